//! Developer and CI entry points: `cargo xtask setup | build-ebpf | test | run`.
mod bench;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "h2trace developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain and test tools if missing (Debian packages, bpf-linker).
    Setup,
    /// Build the eBPF object (release, with BTF) that the agent embeds.
    BuildEbpf,
    /// Set up, build the eBPF object, and run the whole test suite. As root this includes
    /// the kernel integration tests on this machine's kernel and again in Debian's 6.1 and
    /// 6.12 under QEMU (the kernel matrix, where kprobes and fentry attach; ~15 min).
    Test {
        /// Skip the kernel integration tests even when running as root.
        #[arg(long, conflicts_with_all = ["kernel", "no_vm"])]
        no_kernel: bool,
        /// Skip the kernel matrix (quick local runs): the same as `--kernel host`.
        #[arg(long, conflicts_with = "kernel")]
        no_vm: bool,
        /// Kernels to test on, comma-separated; a kernel of the matrix alone runs only the
        /// kernel tests there. [default: all as root, else host]
        #[arg(long, value_enum, value_delimiter = ',')]
        kernel: Vec<vm::KernelArg>,
        /// In the kernel matrix, run only these test files (e.g. `kernel,owner`), for quick
        /// runs while fixing one of them. [default: every kernel test]
        #[arg(long, value_delimiter = ',')]
        vm_tests: Vec<String>,
    },
    /// Connection churn with and without tracers (h2trace, libbpf-tools tcpstates and tcplife,
    /// a bpftrace script): throughput ratios, tracer CPU, peak RSS, losses. As root.
    Bench {
        /// Seconds of load per run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Interleaved rounds (medians and min-max are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Client threads of the churn load.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Load modes: close (FIN), rst (abortive), keep (one connection per thread), h2 (keep,
        /// framed as HTTP/2: the frame walk's cost per request), pipe (no network: writes and
        /// reads through a pipe, what a tracer costs the rest of the host's I/O).
        #[arg(long, value_delimiter = ',', default_value = "close,rst,keep,h2")]
        modes: Vec<String>,
        /// Live sockets for the memory run (connections held idle while h2trace runs, both
        /// ends counted); 0 skips it.
        #[arg(long, default_value_t = 100_000)]
        held: usize,
        /// Only the tracers whose name contains one of these, comma-separated (e.g.
        /// `h2trace,tcplife`); the run without a tracer always comes first. [default: all]
        #[arg(long, value_delimiter = ',')]
        tools: Vec<String>,
    },
    /// Build everything and run h2trace with the given arguments (as root).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Test {
            no_kernel,
            no_vm,
            kernel,
            vm_tests,
        } => {
            let (host, vms) = if no_kernel || no_vm {
                (true, Vec::new())
            } else {
                vm::plan(&kernel, is_root())
            };
            warn_if_disk_short();
            setup()?;
            build_ebpf()?;
            if host {
                // The kernel tests run the tcp_peer example; build it under its plain name.
                run(cargo().args(["build", "--package", "h2trace", "--examples"]))?;
                let mut cmd = cargo();
                cmd.args(["test", "--workspace"]);
                // setup installed the end-to-end peers: their absence is a failure, not a skip.
                if is_root() {
                    cmd.env("H2TRACE_REQUIRE_E2E", "1");
                }
                if no_kernel {
                    cmd.env("H2TRACE_SKIP_KERNEL_TESTS", "1");
                }
                run(&mut cmd)?;
            }
            vm::matrix(&vms, &vm_tests)
        }
        Cmd::Bench {
            seconds,
            rounds,
            threads,
            modes,
            held,
            tools,
        } => {
            if !is_root() {
                bail!(
                    "the bench loads eBPF programs and creates a network namespace: run it as root"
                );
            }
            setup()?;
            run(Command::new("bash")
                .arg(root().join("scripts/install-toolchain.sh"))
                .arg("--bench"))?;
            build_ebpf()?;
            run(cargo().args([
                "build",
                "--release",
                "--package",
                "h2trace",
                "--bins",
                "--examples",
            ]))?;
            bench::bench(
                &root(),
                bench::Opts {
                    seconds,
                    rounds,
                    threads,
                    modes,
                    held,
                    tools,
                },
            )
        }
        Cmd::Run { args } => {
            setup()?;
            build_ebpf()?;
            run(cargo()
                .args(["run", "--release", "--package", "h2trace", "--"])
                .args(args))
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// What a whole test run from a fresh clone writes: 2.7 GiB in the clone, builds and VM scratch
/// (3.3 with cargo's incremental caches), and on a new machine the toolchain, LLVM and the
/// matrix kernels (~3 GiB). A disk that fills half-way shows up as a bare ENOSPC from
/// whichever compiler hit it, so say it up front. A warning, not an error: on a machine set up
/// before, less is enough.
fn warn_if_disk_short() {
    const NEED_GIB: f64 = 6.0;
    let dir = root();
    let Ok(fs) = nix::sys::statvfs::statvfs(&dir) else {
        return;
    };
    let free_gib = (fs.blocks_available() as f64 * fs.fragment_size() as f64) / (1u64 << 30) as f64;
    if free_gib < NEED_GIB {
        eprintln!(
            "xtask: warning: {free_gib:.1} GiB free on the file system of {}; a whole test run \
             from a fresh clone on a new machine needs about {NEED_GIB} GiB",
            dir.display()
        );
    }
}

fn setup() -> Result<()> {
    let script = root().join("scripts/install-toolchain.sh");
    if !is_root() {
        // Without root we cannot install; the build below says what is missing.
        eprintln!("xtask: not root, skipping {}", script.display());
        return Ok(());
    }
    run(Command::new("bash").arg(script))
}

/// Debian's Rust 1.96 builds the programs: it ships a prebuilt `core` for bpfel-unknown-none.
/// Everything rustup's cargo exported to us must be cleared, or Debian's cargo would call
/// rustup's rustc.
fn build_ebpf() -> Result<()> {
    let debian_cargo = Path::new("/usr/bin/cargo");
    if !debian_cargo.exists() {
        bail!("/usr/bin/cargo (Debian's cargo-web) is missing: run `cargo xtask setup` as root");
    }
    let dir = root().join("h2trace-ebpf");
    let mut cmd = Command::new(debian_cargo);
    cmd.current_dir(&dir);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO")
            || k.starts_with("RUSTUP")
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
        {
            cmd.env_remove(&k);
        }
    }
    cmd.env("RUSTC", "/usr/bin/rustc")
        .env("RUSTDOC", "/usr/bin/rustdoc")
        // aya-ebpf uses asm_experimental_arch.
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["build", "--release"]);
    run(&mut cmd).context("building the eBPF programs")?;
    let obj = dir.join("target/bpfel-unknown-none/release/h2trace");
    println!("xtask: eBPF object {}", obj.display());
    Ok(())
}
