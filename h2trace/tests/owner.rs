//! Who owns a connection, in the kernel: connections opened before h2trace started are found
//! by the start-up snapshot with their processes, whether they stay busy or idle while traced,
//! and `--pid` keeps exactly its own. Root only; serial.
mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn pid_of(r: &Value) -> Option<u64> {
    r["process"]["pid"].as_u64()
}

/// The first `act` record whose `side` endpoint is `ip`:`port`. The address as well as the
/// port: traced without a namespace filter, a record can come from another test's namespace
/// still being torn down (a socket of its own on port 8080 ending in FIN_WAIT1).
fn find<'a>(recs: &'a [Value], act: &str, side: &str, ip: &str, port: u16) -> &'a Value {
    recs.iter()
        .find(|r| action(r) == act && r[side]["ip"] == ip && r[side]["port"] == port)
        .unwrap_or_else(|| panic!("no {act} with {side} {ip}:{port}"))
}

/// The connection record (still open at exit, or closed meanwhile) of that socket.
fn connection<'a>(recs: &'a [Value], side: &str, ip: &str, port: u16) -> &'a Value {
    recs.iter()
        .find(|r| {
            matches!(action(r), "connection-open" | "connection-closed")
                && r[side]["ip"] == ip
                && r[side]["port"] == port
        })
        .unwrap_or_else(|| panic!("no connection with {side} {ip}:{port}"))
}

#[test]
fn connections_opened_before_the_start_have_their_owners() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("snapshot", 81);
    let busy = format!("{}:8080", net.server_v4);
    let idle = format!("{}:8081", net.server_v4);
    // One connection keeps exchanging while traced, the other sits idle throughout: both
    // outlast the two tracers' start and stop however slow the machine (an emulated kernel
    // under load took long enough for a fixed 12 s of exchanges, or a 20 s idle timeout, to
    // run out while traced).
    let requests = (scaled(Duration::from_secs(60)).as_millis() / 150).to_string();
    let idle_timeout = scaled(Duration::from_secs(60)).as_millis().to_string();
    let busy_server = net.server(&busy, &["--requests", &requests]);
    let idle_server = net.server(&idle, &["--idle-timeout", &idle_timeout]);
    let busy_client = net.spawn_client(&busy, &["--requests", &requests, "--interval", "150"]);
    let pause = scaled(Duration::from_secs(8)).as_millis().to_string();
    let idle_client = net.spawn_client(&idle, &["--requests", "2", "--pause-after-first", &pause]);
    let id = |k: &KillOnDrop| u64::from(k.0.id());
    let expected = [
        (8080, id(&busy_client), id(&busy_server)),
        (8081, id(&idle_client), id(&idle_server)),
    ];
    // Both connections exist before either tracer starts, however slow the machine.
    NetPair::wait_established(&net.client, 2);
    NetPair::wait_established(&net.server, 2);
    std::thread::sleep(Duration::from_millis(300));
    let all = Tracer::start("snapshot-all", &[]);
    let only = Tracer::start("snapshot-pid", &["--pid", &busy_server.0.id().to_string()]);
    std::thread::sleep(Duration::from_millis(2000));
    let (recs, _d1, p1) = all.stop_keep();
    let (mine, _d2, p2) = only.stop_keep();
    drop((busy_client, idle_client, busy_server, idle_server));
    validate_all(&recs);
    validate_all(&mine);
    assert_replay_identical(&p1);
    assert_replay_identical(&p2);
    let ns_c = NetPair::inode(&net.client);
    for (port, client_pid, server_pid) in expected {
        // The snapshot saw both ends with their processes.
        let client_snap = find(
            &recs,
            "socket-snapshot",
            "destination",
            &net.server_v4,
            port,
        );
        assert_eq!(client_snap["h2trace"]["netns"], ns_c);
        assert_eq!(client_snap["h2trace"]["snapshot"]["state"], "ESTABLISHED");
        assert_eq!(pid_of(client_snap), Some(client_pid));
        let server_snap = find(&recs, "socket-snapshot", "source", &net.server_v4, port);
        assert_eq!(pid_of(server_snap), Some(server_pid));
        // Still open at exit, said to predate the trace, owned by the same processes.
        let client_open = connection(&recs, "destination", &net.server_v4, port);
        assert_eq!(client_open["h2trace"]["socket"]["seen_from"], "snapshot");
        assert_eq!(pid_of(client_open), Some(client_pid), "{client_open:#}");
        let server_open = connection(&recs, "source", &net.server_v4, port);
        assert_eq!(
            server_open["h2trace"]["socket"]["seen_from"], "snapshot",
            "{server_open:#}\n{server_snap:#}"
        );
        assert_eq!(pid_of(server_open), Some(server_pid));
    }
    // The idle one never reached the kernel programs: its record and owner come from the
    // snapshot, with the bytes the kernel had counted before the start.
    let idle_open = find(
        &recs,
        "connection-open",
        "destination",
        &net.server_v4,
        8081,
    );
    assert_eq!(idle_open["h2trace"]["owner_source"], "snapshot");
    assert!(idle_open["source"]["bytes"].as_u64().unwrap() > 0);
    // The busy one: the kernel learned the owner from its I/O.
    let busy_open = connection(&recs, "destination", &net.server_v4, 8080);
    assert_eq!(busy_open["h2trace"]["owner_source"], "io");

    // --pid: that process's sockets only, the ones it had before the start included.
    let server_pid = expected[0].2;
    let owned: Vec<&Value> = mine.iter().filter(|r| pid_of(r).is_some()).collect();
    assert!(!owned.is_empty());
    assert!(
        owned
            .iter()
            .all(|r| pid_of(r) == Some(server_pid) || action(r) == "finding"),
        "records of other processes with --pid"
    );
    let open = connection(&mine, "source", &net.server_v4, 8080);
    assert_eq!(open["h2trace"]["socket"]["seen_from"], "snapshot");
}

/// A connection found by the start-up snapshot that ends while traced: both ends' records say
/// it predates the trace (`seen_from: snapshot`, not `mid-life`) and keep their processes,
/// whichever hook the kernel programs use for state changes.
#[test]
fn a_connection_found_at_start_that_closes_while_traced_says_it_predates_the_trace() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("snapclose", 71);
    let addr = format!("{}:8082", net.server_v4);
    let long = scaled(Duration::from_secs(60)).as_millis().to_string();
    let mut server = net.server(&addr, &["--idle-timeout", &long]);
    let client = net.spawn_client(&addr, &["--requests", "2", "--pause-after-first", &long]);
    let (client_pid, server_pid) = (u64::from(client.0.id()), u64::from(server.0.id()));
    NetPair::wait_established(&net.client, 1);
    NetPair::wait_established(&net.server, 1);
    let tracer = Tracer::start("snapclose", &[]);
    // Once traced (and the snapshot taken), the client ends: the kernel closes its socket
    // with a FIN and the server, reading EOF, closes its own and exits.
    drop(client);
    let ended = wait_timeout(&mut server.0, scaled(Duration::from_secs(20)));
    assert!(ended.is_some(), "the server did not see the client go");
    std::thread::sleep(Duration::from_millis(500));
    let (recs, _dir, path) = tracer.stop_keep();
    validate_all(&recs);
    assert_replay_identical(&path);
    for (side, pid) in [("destination", client_pid), ("source", server_pid)] {
        let snap = find(&recs, "socket-snapshot", side, &net.server_v4, 8082);
        let closed = find(&recs, "connection-closed", side, &net.server_v4, 8082);
        assert_eq!(
            closed["h2trace"]["socket"]["seen_from"], "snapshot",
            "{closed:#}\n{snap:#}"
        );
        assert_eq!(pid_of(closed), Some(pid), "{closed:#}");
    }
    let server_closed = find(&recs, "connection-closed", "source", &net.server_v4, 8082);
    assert_eq!(
        server_closed["h2trace"]["connection"]["fin_first"], "peer",
        "{server_closed:#}"
    );
}

/// A cgroup made for a test (under the v2 hierarchy), removed when dropped.
struct TestCgroup(std::path::PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Innermost first; each is empty once the test's processes are gone.
        for dir in [self.0.clone(), self.0.parent().unwrap().to_path_buf()] {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn v2_root() -> std::path::PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(2) == Some(&"cgroup2")).then(|| f[1].into())
        })
        .expect("a cgroup v2 hierarchy")
}

#[test]
fn cgroup_container_and_netns_filters_are_exact() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("cgroup", 82);
    // A cgroup named the way Docker's systemd driver names a container's scope.
    let container_id = "c0ffee".repeat(10) + "abcd";
    let parent = format!("h2t-{}", std::process::id());
    let rel = format!("/{parent}/docker-{container_id}.scope");
    let dir = v2_root().join(rel.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).unwrap();
    let cgroup = TestCgroup(dir.clone());
    let addr = format!("{}:8080", net.server_v4);
    let server = net.server(&addr, &["--conns", "3", "--requests", "2"]);
    let server_pid = u64::from(server.0.id());
    std::fs::write(dir.join("cgroup.procs"), server_pid.to_string()).unwrap();

    let by_cgroup = Tracer::start("cgroup-filter", &["--cgroup", &format!("/{parent}")]);
    let by_netns = Tracer::start("netns-filter", &["--netns", &net.client]);
    let client_pid = net.client(&addr, &["--conns", "3", "--requests", "2"]);
    let (a, _d1, p1) = by_cgroup.stop_keep();
    let (b, _d2, p2) = by_netns.stop_keep();
    drop(server);
    drop(cgroup);
    for (recs, path) in [(&a, &p1), (&b, &p2)] {
        validate_all(recs);
        assert_replay_identical(path);
    }
    let conns = |recs: &[Value]| -> Vec<Value> {
        recs.iter()
            .filter(|r| action(r).starts_with("connection-"))
            .cloned()
            .collect()
    };

    // --cgroup: the server's three connections, nothing of the client's; each names the
    // cgroup and the container its path encodes.
    let server_conns = conns(&a);
    assert_eq!(server_conns.len(), 3, "{server_conns:#?}");
    for c in &server_conns {
        assert_eq!(owner_pid(c), Some(server_pid));
        assert_eq!(c["h2trace"]["cgroup_path"], rel.as_str());
        assert_eq!(c["container"]["id"], container_id.as_str());
        assert_eq!(c["container"]["runtime"], "docker");
    }
    // --netns: the client's three, all in its namespace.
    let client_conns = conns(&b);
    assert_eq!(client_conns.len(), 3, "{client_conns:#?}");
    let ns = NetPair::inode(&net.client);
    for c in &client_conns {
        assert_eq!(c["h2trace"]["netns"], ns);
        assert_eq!(owner_pid(c), Some(u64::from(client_pid)));
        assert!(c.get("container").is_none());
    }
}

#[test]
fn forked_workers_own_their_connections() {
    let Some(_lock) = kernel_test() else { return };
    const CLIENTS: usize = 6;
    const CONNS: usize = 25;
    let net = NetPair::new("forks", 83);
    let addr = format!("{}:8080", net.server_v4);
    let total = (CLIENTS * CONNS).to_string();
    let mut server = net.server(&addr, &["--fork", "--conns", &total, "--requests", "1"]);
    let server_pid = server.0.id();
    let all = Tracer::start("forks-all", &[]);
    let followed = Tracer::start(
        "forks-pid",
        &["--pid", &server_pid.to_string(), "--follow-forks"],
    );
    // Several client processes at once, each telling its connections apart by request size.
    let mut clients: Vec<(u64, KillOnDrop)> = (0..CLIENTS)
        .map(|k| {
            let send = (100 + k).to_string();
            let c = net.spawn_client(
                &addr,
                &[
                    "--conns",
                    &CONNS.to_string(),
                    "--requests",
                    "1",
                    "--send",
                    &send,
                ],
            );
            (u64::from(c.0.id()), c)
        })
        .collect();
    for (_, c) in &mut clients {
        let st = wait_timeout(&mut c.0, Duration::from_secs(60)).expect("client timed out");
        assert!(st.success());
    }
    wait_timeout(&mut server.0, Duration::from_secs(30)).expect("server did not finish");
    let mut served = String::new();
    use std::io::Read;
    server
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut served)
        .unwrap();
    // Peer port → the workers that served it. A client port can come round again (the server
    // closes first and keeps the TIME_WAIT), so a port may name more than one worker.
    let mut workers: std::collections::HashMap<u64, Vec<u64>> = Default::default();
    let mut n = 0;
    for l in served.lines() {
        let mut f = l.strip_prefix("served ").unwrap_or_default().split(' ');
        if let (Some(Ok(pid)), Some(Ok(port))) =
            (f.next().map(str::parse), f.next().map(str::parse))
        {
            workers.entry(port).or_default().push(pid);
            n += 1;
        }
    }
    assert_eq!(n, CLIENTS * CONNS, "{served}");
    let served_by = |r: &Value| {
        workers
            .get(&r["destination"]["port"].as_u64().unwrap())
            .is_some_and(|w| owner_pid(r).is_some_and(|o| w.contains(&o)))
    };
    let (recs, _d1, p1) = all.stop_keep();
    // The server and its workers have exited: the followed run ends by itself.
    let (mine, _d2, p2) = followed.ended();
    for (r, p) in [(&recs, &p1), (&mine, &p2)] {
        validate_all(r);
        assert_replay_identical(p);
    }

    // Every connection record of the test, each side, against the truth.
    let (ns_c, ns_s) = (NetPair::inode(&net.client), NetPair::inode(&net.server));
    let (mut right, mut checked) = (0, 0);
    for r in recs.iter().filter(|r| action(r) == "connection-closed") {
        let ok = if r["h2trace"]["netns"] == ns_c && r["destination"]["port"] == 8080 {
            let k = r["source"]["bytes"].as_u64().unwrap() - 104;
            let expected = clients.get(k as usize).map(|c| c.0);
            expected.is_some() && owner_pid(r) == expected
        } else if r["h2trace"]["netns"] == ns_s && r["source"]["port"] == 8080 {
            served_by(r)
        } else {
            continue;
        };
        checked += 1;
        right += usize::from(ok);
    }
    let share = right as f64 / checked as f64;
    eprintln!(
        "owner accuracy (forking server, {CLIENTS} client processes): {right}/{checked} connection records = {:.2} %",
        share * 100.0
    );
    assert_eq!(
        checked,
        2 * CLIENTS * CONNS,
        "both sides of every connection"
    );
    assert!(share >= 0.99, "owner accuracy {share}");

    // --pid SERVER --follow-forks: the workers' connections, each owned by its worker.
    let forks = mine.iter().filter(|r| action(r) == "process-fork").count();
    assert!(forks >= CLIENTS * CONNS, "{forks} forks followed");
    let theirs: Vec<&Value> = mine
        .iter()
        .filter(|r| action(r) == "connection-closed")
        .collect();
    assert_eq!(theirs.len(), CLIENTS * CONNS);
    for r in theirs {
        assert!(served_by(r), "{r:#}");
    }
}

#[test]
fn capabilities_are_dropped_once_tracing_runs() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("caps", 84);
    let addr = format!("{}:8080", net.server_v4);
    let _server = net.server(&addr, &["--requests", "1"]);
    let tracer = Tracer::start("caps", &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", tracer.pid())).unwrap();
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        let line = status
            .lines()
            .find(|l| l.starts_with(set))
            .unwrap_or_else(|| panic!("no {set}"));
        assert!(line.ends_with("0000000000000000"), "{line}");
    }
    // Without them it still reads everything it needs.
    let client = net.client(&addr, &["--requests", "1"]);
    let recs = tracer.stop();
    assert!(
        recs.iter()
            .any(|r| action(r) == "connection-closed" && owner_pid(r) == Some(u64::from(client))),
        "the traced connection is missing"
    );
}

#[test]
fn a_socket_handed_to_another_process_follows_its_user() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("handoff", 85);
    let addr = format!("{}:8080", net.server_v4);
    let mut server = net.server(&addr, &["--requests", "3"]);
    let tracer = Tracer::start("handoff", &[]);
    // The client does one exchange, forks, and its child does the other two and closes.
    let parent = u64::from(net.client(
        &addr,
        &["--requests", "3", "--interval", "100", "--handoff"],
    ));
    // The server ends after the third exchange, however slow the child.
    assert!(wait_timeout(&mut server.0, Duration::from_secs(20)).is_some());
    std::thread::sleep(Duration::from_millis(500));
    let recs = tracer.stop();
    let c = find(
        &recs,
        "connection-closed",
        "destination",
        &net.server_v4,
        8080,
    );
    assert_eq!(c["h2trace"]["owner_source"], "io", "{c:#}");
    assert_eq!(c["process"]["name"], "tcp_peer");
    assert_ne!(
        owner_pid(c),
        Some(parent),
        "still owned by the process that let it go"
    );
}
