//! Shared by the kernel integration tests: private network namespaces, the real h2trace
//! binary, the `tcp_peer` example as client and server.
//!
//! Every test runs as root, one at a time (a process-wide lock), in its own pair of network
//! namespaces joined by a veth pair. Addresses come from 198.18.0.0/15 and fd18::/16 (benchmark
//! ranges) and exist only inside those namespaces; everything is removed on drop, also when a
//! test fails.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

/// Take the serial lock, or `None` (test skipped, with a message) when not root or when
/// `H2TRACE_SKIP_KERNEL_TESTS` is set.
pub fn kernel_test() -> Option<MutexGuard<'static, ()>> {
    if std::env::var_os("H2TRACE_SKIP_KERNEL_TESTS").is_some() {
        eprintln!("skipped: H2TRACE_SKIP_KERNEL_TESTS is set");
        return None;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: kernel integration tests need root");
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|p| p.into_inner()))
}

pub fn h2trace_bin() -> &'static str {
    env!("CARGO_BIN_EXE_h2trace")
}

/// The `tcp_peer` example.
pub fn peer_bin() -> PathBuf {
    example_bin("tcp_peer")
}

/// An example, which `cargo test` builds along with the tests: as `examples/NAME` after
/// `cargo build --examples`, as `examples/NAME-<hash>` otherwise.
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    if dir.join(name).exists() {
        return dir.join(name); // `cargo xtask test` builds it so
    }
    let prefix = format!("{name}-");
    let newest = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            let f = e.file_name().to_string_lossy().into_owned();
            f.starts_with(&prefix) && !f.contains('.')
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    match newest {
        Some(e) => e.path(),
        None => panic!(
            "no {name} in {}: run the tests with `cargo test` (it builds examples)",
            dir.display()
        ),
    }
}

/// A duration the tests wait for or bound something by, stretched under software emulation:
/// the kernel matrix (xtask/src/vm.rs) sets `H2TRACE_TEST_SLOWDOWN`, because its emulated CPUs
/// run the same work several times slower.
pub fn scaled(d: Duration) -> Duration {
    let factor = std::env::var("H2TRACE_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    d * factor
}

/// Whether this kernel's tracepoint has the field (layouts differ: `tcp:tcp_send_reset` has
/// `reason` only since 6.10, which the kernel matrix runs below).
pub fn tracepoint_has(event: &str, field: &str) -> bool {
    let format = std::fs::read_to_string(format!("/sys/kernel/tracing/events/{event}/format"))
        .unwrap_or_else(|e| panic!("tracepoint {event}: {e}"));
    format.contains(&format!(" {field};"))
}

/// h2trace programs still loaded in the kernel (by name; the kernel keeps 15 characters),
/// waiting up to 5 s for the count to drop to zero.
pub fn loaded_h2trace_programs() -> usize {
    const NAMES: [&str; 12] = [
        "inet_sock_set_",
        "tcp_set_state_k",
        "tcp_sendmsg_kpr",
        "sock_send_lengt",
        "tcp_destroy_soc",
        "ct_xmit",
        "ct_drop",
        "ct_refresh_kpro",
        "sched_process_f",
        "sock_recv_lengt",
        "tcp_receive_res",
        "ssl_return",
    ];
    let count = || {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| {
                p.name_as_str()
                    .is_some_and(|n| NAMES.iter().any(|k| n.starts_with(k)))
            })
            .count()
    };
    let start = Instant::now();
    loop {
        let n = count();
        if n == 0 || start.elapsed() > Duration::from_secs(5) {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// A client namespace and a server namespace joined by veth, or (`with_router`) through a
/// router namespace in between, where nftables can play the middlebox.
pub struct NetPair {
    pub client: String,
    pub server: String,
    pub router: Option<String>,
    pub client_v4: String,
    pub server_v4: String,
    pub client_v6: String,
    pub server_v6: String,
}

fn veth(a_ns: &str, a: &str, b_ns: &str, b: &str) {
    ip(&[
        "-n", a_ns, "link", "add", a, "type", "veth", "peer", "name", b, "netns", b_ns,
    ]);
}

fn addr(ns: &str, dev: &str, cidr: &str) {
    let mut args = vec!["-n", ns, "addr", "add", cidr, "dev", dev];
    if cidr.contains(':') {
        args.push("nodad");
    }
    ip(&args);
    ip(&["-n", ns, "link", "set", dev, "up"]);
}

impl NetPair {
    /// `tag` keeps names unique per test; the pid keeps them unique per run.
    pub fn new(tag: &str, subnet: u8) -> Self {
        let pair = Self::names(tag, subnet, false);
        let (vc, vs) = (format!("h2c{subnet}"), format!("h2s{subnet}"));
        veth(&pair.client, &vc, &pair.server, &vs);
        addr(&pair.client, &vc, &format!("{}/24", pair.client_v4));
        addr(&pair.client, &vc, &format!("{}/64", pair.client_v6));
        addr(&pair.server, &vs, &format!("{}/24", pair.server_v4));
        addr(&pair.server, &vs, &format!("{}/64", pair.server_v6));
        pair
    }

    /// client 198.18.S.1 — (198.18.S.254 router 198.19.S.254) — 198.19.S.2 server, IPv4.
    pub fn with_router(tag: &str, subnet: u8) -> Self {
        let pair = Self::names(tag, subnet, true);
        let r = pair.router.clone().unwrap();
        let (c, rc, rs, s) = (
            format!("h2c{subnet}"),
            format!("h2rc{subnet}"),
            format!("h2rs{subnet}"),
            format!("h2s{subnet}"),
        );
        veth(&pair.client, &c, &r, &rc);
        veth(&r, &rs, &pair.server, &s);
        addr(&pair.client, &c, &format!("{}/24", pair.client_v4));
        addr(&r, &rc, &format!("198.18.{subnet}.254/24"));
        addr(&r, &rs, &format!("198.19.{subnet}.254/24"));
        addr(&pair.server, &s, &format!("{}/24", pair.server_v4));
        ip(&[
            "-n",
            &pair.client,
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{subnet}.254"),
        ]);
        ip(&[
            "-n",
            &pair.server,
            "route",
            "add",
            "default",
            "via",
            &format!("198.19.{subnet}.254"),
        ]);
        run(Command::new("ip").args([
            "netns",
            "exec",
            &r,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]));
        pair
    }

    fn names(tag: &str, subnet: u8, router: bool) -> Self {
        let id = format!("{tag}-{}", std::process::id());
        let pair = Self {
            client: format!("h2t-{id}-c"),
            server: format!("h2t-{id}-s"),
            router: router.then(|| format!("h2t-{id}-r")),
            client_v4: format!("198.18.{subnet}.1"),
            server_v4: if router {
                format!("198.19.{subnet}.2")
            } else {
                format!("198.18.{subnet}.2")
            },
            client_v6: format!("fd18:{subnet}::1"),
            server_v6: format!("fd18:{subnet}::2"),
        };
        // Remove leftovers of an earlier crashed run with the same names.
        pair.remove();
        for ns in pair.namespaces() {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    fn namespaces(&self) -> Vec<&String> {
        [Some(&self.client), Some(&self.server), self.router.as_ref()]
            .into_iter()
            .flatten()
            .collect()
    }

    fn remove(&self) {
        for ns in self.namespaces() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Run `nft` with a ruleset in the router namespace.
    pub fn router_nft(&self, ruleset: &str) {
        let r = self.router.as_ref().expect("a router namespace");
        let mut child = Command::new("ip")
            .args(["netns", "exec", r, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft (apt install nftables)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Make the router `verdict` (e.g. `drop`, `reject with tcp reset`) every packet to TCP
    /// port `port`: a middlebox that forgot the connection.
    pub fn router_block(&self, port: u16, verdict: &str) {
        self.router_nft(&format!(
            "table inet h2t {{\n chain forward_filter {{\n  type filter hook forward priority 0;\n  tcp dport {port} {verdict}\n }}\n}}\n"
        ));
    }

    /// The namespace's inode, as h2trace reports it in `h2trace.netns`.
    pub fn inode(ns: &str) -> u64 {
        std::fs::metadata(Path::new("/run/netns").join(ns))
            .unwrap()
            .ino()
    }

    fn peer(ns: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(peer_bin()).args(args);
        cmd
    }

    /// Start `tcp_peer server ADDR ARGS…` in the server namespace; returns once it listens.
    pub fn server(&self, addr: &str, args: &[&str]) -> KillOnDrop {
        self.listener(&self.server, &[&["server", addr], args].concat())
    }

    /// Start a listening `tcp_peer` (server or proxy) in namespace `ns`.
    pub fn listener(&self, ns: &str, args: &[&str]) -> KillOnDrop {
        let mut child = Self::peer(ns, args).stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let child = KillOnDrop(child);
        assert_eq!(line.trim(), "ready", "tcp_peer {args:?} did not start");
        child
    }

    /// Start `tcp_peer client ADDR ARGS…` in the client namespace.
    pub fn spawn_client(&self, addr: &str, args: &[&str]) -> KillOnDrop {
        KillOnDrop(
            Self::peer(&self.client, &[&["client", addr], args].concat())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    /// Wait until a client started with `--pause-after-first` has done its first exchange and
    /// pauses: on an emulated kernel the first exchange can take longer than any fixed sleep.
    pub fn wait_paused(client: &mut KillOnDrop) {
        let mut line = String::new();
        BufReader::new(client.0.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "paused", "the client ended before its pause");
    }

    /// Set one sysctl (`name=value`) inside namespace `ns`.
    pub fn sysctl(ns: &str, setting: &str) {
        ip(&["netns", "exec", ns, "sysctl", "-qw", setting]);
    }

    /// Wait (at most 30 s) until namespace `ns` holds at least `n` established TCP sockets: a
    /// fixed sleep is too short on a loaded machine.
    pub fn wait_established(ns: &str, n: usize) {
        Self::wait_sockets(ns, "established", n);
    }

    /// Wait (at most 30 s) until namespace `ns` holds at least `n` TCP sockets in `state` (as
    /// `ss` spells it).
    pub fn wait_sockets(ns: &str, state: &str, n: usize) {
        let start = std::time::Instant::now();
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "ss", "-Htn", "state", state])
                .output()
                .unwrap();
            let have = String::from_utf8_lossy(&out.stdout).lines().count();
            if have >= n {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{ns}: {have} {state} sockets, expected {n}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run `tcp_peer client ADDR ARGS…` to completion (at most 60 s); returns its pid.
    pub fn client(&self, addr: &str, args: &[&str]) -> u32 {
        let mut c = self.spawn_client(addr, args);
        let pid = c.0.id();
        let st = wait_timeout(&mut c.0, Duration::from_secs(60)).expect("client timed out");
        assert!(st.success(), "client failed: {st}");
        pid
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A child process stopped when the test ends, also when it fails: SIGTERM first (so that a
/// server such as nginx takes its workers down with it), SIGKILL if it lingers.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if wait_timeout(&mut self.0, Duration::from_secs(3)).is_some() {
                return;
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running h2trace writing NDJSON to a file.
pub struct Tracer {
    child: Child,
    pub out: PathBuf,
    _dir: TempDir,
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("h2trace-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Tracer {
    /// Start h2trace with `args` (NDJSON to a file) and wait for its `started` record.
    pub fn start(tag: &str, args: &[&str]) -> Self {
        let dir = TempDir::new(tag);
        let out = dir.0.join("out.ndjson");
        let mut cmd = Command::new(h2trace_bin());
        cmd.args(["--format", "ndjson", "--output"])
            .arg(&out)
            .args(args);
        // The kernel matrix (`cargo xtask test`, xtask/src/vm.rs) runs the tests once more with
        // another state hook than the default.
        if let Some(probe) = std::env::var_os("H2TRACE_TEST_PROBE") {
            cmd.arg("--probe").arg(probe);
        }
        let child = cmd.stderr(Stdio::piped()).spawn().unwrap();
        let mut t = Self {
            child,
            out,
            _dir: dir,
        };
        let start = Instant::now();
        while !std::fs::read_to_string(&t.out)
            .unwrap_or_default()
            .contains("\"action\":\"started\"")
        {
            if let Some(st) = t.child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                t.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("h2trace exited early ({st}): {err}");
            }
            assert!(
                start.elapsed() < scaled(Duration::from_secs(30)),
                "h2trace did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(exit code)` once h2trace has exited.
    pub fn try_exit_code(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().unwrap().map(|s| s.code())
    }

    /// SIGINT, wait for exit (130), return every record.
    pub fn stop(self) -> Vec<Value> {
        self.stop_keep().0
    }

    /// Like `stop`, and keep the recorded file (it lives as long as the returned guard).
    pub fn stop_keep(self) -> (Vec<Value>, TempDir, PathBuf) {
        let (dir, out) = self.stop_file();
        (read_records(&out), dir, out)
    }

    /// Wait for h2trace to end on its own (`--pid`: every traced process has exited and its
    /// sockets have closed): exit 0, saying why. Returns the records like `stop_keep`.
    pub fn ended(mut self) -> (Vec<Value>, TempDir, PathBuf) {
        let st = wait_timeout(&mut self.child, scaled(Duration::from_secs(40)))
            .expect("h2trace did not end when its processes had");
        let mut err = String::new();
        use std::io::Read;
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert_eq!(st.code(), Some(0), "{err}");
        assert!(err.contains("every traced process has exited"), "{err}");
        let dir = std::mem::replace(&mut self._dir, TempDir(PathBuf::new()));
        (read_records(&self.out), dir, self.out.clone())
    }

    /// SIGINT, wait for exit (130), and return the recorded file unread (it lives as long as
    /// the returned guard).
    pub fn stop_file(mut self) -> (TempDir, PathBuf) {
        // Let the last records of the traffic reach the buffers and the drain timer.
        std::thread::sleep(Duration::from_millis(300));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let st = wait_timeout(&mut self.child, scaled(Duration::from_secs(20)))
            .expect("h2trace did not stop on SIGINT");
        assert_eq!(st.code(), Some(130), "SIGINT must exit 130");
        let dir = std::mem::replace(&mut self._dir, TempDir(PathBuf::new()));
        (dir, self.out.clone())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn read_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

pub fn action(v: &Value) -> &str {
    v["event"]["action"].as_str().unwrap_or_default()
}

/// Records of one action in one network namespace.
pub fn in_netns<'a>(recs: &'a [Value], ns: &str, act: &str) -> Vec<&'a Value> {
    let ino = NetPair::inode(ns);
    recs.iter()
        .filter(|r| r["h2trace"]["netns"].as_u64() == Some(ino) && action(r) == act)
        .collect()
}

/// The full state sequence of a life record: first state, then every transition.
pub fn states(life: &Value) -> Vec<String> {
    let c = &life["h2trace"]["connection"];
    std::iter::once(c["first_state"].as_str().unwrap().to_string())
        .chain(
            c["states"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["state"].as_str().unwrap().to_string()),
        )
        .collect()
}

/// The same sequence rebuilt from `--events all` state-change records of one socket.
pub fn live_states(recs: &[Value], socket_id: &str) -> Vec<String> {
    let changes: Vec<_> = recs
        .iter()
        .filter(|r| action(r) == "state-change" && r["h2trace"]["socket"]["id"] == socket_id)
        .collect();
    let mut out: Vec<String> = changes
        .first()
        .map(|c| c["h2trace"]["state"]["old"].as_str().unwrap().into())
        .into_iter()
        .collect();
    out.extend(
        changes
            .iter()
            .map(|c| c["h2trace"]["state"]["new"].as_str().unwrap().to_string()),
    );
    out
}

pub fn owner_pid(r: &Value) -> Option<u64> {
    r["process"]["pid"].as_u64()
}

/// Every record matches docs/h2trace.schema.json, and the stream has a start and a summary.
pub fn validate_all(recs: &[Value]) {
    let schema: Value = serde_json::from_str(include_str!("../../../docs/h2trace.schema.json"))
        .expect("schema is JSON");
    let v = jsonschema::validator_for(&schema).expect("schema compiles");
    for r in recs {
        if let Err(e) = v.validate(r) {
            panic!("record does not match docs/h2trace.schema.json: {e}\n{r:#}");
        }
    }
    assert_eq!(action(&recs[0]), "started");
    assert_eq!(action(recs.last().unwrap()), "summary");
    // The state hook is the one the run means to test: the one the kernel matrix names, else
    // the default's first choice wherever the kernel has BTF.
    let hook = recs[0]["h2trace"]["probe"]["state_hook"]
        .as_str()
        .unwrap_or_default();
    let want = match std::env::var("H2TRACE_TEST_PROBE").ok().as_deref() {
        Some("tp-btf") => Some("tp_btf inet_sock_set_state"),
        Some("tracepoint") => Some("tracepoint sock:inet_sock_set_state"),
        Some("fentry") => Some("fentry tcp_set_state"),
        Some("kprobe") => Some("kprobe tcp_set_state"),
        Some(other) => panic!("H2TRACE_TEST_PROBE={other}: no expectation for it"),
        None => Path::new("/sys/kernel/btf/vmlinux")
            .exists()
            .then_some("tp_btf inet_sock_set_state"),
    };
    if let Some(want) = want {
        assert_eq!(hook, want, "the state hook in {}", recs[0]);
    }
}

/// `h2trace replay` of a recorded stream must print it again, byte for byte: the same events,
/// connection records and findings. Returns the replay's exit code.
pub fn assert_replay_identical(recorded: &Path) {
    let out = Command::new(h2trace_bin())
        .args(["replay", "-f", "ndjson"])
        .arg(recorded)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "replay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live = std::fs::read_to_string(recorded).unwrap();
    let replayed = String::from_utf8(out.stdout).unwrap();
    if live != replayed {
        let (l, r): (Vec<_>, Vec<_>) = (live.lines().collect(), replayed.lines().collect());
        let first = l
            .iter()
            .zip(&r)
            .position(|(a, b)| a != b)
            .unwrap_or(l.len().min(r.len()));
        panic!(
            "replay differs from the live run at line {} ({} vs {} lines):\nlive:   {}\nreplay: {}",
            first + 1,
            l.len(),
            r.len(),
            l.get(first).unwrap_or(&""),
            r.get(first).unwrap_or(&"")
        );
    }
}

/// Findings of one pattern.
pub fn findings<'a>(recs: &'a [Value], pattern: &str) -> Vec<&'a Value> {
    recs.iter()
        .filter(|r| action(r) == "finding" && r["h2trace"]["finding"]["pattern"] == pattern)
        .collect()
}

/// If `H2TRACE_RECORD_FIXTURES` names a folder, keep a copy of the stream there as NAME.ndjson.
pub fn keep_fixture(recorded: &Path, name: &str) {
    if let Some(dir) = std::env::var_os("H2TRACE_RECORD_FIXTURES") {
        std::fs::copy(recorded, Path::new(&dir).join(format!("{name}.ndjson"))).unwrap();
    }
}
