//! `cargo xtask bench`: connection churn with and without tracers, interleaved and repeated.
//! Prints, per tracer, the throughput ratio against no tracer, the tracer's CPU time per
//! million kernel state changes, its peak RSS, records lost, and records written against
//! expected; then, from one more run of h2trace's default mode with the kernel's BPF run-time
//! statistics on, what each of its programs costs per run and per connection. Measures only;
//! nothing here is asserted.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// A bpftrace script in the style of tcpstates: one line per TCP state change.
const BPFTRACE_TCPSTATES: &str = r#"tracepoint:sock:inet_sock_set_state /args->protocol == 6/ {
  printf("%llu %d %s %d %d %d %d\n", nsecs, pid, comm, args->sport, args->dport, args->oldstate, args->newstate);
}"#;

pub struct Opts {
    pub seconds: f64,
    pub rounds: usize,
    pub threads: usize,
    pub modes: Vec<String>,
    /// Live sockets for the memory run (0: skip it).
    pub held: usize,
    /// Only the tracers whose name contains one of these (no tracer always runs); empty: all.
    pub tools: Vec<String>,
}

const STARTED: &str = "\"action\":\"started\"";

/// The row of h2trace's default mode.
const DEFAULT: &str = "h2trace ringbuf ndjson";

struct Tool {
    name: &'static str,
    /// Command line, with `{out}` for the output file; empty for "no tracer".
    argv: Vec<String>,
    /// Text the tool writes once it traces (h2trace's `started`): the load waits for it, so
    /// the tool's start-up is neither counted in its CPU nor a time when records are lost.
    ready: Option<&'static str>,
    /// Seconds to wait after starting (after `ready`, if any) before the load.
    warmup: f64,
    /// What one written line is: a socket life, or a state change.
    counts: Unit,
}

#[derive(Clone, Copy, PartialEq)]
enum Unit {
    None,
    /// h2trace records: count `connection-closed` lines (plus live events when asked).
    Lives,
    StateChanges,
}

struct Sample {
    rate: f64,
    cpu_s: f64,
    rss_kib: u64,
    lost: Option<u64>,
    written: u64,
    expected: u64,
    state_changes: u64,
    /// Connections (churn) or exchanges (`keep`, `h2`, `pipe`) of the load.
    units: u64,
    /// With `kernel_cost`: each of the tracer's programs that ran, with its runs and run time.
    programs: Vec<ProgramCost>,
}

struct ProgramCost {
    /// The kernel's name for it (cut to 15 characters, as bpftool shows it).
    name: String,
    runs: u64,
    ns: u64,
}

/// The run counts and run times of the BPF programs a process holds, by program id, from the
/// kernel's statistics (counted only while BPF_ENABLE_STATS or `kernel.bpf_stats_enabled`
/// is on). The ids come from the process's own descriptors (`prog_id` in
/// /proc/PID/fdinfo), so another tracer's programs are never counted.
fn program_stats(pid: u32) -> Result<BTreeMap<u32, ProgramCost>> {
    let mut ids = BTreeSet::new();
    for fd in fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let info = fs::read_to_string(fd.path()).unwrap_or_default();
        ids.extend(
            info.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|v| v.trim().parse::<u32>().ok()),
        );
    }
    let mut out = BTreeMap::new();
    for p in aya::programs::loaded_programs() {
        let p = p.context("listing the loaded BPF programs")?;
        if ids.contains(&p.id()) {
            out.insert(
                p.id(),
                ProgramCost {
                    name: p.name_as_str().unwrap_or("?").to_string(),
                    runs: p.run_count(),
                    ns: p.run_time().as_nanos() as u64,
                },
            );
        }
    }
    Ok(out)
}

fn tools(root: &Path, h2trace: &Path) -> Vec<Tool> {
    let h = h2trace.display().to_string();
    let script = root.join("target/bench/tcpstates.bt");
    let _ = fs::create_dir_all(script.parent().unwrap());
    let _ = fs::write(&script, BPFTRACE_TCPSTATES);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        Tool {
            name: "no tracer",
            argv: vec![],
            ready: None,
            warmup: 0.0,
            counts: Unit::None,
        },
        // The floor: the cost of merely attaching a program to the tracepoint every tracer
        // here needs. No tracer of TCP state changes can do better than this row.
        Tool {
            name: "floor (empty set_state)",
            argv: s(&[
                "/usr/bin/bpftrace",
                "-e",
                "tracepoint:sock:inet_sock_set_state { $unused = 0; }",
            ]),
            ready: None,
            warmup: 4.0,
            counts: Unit::None,
        },
        Tool {
            name: DEFAULT,
            argv: s(&[&h, "-f", "ndjson", "--transport", "ringbuf", "-o", "{out}"]),
            ready: Some(STARTED),
            warmup: 0.3,
            counts: Unit::Lives,
        },
        Tool {
            name: "h2trace --live-hold 0",
            argv: s(&[&h, "-f", "ndjson", "--live-hold", "0", "-o", "{out}"]),
            ready: Some(STARTED),
            warmup: 0.3,
            counts: Unit::Lives,
        },
        // The classic tracepoint for state changes instead of the default BTF one.
        Tool {
            name: "h2trace --probe tracepoint",
            argv: s(&[&h, "-f", "ndjson", "--probe", "tracepoint", "-o", "{out}"]),
            ready: Some(STARTED),
            warmup: 0.3,
            counts: Unit::Lives,
        },
        Tool {
            name: "h2trace --http2 off",
            argv: s(&[&h, "-f", "ndjson", "--http2", "off", "-o", "{out}"]),
            ready: Some(STARTED),
            warmup: 0.3,
            counts: Unit::Lives,
        },
        Tool {
            name: "h2trace perf ndjson",
            argv: s(&[&h, "-f", "ndjson", "--transport", "perf", "-o", "{out}"]),
            ready: Some(STARTED),
            warmup: 0.3,
            counts: Unit::Lives,
        },
        Tool {
            name: "h2trace ringbuf text",
            argv: s(&[&h, "-f", "text", "-o", "{out}"]),
            ready: Some("h2trace: tracing"),
            warmup: 0.3,
            counts: Unit::Lives,
        },
        Tool {
            name: "h2trace --events all",
            argv: s(&[&h, "-f", "ndjson", "--events", "all", "-o", "{out}"]),
            ready: Some(STARTED),
            warmup: 0.3,
            counts: Unit::StateChanges,
        },
        Tool {
            name: "libbpf-tools tcpstates",
            argv: s(&["/usr/sbin/tcpstates"]),
            ready: None,
            warmup: 1.0,
            counts: Unit::StateChanges,
        },
        Tool {
            name: "libbpf-tools tcplife",
            argv: s(&["/usr/sbin/tcplife"]),
            ready: None,
            warmup: 1.0,
            counts: Unit::Lives,
        },
        Tool {
            name: "bpftrace tcpstates.bt",
            argv: s(&["/usr/bin/bpftrace", &script.display().to_string()]),
            ready: None,
            warmup: 4.0,
            counts: Unit::StateChanges,
        },
    ]
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn prctl(option: i32, ...) -> i32;
}

const SIGTERM: i32 = 15;
const PR_SET_PDEATHSIG: i32 = 1;

/// The tracer gets SIGTERM if the bench dies first (killed, or a panic), instead of staying
/// attached to the kernel and taxing every later run.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe and changes only the child being set up.
    unsafe {
        cmd.pre_exec(|| {
            prctl(PR_SET_PDEATHSIG, SIGTERM as std::ffi::c_ulong);
            Ok(())
        });
    }
}

fn proc_cpu_s(pid: u32) -> f64 {
    // utime and stime are fields 14 and 15 of /proc/PID/stat, in clock ticks (100 Hz here).
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn proc_hwm_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// A memory line of /proc/PID/status (0 once the process has exited).
fn proc_status_kib(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Child processes killed and reaped when dropped.
struct Reaped(Vec<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// h2trace's memory with many live sockets: `conns` connections (2·`conns` tracked sockets)
/// opened while it runs and held idle; its resident memory while they are held, then its
/// peak through an exit that reports every one of them as still open.
fn held_sockets(
    h2trace: &Path,
    churn_bin: &Path,
    ns: &str,
    conns: usize,
    dir: &Path,
) -> Result<()> {
    let out = dir.join("held.ndjson");
    let mut cmd = Command::new(h2trace);
    cmd.args([
        "-f",
        "ndjson",
        "--max-sockets",
        &(4 * conns).to_string(),
        "-o",
    ])
    .arg(&out)
    .stdin(Stdio::null())
    .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    let child = cmd.spawn().context("starting h2trace")?;
    // Whatever fails below, no h2trace or holder outlives the run.
    let mut tracer = Reaped(vec![child]);
    let h = &mut tracer.0[0];
    std::thread::sleep(Duration::from_secs(2));
    let start_kib = proc_status_kib(h.id(), "VmRSS:");
    // Several holding processes: one process may not have the descriptors for all of them.
    const PER_PROCESS: usize = 8_000;
    let mut loads = Reaped(Vec::new());
    let mut left = conns;
    while left > 0 {
        let n = left.min(PER_PROCESS);
        left -= n;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(churn_bin)
            .args(["127.0.0.1:0", "--mode", "hold", "--seconds", "60"])
            .args(["--conns", &n.to_string()])
            .stdout(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut load = cmd.spawn().context("starting churn")?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(load.stdout.take().unwrap()),
            &mut line,
        )?;
        loads.0.push(load);
        if !line.starts_with("holding=") {
            bail!("churn could not hold {n} connections: {line}");
        }
    }
    // Let the agent take in the opening of every connection.
    std::thread::sleep(Duration::from_secs(3));
    let held_kib = proc_status_kib(h.id(), "VmRSS:");
    // SAFETY: signalling our own child.
    unsafe { kill(h.id() as i32, 2) };
    let mut peak_kib = 0;
    while h.try_wait()?.is_none() {
        peak_kib = peak_kib.max(proc_hwm_kib(h.id()));
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(loads);
    let text = fs::read_to_string(&out).unwrap_or_default();
    let open = text
        .lines()
        .filter(|l| l.contains("\"connection-open\""))
        .count();
    let summary = text
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["h2trace"]["summary"].clone())
        .unwrap_or_default();
    let _ = fs::remove_file(&out);
    println!(
        "\nheld sockets: {} live sockets; h2trace resident {} MiB after start, {} MiB while they are held, peak {} MiB through an exit reporting {open} open connections (tracked {}, evicted {}, lost {})",
        2 * conns,
        start_kib / 1024,
        held_kib / 1024,
        peak_kib / 1024,
        summary["tracked"],
        summary["evicted"],
        h2trace_losses(&text).unwrap_or(0)
    );
    Ok(())
}

fn netns(name: &str) -> Result<()> {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
    for args in [
        vec!["netns", "add", name],
        vec!["-n", name, "link", "set", "lo", "up"],
        vec![
            "netns",
            "exec",
            name,
            "sysctl",
            "-qw",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ],
    ] {
        let st = Command::new("ip").args(&args).status()?;
        if !st.success() {
            bail!("ip {args:?} failed");
        }
    }
    Ok(())
}

/// Connections, request/response exchanges, and seconds of one load run.
fn churn(churn_bin: &Path, ns: &str, o: &Opts, mode: &str) -> Result<(u64, u64, f64)> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(churn_bin)
        .args([
            "127.0.0.1:0",
            "--threads",
            &o.threads.to_string(),
            "--seconds",
            &o.seconds.to_string(),
            "--mode",
            mode,
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse::<f64>().ok())
    };
    match (
        field("connections="),
        field("exchanges="),
        field("seconds="),
    ) {
        (Some(c), Some(x), Some(s)) => Ok((c as u64, x as u64, s)),
        _ => bail!(
            "churn printed no result: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn run_once(
    tool: &Tool,
    churn_bin: &Path,
    ns: &str,
    o: &Opts,
    mode: &str,
    dir: &Path,
    kernel_cost: bool,
) -> Result<Sample> {
    let out = dir.join(format!("{}.out", tool.name.replace([' ', '-', '.'], "_")));
    let mut child: Option<Child> = None;
    if !tool.argv.is_empty() {
        let argv: Vec<String> = tool
            .argv
            .iter()
            .map(|a| a.replace("{out}", &out.display().to_string()))
            .collect();
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        if argv.iter().any(|a| a == "-o") {
            cmd.stdout(Stdio::null());
        } else {
            cmd.stdout(fs::File::create(&out)?);
        }
        die_with_parent(&mut cmd);
        let mut c = cmd
            .spawn()
            .with_context(|| format!("starting {}", argv[0]))?;
        if let Some(ready) = tool.ready {
            let start = Instant::now();
            while !fs::read_to_string(&out).unwrap_or_default().contains(ready) {
                if c.try_wait()?.is_some() || start.elapsed() > Duration::from_secs(60) {
                    let _ = c.kill();
                    bail!("{} did not start", tool.name);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        child = Some(c);
        std::thread::sleep(Duration::from_secs_f64(tool.warmup));
    }
    // The tracer's CPU while the load runs: its start-up (BTF, loading, attaching) is a fixed
    // cost, not a cost per state change.
    let cpu_before = child.as_ref().map_or(0.0, |c| proc_cpu_s(c.id()));
    // The statistics stay on while the descriptor is held, and go off when it is dropped,
    // even if the bench dies.
    let (stats, programs_before) = match (&child, kernel_cost) {
        (Some(c), true) => (
            Some(
                aya::sys::enable_stats(aya::sys::Stats::RunTime)
                    .context("turning on the kernel's BPF run-time statistics")?,
            ),
            program_stats(c.id())?,
        ),
        _ => (None, BTreeMap::new()),
    };
    let (connections, exchanges, secs) = churn(churn_bin, ns, o, mode)?;
    let mut programs = Vec::new();
    if let (Some(c), Some(_)) = (&child, &stats) {
        for (id, after) in program_stats(c.id())? {
            let before = programs_before.get(&id);
            let runs = after.runs - before.map_or(0, |b| b.runs);
            if runs > 0 {
                programs.push(ProgramCost {
                    runs,
                    ns: after.ns - before.map_or(0, |b| b.ns),
                    name: after.name,
                });
            }
        }
    }
    drop(stats);
    let mut cpu_s = 0.0;
    let mut rss_kib = 0;
    if let Some(c) = child.as_mut() {
        cpu_s = proc_cpu_s(c.id()) - cpu_before;
        rss_kib = proc_hwm_kib(c.id());
        // SAFETY: signalling our own child.
        unsafe { kill(c.id() as i32, 2) };
        let start = Instant::now();
        while c.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(20) {
                c.kill()?;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let per_conn = if mode == "rst" { 6 } else { 10 };
    let state_changes = connections * per_conn;
    let text = fs::read_to_string(&out).unwrap_or_default();
    let (written, expected, lost) = match tool.counts {
        Unit::None => (0, 0, None),
        Unit::Lives if tool.name.starts_with("h2trace") => {
            let written = text
                .lines()
                .filter(|l| l.contains("connection-closed") || l.contains(" close "))
                .count();
            (written as u64, connections * 2, h2trace_losses(&text))
        }
        Unit::Lives => (
            text.lines().count().saturating_sub(1) as u64,
            connections * 2,
            None,
        ),
        Unit::StateChanges if tool.name.starts_with("h2trace") => {
            let written = text
                .lines()
                .filter(|l| l.contains("\"state-change\""))
                .count();
            (written as u64, state_changes, h2trace_losses(&text))
        }
        Unit::StateChanges => (
            text.lines()
                .filter(|l| {
                    !l.contains("SKADDR") && !l.contains("Attaching") && !l.trim().is_empty()
                })
                .count() as u64,
            state_changes,
            None,
        ),
    };
    let _ = fs::remove_file(&out);
    // The no-churn control is measured by its request/response rate.
    let units = if no_churn(mode) {
        exchanges
    } else {
        connections
    };
    Ok(Sample {
        rate: units as f64 / secs,
        cpu_s,
        rss_kib,
        lost,
        written,
        expected,
        state_changes,
        units,
        programs,
    })
}

/// The loss total of an h2trace run: the NDJSON summary's `losses`, or the text summary's
/// "records lost" line.
fn h2trace_losses(text: &str) -> Option<u64> {
    let last = text
        .lines()
        .rev()
        .find(|l| l.contains("\"summary\"") || l.contains("records lost"))?;
    if let Some(n) = last.split("records lost").nth(1) {
        return n.trim().parse().ok();
    }
    let v: serde_json::Value = serde_json::from_str(last).ok()?;
    Some(
        v["h2trace"]["summary"]["losses"]
            .as_object()?
            .iter()
            // A part of `ringbuf_full` / `perf_output_failed`, not records of its own.
            .filter(|(k, _)| *k != "lives_lost")
            .filter_map(|(_, x)| x.as_u64())
            .sum(),
    )
}

/// What each of h2trace's programs cost per connection (or exchange) of one run.
fn print_kernel_cost(s: &Sample, unit: &str) {
    let per = |x: u64| x as f64 / s.units.max(1) as f64;
    println!(
        "\nkernel programs of {DEFAULT}, one more run with the kernel's BPF run-time statistics on \
         ({} {unit}; the statistics add their own clock reads to every run):",
        s.units
    );
    let one = unit.trim_end_matches('s');
    println!(
        "{:<18} {:>16} {:>8} {:>16}",
        "program",
        format!("runs/{one}"),
        "ns/run",
        format!("ns/{one}")
    );
    let mut programs: Vec<&ProgramCost> = s.programs.iter().collect();
    programs.sort_by_key(|p| std::cmp::Reverse(p.ns));
    for p in &programs {
        println!(
            "{:<18} {:>16.2} {:>8.0} {:>16.0}",
            p.name,
            per(p.runs),
            p.ns as f64 / p.runs as f64,
            per(p.ns)
        );
    }
    println!(
        "{:<18} {:>16} {:>8} {:>16.0}",
        "all",
        "",
        "",
        per(programs.iter().map(|p| p.ns).sum())
    );
}

/// The loads measured by their exchanges (request/response, or a pipe's write and read)
/// rather than by connections.
fn no_churn(mode: &str) -> bool {
    matches!(mode, "keep" | "h2" | "pipe")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn bench(root: &Path, o: Opts) -> Result<()> {
    let h2trace = root.join("target/release/h2trace");
    let churn_bin = root.join("target/release/examples/churn");
    for (p, what) in [(&h2trace, "h2trace"), (&churn_bin, "churn")] {
        if !p.exists() {
            bail!(
                "{} missing ({what}): build with `cargo build --release --examples`",
                p.display()
            );
        }
    }
    // A namespace left by a bench that was killed (its pid is gone) is removed first.
    for stale in fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = stale.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("h2t-bench-")
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
    let ns = format!("h2t-bench-{}", std::process::id());
    netns(&ns)?;
    let dir: PathBuf = root.join("target/bench");
    fs::create_dir_all(&dir)?;
    let tools: Vec<Tool> = tools(root, &h2trace)
        .into_iter()
        .enumerate()
        .filter(|(i, t)| {
            *i == 0 || o.tools.is_empty() || o.tools.iter().any(|w| t.name.contains(w.as_str()))
        })
        .map(|(_, t)| t)
        .collect();
    let machine = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    println!(
        "h2trace bench: {} × {:.0} s per run, {} client threads, {} CPUs ({machine}), kernel {}",
        o.rounds,
        o.seconds,
        o.threads,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let result = (|| -> Result<()> {
        for mode in o.modes.iter().filter(|m| !m.is_empty()) {
            let mut samples: Vec<Vec<Sample>> = tools.iter().map(|_| Vec::new()).collect();
            let n = tools.len();
            for round in 0..o.rounds {
                // Interleaved: every tool once per round, so drift hits all alike. The run
                // without a tracer first, then the tracers in an order turned by one each
                // round, so that none always runs right after the same one (bpftrace's exit
                // and its 100 MiB given back, say).
                for k in 0..n {
                    let i = if k == 0 {
                        0
                    } else {
                        1 + (k - 1 + round) % (n - 1)
                    };
                    let t = &tools[i];
                    eprint!("\r{mode}: round {}/{} {:<28}", round + 1, o.rounds, t.name);
                    samples[i].push(run_once(t, &churn_bin, &ns, &o, mode, &dir, false)?);
                }
            }
            eprintln!();
            let median_rate =
                |s: &[Sample]| median(&mut s.iter().map(|x| x.rate).collect::<Vec<_>>());
            let base = median_rate(&samples[0]);
            let no_churn = no_churn(mode);
            let unit = if no_churn { "exchanges" } else { "connections" };
            // What attaching to `inet_sock_set_state` alone leaves: the most any tracer of
            // TCP state changes could keep, when the floor row ran.
            let floor = tools
                .iter()
                .position(|t| t.name.starts_with("floor"))
                .map(|i| median_rate(&samples[i]));
            println!("\nmode {mode}: no tracer {base:.0} {unit}/s (median)");
            println!(
                "{:<26} {:>12} {:>17} {:>8} {:>14} {:>9} {:>6} {:>20}",
                "tracer",
                if no_churn { "exch/s" } else { "conn/s" },
                "vs none (min-max)",
                "vs floor",
                "CPU s/M chg",
                "peak RSS",
                "lost",
                "written/expected"
            );
            for (t, s) in tools.iter().zip(&samples).skip(1) {
                let mut rates: Vec<f64> = s.iter().map(|x| x.rate).collect();
                let (lo, hi) = (
                    rates.iter().cloned().fold(f64::MAX, f64::min),
                    rates.iter().cloned().fold(0.0, f64::max),
                );
                let med = median(&mut rates);
                let mut cpu: Vec<f64> = s
                    .iter()
                    .map(|x| x.cpu_s / (x.state_changes as f64 / 1e6))
                    .collect();
                // Without churn there are a handful of state changes: no meaningful ratio.
                let cpu = if no_churn {
                    "-".to_string()
                } else {
                    format!("{:.2}", median(&mut cpu))
                };
                let rss = s.iter().map(|x| x.rss_kib).max().unwrap_or(0);
                let lost = s
                    .iter()
                    .filter_map(|x| x.lost)
                    .max()
                    .map_or("-".into(), |l| l.to_string());
                let (w, e): (u64, u64) = s
                    .iter()
                    .fold((0, 0), |a, x| (a.0 + x.written, a.1 + x.expected));
                let vs_floor = floor.map_or("-".into(), |f| format!("{:.2}", med / f));
                println!(
                    "{:<26} {:>12.0} {:>6.2} ({:.2}-{:.2}) {:>8} {:>14} {:>6} MiB {:>6} {:>9}/{:<10}",
                    t.name,
                    med,
                    med / base,
                    lo / base,
                    hi / base,
                    vs_floor,
                    cpu,
                    rss / 1024,
                    lost,
                    w,
                    e
                );
            }
            // The statistics time every run of every program on the host, which costs the
            // load too: one more run of the default mode, outside the table.
            if let Some(t) = tools.iter().find(|t| t.name == DEFAULT) {
                eprint!("\r{mode}: kernel cost {:<28}", "");
                let s = run_once(t, &churn_bin, &ns, &o, mode, &dir, true)?;
                eprintln!();
                print_kernel_cost(&s, unit);
            }
        }
        if o.held > 0 {
            held_sockets(&h2trace, &churn_bin, &ns, o.held / 2, &dir)?;
        }
        Ok(())
    })();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    result
}
