//! The diagnosis on recorded streams, without privileges: the fixtures were recorded by the
//! kernel tests in tests/diagnosis.rs (`H2TRACE_RECORD_FIXTURES=DIR cargo test --test
//! diagnosis`), from real TCP between namespaces. Also: replay's handling of bad input.
mod common;

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use common::{action, findings, h2trace_bin};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.ndjson"))
}

fn replay_bytes(input: &[u8], args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(h2trace_bin())
        .args(["replay", "-f", "ndjson"])
        .args(args)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn records(ndjson: &str) -> Vec<Value> {
    ndjson
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The recorded kernel facts, without what the diagnosis derives from them (findings, the
/// per-peer table, each connection's analysis): those change as the detectors improve; the
/// facts must come back unchanged.
fn facts(ndjson: &str) -> Vec<Value> {
    records(ndjson)
        .into_iter()
        .filter(|r| !matches!(action(r), "finding" | "peer-summary" | "peer-window"))
        .map(|mut r| {
            if let Some(c) = r["h2trace"]["connection"].as_object_mut() {
                c.remove("analysis");
            }
            if let Some(s) = r["h2trace"]["summary"].as_object_mut() {
                s.remove("findings");
            }
            r
        })
        .collect()
}

fn assert_same_facts(name: &str, recorded: &str, replayed: &str) {
    let (a, b) = (facts(recorded), facts(replayed));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x == y, "{name}: record {i} differs:\n{x}\n{y}");
    }
    assert_eq!(a.len(), b.len(), "{name}: record count");
}

/// (fixture, pattern that must be found, patterns that must not).
const EXPECTED: &[(&str, Option<&str>, &[&str])] = &[
    // `--pid` on a server that exits while its last socket closes (`process-exited`).
    ("pid-exit", None, &["close-wait-stuck", "dial-per-request"]),
    (
        "healthy-reuse",
        None,
        &[
            "dial-per-request",
            "fixed-age-rotation",
            "idle-close-by-peer",
            "close-wait-stuck",
        ],
    ),
    (
        "dial-per-request",
        Some("dial-per-request"),
        &["fixed-age-rotation", "handshake-failure-loop"],
    ),
    (
        "fixed-age-rotation",
        Some("fixed-age-rotation"),
        &["idle-close-by-peer", "dial-per-request"],
    ),
    (
        "idle-close-by-peer",
        Some("idle-close-by-peer"),
        &["reset-after-idle", "black-hole"],
    ),
    ("close-wait-stuck", Some("close-wait-stuck"), &[]),
    (
        "handshake-failure-loop",
        Some("handshake-failure-loop"),
        &["dial-per-request"],
    ),
    ("blackhole", Some("black-hole"), &["reset-after-idle"]),
    ("forgedrst", Some("reset-after-idle"), &["black-hole"]),
    ("proxy-upstream-churn", Some("proxy-upstream-churn"), &[]),
    ("rst-storm", Some("rst-storm"), &[]),
    // Recorded by tests/conntrack.rs: a NAT router whose table forgets or closes connections.
    (
        "ctdrop",
        Some("conntrack-forgot-connection"),
        &["conntrack-closed-early"],
    ),
    (
        "ctreject",
        Some("conntrack-forgot-connection"),
        &["conntrack-closed-early"],
    ),
    (
        "ctclosed",
        Some("conntrack-closed-early"),
        &["conntrack-forgot-connection"],
    ),
    (
        "cthealthy",
        None,
        &[
            "conntrack-forgot-connection",
            "conntrack-closed-early",
            "black-hole",
        ],
    ),
    // Recorded with real peers (tests/e2e.rs): grpcio and nginx.
    (
        "e2e-grpc-channel-per-call",
        Some("dial-per-request"),
        &["handshake-failure-loop"],
    ),
    ("e2e-grpc-healthy", None, &[]),
    (
        "e2e-grpc-max-age",
        Some("fixed-age-rotation"),
        &["dial-per-request"],
    ),
    ("e2e-grpc-tls-mismatch", Some("handshake-failure-loop"), &[]),
    (
        "e2e-grpc-too-many-pings",
        Some("too-many-pings"),
        &["fixed-age-rotation", "dial-per-request"],
    ),
    ("e2e-grpc-cancel", None, &[]),
    ("e2e-nginx-tls", None, &[]),
    // grpc-go (tests/e2e/grpcgo).
    (
        "e2e-grpcgo-max-age",
        Some("fixed-age-rotation"),
        &["dial-per-request"],
    ),
    (
        "e2e-grpc-blackhole",
        Some("black-hole"),
        &["reset-after-idle"],
    ),
    (
        "e2e-grpc-forgedrst",
        Some("reset-after-idle"),
        &["black-hole"],
    ),
    ("e2e-nginx-idle-timeout", Some("idle-close-by-peer"), &[]),
    ("e2e-nginx-close-wait", Some("close-wait-stuck"), &[]),
    ("e2e-nginx-proxy", Some("proxy-upstream-churn"), &[]),
    ("e2e-requests-abandon", Some("rst-storm"), &[]),
    ("e2e-requests-no-session", Some("time-wait-pileup"), &[]),
];

#[test]
fn fixtures_replay_to_themselves_with_the_expected_findings() {
    for (name, want, not) in EXPECTED {
        let recorded = std::fs::read_to_string(fixture(name)).unwrap();
        let (code, out, err) = replay_bytes(recorded.as_bytes(), &[]);
        assert_eq!(code, Some(0), "{name}: {err}");
        assert_same_facts(name, &recorded, &out);
        let recs = records(&out);
        if let Some(p) = want {
            assert!(!findings(&recs, p).is_empty(), "{name}: no {p}");
        } else {
            assert!(
                recs.iter().all(|r| action(r) != "finding"),
                "{name}: unexpected findings"
            );
        }
        for p in *not {
            assert!(findings(&recs, p).is_empty(), "{name}: unexpected {p}");
        }
        // A finding about a process names it (the recorded close-wait-stuck ones did not).
        for f in recs.iter().filter(|r| action(r) == "finding") {
            if f["process"]["pid"].as_u64() > Some(0) {
                let named = f["process"]["name"].as_str().is_some_and(|n| !n.is_empty());
                assert!(named, "{name}: {f:#}");
            }
        }
    }
}

/// HTTP/2 frames are facts replay joins to their connections again: the recorded GOAWAYs
/// prove the rotation in the finding, and each connection's frame summary comes back.
#[test]
fn recorded_goaways_prove_fixed_age_rotation() {
    let recorded = std::fs::read_to_string(fixture("e2e-grpc-max-age")).unwrap();
    let (code, out, err) = replay_bytes(recorded.as_bytes(), &[]);
    assert_eq!(code, Some(0), "{err}");
    let recs = records(&out);
    let f = findings(&recs, "fixed-age-rotation");
    assert!(!f.is_empty());
    for f in f {
        let msg = f["message"].as_str().unwrap();
        assert!(msg.contains("GOAWAY(NO_ERROR, \"max_age\")"), "{msg}");
        assert!(f["h2trace"]["finding"]["numbers"]["goaway_max_age"].as_u64() >= Some(3));
    }
    let goaway = |r: &Value| r["h2trace"]["connection"]["http2"]["received"]["goaway"].clone();
    let with = records(&out)
        .iter()
        .filter(|r| action(r) == "connection-closed" && !goaway(r).is_null())
        .count();
    assert!(with >= 3, "{with} connections with a received GOAWAY");
}

#[test]
fn every_socket_life_ends_exactly_once_and_replay_is_idempotent() {
    for (name, _, _) in EXPECTED {
        let recorded = std::fs::read_to_string(fixture(name)).unwrap();
        let mut ends: HashMap<String, usize> = HashMap::new();
        for r in records(&recorded) {
            if matches!(action(&r), "connection-closed" | "connection-open") {
                *ends
                    .entry(r["h2trace"]["socket"]["id"].as_str().unwrap().to_string())
                    .or_default() += 1;
            }
        }
        assert!(
            ends.values().all(|&n| n == 1),
            "{name}: a socket life ended twice"
        );
        // Every live event belongs to a life that ends in the stream.
        for r in records(&recorded) {
            if let Some(id) = r["h2trace"]["socket"]["id"].as_str() {
                assert!(ends.contains_key(id), "{name}: {id} never ends");
            }
        }
        let (_, once, _) = replay_bytes(recorded.as_bytes(), &[]);
        let (_, twice, _) = replay_bytes(once.as_bytes(), &[]);
        assert_eq!(once, twice, "{name}: replay is not idempotent");
    }
}

#[test]
fn thresholds_given_to_replay_override_the_recorded_ones() {
    let recorded = std::fs::read_to_string(fixture("dial-per-request")).unwrap();
    let (code, out, _) = replay_bytes(
        recorded.as_bytes(),
        &["--min-conns", "1000", "--time-wait-pileup", "1000"],
    );
    assert_eq!(code, Some(0));
    let recs = records(&out);
    assert!(findings(&recs, "dial-per-request").is_empty());
    assert_eq!(recs[0]["h2trace"]["detect"]["min_conns"], 1000);
}

#[test]
fn malformed_lines_are_reported_by_number_and_skipped() {
    let recorded = std::fs::read_to_string(fixture("idle-close-by-peer")).unwrap();
    let lines: Vec<&str> = recorded.lines().collect();
    let mut input = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        input.extend_from_slice(l.as_bytes());
        input.push(b'\n');
        match i {
            1 => input.extend_from_slice(b"{\"truncated\": \n"),
            2 => input.extend_from_slice(b"\xff\xfe not utf-8\n"),
            3 => input.extend_from_slice(&[b'x'; 2 << 20]), // a 2 MiB line
            _ => {}
        }
        if i == 3 {
            input.push(b'\n');
        }
        if i == 4 {
            input.extend_from_slice(b"{\"schema\":\"h2trace/1\",\"event\":{\"action\":\"connection-closed\"},\"h2trace\":{\"ktime_ns\":1}}\n");
        }
    }
    let (code, out, err) = replay_bytes(&input, &[]);
    assert_eq!(
        code,
        Some(3),
        "skipped lines must show in the exit status: {err}"
    );
    let errs: Vec<&str> = err.lines().collect();
    assert!(
        errs[0].starts_with("h2trace replay: line 3: not JSON"),
        "{err}"
    );
    assert!(
        errs[1].starts_with("h2trace replay: line 5: not UTF-8"),
        "{err}"
    );
    assert!(
        errs[2].starts_with("h2trace replay: line 7: longer than"),
        "{err}"
    );
    assert!(
        errs[3].starts_with("h2trace replay: line 9: missing or invalid field"),
        "{err}"
    );
    assert!(err.contains("4 of"), "{err}");
    // Nothing else was lost: the good lines replay to the recording.
    assert_same_facts("malformed", &recorded, &out);
}

/// A `started` record whose thresholds no run could have (a zero window stopped the
/// detector's clock: a division by zero) or that are not thresholds at all: that line is
/// reported and skipped, and the rest replays with the defaults, which the fixture used.
#[test]
fn a_started_record_with_impossible_thresholds_is_reported_and_skipped() {
    let recorded = std::fs::read_to_string(fixture("idle-close-by-peer")).unwrap();
    let (first, rest) = recorded.split_once('\n').unwrap();
    for (bad, said) in [
        (
            first.replace("\"window_ns\":10000000000", "\"window_ns\":0"),
            "line 1: h2trace.detect.window_ns is 0",
        ),
        (
            first.replace("\"min_conns\":10", "\"min_conns\":0"),
            "line 1: h2trace.detect.min_conns is 0",
        ),
        (
            first.replace("\"min_conns\":10", "\"min_conns\":-1"),
            "line 1: missing or invalid field h2trace.detect",
        ),
    ] {
        assert_ne!(bad, first, "the fixture's thresholds changed");
        let (code, out, err) = replay_bytes(format!("{bad}\n{rest}").as_bytes(), &[]);
        assert_eq!(code, Some(3), "{said}: {err}");
        assert!(err.contains(said), "{said}: {err}");
        assert_same_facts("impossible thresholds", rest, &out);
        assert!(!findings(&records(&out), "idle-close-by-peer").is_empty());
    }
}

#[test]
fn missing_files_and_bad_thresholds_are_usage_errors() {
    let o = Command::new(h2trace_bin())
        .args(["replay", "/nonexistent/h2trace.ndjson"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/h2trace.ndjson"));
    let dir = std::env::temp_dir();
    let o = Command::new(h2trace_bin())
        .arg("replay")
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("opening {}", dir.display())));
    let (code, _, err) = replay_bytes(b"", &["--window", "soon"]);
    assert_eq!(code, Some(2), "{err}");
}

#[test]
fn text_replay_prints_findings_and_the_peer_table() {
    let recorded = std::fs::read_to_string(fixture("dial-per-request")).unwrap();
    let mut child = Command::new(h2trace_bin())
        .args(["replay", "-f", "text", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(recorded.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("!! FINDING dial-per-request [new]"), "{text}");
    // The recording's start, not an invitation to press Ctrl-C.
    assert!(
        text.starts_with("h2trace: replaying a recording of a run with tracepoint"),
        "{text}"
    );
    assert!(
        text.contains("Per peer:") && text.contains("LIFE p50"),
        "{text}"
    );
    assert!(text.contains("Summary over"));
}
