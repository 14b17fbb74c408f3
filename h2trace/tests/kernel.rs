//! Kernel integration tests: load the real programs, drive real TCP between two private
//! network namespaces, assert on what h2trace reports. Root only; serial.
mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

const SEND: usize = 100;
const REPLY: usize = 300;
/// The client's request carries a 4-byte length prefix.
const SENT_BY_CLIENT: u64 = SEND as u64 + 4;

struct Run {
    recs: Vec<Value>,
    client_pid: u32,
    server_pid: u32,
    net: NetPair,
}

/// One exchange: the server replies and ends with `server_close`; the client reads the reply
/// and ends with `client_close`. Traced with `args`.
fn exchange(
    tag: &str,
    subnet: u8,
    v6: bool,
    server_close: &str,
    client_close: &str,
    args: &[&str],
) -> Run {
    let net = NetPair::new(tag, subnet);
    let tracer = Tracer::start(tag, args);
    let ip = if v6 {
        format!("[{}]:8080", net.server_v6)
    } else {
        format!("{}:8080", net.server_v4)
    };
    let (send, reply) = (SEND.to_string(), REPLY.to_string());
    let mut server = net.server(&ip, &["--reply", &reply, "--then", server_close]);
    let server_pid = server.0.id();
    let client_pid = net.client(
        &ip,
        &["--send", &send, "--reply", &reply, "--then", client_close],
    );
    let st =
        wait_timeout(&mut server.0, std::time::Duration::from_secs(20)).expect("server timed out");
    assert!(st.success(), "server failed: {st}");
    let recs = tracer.stop();
    Run {
        recs,
        client_pid,
        server_pid,
        net,
    }
}

impl Run {
    fn one(&self, ns: &str, act: &str) -> &Value {
        let v = in_netns(&self.recs, ns, act);
        assert_eq!(
            v.len(),
            1,
            "expected one {act} in {ns}, got {}: {v:#?}",
            v.len()
        );
        v[0]
    }
    fn client_life(&self) -> &Value {
        self.one(&self.net.client, "connection-closed")
    }
    fn server_life(&self) -> &Value {
        self.one(&self.net.server, "connection-closed")
    }
}

fn assert_owned(life: &Value, pid: u32, role: &str) {
    assert_eq!(
        owner_pid(life),
        Some(pid as u64),
        "owner of {role} socket: {life:#}"
    );
    assert_eq!(life["h2trace"]["socket"]["role"], role);
    assert!(
        life["process"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("tcp_peer")),
        "{life:#}"
    );
}

/// The states of an accepted socket whose client closed first.
const SERVER_CLOSED_BY_PEER: [&str; 6] = [
    "LISTEN",
    "SYN_RECV",
    "ESTABLISHED",
    "CLOSE_WAIT",
    "LAST_ACK",
    "CLOSE",
];

fn graceful(transport: &str, subnet: u8, v6: bool) {
    let Some(_lock) = kernel_test() else { return };
    let tag = format!("fin-{transport}{}", if v6 { "6" } else { "" });
    let r = exchange(
        &tag,
        subnet,
        v6,
        "wait-peer",
        "close",
        &["--events", "all", "--transport", transport],
    );
    let (c, s) = (r.client_life(), r.server_life());
    let client_states = [
        "CLOSE",
        "SYN_SENT",
        "ESTABLISHED",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "CLOSE",
    ];
    assert_eq!(states(c), client_states);
    assert_eq!(states(s), SERVER_CLOSED_BY_PEER);
    assert_eq!(c["h2trace"]["connection"]["fin_first"], "local");
    assert_eq!(s["h2trace"]["connection"]["fin_first"], "peer");
    // The same sequences from the live transitions of --events all.
    assert_eq!(
        live_states(&r.recs, c["h2trace"]["socket"]["id"].as_str().unwrap()),
        client_states
    );
    assert_eq!(
        live_states(&r.recs, s["h2trace"]["socket"]["id"].as_str().unwrap()),
        SERVER_CLOSED_BY_PEER
    );
    // Bytes, both sides, and the server socket owned by the server, not the softirq's task.
    assert_eq!(c["source"]["bytes"], SENT_BY_CLIENT);
    assert_eq!(c["destination"]["bytes"], REPLY as u64);
    assert_eq!(s["source"]["bytes"], REPLY as u64);
    assert_eq!(s["destination"]["bytes"], SENT_BY_CLIENT);
    assert_owned(c, r.client_pid, "client");
    assert_owned(s, r.server_pid, "server");
    assert_eq!(c["network"]["community_id"], s["network"]["community_id"]);
    // Each live state change of the flow names it by the same Community ID, except the one
    // the kernel makes before it has the whole tuple: the client's SYN_SENT, before connect()
    // picks the local port. No flow yet, so no ID. The accepted socket's SYN_RECV is whole on
    // every kernel: 6.1 and 6.12 fill in its peer after the step, so it is written later.
    let flow = &c["network"]["community_id"];
    assert!(flow.is_string(), "{c:#}");
    let mut incomplete = Vec::new();
    for life in [c, s] {
        let id = life["h2trace"]["socket"]["id"].as_str().unwrap();
        for r in r
            .recs
            .iter()
            .filter(|r| action(r) == "state-change" && r["h2trace"]["socket"]["id"] == id)
        {
            let complete = r["source"]["port"] != 0 && r["destination"]["port"] != 0;
            let want = if complete { flow } else { &Value::Null };
            assert_eq!(&r["network"]["community_id"], want, "{r:#}");
            if !complete {
                let st = &r["h2trace"]["state"];
                incomplete.push((st["old"].as_str(), st["new"].as_str()));
            }
        }
    }
    assert_eq!(
        incomplete,
        [(Some("CLOSE"), Some("SYN_SENT"))],
        "only the client's SYN_SENT, before its port was picked"
    );
    assert_eq!(c["network"]["type"], if v6 { "ipv6" } else { "ipv4" });
    let server_ip = if v6 {
        &r.net.server_v6
    } else {
        &r.net.server_v4
    };
    assert_eq!(c["destination"]["ip"].as_str().unwrap(), server_ip);
    assert_eq!(c["destination"]["port"], 8080);
    assert_eq!(s["source"]["port"], 8080);
    for l in [c, s] {
        assert_eq!(l["h2trace"]["connection"]["resets_sent"], 0);
        assert_eq!(l["h2trace"]["connection"]["resets_received"], 0);
    }
    // The peer's FIN put the server in CLOSE_WAIT: that is always a live event.
    let cw = in_netns(&r.recs, &r.net.server, "state-change");
    assert!(
        cw.iter()
            .any(|e| e["h2trace"]["state"]["new"] == "CLOSE_WAIT")
    );
    // Every record is shaped as the schema says.
    validate_all(&r.recs);
}

#[test]
fn graceful_close_ringbuf() {
    graceful("ringbuf", 11, false);
}

#[test]
fn graceful_close_perf() {
    graceful("perf", 12, false);
}

#[test]
fn graceful_close_ipv6_ringbuf() {
    graceful("ringbuf", 13, true);
}

#[test]
fn graceful_close_ipv6_perf() {
    graceful("perf", 14, true);
}

/// A client that calls shutdown(SHUT_WR) and then close(): the close sets its FIN_WAIT state a
/// second time, which the kernel reports like any change and the record keeps (docs/ndjson.md
/// says what a repeated state means). The server holds its close long enough for the client's
/// close to come before the server's FIN.
#[test]
fn close_after_shutdown_repeats_the_fin_wait_state() {
    let Some(_lock) = kernel_test() else { return };
    let r = exchange("shut", 15, false, "hold:300", "shutdown", &[]);
    let (c, s) = (r.client_life(), r.server_life());
    let st = states(c);
    // The peer's ACK of the FIN may come before shutdown() returns: FIN_WAIT1 or FIN_WAIT2.
    let repeated: Vec<&str> = st
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0].as_str())
        .collect();
    assert!(
        repeated == ["FIN_WAIT1"] || repeated == ["FIN_WAIT2"],
        "client states {st:?}"
    );
    assert_eq!(st[..3], ["CLOSE", "SYN_SENT", "ESTABLISHED"], "{st:?}");
    assert_eq!(st.last().map(String::as_str), Some("CLOSE"), "{st:?}");
    assert_eq!(c["h2trace"]["connection"]["fin_first"], "local");
    assert_eq!(states(s), SERVER_CLOSED_BY_PEER);
    assert_eq!(s["h2trace"]["connection"]["fin_first"], "peer");
}

/// `hold`: `--live-hold`. With the default, the resets' live events are folded into the
/// lives (the sockets end microseconds later); with 0 they are written as they happen; with
/// 1 ns the agent's hold runs out before either record comes, so only the kernel folds: the
/// client's RST, sent from CLOSE by the abortive close itself (`flags::FOLD_CLOSED_RESETS`).
fn abortive(transport: &str, subnet: u8, hold: &str) {
    let Some(_lock) = kernel_test() else { return };
    let r = exchange(
        &format!(
            "rst-{transport}-{}",
            match hold {
                "0" => "live",
                "1ns" => "kernel-folded",
                _ => "held",
            }
        ),
        subnet,
        false,
        "wait-peer",
        "rst",
        &["--transport", transport, "--live-hold", hold],
    );
    let (c, s) = (r.client_life(), r.server_life());
    assert_eq!(states(c), ["CLOSE", "SYN_SENT", "ESTABLISHED", "CLOSE"]);
    assert_eq!(states(s), ["LISTEN", "SYN_RECV", "ESTABLISHED", "CLOSE"]);
    let (cc, sc) = (&c["h2trace"]["connection"], &s["h2trace"]["connection"]);
    // The client aborted (SO_LINGER 0): it sent the RST, the server received it.
    assert_eq!(cc["resets_sent"], 1);
    assert_eq!(cc["resets_received"], 0);
    if tracepoint_has("tcp/tcp_send_reset", "reason") {
        assert!(
            cc["reset_sent_reason"]
                .as_str()
                .is_some_and(|r| r.contains("ABORT") || r == "TCP_STATE"),
            "{cc:#}"
        );
    } else {
        assert!(cc["reset_sent_reason"].is_null(), "{cc:#}");
    }
    assert_eq!(sc["resets_received"], 1);
    assert_eq!(sc["resets_sent"], 0);
    assert_eq!(sc["reset_received_state"], "ESTABLISHED");
    // Resets are live events even without --events all, and no transitions are.
    let sent = in_netns(&r.recs, &r.net.client, "reset-sent");
    let received = in_netns(&r.recs, &r.net.server, "reset-received");
    if hold == "0" {
        assert_eq!((sent.len(), received.len()), (1, 1));
        assert_eq!(sent[0]["h2trace"]["reset"]["direction"], "sent");
        assert!(cc["folded"].is_null() && sc["folded"].is_null());
    } else if hold == "1ns" {
        assert_eq!((sent.len(), received.len()), (0, 1));
        assert_eq!(cc["folded"], serde_json::json!({"resets_sent": 1}));
        assert!(sc["folded"].is_null(), "{sc:#}");
    } else {
        // Each socket ended right after its reset: its record stands for the event.
        assert_eq!((sent.len(), received.len()), (0, 0));
        assert_eq!(cc["folded"], serde_json::json!({"resets_sent": 1}));
        assert_eq!(sc["folded"], serde_json::json!({"resets_received": 1}));
    }
    // Counted the same either way.
    let summary = &r.recs.last().unwrap()["h2trace"]["summary"];
    assert!(summary["resets_sent"].as_u64() >= Some(1), "{summary:#}");
    assert!(
        summary["resets_received"].as_u64() >= Some(1),
        "{summary:#}"
    );
    assert!(in_netns(&r.recs, &r.net.client, "state-change").is_empty());
    assert_owned(c, r.client_pid, "client");
    assert_owned(s, r.server_pid, "server");
    validate_all(&r.recs);
}

#[test]
fn abortive_close_ringbuf() {
    abortive("ringbuf", 21, "250ms");
}

#[test]
fn abortive_close_perf() {
    abortive("perf", 22, "250ms");
}

#[test]
fn abortive_close_resets_written_live_without_hold() {
    abortive("ringbuf", 23, "0");
}

#[test]
fn abortive_close_reset_from_close_folded_by_the_kernel() {
    abortive("ringbuf", 24, "1ns");
}

fn close_wait(transport: &str, subnet: u8) {
    let Some(_lock) = kernel_test() else { return };
    // The server closes right after replying; the client waits 300 ms before closing, so it
    // sits in CLOSE_WAIT meanwhile.
    let r = exchange(
        &format!("cw-{transport}"),
        subnet,
        false,
        "close",
        "hold:300",
        &["--transport", transport],
    );
    let (c, s) = (r.client_life(), r.server_life());
    assert_eq!(
        states(c),
        [
            "CLOSE",
            "SYN_SENT",
            "ESTABLISHED",
            "CLOSE_WAIT",
            "LAST_ACK",
            "CLOSE"
        ]
    );
    assert_eq!(
        states(s),
        [
            "LISTEN",
            "SYN_RECV",
            "ESTABLISHED",
            "FIN_WAIT1",
            "FIN_WAIT2",
            "CLOSE"
        ]
    );
    assert_eq!(c["h2trace"]["connection"]["fin_first"], "peer");
    assert_eq!(s["h2trace"]["connection"]["fin_first"], "local");
    let cw = in_netns(&r.recs, &r.net.client, "state-change");
    assert_eq!(
        cw.len(),
        1,
        "CLOSE_WAIT is the one live transition by default: {cw:#?}"
    );
    assert_eq!(cw[0]["h2trace"]["state"]["new"], "CLOSE_WAIT");
    assert_eq!(owner_pid(cw[0]), Some(r.client_pid as u64));
    // Time in CLOSE_WAIT: from entering it to LAST_ACK, at least the 300 ms hold.
    let st = c["h2trace"]["connection"]["states"].as_array().unwrap();
    let dwell = st[3]["offset_ns"].as_u64().unwrap() - st[2]["offset_ns"].as_u64().unwrap();
    assert!(dwell >= 290_000_000, "CLOSE_WAIT lasted {dwell} ns");
    assert_owned(c, r.client_pid, "client");
    assert_owned(s, r.server_pid, "server");
}

#[test]
fn peer_close_leaves_close_wait_ringbuf() {
    close_wait("ringbuf", 31);
}

#[test]
fn peer_close_leaves_close_wait_perf() {
    close_wait("perf", 32);
}

fn pid_filter(transport: &str, subnet: u8) {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new(&format!("pid-{transport}"), subnet);
    let addr = format!("{}:8080", net.server_v4);
    // The server must exist before h2trace starts to name it with --pid.
    let reply = REPLY.to_string();
    let mut server = net.server(
        &addr,
        &["--conns", "3", "--reply", &reply, "--then", "wait-peer"],
    );
    let server_pid = server.0.id();
    let tracer = Tracer::start(
        &format!("pid-{transport}"),
        &[
            "--pid",
            &server_pid.to_string(),
            "--events",
            "all",
            "--transport",
            transport,
        ],
    );
    let client_pid = net.client(
        &addr,
        &[
            "--conns",
            "3",
            "--send",
            &SEND.to_string(),
            "--reply",
            &reply,
        ],
    );
    assert!(
        wait_timeout(&mut server.0, std::time::Duration::from_secs(20))
            .unwrap()
            .success()
    );
    // The server has exited and its sockets have closed: h2trace ends the run by itself.
    let (recs, _dir, _) = tracer.ended();
    let exits: Vec<_> = recs
        .iter()
        .filter(|r| action(r) == "process-exited")
        .collect();
    assert_eq!(exits.len(), 1, "{exits:?}");
    assert_eq!(exits[0]["h2trace"]["exit"]["pid"], server_pid);
    let sockets: Vec<_> = recs
        .iter()
        .filter(|r| r["h2trace"]["socket"].is_object())
        .collect();
    assert!(!sockets.is_empty());
    // Exactly the server's sockets: every record is the server's, none is the client's or
    // anyone else's on the host.
    for r in &sockets {
        assert_eq!(owner_pid(r), Some(server_pid as u64), "{r:#}");
    }
    let lives: Vec<_> = sockets
        .iter()
        .filter(|r| action(r) == "connection-closed")
        .collect();
    assert_eq!(lives.len(), 3);
    // Including the transitions that ran in softirq before the server touched the socket.
    for l in lives {
        let id = l["h2trace"]["socket"]["id"].as_str().unwrap();
        assert_eq!(live_states(&recs, id), SERVER_CLOSED_BY_PEER);
    }
    assert!(recs.iter().all(|r| owner_pid(r) != Some(client_pid as u64)));
}

/// A traced process exits while one of its sockets is still closing: the socket is followed
/// to its end, the exit is said in between, and then h2trace ends the run by itself.
#[test]
fn a_traced_process_that_exits_keeps_its_sockets_to_their_end() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("pid-exit", 43);
    // Above the TIME_WAIT length, an orphaned FIN_WAIT2 socket stays a full socket for the
    // difference (5 s) instead of turning into a timewait entry at once (tcp_rcv_state_process).
    NetPair::sysctl(&net.server, "net.ipv4.tcp_fin_timeout=65");
    let addr = format!("{}:8080", net.server_v4);
    let reply = REPLY.to_string();
    // The server answers once, closes first and exits; the client holds its end for 3 s.
    let mut server = net.server(
        &addr,
        &["--conns", "1", "--reply", &reply, "--then", "close"],
    );
    let server_pid = server.0.id();
    let tracer = Tracer::start("pid-exit", &["--pid", &server_pid.to_string()]);
    let mut client = net.spawn_client(
        &addr,
        &[
            "--send",
            &SEND.to_string(),
            "--reply",
            &reply,
            "--then",
            "hold:3000",
        ],
    );
    assert!(
        wait_timeout(&mut server.0, std::time::Duration::from_secs(20))
            .unwrap()
            .success()
    );
    let (recs, _dir, path) = tracer.ended();
    assert!(
        wait_timeout(&mut client.0, std::time::Duration::from_secs(20))
            .unwrap()
            .success()
    );
    validate_all(&recs);
    assert_replay_identical(&path);
    keep_fixture(&path, "pid-exit");
    let at = |act: &str| recs.iter().position(|r| action(r) == act);
    let exit = at("process-exited").expect("no process-exited record");
    assert_eq!(recs[exit]["h2trace"]["exit"]["pid"], server_pid);
    assert_eq!(
        recs[exit]["h2trace"]["exit"]["open_sockets"], 1,
        "{:#}",
        recs[exit]
    );
    // The connection's server end: closed after the exit was said, and recorded after it.
    let life = recs
        .iter()
        .position(|r| action(r) == "connection-closed" && r["source"]["port"] == 8080)
        .expect("the server's connection was not followed to its end");
    assert!(life > exit);
    let l = &recs[life];
    assert_eq!(owner_pid(l), Some(u64::from(server_pid)));
    assert!(
        states(l).contains(&"FIN_WAIT2".to_string()),
        "{:?}",
        states(l)
    );
    assert!(
        l["h2trace"]["connection"]["closed_ns"].as_u64()
            > recs[exit]["h2trace"]["ktime_ns"].as_u64()
    );
    assert_eq!(action(recs.last().unwrap()), "summary");
}

#[test]
fn pid_keeps_exactly_one_process_ringbuf() {
    pid_filter("ringbuf", 41);
}

#[test]
fn pid_keeps_exactly_one_process_perf() {
    pid_filter("perf", 42);
}

// ---- HTTP/2 (h2c): frames walked from the syscall buffers ------------------------------

/// Run the `h2c_peer` pair under the tracer; returns the records and the namespaces.
fn h2c(tag: &str, subnet: u8, args: &[&str], peer_args: &[&str]) -> (Vec<Value>, NetPair) {
    let net = NetPair::new(tag, subnet);
    let tracer = Tracer::start(tag, args);
    let addr = format!("{}:8080", net.server_v4);
    let bin = example_bin("h2c_peer");
    let run = |ns: &str, mode: &str| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(&bin)
            .args([mode, &addr])
            .args(peer_args);
        c
    };
    let mut server = run(&net.server, "server")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let mut server = KillOnDrop(server);
    assert_eq!(line.trim(), "ready");
    let mut client = KillOnDrop(run(&net.client, "client").spawn().unwrap());
    for (who, c) in [("client", &mut client), ("server", &mut server)] {
        let st = wait_timeout(&mut c.0, std::time::Duration::from_secs(60)).expect("timed out");
        assert!(st.success(), "h2c_peer {who}: {st}");
    }
    (tracer.stop(), net)
}

/// The `http2-frame` records of one namespace, as (direction, type, stream, frame).
fn h2_frames<'a>(recs: &'a [Value], ns: &str) -> Vec<(&'a str, &'a str, u64, &'a Value)> {
    in_netns(recs, ns, "http2-frame")
        .into_iter()
        .map(|r| {
            let f = &r["h2trace"]["http2_frame"];
            (
                f["direction"].as_str().unwrap(),
                f["type"].as_str().unwrap(),
                f["stream_id"].as_u64().unwrap(),
                f,
            )
        })
        .collect()
}

/// `read_first`: the client reads the server's SETTINGS before it writes its preface.
fn h2c_frames(transport: &str, subnet: u8, read_first: bool) {
    let Some(_lock) = kernel_test() else { return };
    const REQUESTS: u64 = 4;
    let requests = REQUESTS.to_string();
    let mut peer = vec!["--requests", &requests, "--data", "40000"];
    if read_first {
        peer.push("--read-first");
    }
    let (recs, net) = h2c(
        &format!("h2c-{transport}{}", if read_first { "-rf" } else { "" }),
        subnet,
        &["--transport", transport],
        &peer,
    );
    for (ns, side, sent, received) in [
        (&net.client, "client", "sent", "received"),
        (&net.server, "server", "received", "sent"),
    ] {
        let frames = h2_frames(&recs, ns);
        let of = |dir: &str, ty: &str| -> Vec<_> {
            frames
                .iter()
                .filter(|(d, t, _, _)| *d == dir && *t == ty)
                .collect()
        };
        assert!(
            frames.iter().all(|(_, _, _, f)| f["side"] == side),
            "{side}: {frames:#?}"
        );
        // The server's SETTINGS went out before the preface came in: held, then reported
        // once (at the client too when it read them before writing its preface).
        let settings: Vec<_> = of(received, "SETTINGS")
            .into_iter()
            .filter(|(_, _, _, f)| f["ack"] == false)
            .collect();
        assert_eq!(settings.len(), 1, "{side}: {frames:#?}");
        assert_eq!(settings[0].3["settings"]["MAX_CONCURRENT_STREAMS"], 33);
        let client_settings = of(sent, "SETTINGS");
        assert_eq!(
            client_settings[0].3["settings"]["INITIAL_WINDOW_SIZE"], 65536,
            "{side}: {frames:#?}"
        );
        // One PING per request, each acked, header split over two iovecs.
        let pings: Vec<_> = of(sent, "PING")
            .into_iter()
            .filter(|(_, _, _, f)| f["ack"] == false)
            .collect();
        assert_eq!(pings.len() as u64, REQUESTS, "{side}: {frames:#?}");
        let acks = of(received, "PING");
        assert!(acks.iter().all(|(_, _, _, f)| f["ack"] == true));
        assert_eq!(acks.len() as u64, REQUESTS);
        assert_eq!(
            pings.last().unwrap().3["opaque"],
            format!("{:016x}", REQUESTS - 1)
        );
        let rst = of(sent, "RST_STREAM");
        assert_eq!(rst.len(), 1, "{side}: {frames:#?}");
        assert_eq!(
            (rst[0].2, rst[0].3["error"].as_str()),
            (1001, Some("CANCEL"))
        );
        let goaway = of(received, "GOAWAY");
        assert_eq!(goaway.len(), 1, "{side}: {frames:#?}");
        let g = goaway[0].3;
        assert_eq!(g["last_stream_id"], 2 * REQUESTS - 1);
        assert_eq!(
            (g["error"].as_str(), g["debug"].as_str()),
            (Some("NO_ERROR"), Some("bye"))
        );
        // The connection record: every stream counted, no frame boundary lost, through 40 kB
        // DATA frames written in 777-byte pieces and read 7 bytes at a time.
        let lives = in_netns(&recs, ns, "connection-closed");
        assert_eq!(lives.len(), 1, "{side}");
        let h = &lives[0]["h2trace"]["connection"]["http2"];
        assert_eq!(h["side"], side, "{h:#}");
        assert_eq!(h["requests"], REQUESTS, "{h:#}");
        assert!(h.get("desync").is_none(), "{h:#}");
        assert_eq!(
            h["received"]["goaway"]["debug"]
                .as_str()
                .or(h["sent"]["goaway"]["debug"].as_str()),
            Some("bye")
        );
    }
}

#[test]
fn h2c_frames_and_streams_ringbuf() {
    h2c_frames("ringbuf", 51, false);
}

#[test]
fn h2c_frames_and_streams_perf() {
    h2c_frames("perf", 52, false);
}

#[test]
fn h2c_client_that_reads_the_server_settings_before_its_preface() {
    h2c_frames("ringbuf", 55, true);
}

/// A server whose first bytes look like SETTINGS, to a client that never sends the preface,
/// is not HTTP/2; and `--http2 off` sees no frames at all.
#[test]
fn h2c_only_for_sockets_that_spoke_the_preface() {
    let Some(_lock) = kernel_test() else { return };
    let (recs, net) = h2c("h2c-not", 53, &[], &["--not-h2"]);
    for ns in [&net.client, &net.server] {
        assert!(h2_frames(&recs, ns).is_empty(), "{recs:#?}");
        let lives = in_netns(&recs, ns, "connection-closed");
        assert_eq!(lives.len(), 1);
        assert!(lives[0]["h2trace"]["connection"]["http2"].is_null());
    }
    drop(net);
    let (recs, net) = h2c("h2c-off", 54, &["--http2", "off"], &["--requests", "1"]);
    assert!(recs.iter().all(|r| action(r) != "http2-frame"));
    let lives = in_netns(&recs, &net.client, "connection-closed");
    assert!(lives[0]["h2trace"]["connection"]["http2"].is_null());
}
