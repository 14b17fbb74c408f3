//! Staying power, in the kernel: a minute of connection churn at the machine's maximum with
//! h2trace attached, and signals in the middle of a flood. Root only; serial. Durations are
//! printed, never asserted beyond generous bounds (a hung exit is a failure, a slow one not).
mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// `churn ADDR` inside the server namespace of `net` (server and client threads in one
/// process, one request per connection, closed with FIN).
fn churn(net: &NetPair, seconds: u64) -> KillOnDrop {
    let addr = format!("{}:8080", net.server_v4);
    KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &net.server])
            .arg(example_bin("churn"))
            .args([&addr, "--threads", "2", "--seconds", &seconds.to_string()])
            .args(["--mode", "close"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// The connections an ended churn load made, from its last words.
fn connections_made(load: &mut KillOnDrop) -> u64 {
    use std::io::Read;
    let mut done = String::new();
    load.0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut done)
        .unwrap();
    done.split_whitespace()
        .find_map(|f| f.strip_prefix("connections="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("churn said: {done}"))
}

/// Three seconds of churn in a new namespace pair (`tag`, `subnet`), traced with `args`: the
/// connections made, the records, and the pair.
fn churn_traced(tag: &str, subnet: u8, args: &[&str]) -> (u64, Vec<Value>, NetPair) {
    let net = NetPair::new(tag, subnet);
    let tracer = Tracer::start(tag, args);
    let mut load = churn(&net, 3);
    assert!(
        wait_timeout(&mut load.0, Duration::from_secs(30))
            .expect("churn did not end")
            .success()
    );
    let connections = connections_made(&mut load);
    (connections, tracer.stop(), net)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_minute_of_maximum_churn() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("flood", 86);
    let tracer = Tracer::start("flood", &[]);
    let mut load = churn(&net, 60);
    let load_pid = u64::from(load.0.id());
    let (mut peak, start) = (0, Instant::now());
    while load.0.try_wait().unwrap().is_none() {
        peak = peak.max(rss_kib(tracer.pid()));
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "churn did not end"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let connections = connections_made(&mut load);
    // A minute of churn is millions of records: read them one at a time, keeping only what
    // the checks below need (all of them parsed at once took 1.6 GB in the kernel matrix).
    let (_dir, path) = tracer.stop_file();
    let (mut closed, mut loss_records, mut dial, mut last) = (0u64, 0, Vec::new(), Value::Null);
    for line in
        std::io::BufRead::lines(std::io::BufReader::new(std::fs::File::open(&path).unwrap()))
    {
        let r: Value = serde_json::from_str(&line.unwrap()).unwrap();
        match action(&r) {
            // This test's server only: a record from another test's namespace still being torn
            // down would hide a missing one.
            "connection-closed"
                if r["destination"]["ip"] == net.server_v4 && r["destination"]["port"] == 8080 =>
            {
                closed += 1
            }
            "loss" => loss_records += 1,
            "finding" if r["h2trace"]["finding"]["pattern"] == "dial-per-request" => dial.push(r),
            _ => last = r,
        }
    }
    eprintln!(
        "flood: {connections} connections in 60 s, h2trace peak RSS {} MiB",
        peak / 1024
    );
    // No crash (the stop above returned 130 with a summary), memory bounded.
    assert!(peak < 96 * 1024, "peak RSS {peak} KiB");
    assert_eq!(action(&last), "summary");
    let summary = &last["h2trace"]["summary"];
    let losses = &summary["losses"];
    let lost: u64 = losses
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_u64)
        .sum();
    // Every loss is in the stream: a loss record says so before the summary does.
    if lost > 0 {
        assert!(loss_records > 0);
    }
    // Both ends of every connection, unless lost or evicted, were recorded.
    let missing = connections.saturating_sub(closed);
    eprintln!("flood: {closed} client records for {connections} connections, {lost} lost");
    assert!(
        missing <= lost + summary["evicted"].as_u64().unwrap_or(0) + 2 * 2,
        "{missing} connections missing without a counted loss"
    );
    // And the diagnosis still names what this load is: a client that dials per request.
    assert!(
        dial.iter().any(|f| owner_pid(f) == Some(load_pid)),
        "no dial-per-request for the churn process"
    );
}

/// SIGTERM (exit 0) or SIGINT (exit 130) in the middle of a flood.
fn signal_during_flood(tag: &str, subnet: u8, sig: nix::sys::signal::Signal, code: i32) {
    let net = NetPair::new(tag, subnet);
    let dir = TempDir::new(tag);
    let out = dir.0.join("o.ndjson");
    let mut h = KillOnDrop(
        Command::new(h2trace_bin())
            .args(["-f", "ndjson", "-o"])
            .arg(&out)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("\"started\"")
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _load = churn(&net, 10);
    std::thread::sleep(Duration::from_secs(2));
    let sent = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(h.0.id() as i32), sig).unwrap();
    let st = wait_timeout(&mut h.0, Duration::from_secs(10)).expect("no exit after the signal");
    let took = sent.elapsed();
    eprintln!("{tag}: exited {} ms after {sig}", took.as_millis());
    assert_eq!(st.code(), Some(code));
    assert!(took < scaled(Duration::from_secs(5)), "took {took:?}");
    let recs = read_records(&out);
    assert_eq!(
        action(recs.last().unwrap()),
        "summary",
        "summary flushed last"
    );
    assert_eq!(loaded_h2trace_programs(), 0, "programs left loaded");
}

#[test]
fn sigterm_during_a_flood_exits_with_a_summary_and_detaches() {
    let Some(_lock) = kernel_test() else { return };
    signal_during_flood("sigterm", 87, nix::sys::signal::Signal::SIGTERM, 0);
}

#[test]
fn sigint_during_a_flood_exits_with_a_summary_and_detaches() {
    let Some(_lock) = kernel_test() else { return };
    signal_during_flood("sigint", 88, nix::sys::signal::Signal::SIGINT, 130);
}

/// Loss forced with the smallest ring (4 KiB, a few records) under churn: it is counted, said
/// in the stream before the summary, and accounts for every record that did not come.
#[test]
fn loss_forced_by_a_tiny_ring_is_counted_and_reported() {
    let Some(_lock) = kernel_test() else { return };
    let (connections, recs, net) = churn_traced("tinyring", 45, &["--ring-size", "4KiB"]);
    let ns = NetPair::inode(&net.server);
    // Both ends of each connection live in the server namespace (churn runs there).
    let written = recs
        .iter()
        .filter(|r| action(r) == "connection-closed" && r["h2trace"]["netns"] == ns)
        .count() as u64;
    let full = |r: &Value| r["h2trace"]["loss"]["ringbuf_full"].as_u64().unwrap_or(0);
    let losses: Vec<&Value> = recs.iter().filter(|r| action(r) == "loss").collect();
    let summary = &recs.last().unwrap()["h2trace"]["summary"];
    assert_eq!(action(recs.last().unwrap()), "summary");
    let lost = summary["losses"]["ringbuf_full"].as_u64().unwrap();
    eprintln!(
        "tinyring: {connections} connections, {written} of {} lives written, {lost} records lost",
        2 * connections
    );
    assert!(lost > 0, "a 4 KiB ring under churn lost nothing");
    // Said as it happened, and the last loss record agrees with the summary.
    assert!(!losses.is_empty());
    assert_eq!(full(losses.last().unwrap()), lost);
    assert!(losses.windows(2).all(|w| full(w[0]) <= full(w[1])));
    // Every missing life is among the counted losses, and the count is not inflated beyond
    // what this load emitted (two lives and one live CLOSE_WAIT per connection) plus the
    // host's own sockets meanwhile.
    let missing = 2 * connections - written.min(2 * connections);
    let open = summary["open_at_exit"].as_u64().unwrap_or(0);
    assert!(
        missing <= lost + open,
        "{missing} lives missing, {lost} counted lost, {open} open at exit"
    );
    assert!(
        lost <= 3 * connections + 1_000,
        "{lost} counted for {connections}"
    );
    // Exactly, for the lives: every life the kernel ended (on the whole host) was written,
    // discarded as a handshake race's loser, or counted lost. Only a socket of the host ending
    // between the last drain and the last read of the counters could tip it by one.
    let n = |k: &str| summary[k].as_u64().unwrap_or(0);
    let lives_lost = summary["losses"]["lives_lost"].as_u64().unwrap_or(0);
    assert!(lives_lost > 0 && lives_lost <= lost, "{summary:#}");
    let accounted = n("connections") + n("discarded_children") + lives_lost;
    assert!(
        accounted.abs_diff(n("ended")) <= 2,
        "ended {} ≠ written {} + discarded {} + lost {lives_lost}",
        n("ended"),
        n("connections"),
        n("discarded_children")
    );
}

/// `--events all` writes every state change: more than the agent can read under maximum churn
/// here. Past half a ring, the kernel sheds those state changes (counted) and keeps the room
/// for the connection records, which list every state change themselves: the records the
/// diagnosis stands on are not the ones lost.
#[test]
fn events_all_past_half_a_ring_sheds_state_changes_not_connections() {
    let Some(_lock) = kernel_test() else { return };
    let (connections, recs, net) =
        churn_traced("shed", 47, &["--events", "all", "--ring-size", "1MiB"]);
    let summary = &recs.last().unwrap()["h2trace"]["summary"];
    assert_eq!(action(recs.last().unwrap()), "summary");
    let loss = |k: &str| summary["losses"][k].as_u64().unwrap_or(0);
    let ns = NetPair::inode(&net.server);
    let mine = |a: &str| {
        recs.iter()
            .filter(|r| action(r) == a && r["h2trace"]["netns"] == ns)
            .count() as u64
    };
    let (lives, states) = (mine("connection-closed"), mine("state-change"));
    eprintln!(
        "shed: {connections} connections, {lives} lives and {states} state changes written, {} shed, {} lost ({} of them lives)",
        loss("states_shed"),
        loss("ringbuf_full"),
        loss("lives_lost")
    );
    assert!(loss("states_shed") > 0, "{summary:#}");
    // What is lost beyond that is a small part, and every life is written or counted.
    assert!(
        loss("lives_lost") * 10 <= loss("states_shed"),
        "{summary:#}"
    );
    let n = |k: &str| summary[k].as_u64().unwrap_or(0);
    assert!(
        (n("connections") + n("discarded_children") + loss("lives_lost")).abs_diff(n("ended")) <= 2,
        "{summary:#}"
    );
    assert!(2 * connections <= lives + loss("lives_lost") + n("open_at_exit"));
    // Said as it happened, not only at the end.
    assert!(
        recs.iter()
            .any(|r| action(r) == "loss" && r["h2trace"]["loss"]["states_shed"].as_u64() > Some(0))
    );
}

/// A node that talks to ever new peers (a client dialing 2,000 addresses in turn): the
/// diagnosis keeps `--max-peers` of them and sums the one-off peers it drops in `other
/// peers`, so that every connection is counted in exactly one peer record, the stream does
/// not get a record per dropped peer, and memory stays flat.
#[test]
fn ever_new_peers_are_summed_as_other_peers_and_memory_stays_flat() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("peers", 46);
    let tracer = Tracer::start("peers", &["--max-peers", "64"]);
    // Longer where the machine is slower (an emulated kernel), so that the load still goes
    // round its peers.
    let seconds = scaled(Duration::from_secs(3)).as_secs().to_string();
    let mut load = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &net.server])
            .arg(example_bin("churn"))
            .args(["0.0.0.0:8080", "--threads", "2", "--seconds", &seconds])
            .args(["--peers", "2000"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let load_pid = u64::from(load.0.id());
    assert!(
        wait_timeout(&mut load.0, scaled(Duration::from_secs(60)))
            .expect("churn did not end")
            .success()
    );
    let connections = connections_made(&mut load);
    let rss = rss_kib(tracer.pid());
    let (recs, _dir, path) = tracer.stop_keep();
    assert_replay_identical(&path);
    let ns = NetPair::inode(&net.server);
    let mine = |r: &&Value| r["h2trace"]["netns"] == ns && owner_pid(r) == Some(load_pid);
    // Connections per peer, from the connection records (client side: to port 8080).
    let mut conns: std::collections::BTreeMap<String, u64> = Default::default();
    for r in recs.iter().filter(mine).filter(|r| {
        matches!(action(r), "connection-closed" | "connection-open")
            && r["destination"]["port"] == 8080
    }) {
        let ip = r["destination"]["ip"].as_str().unwrap();
        *conns.entry(format!("{ip}:8080")).or_default() += 1;
    }
    // The same, from the peer records: those forgotten on the way, and the run's table.
    let peers: Vec<&Value> = recs
        .iter()
        .filter(mine)
        .filter(|r| action(r) == "peer-summary")
        .collect();
    let forgotten = |r: &Value| r["h2trace"]["peer"]["forgotten"] == true;
    let mut counted: std::collections::BTreeMap<String, u64> = Default::default();
    for p in peers
        .iter()
        .filter(|p| p["h2trace"]["peer"]["peer"] != "clients on port 8080")
    {
        let peer = p["h2trace"]["peer"]["peer"].as_str().unwrap().to_string();
        *counted.entry(peer).or_default() += p["h2trace"]["peer"]["connections"].as_u64().unwrap();
    }
    let summary = &recs.last().unwrap()["h2trace"]["summary"];
    let dropped = summary["peers_forgotten"].as_u64().unwrap();
    let written = peers.iter().filter(|p| forgotten(p)).count() as u64;
    let others = counted.remove("other peers").unwrap_or(0);
    eprintln!(
        "peers: {connections} connections to {} peers, {dropped} dropped, {written} written as forgotten, {others} connections in other peers, RSS after the load {} MiB",
        conns.len(),
        rss / 1024
    );
    assert!(conns.len() > 4 * 64, "{} peers", conns.len());
    // Every connection in exactly one peer record: its peer's, or `other peers`.
    for (peer, n) in &counted {
        assert!(conns.get(peer).is_some_and(|c| n <= c), "{peer}: {n}");
    }
    assert_eq!(
        counted.values().sum::<u64>() + others,
        conns.values().sum::<u64>(),
        "every connection in exactly one peer record"
    );
    // Every peer past the cap went at least once, nearly all of them into `other peers`
    // (each had one connection or so while it was kept) rather than a record each.
    assert!(dropped >= conns.len() as u64 - 64, "{dropped} dropped");
    assert!(written * 10 < dropped, "{written} of {dropped} written");
    assert!(others > 0);
    // The run's table: at most the cap, and the server's side (always busy) never dropped.
    let kept = peers.iter().filter(|p| !forgotten(p)).count();
    assert!(kept <= 64, "{kept} peers in the final table");
    assert!(
        peers
            .iter()
            .any(|p| !forgotten(p) && p["h2trace"]["peer"]["peer"] == "clients on port 8080")
    );
    // The bound (before, these 2,000 peers took over 300 MiB).
    assert!(rss < 64 * 1024, "RSS {rss} KiB after the load");
}
