//! End to end with real peers nobody here wrote: grpcio (client and server) and nginx (server
//! and proxy), driven by tests/e2e/peers.py with the libraries' own APIs, between private
//! namespaces. h2trace must name the cause. Root only; serial. `scripts/install-toolchain.sh`
//! installs the peers (nginx-light from apt, grpcio and requests from PyPI in a venv).
mod common;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

fn python() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    let py = cache.join("h2trace/venv/bin/python");
    if py.exists() && PathBuf::from("/usr/sbin/nginx").exists() {
        return Some(py);
    }
    // `cargo xtask test` installs the peers and sets this: there, missing peers are a failure.
    assert!(
        std::env::var_os("H2TRACE_REQUIRE_E2E").is_none(),
        "end-to-end peers missing ({} or /usr/sbin/nginx): run scripts/install-toolchain.sh",
        py.display()
    );
    eprintln!("skipped: end-to-end peers not installed (run scripts/install-toolchain.sh)");
    None
}

fn peers_py() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/peers.py")
}

fn py_cmd(py: &PathBuf, ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(py)
        .arg(peers_py())
        .args(args);
    c
}

/// Start a Python server in `ns`; returns once it printed `ready`.
fn py_server(py: &PathBuf, ns: &str, args: &[&str]) -> KillOnDrop {
    ready(py_cmd(py, ns, args))
}

/// Start a server; returns once it printed `ready`.
fn ready(mut cmd: Command) -> KillOnDrop {
    use std::io::BufRead;
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let child = KillOnDrop(child);
    assert_eq!(line.trim(), "ready", "{cmd:?} did not start");
    child
}

/// Run a Python client in `ns` to completion; returns its pid.
fn py_client(py: &PathBuf, ns: &str, args: &[&str]) -> u32 {
    let mut c = KillOnDrop(py_cmd(py, ns, args).spawn().unwrap());
    let pid = c.0.id();
    let st = wait_timeout(&mut c.0, Duration::from_secs(60)).expect("client timed out");
    assert!(st.success(), "{args:?} failed: {st}");
    pid
}

/// nginx in the server namespace with these servers: :8081 with a 1 s keep-alive timeout,
/// :8083 a backend, :8082 a proxy to it without upstream keep-alive (nginx's default), :8084
/// static files, and :8443 HTTP/2 over TLS (a throwaway self-signed certificate) that ends a
/// connection with GOAWAY after 2 requests.
fn nginx(net: &NetPair, dir: &TempDir) -> KillOnDrop {
    let ip = &net.server_v4;
    let d = dir.0.display();
    let cert = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=h2trace-test", "-keyout"])
        .arg(dir.0.join("key.pem"))
        .arg("-out")
        .arg(dir.0.join("cert.pem"))
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(cert.success(), "openssl req failed");
    let conf = format!(
        "worker_processes 1;\nerror_log {d}/error.log warn;\npid {d}/nginx.pid;\nevents {{ worker_connections 256; }}\n\
         http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
         keepalive_timeout 1s;\n\
         server {{ listen {ip}:8081; location / {{ return 200 \"ok\\n\"; }} }}\n\
         server {{ listen {ip}:8083; keepalive_timeout 0; location / {{ return 200 \"backend\\n\"; }} }}\n\
         server {{ listen {ip}:8082; keepalive_timeout 30s; location / {{ proxy_pass http://{ip}:8083; }} }}\n\
         server {{ listen {ip}:8084; location / {{ root {d}/www; }} }}\n\
         server {{ listen {ip}:8443 ssl http2; ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;\n\
         keepalive_requests 2; location / {{ return 200 \"tls\\n\"; }} }}\n}}\n"
    );
    // A large response for clients that give up on it.
    std::fs::create_dir_all(dir.0.join("www")).unwrap();
    std::fs::write(dir.0.join("www/big"), vec![b'x'; 1 << 20]).unwrap();
    let path = dir.0.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.server,
            "nginx",
            "-g",
            "daemon off;",
            "-c",
        ])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("nginx");
    let guard = KillOnDrop(child);
    let start = Instant::now();
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &net.server, "ss", "-Hltn"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).matches(":808").count() >= 4 {
            return guard;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nginx did not start: {}",
            std::fs::read_to_string(dir.0.join("error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Trace `scenario`; check the schema and that the recording replays to itself.
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

fn finding_for<'a>(
    recs: &'a [Value],
    pattern: &str,
    pid: Option<u32>,
    comm: Option<&str>,
) -> &'a Value {
    findings(recs, pattern)
        .into_iter()
        .find(|f| {
            pid.is_none_or(|p| owner_pid(f) == Some(p as u64))
                && comm.is_none_or(|c| f["process"]["name"] == c)
        })
        .unwrap_or_else(|| {
            let all: Vec<String> = recs
                .iter()
                .filter(|r| action(r) == "finding")
                .map(|r| {
                    format!(
                        "{} {} {}",
                        r["rule"]["id"], r["process"]["pid"], r["message"]
                    )
                })
                .collect();
            panic!("no {pattern} for {pid:?}/{comm:?}; findings: {all:#?}")
        })
}

/// `http2-frame` records of one namespace: (side, direction, type) match.
fn frames_in<'a>(recs: &'a [Value], ns: &str, side: &str, dir: &str, ty: &str) -> Vec<&'a Value> {
    in_netns(recs, ns, "http2-frame")
        .into_iter()
        .map(|r| &r["h2trace"]["http2_frame"])
        .filter(|f| f["side"] == side && f["direction"] == dir && f["type"] == ty)
        .collect()
}

/// The `http2` objects of one namespace's connection records.
fn h2_conns<'a>(recs: &'a [Value], ns: &str) -> Vec<&'a Value> {
    in_netns(recs, ns, "connection-closed")
        .into_iter()
        .chain(in_netns(recs, ns, "connection-open"))
        .map(|r| &r["h2trace"]["connection"]["http2"])
        .filter(|h| !h.is_null())
        .collect()
}

/// The client reset exactly these streams with RST_STREAM(CANCEL), and the server saw each.
fn assert_cancelled(recs: &[Value], net: &NetPair, ids: &[u64]) {
    for (ns, side, dir) in [
        (&net.client, "client", "sent"),
        (&net.server, "server", "received"),
    ] {
        let r = frames_in(recs, ns, side, dir, "RST_STREAM");
        let got: Vec<_> = r.iter().map(|f| f["stream_id"].as_u64().unwrap()).collect();
        assert_eq!(got, ids, "{side}: {r:#?}");
        assert!(r.iter().all(|f| f["error"] == "CANCEL"), "{r:#?}");
    }
}

fn requests(conns: &[&Value]) -> Vec<u64> {
    conns
        .iter()
        .map(|h| h["requests"].as_u64().unwrap())
        .collect()
}

/// The grpc-go peer (tests/e2e/grpcgo), built once per run with Debian's Go and grpc-go
/// packages (GOPATH mode, offline).
fn grpcgo() -> Option<PathBuf> {
    static BIN: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/grpcgo");
        let bin = tmp.join("grpcgo");
        let built = Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg(".")
            .current_dir(&src)
            .env("GO111MODULE", "off")
            .env(
                "GOPATH",
                format!("{}:/usr/share/gocode", tmp.join("gopath").display()),
            )
            .env("GOCACHE", tmp.join("gocache"))
            .status();
        match built {
            Ok(st) if st.success() => Some(bin),
            other => {
                assert!(
                    std::env::var_os("H2TRACE_REQUIRE_E2E").is_none(),
                    "cannot build the grpc-go peer ({other:?}): run scripts/install-toolchain.sh"
                );
                eprintln!("skipped: grpc-go peer not buildable (run scripts/install-toolchain.sh)");
                None
            }
        }
    })
    .clone()
}

/// Which gRPC implementation plays both ends.
#[derive(Clone, Copy)]
enum Grpc {
    /// grpcio (Python, tests/e2e/peers.py).
    Python,
    /// grpc-go (tests/e2e/grpcgo).
    Go,
}

/// A gRPC server and client of `imp` between two fresh namespaces, traced with `trace` args
/// and recorded as fixture `name`; `server` and `client` are the peers' options after the
/// address. Returns the records, the namespaces and the client's pid.
fn grpc(
    imp: Grpc,
    name: &str,
    subnet: u8,
    trace: &[&str],
    server: &[&str],
    client: &[&str],
) -> Option<(Vec<Value>, NetPair, u32)> {
    // Both peers start as `ip netns exec NS PROGRAM MODE ADDR OPTIONS…`.
    let (program, modes): (Vec<PathBuf>, [&str; 2]) = match imp {
        Grpc::Python => (vec![python()?, peers_py()], ["grpc-server", "grpc-client"]),
        Grpc::Go => (vec![grpcgo()?], ["server", "client"]),
    };
    let net = NetPair::new(name, subnet);
    let target = format!("{}:50051", net.server_v4);
    let cmd = |ns: &str, mode: &str, opts: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .args(&program)
            .args([mode, &target])
            .args(opts);
        c
    };
    let mut pid = 0;
    let recs = traced(name, trace, || {
        let s = ready(cmd(&net.server, modes[0], server));
        let mut c = KillOnDrop(cmd(&net.client, modes[1], client).spawn().unwrap());
        pid = c.0.id();
        let st = wait_timeout(&mut c.0, Duration::from_secs(60)).expect("client timed out");
        assert!(st.success(), "{name} client failed: {st}");
        vec![s]
    });
    Some((recs, net, pid))
}

#[test]
fn grpc_channel_per_call_is_dial_per_request() {
    let Some(_lock) = kernel_test() else { return };
    let Some((recs, net, client)) = grpc(
        Grpc::Python,
        "e2e-grpc-channel-per-call",
        81,
        &["--peek"],
        &[],
        &["--calls", "25", "--channel-per-call"],
    ) else {
        return;
    };
    let f = finding_for(&recs, "dial-per-request", Some(client), None);
    assert_eq!(f["destination"]["port"], 50051);
    // grpcio writes with sendmsg: the HTTP/2 client preface, read through msghdr and iovec.
    let msg = f["message"].as_str().unwrap();
    assert!(msg.contains("HTTP/2"), "{msg}");
    let lives = in_netns(&recs, &net.client, "connection-closed");
    assert!(
        lives
            .iter()
            .any(|l| l["h2trace"]["connection"]["analysis"]["protocol"] == "h2c")
    );
    assert!(
        f["h2trace"]["finding"]["numbers"]["connections"]
            .as_u64()
            .unwrap()
            >= 10
    );
}

#[test]
fn grpc_reusing_one_channel_has_no_finding() {
    let Some(_lock) = kernel_test() else { return };
    let Some((recs, net, _)) = grpc(
        Grpc::Python,
        "e2e-grpc-healthy",
        82,
        &[],
        &["--max-concurrent-streams", "7"],
        &["--calls", "40", "--interval-ms", "50"],
    ) else {
        return;
    };
    let found: Vec<_> = recs
        .iter()
        .filter(|r| action(r) == "finding")
        .map(|r| r["message"].clone())
        .collect();
    assert!(found.is_empty(), "{found:#?}");
    // One connection carried every call, as both ends counted its streams.
    let client = h2_conns(&recs, &net.client);
    let server = h2_conns(&recs, &net.server);
    assert_eq!(requests(&client), [40], "{client:#?}");
    assert_eq!(requests(&server), [40], "{server:#?}");
    assert_eq!(client[0]["side"], "client");
    assert_eq!(client[0]["streams_opened_local"], 40);
    assert_eq!(server[0]["streams_opened_peer"], 40);
    assert!(client[0].get("desync").is_none() && server[0].get("desync").is_none());
    // SETTINGS both ways: the server's limit reached the client, which sent its own.
    assert_eq!(
        client[0]["received"]["settings"]["MAX_CONCURRENT_STREAMS"], 7,
        "{client:#?}"
    );
    assert_eq!(server[0]["sent"]["settings"]["MAX_CONCURRENT_STREAMS"], 7);
    assert_eq!(server[0]["received"]["settings"]["ENABLE_PUSH"], 0);
    let settings = frames_in(&recs, &net.server, "server", "sent", "SETTINGS");
    assert!(settings.iter().any(|f| f["ack"] == false), "{settings:#?}");
}

#[test]
fn grpc_client_pinging_faster_than_allowed_is_too_many_pings() {
    let Some(_lock) = kernel_test() else { return };
    // The server allows a ping every 2 s; the client pings every second (grpc's floor).
    let Some((recs, net, client)) = grpc(
        Grpc::Python,
        "e2e-grpc-too-many-pings",
        90,
        &[],
        &["--min-ping-interval-ms", "2000"],
        &["--calls", "1", "--keepalive-ms", "200", "--hold-ms", "4500"],
    ) else {
        return;
    };
    // The server's GOAWAY, as it sent it and as the client read it.
    for (ns, side, dir) in [
        (&net.server, "server", "sent"),
        (&net.client, "client", "received"),
    ] {
        let g = frames_in(&recs, ns, side, dir, "GOAWAY");
        assert_eq!(g.len(), 1, "{side}: {g:#?}");
        assert_eq!(g[0]["error"], "ENHANCE_YOUR_CALM");
        assert_eq!(g[0]["code"], 11);
        assert_eq!(g[0]["debug"], "too_many_pings");
        assert_eq!(g[0]["last_stream_id"], 1);
    }
    // The client's keepalive cadence: about a second between pings.
    let c = h2_conns(&recs, &net.client);
    assert_eq!(c.len(), 1, "{c:#?}");
    let min = c[0]["sent"]["min_interval_ns"].as_u64().unwrap();
    assert!((500_000_000..1_500_000_000).contains(&min), "{c:#?}");
    assert!(c[0]["sent"]["pings"].as_u64().unwrap() >= 3, "{c:#?}");
    let f = finding_for(&recs, "too-many-pings", Some(client), None);
    let msg = f["message"].as_str().unwrap();
    assert!(msg.contains("too_many_pings"), "{msg}");
}

#[test]
fn grpc_cancelled_calls_reset_their_streams() {
    let Some(_lock) = kernel_test() else { return };
    let Some((recs, net, _)) = grpc(
        Grpc::Python,
        "e2e-grpc-cancel",
        91,
        &[],
        &["--delay-ms", "1500"],
        &[
            "--calls",
            "3",
            "--cancel-after-ms",
            "300",
            "--deadline-s",
            "5",
        ],
    ) else {
        return;
    };
    // Each cancelled call is one RST_STREAM(CANCEL) on its own stream, seen from both ends.
    assert_cancelled(&recs, &net, &[1, 3, 5]);
    let c = h2_conns(&recs, &net.client);
    assert_eq!(c[0]["sent"]["rst_stream"]["CANCEL"], 3, "{c:#?}");
    assert_eq!(requests(&c), [3]);
    assert!(findings(&recs, "stream-cancel-storm").is_empty());
}

#[test]
fn grpc_callers_giving_up_is_a_stream_cancel_storm() {
    let Some(_lock) = kernel_test() else { return };
    let Some((recs, _net, client)) = grpc(
        Grpc::Python,
        "e2e-grpc-cancel-storm",
        92,
        &["--cancel-storm", "20"],
        &["--delay-ms", "1000"],
        &["--calls", "25", "--cancel-after-ms", "20"],
    ) else {
        return;
    };
    let f = finding_for(&recs, "stream-cancel-storm", Some(client), None);
    let n = &f["h2trace"]["finding"]["numbers"];
    assert!(n["sent"].as_u64().unwrap() >= 20, "{n}");
    assert_eq!(n["received"], 0, "{n}");
    let msg = f["message"].as_str().unwrap();
    assert!(msg.contains("cancelled them itself"), "{msg}");
    // The server saw the same cancellations arrive.
    let s = findings(&recs, "stream-cancel-storm");
    assert!(
        s.iter()
            .any(|f| f["h2trace"]["finding"]["numbers"]["received"].as_u64() >= Some(20)),
        "{s:#?}"
    );
}

#[test]
fn grpc_max_connection_age_is_fixed_age_rotation() {
    let Some(_lock) = kernel_test() else { return };
    let Some((recs, net, client)) = grpc(
        Grpc::Python,
        "e2e-grpc-max-age",
        83,
        &[],
        &["--max-age-ms", "700"],
        &["--calls", "90", "--interval-ms", "50"],
    ) else {
        return;
    };
    let f = finding_for(&recs, "fixed-age-rotation", Some(client), None);
    let age = f["h2trace"]["finding"]["numbers"]["age_p50_ns"]
        .as_u64()
        .unwrap();
    assert!((500_000_000..1_300_000_000).contains(&age), "age {age}");
    assert!(findings(&recs, "dial-per-request").is_empty());
    // The proof: the server's GOAWAY(NO_ERROR, "max_age") before each rotation, and the
    // finding says so.
    let goaways = frames_in(&recs, &net.client, "client", "received", "GOAWAY");
    assert!(goaways.len() >= 3, "{goaways:#?}");
    assert!(
        goaways
            .iter()
            .all(|g| g["error"] == "NO_ERROR" && g["debug"] == "max_age"),
        "{goaways:#?}"
    );
    let numbers = &f["h2trace"]["finding"]["numbers"];
    assert!(
        numbers["goaway_max_age"].as_u64().unwrap() >= 3,
        "{numbers}"
    );
    let msg = f["message"].as_str().unwrap();
    assert!(msg.contains("GOAWAY"), "{msg}");
    // Every call went over one of the rotated connections: no stream was lost or doubled.
    let conns = h2_conns(&recs, &net.client);
    assert!(conns.len() >= 3, "{conns:#?}");
    assert_eq!(requests(&conns).iter().sum::<u64>(), 90, "{conns:#?}");
}

/// grpc-go's MaxConnectionAge: GOAWAY(NO_ERROR) with no debug text, from a server that
/// writes with write(2) in 32 KiB batches, several frames per call.
#[test]
fn grpc_go_max_connection_age_is_fixed_age_rotation() {
    let Some(_lock) = kernel_test() else { return };
    let Some((recs, net, client)) = grpc(
        Grpc::Go,
        "e2e-grpcgo-max-age",
        94,
        &[],
        &["--max-age-ms", "700"],
        &["--calls", "90", "--interval-ms", "50"],
    ) else {
        return;
    };
    let f = finding_for(&recs, "fixed-age-rotation", Some(client), None);
    let msg = f["message"].as_str().unwrap();
    assert!(msg.contains("GOAWAY(NO_ERROR)"), "{msg}");
    assert!(findings(&recs, "dial-per-request").is_empty());
    let goaways = frames_in(&recs, &net.client, "client", "received", "GOAWAY");
    assert!(goaways.len() >= 3, "{goaways:#?}");
    assert!(goaways.iter().all(|g| g["error"] == "NO_ERROR"));
    let conns = h2_conns(&recs, &net.client);
    assert_eq!(requests(&conns).iter().sum::<u64>(), 90, "{conns:#?}");
    assert!(
        conns.iter().all(|h| h.get("desync").is_none()),
        "{conns:#?}"
    );
}

/// grpc-go over TLS, read from Go's crypto/tls (`--http2 all --go-binary`): the rotation is
/// proven by the GOAWAYs inside the encrypted connections, and every call is counted.
#[test]
fn grpc_go_over_tls_is_read_through_crypto_tls() {
    let Some(_lock) = kernel_test() else { return };
    let Some(bin) = grpcgo() else { return };
    let dir = TempDir::new("e2e-grpcgo-tls-cert");
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=h2trace-test", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(made.success());
    let (bin, cert, key) = (
        bin.display().to_string(),
        cert.display().to_string(),
        key.display().to_string(),
    );
    let Some((recs, net, client)) = grpc(
        Grpc::Go,
        "e2e-grpcgo-tls",
        99,
        &["--http2", "all", "--go-binary", &bin],
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--max-age-ms",
            "700",
        ],
        &["--tls", "--calls", "90", "--interval-ms", "50"],
    ) else {
        return;
    };
    for (ns, side) in [(&net.client, "client"), (&net.server, "server")] {
        let conns = h2_conns(&recs, ns);
        assert!(conns.len() >= 3, "{side}: {conns:#?}");
        assert!(conns.iter().all(|h| h["tls"] == true && h["side"] == side));
        assert_eq!(
            requests(&conns).iter().sum::<u64>(),
            90,
            "{side}: {conns:#?}"
        );
    }
    let g = frames_in(&recs, &net.client, "client", "received", "GOAWAY");
    assert!(
        g.len() >= 3 && g.iter().all(|g| g["error"] == "NO_ERROR"),
        "{g:#?}"
    );
    let f = finding_for(&recs, "fixed-age-rotation", Some(client), None);
    let msg = f["message"].as_str().unwrap();
    assert!(msg.contains("GOAWAY(NO_ERROR)"), "{msg}");
    assert_eq!(loaded_h2trace_programs(), 0);
}

/// grpc-go's MaxConnectionIdle: the server announces its idle close with GOAWAY(NO_ERROR) and
/// the client closes first. HTTP/2 says the close was the peer's, and the silence before the
/// GOAWAY is the idle timeout.
#[test]
fn grpc_go_max_connection_idle_is_idle_close_by_peer() {
    let Some(_lock) = kernel_test() else { return };
    let Some((recs, net, client)) = grpc(
        Grpc::Go,
        "e2e-grpcgo-max-idle",
        97,
        &[],
        &["--max-idle-ms", "500"],
        &["--calls", "6", "--interval-ms", "1200"],
    ) else {
        return;
    };
    let f = finding_for(&recs, "idle-close-by-peer", Some(client), None);
    let n = &f["h2trace"]["finding"]["numbers"];
    let idle = n["idle_before_close_p50_ns"].as_u64().unwrap();
    assert!((400_000_000..1_100_000_000).contains(&idle), "{n}");
    assert!(n["goaway_before_close"].as_u64().unwrap() >= 3, "{n}");
    let msg = f["message"].as_str().unwrap();
    assert!(
        msg.contains("HTTP/2 confirms it") && msg.contains("GOAWAY(NO_ERROR)"),
        "{msg}"
    );
    let goaways = frames_in(&recs, &net.client, "client", "received", "GOAWAY");
    assert!(goaways.len() >= 3, "{goaways:#?}");
    assert!(findings(&recs, "fixed-age-rotation").is_empty());
}

/// grpc-go's keepalive enforcement: a client pinging every 10 s (grpc-go's floor) against a
/// server that allows one a minute gets GOAWAY(ENHANCE_YOUR_CALM, "too_many_pings") after
/// its third strike, 30–40 s in.
#[test]
fn grpc_go_client_pinging_faster_than_allowed_is_too_many_pings() {
    let Some(_lock) = kernel_test() else { return };
    let Some((recs, net, client)) = grpc(
        Grpc::Go,
        "e2e-grpcgo-too-many-pings",
        98,
        &[],
        &["--min-ping-interval-ms", "60000"],
        &[
            "--calls",
            "1",
            "--keepalive-ms",
            "10000",
            // The GOAWAY comes with the third ping that counts as a strike: 30 s in when the
            // flow-control ping after the call set the server's clock, 40 s when there was none.
            "--hold-ms",
            "45000",
        ],
    ) else {
        return;
    };
    let g = frames_in(&recs, &net.client, "client", "received", "GOAWAY");
    assert!(
        !g.is_empty(),
        "no GOAWAY; client connections: {:#?}",
        h2_conns(&recs, &net.client)
    );
    assert_eq!(
        (g[0]["error"].as_str(), g[0]["debug"].as_str()),
        (Some("ENHANCE_YOUR_CALM"), Some("too_many_pings"))
    );
    let f = finding_for(&recs, "too-many-pings", Some(client), None);
    let n = &f["h2trace"]["finding"]["numbers"];
    let ping = n["client_ping_min_interval_ns"].as_u64().unwrap();
    assert!((9_000_000_000..11_000_000_000).contains(&ping), "{n}");
}

/// grpc-go cancels a call with RST_STREAM(CANCEL) on its stream; its server sends nothing back.
#[test]
fn grpc_go_cancelled_calls_reset_their_streams() {
    let Some(_lock) = kernel_test() else { return };
    let Some((recs, net, _)) = grpc(
        Grpc::Go,
        "e2e-grpcgo-cancel",
        95,
        &[],
        &["--delay-ms", "1500"],
        // The hold lets the last RST_STREAM out: grpc-go writes it from another goroutine,
        // and closing the connection at once can drop it.
        &[
            "--calls",
            "3",
            "--cancel-after-ms",
            "300",
            "--hold-ms",
            "300",
        ],
    ) else {
        return;
    };
    assert_cancelled(&recs, &net, &[1, 3, 5]);
    // grpc-go's server announces its frame size limit, and nothing else.
    let s = frames_in(&recs, &net.client, "client", "received", "SETTINGS");
    assert!(
        s.iter().any(|f| f["settings"]["MAX_FRAME_SIZE"] == 16384),
        "{s:#?}"
    );
}

/// A call whose deadline passes: grpc-go's client resets the stream with CANCEL (the server
/// here waits out its delay, so nothing races the client).
#[test]
fn grpc_go_deadline_resets_the_stream() {
    let Some(_lock) = kernel_test() else { return };
    let Some((recs, net, _)) = grpc(
        Grpc::Go,
        "e2e-grpcgo-deadline",
        100,
        &[],
        &["--delay-ms", "1000", "--ignore-deadline"],
        &["--calls", "2", "--deadline-ms", "200", "--hold-ms", "300"],
    ) else {
        return;
    };
    assert_cancelled(&recs, &net, &[1, 3]);
}

/// A grpc-go connection per call: each carried exactly one stream, which the finding says.
#[test]
fn grpc_go_connection_per_call_carries_one_stream_each() {
    let Some(_lock) = kernel_test() else { return };
    let Some((recs, net, client)) = grpc(
        Grpc::Go,
        "e2e-grpcgo-conn-per-call",
        96,
        &[],
        &[],
        &["--calls", "25", "--conn-per-call"],
    ) else {
        return;
    };
    // Should one go missing, say what each connection looked like, and what was lost.
    let seen: Vec<String> = ["connection-closed", "connection-open"]
        .iter()
        .flat_map(|a| in_netns(&recs, &net.client, a))
        .map(|r| {
            let c = &r["h2trace"]["connection"];
            let id = &r["h2trace"]["socket"]["id"];
            let frames: Vec<String> = recs
                .iter()
                .filter(|f| action(f) == "http2-frame" && &f["h2trace"]["socket"]["id"] == id)
                .map(|f| {
                    let f = &f["h2trace"]["http2_frame"];
                    format!("{} {} {}", f["direction"], f["type"], f["side"])
                })
                .collect();
            format!(
                "{} :{} {} {} http2={} frames={frames:?}",
                action(r),
                r["source"]["port"],
                r["h2trace"]["socket"]["seen_from"],
                c["states"],
                c["http2"]
            )
        })
        .collect();
    let summary = &recs.last().unwrap()["h2trace"]["summary"];
    assert_eq!(
        requests(&h2_conns(&recs, &net.client)),
        [1; 25],
        "{seen:#?}\n{summary}"
    );
    let f = finding_for(&recs, "dial-per-request", Some(client), None);
    let msg = f["message"].as_str().unwrap();
    assert!(msg.contains("single stream"), "{msg}");
    let n = &f["h2trace"]["finding"]["numbers"];
    assert_eq!(
        n["single_stream_connections"], n["http2_connections"],
        "{n}"
    );
}

#[test]
fn nginx_keepalive_timeout_is_idle_close_by_peer() {
    let Some(_lock) = kernel_test() else { return };
    let Some(py) = python() else { return };
    let net = NetPair::new("e2e-nginx-idle", 84);
    let dir = TempDir::new("e2e-nginx-idle");
    let url = format!("http://{}:8081/", net.server_v4);
    let mut client = 0;
    let recs = traced("e2e-nginx-idle-timeout", &[], || {
        let nginx = nginx(&net, &dir);
        // A pooled client (requests.Session) that pauses longer than nginx keeps idle connections.
        client = py_client(
            &py,
            &net.client,
            &[
                "http-client",
                &url,
                "--requests",
                "5",
                "--pause-ms",
                "1600",
                "--session",
            ],
        );
        vec![nginx]
    });
    let f = finding_for(&recs, "idle-close-by-peer", Some(client), None);
    let idle = f["h2trace"]["finding"]["numbers"]["idle_before_close_p50_ns"]
        .as_u64()
        .unwrap();
    assert!(
        (800_000_000..1_400_000_000).contains(&idle),
        "nginx's 1 s timeout, measured {idle}"
    );
}

/// HTTP/2 over TLS, read from OpenSSL's plaintext (`--http2 all`): curl fetches three URLs;
/// nginx ends the connection after two requests with GOAWAY, and curl opens another.
#[test]
fn nginx_and_curl_over_tls_show_their_http2_frames() {
    let Some(_lock) = kernel_test() else { return };
    let Some(_py) = python() else { return };
    if !std::path::Path::new("/usr/bin/curl").exists() {
        assert!(
            std::env::var_os("H2TRACE_REQUIRE_E2E").is_none(),
            "curl missing: run scripts/install-toolchain.sh"
        );
        return;
    }
    let net = NetPair::new("e2e-nginx-tls", 93);
    let dir = TempDir::new("e2e-nginx-tls");
    let urls: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|p| format!("https://{}:8443/{p}", net.server_v4))
        .collect();
    let recs = traced("e2e-nginx-tls", &["--http2", "all"], || {
        let nginx = nginx(&net, &dir);
        let st = Command::new("ip")
            .args(["netns", "exec", &net.client, "curl", "-sk", "--http2"])
            .args(&urls)
            .stdout(Stdio::null())
            .status()
            .expect("curl");
        assert!(st.success(), "curl: {st}");
        vec![nginx]
    });
    for (ns, side) in [(&net.client, "client"), (&net.server, "server")] {
        let conns = h2_conns(&recs, ns);
        let mut reqs = requests(&conns);
        reqs.sort();
        assert_eq!(reqs, [1, 2], "{side}: {conns:#?}");
        assert!(conns.iter().all(|h| h["tls"] == true && h["side"] == side));
    }
    // nginx's GOAWAY after the second request (stream 3), as sent and as curl read it.
    for (ns, side, dir) in [
        (&net.server, "server", "sent"),
        (&net.client, "client", "received"),
    ] {
        let g = frames_in(&recs, ns, side, dir, "GOAWAY");
        assert!(!g.is_empty(), "{side}: no GOAWAY");
        assert_eq!(g[0]["error"], "NO_ERROR");
        assert_eq!(g[0]["last_stream_id"], 3, "{g:#?}");
    }
    let settings = frames_in(&recs, &net.client, "client", "received", "SETTINGS");
    assert!(
        settings
            .iter()
            .any(|f| f["settings"]["MAX_CONCURRENT_STREAMS"] == 128),
        "{settings:#?}"
    );
    // The uprobes went with h2trace.
    assert_eq!(loaded_h2trace_programs(), 0);
}

#[test]
fn nginx_proxy_without_upstream_keepalive_is_upstream_churn() {
    let Some(_lock) = kernel_test() else { return };
    let Some(py) = python() else { return };
    let net = NetPair::new("e2e-nginx-proxy", 85);
    let dir = TempDir::new("e2e-nginx-proxy");
    let url = format!("http://{}:8082/", net.server_v4);
    let recs = traced("e2e-nginx-proxy", &[], || {
        let nginx = nginx(&net, &dir);
        py_client(
            &py,
            &net.client,
            &[
                "http-client",
                &url,
                "--requests",
                "25",
                "--pause-ms",
                "20",
                "--session",
            ],
        );
        vec![nginx]
    });
    let f = finding_for(&recs, "proxy-upstream-churn", None, Some("nginx"));
    assert!(
        f["h2trace"]["finding"]["numbers"]["connections"]
            .as_u64()
            .unwrap()
            >= 20
    );
    let up = finding_for(&recs, "dial-per-request", None, Some("nginx"));
    assert_eq!(up["destination"]["port"], 8083);
}

#[test]
fn grpc_tls_to_a_plaintext_server_is_a_handshake_failure_loop() {
    let Some(_lock) = kernel_test() else { return };
    let Some((recs, _net, client)) = grpc(
        Grpc::Python,
        "e2e-grpc-tls-mismatch",
        86,
        &[],
        &[],
        &["--tls", "--deadline-s", "3"],
    ) else {
        return;
    };
    let f = finding_for(&recs, "handshake-failure-loop", Some(client), None);
    assert!(
        f["h2trace"]["finding"]["numbers"]["connections"]
            .as_u64()
            .unwrap()
            >= 3
    );
}

#[test]
fn nginx_idle_close_left_unnoticed_is_close_wait_stuck() {
    let Some(_lock) = kernel_test() else { return };
    let Some(py) = python() else { return };
    let net = NetPair::new("e2e-nginx-cw", 87);
    let dir = TempDir::new("e2e-nginx-cw");
    let url = format!("http://{}:8081/", net.server_v4);
    let mut client = 0;
    let recs = traced(
        "e2e-nginx-close-wait",
        &["--close-wait-stuck", "1s"],
        || {
            let nginx = nginx(&net, &dir);
            // One request, then the pooled connection sits unused while nginx closes it after 1 s.
            client = py_client(
                &py,
                &net.client,
                &[
                    "http-client",
                    &url,
                    "--requests",
                    "1",
                    "--session",
                    "--hold-ms",
                    "3500",
                ],
            );
            vec![nginx]
        },
    );
    let f = finding_for(&recs, "close-wait-stuck", Some(client), None);
    assert!(
        f["h2trace"]["finding"]["numbers"]["close_wait_longest_ns"]
            .as_u64()
            .unwrap()
            >= 1_000_000_000
    );
}

#[test]
fn requests_abandoning_responses_is_an_rst_storm() {
    let Some(_lock) = kernel_test() else { return };
    let Some(py) = python() else { return };
    let net = NetPair::new("e2e-rst", 88);
    let dir = TempDir::new("e2e-rst");
    let url = format!("http://{}:8084/big", net.server_v4);
    let mut client = 0;
    let recs = traced("e2e-requests-abandon", &["--rst-storm", "15"], || {
        let nginx = nginx(&net, &dir);
        client = py_client(
            &py,
            &net.client,
            &["http-client", &url, "--requests", "25", "--abandon"],
        );
        vec![nginx]
    });
    let f = finding_for(&recs, "rst-storm", Some(client), None);
    assert!(
        f["h2trace"]["finding"]["numbers"]["resets"]
            .as_u64()
            .unwrap()
            >= 15
    );
}

#[test]
fn requests_without_a_session_piles_up_time_wait() {
    let Some(_lock) = kernel_test() else { return };
    let Some(py) = python() else { return };
    let net = NetPair::new("e2e-tw", 89);
    let dir = TempDir::new("e2e-tw");
    let url = format!("http://{}:8081/", net.server_v4);
    let mut client = 0;
    let recs = traced(
        "e2e-requests-no-session",
        &["--time-wait-pileup", "20", "--peek"],
        || {
            let nginx = nginx(&net, &dir);
            client = py_client(&py, &net.client, &["http-client", &url, "--requests", "30"]);
            vec![nginx]
        },
    );
    finding_for(&recs, "time-wait-pileup", Some(client), None);
    let dial = finding_for(&recs, "dial-per-request", Some(client), None);
    assert_eq!(dial["destination"]["port"], 8081);
    // With --peek the bytes say which protocol: requests sends "GET /", nginx "HTTP/1.1 200".
    let msg = dial["message"].as_str().unwrap();
    assert!(msg.contains("HTTP/1.x"), "{msg}");
    let lives = in_netns(&recs, &net.client, "connection-closed");
    assert!(
        lives
            .iter()
            .all(|l| l["h2trace"]["connection"]["first_bytes"] == "474554202f204854")
    );
    let served = in_netns(&recs, &net.server, "connection-closed");
    assert!(
        served
            .iter()
            .all(|l| l["h2trace"]["connection"]["analysis"]["protocol"] == "http/1")
    );
}

/// A gRPC connection through the router goes idle; then the router `verdict`s its packets.
fn grpc_through_middlebox(tag: &str, subnet: u8, verdict: &str) -> (Vec<Value>, u32) {
    let py = python().expect("checked by the caller");
    let net = NetPair::with_router(tag, subnet);
    let target = format!("{}:50051", net.server_v4);
    let mut client = 0;
    let recs = traced(tag, &[], || {
        let server = py_server(&py, &net.server, &["grpc-server", &target]);
        let mut c = KillOnDrop(
            py_cmd(
                &py,
                &net.client,
                &[
                    "grpc-client",
                    &target,
                    "--calls",
                    "2",
                    "--pause-after-first-ms",
                    "1500",
                    "--deadline-s",
                    "3",
                ],
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
        );
        client = c.0.id();
        // The path dies during the pause: after the first call however slow the start, and
        // after the HTTP/2 frames that follow a call at once (WINDOW_UPDATE, a BDP PING).
        NetPair::wait_paused(&mut c);
        std::thread::sleep(Duration::from_millis(300));
        net.router_block(50051, verdict);
        wait_timeout(&mut c.0, Duration::from_secs(20)).expect("client timed out");
        vec![server]
    });
    (recs, client)
}

#[test]
fn grpc_through_a_middlebox_that_forgets_is_a_black_hole() {
    let Some(_lock) = kernel_test() else { return };
    if python().is_none() {
        return;
    }
    let (recs, client) = grpc_through_middlebox("e2e-grpc-blackhole", 90, "drop");
    let f = finding_for(&recs, "black-hole", Some(client), None);
    let gap = f["h2trace"]["finding"]["numbers"]["idle_gap_ns"]
        .as_u64()
        .unwrap();
    assert!(
        (1_200_000_000..2_500_000_000).contains(&gap),
        "idle gap {gap}"
    );
}

#[test]
fn grpc_through_a_middlebox_that_resets_is_reset_after_idle() {
    let Some(_lock) = kernel_test() else { return };
    if python().is_none() {
        return;
    }
    let (recs, client) = grpc_through_middlebox("e2e-grpc-forgedrst", 91, "reject with tcp reset");
    let f = finding_for(&recs, "reset-after-idle", Some(client), None);
    let gap = f["h2trace"]["finding"]["numbers"]["idle_gap_ns"]
        .as_u64()
        .unwrap();
    assert!(
        (1_200_000_000..2_500_000_000).contains(&gap),
        "idle gap {gap}"
    );
}
