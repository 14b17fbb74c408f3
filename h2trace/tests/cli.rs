//! The agent as operators meet it: bad input, privileges, `check`, signals, closed pipes.
mod common;

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use nix::{sys::signal::Signal, unistd::Pid};

fn h2trace(args: &[&str]) -> std::process::Output {
    Command::new(h2trace_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_pid_that_does_not_exist_is_a_usage_error() {
    // Above the kernel's pid_max limit (2^22), so no process can have it.
    let o = h2trace(&["--pid", "4194305"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no process with pid 4194305"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_flags_are_usage_errors() {
    for args in [
        &["--transport", "pigeon"][..],
        &["-4", "-6"],
        &["--duration", "soon"],
        &["--duration", "-5s"],
        &["--local-port", "70000"],
        &["--remote-port", "http"],
        &["--pid", "12ab"],
        &["--http2", "sometimes"],
        &["--ring-size", "1000"],
        &["--live-hold", "a while"],
        &["--live-hold", "5s"],
        &["--live-hold", "2s", "--close-wait-stuck", "1s"],
        &["--window", "0s"],
        &["--close-wait-stuck", "0ms"],
    ] {
        let o = h2trace(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).is_empty());
    }
}

#[test]
fn an_unwritable_output_is_a_usage_error_at_start() {
    let dir = TempDir::new("cli-output");
    let path = dir.0.join("no-such-dir").join("out.ndjson");
    let start = std::time::Instant::now();
    let o = h2trace(&["--output", path.to_str().unwrap(), "--duration", "30s"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(path.to_str().unwrap()),
        "{}",
        stderr(&o)
    );
    // Before loading anything, not after the run.
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn help_teaches() {
    let o = h2trace(&["--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    for s in [
        "--pid",
        "--events",
        "--transport",
        "Examples:",
        "check",
        "Exit status",
    ] {
        assert!(out.contains(s), "--help lacks {s}");
    }
}

#[test]
fn without_capabilities_it_names_them() {
    let Some(_lock) = kernel_test() else { return };
    // Drop to nobody with no capabilities at all.
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .arg(h2trace_bin())
        .args(["--duration", "1s", "-f", "ndjson"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("CAP_BPF") && e.contains("CAP_PERFMON") && e.contains("sudo"),
        "{e}"
    );
    assert!(!e.contains("os error"), "a raw errno leaked: {e}");
}

#[test]
fn check_tells_the_truth_about_this_kernel() {
    let Some(_lock) = kernel_test() else { return };
    let o = h2trace(&["check"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{out}");
    let line = |hook: &str| {
        out.lines()
            .find(|l| l.contains(hook))
            .unwrap_or_else(|| panic!("no {hook} in {out}"))
            .to_string()
    };
    assert!(
        line("tracepoint sock:inet_sock_set_state")
            .trim_start()
            .starts_with("ok")
    );
    // The BTF tracepoint needs only the kernel's BTF (Linux ≥ 5.5).
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    let b = line("tp_btf inet_sock_set_state");
    assert_eq!(b.trim_start().starts_with("ok"), btf, "{b}");
    assert!(line("ring buffer").trim_start().starts_with("ok"));
    // Kprobes work exactly when the kernel has the kprobe PMU.
    let kprobes = Path::new("/sys/bus/event_source/devices/kprobe/type").exists();
    let k = line("kprobe tcp_set_state");
    assert_eq!(k.trim_start().starts_with("ok"), kprobes, "{k}");
    if !kprobes {
        assert!(
            k.contains("passes the verifier") && k.contains("cannot attach kprobes"),
            "{k}"
        );
    }
    assert!(out.contains("fentry tcp_set_state"));
    assert!(out.contains("tracing can run"));
    assert!(line("CAP_BPF").trim_start().starts_with("yes"));
}

#[test]
fn kprobe_program_passes_the_verifier_and_kprobe_mode_says_why_it_cannot_run() {
    let Some(_lock) = kernel_test() else { return };
    let cfg = h2trace::config::resolve(
        &<h2trace::cli::Cli as clap::Parser>::parse_from(["h2trace"]).trace,
    )
    .unwrap();
    for program in [
        "tcp_set_state_kprobe",
        "listen_start_kprobe",
        "tcp_sendmsg_kprobe",
        "tcp_sendmsg_kretprobe",
        "tcp_cleanup_rbuf_kprobe",
        "ct_refresh_kprobe",
    ] {
        h2trace::probe::verify_kprobe(&cfg.probe, program).unwrap_or_else(|e| {
            panic!(
                "{program} does not load: {}",
                h2trace::probe::error_chain(&e)
            )
        });
    }
    if Path::new("/sys/bus/event_source/devices/kprobe/type").exists() {
        return; // this kernel can attach kprobes: the kernel tests cover that mode
    }
    let o = h2trace(&["--probe", "kprobe", "--duration", "1s", "-f", "ndjson"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("kprobe tcp_set_state") && e.contains("cannot attach kprobes"),
        "{e}"
    );
}

/// h2trace's programs still loaded in the kernel. The kernel frees a program shortly after its
/// last link and fd are gone (deferred work), so this waits up to 5 s for them to disappear.
#[test]
fn duration_and_sigterm_end_with_a_summary_and_leave_nothing_behind() {
    let Some(_lock) = kernel_test() else { return };
    let dir = TempDir::new("duration");
    let out = dir.0.join("o.ndjson");
    let o = Command::new(h2trace_bin())
        .args(["--duration", "1s", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let recs = read_records(&out);
    assert_eq!(action(&recs[0]), "started");
    let last = recs.last().unwrap();
    assert_eq!(action(last), "summary");
    assert!(last["h2trace"]["summary"]["duration_ns"].as_u64().unwrap() >= 1_000_000_000);
    assert_eq!(
        loaded_h2trace_programs(),
        0,
        "programs left attached after exit"
    );

    let t = Tracer::start("sigterm", &[]);
    nix::sys::signal::kill(Pid::from_raw(t.pid() as i32), Signal::SIGTERM).unwrap();
    let mut child = t;
    let st = child_wait(&mut child);
    assert_eq!(st, Some(0), "SIGTERM exits 0");
    assert_eq!(action(read_records(&child.out).last().unwrap()), "summary");
    assert_eq!(loaded_h2trace_programs(), 0);
}

fn child_wait(t: &mut Tracer) -> Option<i32> {
    // Tracer::stop sends SIGINT; here the signal was sent already.
    let start = Instant::now();
    loop {
        if let Some(code) = t.try_exit_code() {
            return code;
        }
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_closed_pipe_exits_quietly() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("pipe", 51);
    let mut child = KillOnDrop(
        Command::new(h2trace_bin())
            .args(["--events", "all", "-f", "ndjson"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"started\""));
    // The reader is gone (like `| head -1`); traffic makes h2trace write again.
    let addr = format!("{}:8080", net.server_v4);
    let mut server = net.server(
        &addr,
        &["--conns", "5", "--reply", "10", "--then", "wait-peer"],
    );
    net.client(&addr, &["--conns", "5", "--send", "10", "--reply", "10"]);
    server.0.wait().unwrap();
    let st = wait_timeout(child, Duration::from_secs(10))
        .expect("h2trace kept running after its reader left");
    assert_eq!(st.code(), Some(0));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.is_empty(), "a closed pipe is not an error: {err}");
    assert_eq!(loaded_h2trace_programs(), 0);
}

#[test]
fn text_mode_has_columns_and_a_summary() {
    let Some(_lock) = kernel_test() else { return };
    let net = NetPair::new("text", 52);
    let dir = TempDir::new("text");
    let out = dir.0.join("o.txt");
    let duration = format!("{}ms", scaled(Duration::from_secs(3)).as_millis());
    let mut child = KillOnDrop(
        Command::new(h2trace_bin())
            .args(["-f", "text", "--duration", &duration, "-o"])
            .arg(&out)
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let start = Instant::now();
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("h2trace: tracing with")
    {
        assert!(start.elapsed() < Duration::from_secs(60), "never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let addr = format!("{}:8080", net.server_v4);
    let mut server = net.server(&addr, &["--reply", "10", "--then", "wait-peer"]);
    net.client(&addr, &["--send", "10", "--reply", "10"]);
    server.0.wait().unwrap();
    assert_eq!(
        wait_timeout(child, Duration::from_secs(20)).unwrap().code(),
        Some(0)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("TIME") && text.contains("REMOTE"), "{text}");
    let client = format!("{}:8080", net.server_v4);
    assert!(
        text.lines().any(|l| l.contains("close")
            && l.contains(&client)
            && l.contains("CLOSE>SYN_SENT>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE")),
        "{text}"
    );
    assert!(
        text.contains("Summary over") && text.contains("connections closed"),
        "{text}"
    );
}
