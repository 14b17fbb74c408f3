//! The diagnosis, end to end in the kernel: each reuse-failure pattern reproduced with real
//! TCP between private namespaces (and nftables in a router namespace for the middlebox
//! cases), the finding and its key numbers asserted, and the recorded stream replayed to the
//! very same output. Root only; serial.
mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// Trace `scenario` with `args`; returns the records after checking the schema and that the
/// replay of the recording is identical.
/// The scenario returns the processes that must outlive the trace (still-open connections).
fn traced(tag: &str, args: &[&str], scenario: impl FnOnce() -> Vec<KillOnDrop>) -> Vec<Value> {
    let tracer = Tracer::start(tag, args);
    let alive = scenario();
    let (recs, _dir, path) = tracer.stop_keep();
    drop(alive);
    validate_all(&recs);
    assert_replay_identical(&path);
    keep_fixture(&path, tag);
    recs
}

fn number(f: &Value, k: &str) -> u64 {
    f["h2trace"]["finding"]["numbers"][k]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {k} in {f:#}"))
}

fn the_finding<'a>(recs: &'a [Value], pattern: &str, pid: u32) -> &'a Value {
    let all = findings(recs, pattern);
    let mine: Vec<_> = all
        .iter()
        .copied()
        .filter(|f| owner_pid(f) == Some(pid as u64))
        .collect();
    assert!(
        !mine.is_empty(),
        "no {pattern} finding for pid {pid}; findings: {:#?}",
        findings_summary(recs)
    );
    let f = mine[0];
    assert_eq!(f["h2trace"]["finding"]["status"], "new");
    assert!(
        f["h2trace"]["finding"]["evidence"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
    );
    assert!(f["h2trace"]["finding"]["confidence"].as_f64().unwrap() > 0.0);
    assert!(!f["message"].as_str().unwrap().is_empty());
    // The evidence names connections of this run.
    let ids: Vec<&str> = recs
        .iter()
        .filter_map(|r| r["h2trace"]["socket"]["id"].as_str())
        .collect();
    for e in f["h2trace"]["finding"]["evidence"].as_array().unwrap() {
        assert!(
            ids.contains(&e.as_str().unwrap()),
            "evidence {e} is not a recorded connection"
        );
    }
    f
}

fn findings_summary(recs: &[Value]) -> Vec<String> {
    recs.iter()
        .filter(|r| action(r) == "finding")
        .map(|r| {
            format!(
                "{} pid={} {}",
                r["h2trace"]["finding"]["pattern"], r["process"]["pid"], r["message"]
            )
        })
        .collect()
}

#[test]
fn healthy_reuse_has_no_finding() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("healthy", 61);
    let addr = format!("{}:8080", net.server_v4);
    let mut client_pid = 0;
    let recs = traced("healthy-reuse", &[], || {
        let server = net.server(
            &addr,
            &[
                "--requests",
                "1000",
                "--idle-timeout",
                "20000",
                "--then",
                "close",
            ],
        );
        // One connection, 40 requests over 2 s, still open when tracing stops.
        let client = net.spawn_client(
            &addr,
            &[
                "--requests",
                "40",
                "--interval",
                "50",
                "--then",
                "hold:3000",
            ],
        );
        client_pid = client.0.id();
        std::thread::sleep(Duration::from_millis(2500));
        vec![server, client]
    });
    assert!(
        recs.iter().all(|r| action(r) != "finding"),
        "{:#?}",
        findings_summary(&recs)
    );
    // The open connection is reported at exit, with its bytes so far.
    let open = in_netns(&recs, &net.client, "connection-open");
    assert_eq!(open.len(), 1);
    assert_eq!(owner_pid(open[0]), Some(client_pid as u64));
    assert_eq!(open[0]["h2trace"]["connection"]["analysis"]["end"], "open");
    assert!(open[0]["source"]["bytes"].as_u64().unwrap() >= 40 * 104);
}

#[test]
fn dial_per_request_and_time_wait_pileup() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("dial", 62);
    let addr = format!("{}:8080", net.server_v4);
    let mut client_pid = 0;
    let recs = traced("dial-per-request", &["--time-wait-pileup", "20"], || {
        let mut server = net.server(&addr, &["--conns", "40", "--then", "wait-peer"]);
        client_pid = net.client(&addr, &["--conns", "40", "--interval", "0"]);
        assert!(
            wait_timeout(&mut server.0, Duration::from_secs(20))
                .unwrap()
                .success()
        );
        vec![]
    });
    let f = the_finding(&recs, "dial-per-request", client_pid);
    assert_eq!(f["destination"]["ip"].as_str().unwrap(), net.server_v4);
    assert_eq!(f["destination"]["port"], 8080);
    assert!(number(f, "connections") >= 10);
    assert!(number(f, "lifetime_p50_ns") < 1_000_000_000);
    assert_eq!(number(f, "bytes_sent_p50"), 104);
    assert_eq!(number(f, "bytes_received_p50"), 100);
    // Emitted once and updated as the evidence doubles, not repeated per connection.
    let all = findings(&recs, "dial-per-request");
    assert!(all.len() <= 3, "{} dial-per-request records", all.len());
    let tw = the_finding(&recs, "time-wait-pileup", client_pid);
    assert!(number(tw, "time_wait") >= 20);
    // The per-peer table at exit.
    let peers: Vec<_> = recs
        .iter()
        .filter(|r| action(r) == "peer-summary" && owner_pid(r) == Some(client_pid as u64))
        .collect();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0]["h2trace"]["peer"]["connections"], 40);
    assert_eq!(peers[0]["h2trace"]["peer"]["closers"]["local"], 40);
}

#[test]
fn fixed_age_rotation() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("age", 63);
    let addr = format!("{}:8080", net.server_v4);
    let mut client_pid = 0;
    let recs = traced("fixed-age-rotation", &[], || {
        // The server closes every connection at 600 ms of age; the client is busy (a request
        // every 50 ms) and reconnects at once.
        let mut server = net.server(
            &addr,
            &[
                "--conns",
                "5",
                "--max-age",
                "600",
                "--requests",
                "1000",
                "--then",
                "close",
            ],
        );
        client_pid = net.client(
            &addr,
            &[
                "--conns",
                "5",
                "--requests",
                "1000",
                "--interval",
                "50",
                "--until-eof",
            ],
        );
        assert!(
            wait_timeout(&mut server.0, Duration::from_secs(20))
                .unwrap()
                .success()
        );
        vec![]
    });
    let f = the_finding(&recs, "fixed-age-rotation", client_pid);
    let age = number(f, "age_p50_ns");
    assert!((500_000_000..800_000_000).contains(&age), "age {age}");
    assert!(
        findings(&recs, "idle-close-by-peer").is_empty(),
        "{:#?}",
        findings_summary(&recs)
    );
    assert!(findings(&recs, "dial-per-request").is_empty());
}

#[test]
fn idle_close_by_peer() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("idle", 64);
    let addr = format!("{}:8080", net.server_v4);
    let mut client_pid = 0;
    let recs = traced("idle-close-by-peer", &[], || {
        // The server drops connections idle for 400 ms; the client pauses 1.2 s between
        // requests, so it finds each connection closed.
        let mut server = net.server(
            &addr,
            &[
                "--conns",
                "3",
                "--idle-timeout",
                "400",
                "--requests",
                "1000",
                "--then",
                "close",
            ],
        );
        client_pid = net.client(
            &addr,
            &[
                "--conns",
                "3",
                "--requests",
                "2",
                "--pause-after-first",
                "1200",
            ],
        );
        assert!(
            wait_timeout(&mut server.0, Duration::from_secs(20))
                .unwrap()
                .success()
        );
        vec![]
    });
    let f = the_finding(&recs, "idle-close-by-peer", client_pid);
    let idle = number(f, "idle_before_close_p50_ns");
    assert!((350_000_000..600_000_000).contains(&idle), "idle {idle}");
    let cw = number(f, "close_wait_p50_ns");
    assert!(
        (600_000_000..1_200_000_000).contains(&cw),
        "CLOSE_WAIT {cw}"
    );
    // The client's write after the peer's close is answered by a RST: not a middlebox reset.
    assert!(
        findings(&recs, "reset-after-idle").is_empty(),
        "{:#?}",
        findings_summary(&recs)
    );
}

#[test]
fn close_wait_stuck() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("cwstuck", 65);
    let addr = format!("{}:8080", net.server_v4);
    let mut client_pid = 0;
    let recs = traced("close-wait-stuck", &["--close-wait-stuck", "1s"], || {
        let server = net.server(&addr, &["--then", "close"]);
        // The client never notices the server's close while h2trace runs.
        let client = net.spawn_client(&addr, &["--then", "hold:30000"]);
        client_pid = client.0.id();
        // Stuck for over 2 s (and past the 1 s threshold) when tracing stops, however long
        // the client took to start.
        NetPair::wait_sockets(&net.client, "close-wait", 1);
        std::thread::sleep(Duration::from_millis(2500));
        vec![server, client]
    });
    let f = the_finding(&recs, "close-wait-stuck", client_pid);
    // Named, although no connection of the client has closed yet.
    let name = f["process"]["name"].as_str().unwrap_or_default();
    assert!(name.starts_with("tcp_peer"), "{f:#}");
    let peer = recs
        .iter()
        .find(|r| action(r) == "peer-summary" && owner_pid(r) == Some(client_pid as u64))
        .expect("a per-peer summary for the client");
    assert_eq!(peer["h2trace"]["peer"]["close_wait_open"], 1);
    assert!(
        peer["h2trace"]["peer"]["close_wait_max_ns"]
            .as_u64()
            .unwrap()
            >= 2_000_000_000
    );
    assert_eq!(number(f, "connections"), 1);
    assert!(number(f, "close_wait_longest_ns") >= 1_000_000_000);
    // Found while it was happening (a tick record carried the time), not only at exit.
    let summary_at = recs.last().unwrap()["h2trace"]["ktime_ns"]
        .as_u64()
        .unwrap();
    assert!(f["h2trace"]["ktime_ns"].as_u64().unwrap() < summary_at - 500_000_000);
}

#[test]
fn handshake_failure_loop() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("hs", 66);
    let addr = format!("{}:8443", net.server_v4);
    let mut client_pid = 0;
    let recs = traced("handshake-failure-loop", &[], || {
        let mut server = net.server(&addr, &["--conns", "5", "--then", "reject"]);
        // Retries after 150, 300, 600, 1200 ms: backoff. Five attempts and gaps well above a
        // connection's own time, so that the trend still shows under emulation (QEMU) when an
        // attempt takes longer than the 100 ms that counts as a failed handshake.
        client_pid = net.client(
            &addr,
            &[
                "--conns",
                "5",
                "--send",
                "300",
                "--reply",
                "0",
                "--until-eof",
                "--gap",
                "150",
                "--gap-growth",
                "2",
            ],
        );
        assert!(
            wait_timeout(&mut server.0, Duration::from_secs(20))
                .unwrap()
                .success()
        );
        vec![]
    });
    let f = the_finding(&recs, "handshake-failure-loop", client_pid);
    assert!(number(f, "connections") >= 3);
    // With the fourth attempt at the latest, the backoff shows.
    let growing = findings(&recs, "handshake-failure-loop")
        .iter()
        .filter_map(|f| f["h2trace"]["finding"]["numbers"]["growing_gaps_share"].as_f64())
        .fold(0.0, f64::max);
    let lifetimes: Vec<u64> = recs
        .iter()
        .filter(|r| action(r) == "connection-closed" && owner_pid(r) == Some(client_pid as u64))
        .filter_map(|r| r["h2trace"]["connection"]["analysis"]["lifetime_ns"].as_u64())
        .collect();
    assert!(
        growing >= 0.5,
        "growing gaps share {growing}; client lifetimes {lifetimes:?}; {:#?}",
        findings(&recs, "handshake-failure-loop")
    );
}

/// A server that keeps what its client closed (CLOSE_WAIT), and a client that connects from
/// the same port each time. The client's namespace keeps no TIME_WAIT sockets, as when its
/// table is full under churn, so nothing there remembers the old connection: each new SYN
/// meets the server's, is answered for it, and goes again after the client resets that.
#[test]
fn port_reuse_collision() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("portreuse", 77);
    NetPair::sysctl(&net.client, "net.ipv4.tcp_max_tw_buckets=0");
    let addr = format!("{}:8080", net.server_v4);
    let from = format!("{}:40100", net.client_v4);
    let mut client_pid = 0;
    let recs = traced("port-reuse-collision", &[], || {
        // One connection at a time: each waits in CLOSE_WAIT for a second after the client's
        // FIN, and the client comes back from the same port 200 ms after it.
        let server = net.server(&addr, &["--conns", "4", "--then", "hold:1000"]);
        client_pid = net.client(&addr, &["--conns", "4", "--bind", &from, "--gap", "200"]);
        vec![server]
    });
    let f = the_finding(&recs, "port-reuse-collision", client_pid);
    assert_eq!(number(f, "connections"), 3, "{f:#}");
    // The client's records: the first connection clean, each later one with the handshake's
    // reset, and all of them ended with a FIN.
    let mine: Vec<&Value> = recs
        .iter()
        .filter(|r| action(r) == "connection-closed" && owner_pid(r) == Some(client_pid as u64))
        .collect();
    let analysis = |r: &Value| {
        let a = &r["h2trace"]["connection"]["analysis"];
        (
            a["end"].as_str().map(String::from),
            a["handshake_reset"] == true,
        )
    };
    let seen: Vec<_> = mine.iter().map(|r| analysis(r)).collect();
    let fin = Some("fin".to_string());
    assert_eq!(
        seen,
        [
            (fin.clone(), false),
            (fin.clone(), true),
            (fin.clone(), true),
            (fin, true)
        ],
        "{mine:#?}"
    );
    assert!(mine.iter().all(|r| r["source"]["port"] == 40100));
}

/// A connection through the router goes idle; then the router starts `verdict`ing its packets.
fn middlebox(tag: &str, subnet: u8, verdict: &str) -> (Vec<Value>, u32) {
    let net = NetPair::with_router(tag, subnet);
    let addr = format!("{}:8080", net.server_v4);
    let mut client_pid = 0;
    let recs = traced(tag, &[], || {
        let server = net.server(
            &addr,
            &[
                "--requests",
                "1000",
                "--idle-timeout",
                "20000",
                "--then",
                "close",
            ],
        );
        let mut client = net.spawn_client(
            &addr,
            &[
                "--requests",
                "2",
                "--pause-after-first",
                "1500",
                "--user-timeout",
                "2000",
                "--then",
                "close",
            ],
        );
        client_pid = client.0.id();
        // The path dies during the pause, after the first exchange however slow the machine,
        // and after its last (delayed) ACK.
        NetPair::wait_paused(&mut client);
        std::thread::sleep(Duration::from_millis(300));
        net.router_block(8080, verdict);
        wait_timeout(&mut client.0, Duration::from_secs(20)).expect("client timed out");
        vec![server]
    });
    (recs, client_pid)
}

#[test]
fn black_hole_after_idle() {
    let Some(_lock) = kernel_test() else { return };
    let (recs, client_pid) = middlebox("blackhole", 67, "drop");
    let f = the_finding(&recs, "black-hole", client_pid);
    let gap = number(f, "idle_gap_ns");
    assert!(
        (1_300_000_000..2_500_000_000).contains(&gap),
        "idle gap {gap}"
    );
    assert!(number(f, "retransmits") >= 2);
    assert_eq!(f["h2trace"]["finding"]["numbers"]["ended"], "timeout");
}

#[test]
fn reset_after_idle() {
    let Some(_lock) = kernel_test() else { return };
    let (recs, client_pid) = middlebox("forgedrst", 68, "reject with tcp reset");
    let f = the_finding(&recs, "reset-after-idle", client_pid);
    let gap = number(f, "idle_gap_ns");
    assert!(
        (1_300_000_000..2_500_000_000).contains(&gap),
        "idle gap {gap}"
    );
    assert!(findings(&recs, "black-hole").is_empty());
}

#[test]
fn proxy_upstream_churn() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("proxy", 69);
    let upstream = format!("{}:8080", net.server_v4);
    let front = format!("{}:9090", net.server_v4);
    let mut proxy_pid = 0;
    let recs = traced("proxy-upstream-churn", &[], || {
        let mut server = net.server(&upstream, &["--conns", "30", "--then", "wait-peer"]);
        let mut proxy = net.listener(
            &net.server,
            &[
                "proxy",
                &front,
                &upstream,
                "--requests",
                "30",
                "--reply",
                "100",
            ],
        );
        proxy_pid = proxy.0.id();
        // One long-lived client connection carrying 30 requests.
        net.client(
            &front,
            &["--requests", "30", "--interval", "20", "--then", "close"],
        );
        assert!(
            wait_timeout(&mut proxy.0, Duration::from_secs(20))
                .unwrap()
                .success()
        );
        assert!(
            wait_timeout(&mut server.0, Duration::from_secs(20))
                .unwrap()
                .success()
        );
        vec![]
    });
    let f = the_finding(&recs, "proxy-upstream-churn", proxy_pid);
    // Written when the client's connection ends, which races the end of the last upstream
    // connection (the proxy closes both at once): 29 or 30 of them are in by then.
    assert!((29..=30).contains(&number(f, "connections")), "{f:#}");
    assert_eq!(number(f, "downstream_connections"), 1);
    assert!(the_finding(&recs, "dial-per-request", proxy_pid)["destination"]["port"] == 8080);
}

#[test]
fn rst_storm() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("rst", 70);
    let addr = format!("{}:8080", net.server_v4);
    let mut client_pid = 0;
    let recs = traced("rst-storm", &["--rst-storm", "20"], || {
        let mut server = net.server(&addr, &["--conns", "30", "--then", "wait-peer"]);
        client_pid = net.client(&addr, &["--conns", "30", "--then", "rst"]);
        assert!(
            wait_timeout(&mut server.0, Duration::from_secs(20))
                .unwrap()
                .success()
        );
        vec![]
    });
    let f = the_finding(&recs, "rst-storm", client_pid);
    assert!(number(f, "resets") >= 20);
}
