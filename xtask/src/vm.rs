//! The kernel matrix: the kernel integration tests inside Debian's 6.1 and 6.12 kernels under
//! QEMU, where kprobes and fentry attach (our machines' own kernel has neither).
//!
//! Per kernel: the newest Debian package of the series, fetched with `apt-get download` and
//! unpacked into a cache (never installed), its modules indexed with `depmod -b`; an initramfs
//! with the host-built test binaries, the host tools they call, the netfilter and veth modules
//! and `vm/init.sh` as /init; QEMU boots it under a hard timeout, the serial console streamed to
//! the terminal and to target/vm/KERNEL.log. Only the init's PASS line counts as success.
//!
//! The kernel tests are the h2trace integration tests whose source calls `kernel_test(`: new
//! test files join the matrix by using that guard. Tests that need the end-to-end peers
//! (Python, nginx) skip themselves in the guest, where those are absent.

mod initramfs;
mod kernels;

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use initramfs::Archive;
use kernels::{Kernel, SERIES, Series, fetch};

use crate::{cargo, is_root, root, run};

/// `--kernel`: where the kernel tests run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelArg {
    /// This machine's kernel, with the whole test suite.
    Host,
    /// Debian 12's 6.1 in QEMU.
    #[value(name = "6.1")]
    V6_1,
    /// Debian 12's 6.12 in QEMU.
    #[value(name = "6.12")]
    V6_12,
    /// The host and every kernel of the matrix.
    All,
}

/// Whether the host suite runs, and which kernels of the matrix. Without `--kernel`: the host
/// and, as root (the guests' tests need the host's root-only setup), every kernel of the matrix.
pub fn plan(args: &[KernelArg], root: bool) -> (bool, Vec<&'static Series>) {
    let default = if root {
        &[KernelArg::All][..]
    } else {
        &[KernelArg::Host][..]
    };
    let args = if args.is_empty() { default } else { args };
    let has = |k| args.contains(&k) || args.contains(&KernelArg::All);
    let vms = SERIES
        .iter()
        .zip([KernelArg::V6_1, KernelArg::V6_12])
        .filter(|(_, k)| has(*k))
        .map(|(s, _)| s)
        .collect();
    (has(KernelArg::Host), vms)
}

/// Modules the init loads before the tests: veth pairs, conntrack (its sysctls exist only once
/// it is loaded), ctnetlink, nftables with the expressions the middlebox rules use. Whatever
/// else a test's nft rules need, the kernel loads on demand from the directories below.
const PRELOAD: &str = "veth nf_conntrack nf_conntrack_netlink nf_tables nft_ct nft_nat nft_masq nft_reject_inet nft_chain_nat";
const MODULE_DIRS: [&str; 3] = [
    "kernel/net/netfilter/",
    "kernel/net/ipv4/netfilter/",
    "kernel/net/ipv6/netfilter/",
];
/// Single modules by name: veth; the crc32c implementations that conntrack's libcrc32c asks
/// the crypto API for at load (a softdep, which modules.dep does not list); sock_diag for TCP,
/// which h2trace uses to list the sockets open before it starts (the kernel loads it on demand).
const MODULES: [&str; 5] = [
    "veth",
    "crc32c_generic",
    "crc32c-intel",
    "inet_diag",
    "tcp_diag",
];
/// Host tools the tests and the init call, copied with their libraries.
const HOST_TOOLS: [&str; 7] = [
    "busybox", "ip", "ss", "nft", "sysctl", "setpriv", "modprobe",
];
/// Each kernel test binary runs with the default chain (auto), then once more per other state
/// hook here, except DEFAULT_ONLY.
const PROBES: &str = "tracepoint kprobe";
/// Test files about the command line and the end-to-end peers rather than the state hook: run
/// with the default only (cli takes 100 s under emulation).
const DEFAULT_ONLY: [&str; 2] = ["cli", "e2e"];
/// Per kernel, boot to power-off; a measured run took 21 min (README, "Test it").
const TIMEOUT: Duration = Duration::from_secs(40 * 60);
const PASS: &str = "H2TRACE-VM-RESULT: PASS";

/// Run the kernel tests (or only the files named in `only`) in each kernel of `series`; all of
/// them, then fail if any failed.
pub fn matrix(series: &[&Series], only: &[String]) -> Result<()> {
    if series.is_empty() {
        return Ok(());
    }
    if is_root() {
        run(Command::new("bash")
            .arg(root().join("scripts/install-toolchain.sh"))
            .arg("--vm"))?;
    }
    let work = root().join("target/vm");
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let bins = Binaries::build(&work, only)?;
    let prepared: Vec<_> = series
        .iter()
        .map(|s| {
            let ready = fetch(s).and_then(|k| {
                let initrd = work.join(format!("{}.cpio", k.release()));
                initramfs(&k, &bins, &initrd)?;
                Ok((k, initrd))
            });
            (s.name, ready)
        })
        .collect();
    // The kernels boot side by side: an emulated guest keeps about one of our two cores busy,
    // most of a test run being waits (timeouts, idle gaps), so two take little longer than one.
    let outcomes: Vec<_> = std::thread::scope(|scope| {
        let runs: Vec<_> = prepared
            .iter()
            .map(|(name, ready)| {
                let log = work.join(format!("{name}.log"));
                let run = ready
                    .as_ref()
                    .map(|(k, initrd)| scope.spawn(move || boot(name, k, initrd, &log)));
                (*name, run)
            })
            .collect();
        runs.into_iter()
            .map(|(name, run)| {
                let outcome = match run {
                    Ok(handle) => handle.join().expect("the boot thread panicked"),
                    Err(e) => Err(anyhow::anyhow!("{e:#}")),
                };
                if let Err(e) = &outcome {
                    eprintln!("xtask: kernel {name}: {e:#}");
                }
                (name, outcome)
            })
            .collect()
    });
    println!("\nxtask: kernel matrix");
    let mut failed = Vec::new();
    for (name, outcome) in &outcomes {
        match outcome {
            Ok(o) => {
                println!("  {name:<5} {o}");
                if !o.passed {
                    failed.push(*name);
                }
            }
            Err(e) => {
                println!("  {name:<5} error: {e:#}");
                failed.push(*name);
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "kernel tests failed on {} (logs in {})",
            failed.join(", "),
            work.display()
        );
    }
    Ok(())
}

/// The host-built programs the guest runs, each with a copy stripped of debug info (a fifth of
/// the size: the initramfs is unpacked by an emulated CPU).
struct Binaries {
    h2trace: Program,
    examples: Vec<Program>,
    tests: Vec<Program>,
}

struct Program {
    /// The cargo target's name (`kernel` for tests/kernel.rs).
    name: String,
    path: PathBuf,
    stripped: PathBuf,
}

impl Binaries {
    fn build(work: &Path, only: &[String]) -> Result<Self> {
        // The whole workspace, as the host suite builds it: the same features, so the same
        // artifacts, nothing built twice.
        let out = cargo()
            .args([
                "test",
                "--workspace",
                "--no-run",
                "--message-format=json-render-diagnostics",
            ])
            .stderr(Stdio::inherit())
            .output()
            .context("running cargo test --no-run")?;
        if !out.status.success() {
            bail!("building the tests failed");
        }
        let manifest = fs::canonicalize(root().join("h2trace/Cargo.toml"))?;
        let strip_dir = work.join("bin");
        fs::create_dir_all(&strip_dir)?;
        let mut h2trace = None;
        let (mut examples, mut tests) = (Vec::new(), Vec::new());
        for line in out.stdout.split(|&b| b == b'\n') {
            let Ok(msg) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            let Some(exe) = msg["executable"].as_str() else {
                continue;
            };
            let of_h2trace = msg["manifest_path"]
                .as_str()
                .and_then(|m| fs::canonicalize(m).ok())
                .is_some_and(|m| m == manifest);
            if !of_h2trace {
                continue;
            }
            // `cargo test` also reports the test harnesses of the binary and the examples.
            let harness = msg["profile"]["test"] == true;
            let target = &msg["target"];
            let kind = |k: &str| {
                target["kind"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == k))
            };
            let name = target["name"].as_str().unwrap_or_default();
            let prog = || Program::stripped(name, Path::new(exe), &strip_dir);
            if kind("bin") && target["name"] == "h2trace" && !harness {
                h2trace = Some(prog()?);
            } else if kind("example") && !harness {
                examples.push(prog()?);
            } else if kind("test")
                && (only.is_empty() || only.iter().any(|o| o == name))
                && is_kernel_test(target["src_path"].as_str().unwrap_or(""))?
            {
                tests.push(prog()?);
            }
        }
        let h2trace = h2trace.context("cargo built no h2trace binary")?;
        if tests.is_empty() {
            bail!(
                "no kernel tests found (integration tests that call kernel_test(){})",
                if only.is_empty() {
                    String::new()
                } else {
                    format!(", among {}", only.join(", "))
                }
            );
        }
        Ok(Self {
            h2trace,
            examples,
            tests,
        })
    }
}

fn is_kernel_test(src: &str) -> Result<bool> {
    let text = fs::read_to_string(src).with_context(|| format!("reading {src}"))?;
    Ok(text.contains("kernel_test("))
}

impl Program {
    fn stripped(name: &str, path: &Path, dir: &Path) -> Result<Self> {
        let stripped = dir.join(path.file_name().context("a program without a name")?);
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(path))?;
        Ok(Self {
            name: name.to_string(),
            path: path.to_path_buf(),
            stripped,
        })
    }
}

/// A host tool by name, from the directories root's PATH has.
fn host_tool(name: &str) -> Result<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .with_context(|| format!("{name} is not installed (scripts/install-toolchain.sh --vm)"))
}

fn initramfs(k: &Kernel, bins: &Binaries, out: &Path) -> Result<()> {
    let mut a = Archive::new()?;
    for d in ["/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/etc"] {
        a.dir(Path::new(d));
    }
    a.symlink(Path::new("/var/run"), Path::new("/run"));
    for tool in HOST_TOOLS {
        a.program(&host_tool(tool)?, None)?;
    }
    let busybox = fs::canonicalize(host_tool("busybox")?)?;
    a.symlink(Path::new("/bin/sh"), &busybox);
    for p in std::iter::once(&bins.h2trace)
        .chain(&bins.examples)
        .chain(&bins.tests)
    {
        a.program(&p.path, Some(&p.stripped))?;
    }
    modules(&mut a, k)?;

    let mut conf = String::new();
    let mut var = |name: &str, value: String| -> Result<()> {
        if value.contains(['\'', '\n']) {
            bail!("{name} cannot be quoted for the init: {value}");
        }
        conf.push_str(&format!("{name}='{value}'\n"));
        Ok(())
    };
    var("H2TRACE", bins.h2trace.path.display().to_string())?;
    let paths = |all: bool| -> Result<String> {
        let mut v = Vec::new();
        for t in &bins.tests {
            if all || !DEFAULT_ONLY.contains(&t.name.as_str()) {
                let p = t.path.display().to_string();
                if p.contains(' ') {
                    bail!("a test path with a space: {p}");
                }
                v.push(p);
            }
        }
        Ok(v.join(" "))
    };
    var("TESTS", paths(true)?)?;
    var("PROBE_TESTS", paths(false)?)?;
    var("PROBES", PROBES.into())?;
    var("MODULES", PRELOAD.into())?;
    a.data(Path::new("/etc/h2trace-vm.conf"), conf, 0o644);
    a.data(Path::new("/init"), include_str!("vm/init.sh"), 0o755);
    a.write(out)?;
    let size = fs::metadata(out)?.len();
    println!(
        "xtask: {} ({} MiB, {} kernel test binaries)",
        out.display(),
        size >> 20,
        bins.tests.len()
    );
    Ok(())
}

/// The modules under MODULE_DIRS, MODULES, everything they depend on, and the index files.
fn modules(a: &mut Archive, k: &Kernel) -> Result<()> {
    let dir = k.modules();
    let dep_file = dir.join("modules.dep");
    let deps =
        fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    let mut wanted = BTreeSet::new();
    for line in deps.lines() {
        let Some((module, needs)) = line.split_once(':') else {
            continue;
        };
        let file = Path::new(module).file_name().and_then(|n| n.to_str());
        let name = file.and_then(|f| f.split('.').next()).unwrap_or("");
        if MODULE_DIRS.iter().any(|d| module.starts_with(d)) || MODULES.contains(&name) {
            wanted.insert(module);
            wanted.extend(needs.split_whitespace());
        }
    }
    let guest = Path::new("/lib/modules").join(k.release());
    for m in wanted {
        a.file(&guest.join(m), &dir.join(m))?;
    }
    for e in fs::read_dir(&dir)? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with("modules.") {
            a.file(&guest.join(e.file_name()), &e.path())?;
        }
    }
    Ok(())
}

/// How one kernel's run went, in wall-clock time on this machine.
struct Outcome {
    passed: bool,
    /// QEMU start to the init's first line.
    boot: Option<Duration>,
    /// The init's first line to the result line.
    tests: Option<Duration>,
    total: Duration,
    timed_out: bool,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs =
            |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()));
        write!(
            f,
            "{}  boot {}  tests {}  total {:.1} s{}",
            if self.passed { "PASS" } else { "FAIL" },
            secs(self.boot),
            secs(self.tests),
            self.total.as_secs_f64(),
            if self.timed_out { " (timed out)" } else { "" }
        )
    }
}

/// Boot the kernel with the initramfs, stream the console, and read the verdict from it.
fn boot(name: &str, k: &Kernel, initrd: &Path, log: &Path) -> Result<Outcome> {
    let mut qemu = Command::new("qemu-system-x86_64");
    // Software emulation: our machines have a /dev/kvm, but a guest on it printed nothing in
    // 11 minutes while QEMU spun in the kernel. One vCPU: with two, a 6.12 guest died of an
    // `int3` oops in __sys_sendto while a tracepoint was detached (the kernel patches its
    // static key with text_poke_bp, whose int3 another emulated vCPU still executed after the
    // patch), a cross-vCPU code-modification race of the emulator, not of h2trace or Linux.
    qemu.args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "2G"])
        .args([
            "-display", "none", "-vga", "none", "-monitor", "none", "-serial", "stdio",
        ])
        .args(["-nic", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(k.vmlinuz())
        .arg("-initrd")
        .arg(initrd)
        // panic=-1 reboots on a panic, and -no-reboot turns that into QEMU exiting.
        .args([
            "-append",
            "console=ttyS0 panic=-1 loglevel=5 random.trust_cpu=on mitigations=off",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    println!("xtask: booting {} ({})", k.pkg, log.display());
    let start = Instant::now();
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().unwrap();
    let mut log_file =
        fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let (tx, rx) = mpsc::channel();
    let prefix = format!("[{name}] ");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            println!("{prefix}{line}");
            let _ = writeln!(log_file, "{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut outcome = Outcome {
        passed: false,
        boot: None,
        tests: None,
        total: Duration::ZERO,
        timed_out: false,
    };
    loop {
        let left = TIMEOUT.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.starts_with("H2TRACE-VM: init") && outcome.boot.is_none() {
                    outcome.boot = Some(start.elapsed());
                }
                if line.starts_with("H2TRACE-VM-RESULT:") {
                    outcome.passed = line == PASS;
                    outcome.tests = outcome.boot.map(|b| start.elapsed() - b);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                outcome.timed_out = true;
                outcome.passed = false;
                eprintln!("xtask: kernel {name}: no power-off within {TIMEOUT:?}, stopping QEMU");
                let _ = child.kill();
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait()?;
    let _ = reader.join();
    outcome.total = start.elapsed();
    if !outcome.timed_out && !status.success() {
        eprintln!("xtask: kernel {name}: QEMU exited with {status}");
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_choices() {
        let names = |(host, vms): (bool, Vec<&Series>)| {
            (host, vms.iter().map(|s| s.name).collect::<Vec<_>>())
        };
        for root in [true, false] {
            assert_eq!(
                names(plan(&[KernelArg::All], root)),
                (true, vec!["6.1", "6.12"])
            );
            assert_eq!(
                names(plan(&[KernelArg::V6_12], root)),
                (false, vec!["6.12"])
            );
            assert_eq!(
                names(plan(&[KernelArg::Host, KernelArg::V6_1], root)),
                (true, vec!["6.1"])
            );
            assert_eq!(names(plan(&[KernelArg::Host], root)), (true, vec![]));
        }
        assert_eq!(names(plan(&[], true)), (true, vec!["6.1", "6.12"]));
        assert_eq!(names(plan(&[], false)), (true, vec![]));
    }
}
