//! Conntrack, end to end: a client, a NAT router with its own conntrack table and a server,
//! each in a private namespace. The router's established timeout is set to a few seconds and it
//! does not pick up mid-stream connections (`nf_conntrack_tcp_loose=0`), so a connection that
//! idles past the timeout is forgotten: its next packet is INVALID, dropped (a black hole) or
//! answered with a reset. h2trace follows the router's table with `--conntrack-netns` and must
//! report the entry's events, join it to the client and the server sockets through the NAT,
//! and say "conntrack forgot a live connection". Root only; serial.
mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const TIMEOUT_S: u64 = 3;

/// The router masquerades towards the server and treats INVALID packets with `invalid`;
/// `extra` adds forward-chain rules.
fn router(tag: &str, subnet: u8, invalid: &str, extra: &str) -> NetPair {
    let net = NetPair::with_router(tag, subnet);
    let r = net.router.clone().unwrap();
    for (k, v) in [
        (
            "net.netfilter.nf_conntrack_tcp_timeout_established",
            TIMEOUT_S.to_string(),
        ),
        ("net.netfilter.nf_conntrack_tcp_loose", "0".to_string()),
    ] {
        NetPair::sysctl(&r, &format!("{k}={v}"));
    }
    net.router_nft(&format!(
        "table ip h2tct {{\n chain postrouting_nat {{\n  type nat hook postrouting priority 100;\n  oifname \"h2rs{subnet}\" masquerade\n }}\n chain forward_filter {{\n  type filter hook forward priority 0;\n  ct state invalid {invalid}\n  {extra}\n }}\n}}\n"
    ));
    net
}

struct Run {
    recs: Vec<Value>,
    client_pid: u32,
    router_netns: u64,
    server_v4: String,
}

/// One connection through the router: a request, `pause_ms` of silence, a second request.
fn run(tag: &str, subnet: u8, invalid: &str, pause_ms: u64, requests: &str) -> Run {
    let server = [
        "--requests",
        "100",
        "--idle-timeout",
        "30000",
        "--then",
        "close",
    ];
    run_with(tag, subnet, (invalid, ""), &server, pause_ms, requests)
}

fn run_with(
    tag: &str,
    subnet: u8,
    (invalid, extra): (&str, &str),
    server_args: &[&str],
    pause_ms: u64,
    requests: &str,
) -> Run {
    let net = router(tag, subnet, invalid, extra);
    let r = net.router.clone().unwrap();
    let addr = format!("{}:8080", net.server_v4);
    let tracer = Tracer::start(tag, &["--conntrack-netns", &r]);
    let server = net.server(&addr, server_args);
    let pause = pause_ms.to_string();
    let mut client = net.spawn_client(
        &addr,
        &[
            "--requests",
            requests,
            "--pause-after-first",
            &pause,
            "--interval",
            "1000",
            "--user-timeout",
            "2000",
            "--then",
            "close",
        ],
    );
    let client_pid = client.0.id();
    wait_timeout(&mut client.0, Duration::from_secs(30)).expect("client timed out");
    let (recs, _dir, path) = tracer.stop_keep();
    drop(server);
    validate_all(&recs);
    assert_replay_identical(&path);
    keep_fixture(&path, tag);
    Run {
        recs,
        client_pid,
        router_netns: NetPair::inode(&r),
        server_v4: net.server_v4.clone(),
    }
}

fn ct_events(run: &Run) -> Vec<&Value> {
    run.recs
        .iter()
        .filter(|r| {
            action(r).starts_with("conntrack-")
                && action(r) != "conntrack-source"
                && r["h2trace"]["netns"] == run.router_netns
                && r["destination"]["port"] == 8080
        })
        .collect()
}

fn ct_state(r: &Value, which: &str) -> String {
    r["h2trace"]["conntrack"]["state"][which]
        .as_str()
        .unwrap_or("-")
        .to_string()
}

/// The connection record (closed or still open at exit) whose local port is `port`.
fn connection(run: &Run, local_port: u64, remote_port: u64) -> &Value {
    run.recs
        .iter()
        .find(|r| {
            matches!(action(r), "connection-closed" | "connection-open")
                && r["source"]["port"] == local_port
                && r["destination"]["port"] == remote_port
        })
        .unwrap_or_else(|| panic!("no connection {local_port} -> {remote_port}"))
}

/// With a kernel-side hook attached (the `started` record names it), state changes carry the
/// kernel's own time: the router sees the handshake's last ACK right after the client's socket
/// became ESTABLISHED. Without one, they come from ctnetlink.
fn state_changes_from_the_kernel_side(run: &Run, established: &Value, client: &Value) {
    let started = run.recs.iter().find(|r| action(r) == "started").unwrap();
    let source = established["h2trace"]["conntrack"]["source"]
        .as_str()
        .unwrap();
    let Some(hook) = started["h2trace"]["probe"]["conntrack_hook"].as_str() else {
        assert_eq!(source, "ctnetlink");
        return;
    };
    assert!(hook.starts_with(source), "hook {hook}, source {source}");
    let conn = &client["h2trace"]["connection"];
    let est = conn["states"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["state"] == "ESTABLISHED")
        .unwrap();
    let socket_est = conn["start_ns"].as_u64().unwrap() + est["offset_ns"].as_u64().unwrap();
    let ct_est = established["h2trace"]["ktime_ns"].as_u64().unwrap();
    // Causality is the point: an exact time is never before the client's (a ctnetlink stamp,
    // the start of a drain interval, usually is). The bound only catches a wrong clock; it is
    // loose for emulated kernels.
    assert!(
        ct_est >= socket_est && ct_est - socket_est < 100_000_000,
        "client ESTABLISHED at {socket_est}, router at {ct_est}"
    );
}

/// Checks shared by both middlebox verdicts; returns the finding.
fn forgotten<'a>(run: &'a Run, afterwards: &str) -> &'a Value {
    let src = run
        .recs
        .iter()
        .find(|r| action(r) == "conntrack-source" && r["h2trace"]["netns"] == run.router_netns)
        .expect("a conntrack-source record for the router");
    let ns = &src["h2trace"]["conntrack_source"];
    assert_eq!(ns["timeout_established_s"], TIMEOUT_S);
    assert_eq!(ns["tcp_loose"], false);

    // The router's view: NEW in SYN_SENT, up to ESTABLISHED, then an expiry in ESTABLISHED.
    let evs = ct_events(run);
    let new = evs
        .iter()
        .find(|r| action(r) == "conntrack-new")
        .expect("conntrack-new");
    assert_eq!(ct_state(new, "new"), "SYN_SENT");
    let c = &new["h2trace"]["conntrack"];
    assert_eq!(c["nat"], true);
    assert_eq!(c["reply"]["src_ip"], run.server_v4.as_str());
    assert_ne!(c["reply"]["dst_ip"], c["orig"]["src_ip"], "masqueraded");
    let client_port = c["orig"]["src_port"].as_u64().unwrap();
    let nat_port = c["reply"]["dst_port"].as_u64().unwrap();
    let established = evs
        .iter()
        .find(|r| action(r) == "conntrack-update" && ct_state(r, "new") == "ESTABLISHED")
        .unwrap_or_else(|| panic!("no update to ESTABLISHED: {evs:#?}"));
    let destroy = evs
        .iter()
        .find(|r| action(r) == "conntrack-destroy")
        .expect("the expired entry is destroyed");
    assert_eq!(destroy["h2trace"]["conntrack"]["expired"], true);
    assert_eq!(ct_state(destroy, "old"), "ESTABLISHED");

    // Joined to both sockets: the client's (before NAT) and the server's (after NAT).
    let client = connection(run, client_port, 8080);
    let server = connection(run, 8080, nat_port);
    state_changes_from_the_kernel_side(run, established, client);
    for conn in [client, server] {
        let j = &conn["h2trace"]["connection"]["conntrack"];
        assert_eq!(j["netns"], run.router_netns, "{conn:#}");
        assert_eq!(j["verdict"]["kind"], "forgot-live-connection", "{conn:#}");
        assert_eq!(j["timeout_established_s"], TIMEOUT_S);
        assert_eq!(j["end"]["expired"], true);
    }

    let f = findings(&run.recs, "conntrack-forgot-connection")
        .into_iter()
        .find(|f| owner_pid(f) == Some(u64::from(run.client_pid)))
        .unwrap_or_else(|| panic!("no conntrack finding for the client: {:#?}", run.recs));
    let n = &f["h2trace"]["finding"]["numbers"];
    assert_eq!(n["timeout_established_s"], TIMEOUT_S);
    assert_eq!(n["conntrack_netns"], run.router_netns);
    let idle = n["idle_gap_ns"].as_u64().unwrap();
    assert!(
        (4_000_000_000..7_000_000_000).contains(&idle),
        "idle gap {idle}"
    );
    assert_eq!(n["afterwards"][afterwards], 1, "{n:#}");
    f
}

#[test]
fn expired_entry_then_invalid_drop_is_a_forgotten_connection() {
    let Some(_lock) = kernel_test() else { return };
    let run = run("ctdrop", 71, "drop", 5000, "2");
    let f = forgotten(&run, "retransmissions");
    assert!(f["message"].as_str().unwrap().contains("forgot"));
}

#[test]
fn expired_entry_then_invalid_reset_is_a_forgotten_connection() {
    let Some(_lock) = kernel_test() else { return };
    let run = run("ctreject", 72, "reject with tcp reset", 5000, "2");
    forgotten(&run, "reset");
}

#[test]
fn traffic_more_frequent_than_the_timeout_has_no_verdict() {
    let Some(_lock) = kernel_test() else { return };
    // Requests every second for five seconds: longer than the timeout, never idle that long.
    let run = run("cthealthy", 73, "drop", 1000, "6");
    let evs = ct_events(&run);
    assert!(
        evs.iter().any(|r| action(r) == "conntrack-new"),
        "the router's entry is reported: {evs:#?}"
    );
    let c = &evs[0]["h2trace"]["conntrack"];
    let port = c["orig"]["src_port"].as_u64().unwrap();
    let j = &connection(&run, port, 8080)["h2trace"]["connection"]["conntrack"];
    assert_eq!(j["netns"], run.router_netns);
    assert!(j["verdict"].is_null(), "{j:#}");
    let states: Vec<&str> = j["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert!(states.contains(&"ESTABLISHED"), "{states:?}");
    for p in [
        "conntrack-forgot-connection",
        "conntrack-closed-early",
        "black-hole",
    ] {
        assert!(findings(&run.recs, p).is_empty(), "unexpected {p}");
    }
}

#[test]
fn entry_closed_under_an_established_socket() {
    let Some(_lock) = kernel_test() else { return };
    // The server aborts after its first answer; the router's table sees the RST (CLOSE), its
    // filter drops it, so the client never learns and stays ESTABLISHED.
    let run = run_with(
        "ctclosed",
        74,
        ("drop", "tcp flags & rst == rst drop"),
        &["--requests", "1", "--then", "rst"],
        2500,
        "2",
    );
    let evs = ct_events(&run);
    let close = evs
        .iter()
        .find(|r| ct_state(r, "new") == "CLOSE")
        .unwrap_or_else(|| panic!("the table never went to CLOSE: {evs:#?}"));
    let port = close["h2trace"]["conntrack"]["orig"]["src_port"]
        .as_u64()
        .unwrap();
    let client = connection(&run, port, 8080);
    let j = &client["h2trace"]["connection"]["conntrack"];
    assert_eq!(j["verdict"]["kind"], "closed-while-established", "{j:#}");
    assert_eq!(j["verdict"]["state"], "CLOSE");
    let f = findings(&run.recs, "conntrack-closed-early")
        .into_iter()
        .find(|f| owner_pid(f) == Some(u64::from(run.client_pid)))
        .unwrap_or_else(|| panic!("no conntrack-closed-early finding: {:#?}", run.recs));
    assert_eq!(
        f["h2trace"]["finding"]["numbers"]["conntrack_state"],
        "CLOSE"
    );
    assert!(findings(&run.recs, "conntrack-forgot-connection").is_empty());
}

#[test]
fn conntrack_overruns_are_counted() {
    let Some(_lock) = kernel_test() else { return };
    let net = router("ctoverrun", 75, "drop", "");
    let r = net.router.clone().unwrap();
    let addr = format!("{}:8080", net.server_v4);
    let tracer = Tracer::start(
        "ctoverrun",
        &[
            "--conntrack-netns",
            &r,
            "--conntrack-buffer",
            "4KiB",
            "--conntrack-probe",
            "netlink",
        ],
    );
    let signal = |s| {
        let pid = nix::unistd::Pid::from_raw(tracer.pid() as i32);
        nix::sys::signal::kill(pid, s).unwrap();
    };
    let _server = net.server(&addr, &["--conns", "300", "--then", "close"]);
    // A stopped agent reads nothing: the kernel drops the conntrack events that do not fit
    // its small buffer and says so (ENOBUFS) at the next read.
    signal(nix::sys::signal::Signal::SIGSTOP);
    net.client(&addr, &["--conns", "300", "--then", "close"]);
    signal(nix::sys::signal::Signal::SIGCONT);
    let recs = tracer.stop();
    validate_all(&recs);
    let overruns = |r: &Value, path: &str| r["h2trace"][path]["conntrack_overruns"].as_u64();
    let summary = recs.iter().find(|r| action(r) == "summary").unwrap();
    let total = summary["h2trace"]["summary"]["losses"]["conntrack_overruns"]
        .as_u64()
        .unwrap();
    assert!(total >= 1, "no overrun counted: {summary:#}");
    assert!(
        recs.iter()
            .any(|r| action(r) == "loss" && overruns(r, "loss") == Some(total)),
        "no loss record with the overruns"
    );
    // What fitted still arrived.
    assert!(recs.iter().any(|r| action(r) == "conntrack-new"));
}
