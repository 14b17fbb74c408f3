//! The deployment files in deploy/, checked offline and without privileges: the systemd unit with
//! `systemd-analyze verify`, the DaemonSet against Kubernetes' own schemas (kubernetes-validate),
//! the Containerfile with hadolint and against this repository, the log-shipper examples against
//! the records they ship, and the capabilities of the unit and the DaemonSet against each other.
//! The validators live in the project's venv (scripts/install-toolchain.sh); without it those
//! checks are skipped with a message, unless `cargo xtask test` (H2TRACE_REQUIRE_E2E) asks for them.
use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Command, Output},
};

use clap::Parser as _;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A program from the project's venv, or None (after saying so) when it is not installed.
fn venv_bin(name: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    let bin = cache.join("h2trace/venv/bin").join(name);
    if bin.exists() {
        return Some(bin);
    }
    // `cargo xtask test` installs the venv and sets this: there, a missing validator is a failure.
    assert!(
        std::env::var_os("H2TRACE_REQUIRE_E2E").is_none(),
        "{} missing: run scripts/install-toolchain.sh",
        bin.display()
    );
    eprintln!(
        "skipped: {} not installed (run scripts/install-toolchain.sh)",
        bin.display()
    );
    None
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The h2trace command line of a deployment file must be one the real CLI accepts.
fn assert_cli_accepts(args: &[&str], whence: &str) {
    let argv = std::iter::once("h2trace").chain(args.iter().copied());
    if let Err(e) = h2trace::cli::Cli::try_parse_from(argv) {
        panic!("{whence}: h2trace rejects {args:?}: {e}");
    }
}

// --- systemd unit ---------------------------------------------------------------------------

const UNIT: &str = "deploy/h2trace.service";

/// `Key=value` lines of the unit (comments and sections skipped), in order.
fn unit_values(key: &str) -> Vec<String> {
    read(UNIT)
        .lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .collect()
}

fn unit_one(key: &str) -> String {
    let v = unit_values(key);
    assert_eq!(v.len(), 1, "{UNIT}: expected one {key}=, found {v:?}");
    v.into_iter().next().unwrap()
}

/// Capability names, without the `CAP_` prefix, as Kubernetes spells them.
fn unit_caps(key: &str) -> BTreeSet<String> {
    unit_one(key)
        .split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("{UNIT}: {key}: {c} is not a CAP_ name"))
                .to_owned()
        })
        .collect()
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        // setup installs it (scripts/install-toolchain.sh): its absence is then a failure.
        assert!(
            std::env::var_os("H2TRACE_REQUIRE_E2E").is_none(),
            "systemd-analyze is missing (apt-get install systemd)"
        );
        eprintln!("skipped: systemd-analyze not installed (apt-get install systemd)");
        return;
    }
    // verify insists that ExecStart= is executable: point it at the binary this test built.
    let dir = std::env::temp_dir().join(format!("h2trace-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unit = dir.join("h2trace.service");
    std::fs::write(
        &unit,
        read(UNIT).replace("/usr/local/bin/h2trace", env!("CARGO_BIN_EXE_h2trace")),
    )
    .unwrap();
    let o = run(Command::new("systemd-analyze").arg("verify").arg(&unit));
    std::fs::remove_dir_all(&dir).ok();
    let out = text(&o);
    // Unknown keys and bad values are only warnings (exit 0): any word about the unit fails.
    assert!(
        o.status.success() && !out.contains("h2trace.service"),
        "systemd-analyze verify {UNIT}:\n{out}"
    );
}

#[test]
fn systemd_unit_runs_h2trace_as_documented() {
    let exec = unit_one("ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/h2trace"));
    let args: Vec<&str> = words.collect();
    assert_cli_accepts(&args, UNIT);
    // NDJSON goes to stdout, which systemd appends to the log directory the unit owns.
    assert!(
        !args.iter().any(|a| *a == "-o" || a.starts_with("--output")),
        "{args:?}"
    );
    assert_eq!(
        unit_one("StandardOutput"),
        "append:/var/log/h2trace/h2trace.ndjson"
    );
    assert_eq!(unit_one("LogsDirectory"), "h2trace");
    assert_eq!(unit_one("ProtectSystem"), "strict");
    assert_eq!(unit_one("NoNewPrivileges"), "yes");
    assert_eq!(unit_one("MemoryMax"), "256M");
    assert_eq!(unit_one("RestrictAddressFamilies"), "AF_NETLINK AF_UNIX");
    // Settings that would blind h2trace must stay off.
    for key in ["PrivateNetwork", "PrivateUsers", "ProtectProc"] {
        assert!(
            unit_values(key).is_empty(),
            "{UNIT}: {key}= must not be set"
        );
    }
}

// --- Kubernetes DaemonSet -------------------------------------------------------------------

const DAEMONSET: &str = "deploy/daemonset.yaml";

/// The manifest's documents as JSON, read by PyYAML from the validator's venv.
fn manifest() -> Option<Vec<Value>> {
    // PyYAML comes with kubernetes-validate: an older venv without it is skipped likewise.
    venv_bin("kubernetes-validate")?;
    let py = venv_bin("python")?;
    let o = run(Command::new(py)
        .args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(repo().join(DAEMONSET)));
    assert!(o.status.success(), "reading {DAEMONSET}: {}", text(&o));
    Some(serde_json::from_slice(&o.stdout).unwrap())
}

fn daemonset_pod() -> Option<Value> {
    let docs = manifest()?;
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet in the manifest");
    Some(ds["spec"]["template"]["spec"].clone())
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn daemonset_passes_kubernetes_schema_validation() {
    let Some(validate) = venv_bin("kubernetes-validate") else {
        return;
    };
    // Strict: unknown fields are errors. The newest schemas the validator has, and 1.30, the
    // oldest release with securityContext.appArmorProfile (which the manifest uses).
    for version in [None, Some("1.30.0")] {
        let mut cmd = Command::new(&validate);
        cmd.args(["--strict", "--quiet"]);
        if let Some(v) = version {
            cmd.args(["-k", v]);
        }
        let o = run(cmd.arg(repo().join(DAEMONSET)));
        assert!(
            o.status.success(),
            "kubernetes-validate {version:?} {DAEMONSET}:\n{}",
            text(&o)
        );
    }
}

#[test]
fn daemonset_runs_on_the_hosts_namespaces_without_privileged() {
    let Some(pod) = daemonset_pod() else { return };
    assert_eq!(pod["hostPID"], true, "owners come from the host's /proc");
    assert_eq!(pod["hostNetwork"], true, "the node's conntrack table");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "tolerates every taint"
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(c["resources"]["limits"]["memory"], "256Mi");
    let args = strs(&c["args"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_cli_accepts(&args, DAEMONSET);
    assert!(
        !args.iter().any(|a| *a == "-o" || a.starts_with("--output")),
        "NDJSON goes to stdout for the cluster's log pipeline: {args:?}"
    );
}

/// What h2trace reads from the host's file system (the source names these paths) and so must be
/// mounted at the same place: hostPID brings /proc, the rest is here.
const HOST_PATHS: [&str; 4] = [
    "/sys/kernel/btf",     // struct offsets (probe: /sys/kernel/btf/vmlinux)
    "/sys/kernel/tracing", // tracepoint formats and ids (probe/tracefs.rs)
    "/sys/fs/cgroup",      // owners' cgroups, the sock_ops cgroup
    "/run/netns",          // --conntrack-netns NAME (netns.rs)
];

#[test]
fn daemonset_mounts_what_h2trace_reads_read_only() {
    let Some(pod) = daemonset_pod() else { return };
    let c = &pod["containers"][0];
    for path in HOST_PATHS {
        let m = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("{DAEMONSET}: {path} is not mounted"));
        assert_eq!(m["readOnly"], true, "{path} read-only");
        let v = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("{DAEMONSET}: no volume {}", m["name"]));
        assert_eq!(
            v["hostPath"]["path"], path,
            "the host's {path} at the same place"
        );
    }
    let netns = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/run/netns")
        .unwrap();
    assert_eq!(
        netns["mountPropagation"], "HostToContainer",
        "namespaces created after start must appear"
    );
}

#[test]
fn unit_and_daemonset_grant_the_same_capabilities() {
    let bounding = unit_caps("CapabilityBoundingSet");
    let ambient = unit_caps("AmbientCapabilities");
    assert_eq!(
        bounding, ambient,
        "{UNIT}: bounding and ambient sets differ"
    );
    let unit = read(UNIT);
    for cap in &bounding {
        assert!(
            format!("CAP_{cap}").parse::<caps::Capability>().is_ok(),
            "{UNIT}: CAP_{cap} is not a capability"
        );
        // Each one is justified in a comment line of its own.
        assert!(
            unit.lines()
                .any(|l| l.starts_with(&format!("#  CAP_{cap} "))),
            "{UNIT}: CAP_{cap} has no comment saying why"
        );
    }
    // The unit raises RLIMIT_MEMLOCK itself (kernels < 5.11); Kubernetes cannot, so the pod gets
    // SYS_RESOURCE for aya to raise it. That is the one intended difference.
    assert_eq!(unit_one("LimitMEMLOCK"), "infinity");
    let Some(pod) = daemonset_pod() else { return };
    let added: BTreeSet<String> =
        strs(&pod["containers"][0]["securityContext"]["capabilities"]["add"])
            .into_iter()
            .collect();
    let mut expected = bounding.clone();
    expected.insert("SYS_RESOURCE".into());
    assert_eq!(added, expected, "{DAEMONSET} vs {UNIT}");
    let ds = read(DAEMONSET);
    for cap in &added {
        assert!(
            ds.lines()
                .any(|l| l.trim_start().starts_with(&format!("#  {cap} "))),
            "{DAEMONSET}: {cap} has no comment saying why"
        );
    }
}

// --- Containerfile --------------------------------------------------------------------------

const CONTAINERFILE: &str = "deploy/Containerfile";

/// (instruction, arguments) with continuation lines joined and comments dropped.
fn instructions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read(CONTAINERFILE).lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => cur.push_str(part),
            None => {
                cur.push_str(t);
                let (i, a) = cur.split_once(char::is_whitespace).unwrap();
                out.push((i.to_uppercase(), a.trim().to_owned()));
                cur.clear();
            }
        }
    }
    out
}

#[test]
fn containerfile_passes_hadolint() {
    let Some(hadolint) = venv_bin("hadolint") else {
        return;
    };
    let o = run(Command::new(hadolint)
        .args(["--no-color", "--failure-threshold", "style"])
        .arg(repo().join(CONTAINERFILE)));
    assert!(
        o.status.success(),
        "hadolint {CONTAINERFILE}:\n{}",
        text(&o)
    );
}

/// Does the ignore file beside the Containerfile keep `path` out of the build context? Only the
/// two forms it uses: `**/NAME` (a path component anywhere) and a path from the root.
fn ignored(patterns: &[String], path: &str) -> bool {
    patterns.iter().any(|p| match p.strip_prefix("**/") {
        Some(name) => path.split('/').any(|c| c == name),
        None => path == p || path.starts_with(&format!("{p}/")),
    })
}

#[test]
fn containerfile_matches_the_repository() {
    let ins = instructions();
    let patterns: Vec<String> = read("deploy/Containerfile.dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let tracked = run(Command::new("git").arg("-C").arg(repo()).args(["ls-files"]));
    let tracked: Vec<String> = String::from_utf8_lossy(&tracked.stdout)
        .lines()
        .map(str::to_owned)
        .collect();

    let mut stages: Vec<String> = Vec::new();
    let mut froms = Vec::new();
    for (i, a) in &ins {
        match i.as_str() {
            "FROM" => {
                let w: Vec<&str> = a.split_whitespace().collect();
                froms.push(w[0].to_owned());
                if let [_, as_, name] = w[..] {
                    assert!(as_.eq_ignore_ascii_case("AS"), "{a}");
                    stages.push(name.to_owned());
                }
            }
            "COPY" => {
                let w: Vec<&str> = a.split_whitespace().collect();
                if let Some(from) = w[0].strip_prefix("--from=") {
                    assert!(
                        stages.iter().any(|s| s == from),
                        "COPY --from={from}: no earlier stage"
                    );
                    continue;
                }
                // Every source is in the repository and in the build context.
                for src in &w[..w.len() - 1] {
                    if *src == "." {
                        for f in &tracked {
                            assert!(
                                !ignored(&patterns, f),
                                "{f} is tracked but kept out of the build"
                            );
                        }
                        continue;
                    }
                    assert!(
                        repo().join(src).exists(),
                        "COPY {src}: not in the repository"
                    );
                    assert!(
                        !ignored(&patterns, src),
                        "COPY {src}: kept out of the build context"
                    );
                }
            }
            _ => {}
        }
    }
    assert!(!tracked.is_empty(), "git ls-files found nothing");

    // The build image's Rust is the workspace's rust-version; the run image is the same Debian
    // release (the binary links its glibc).
    let rust_version = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("rust-version in Cargo.toml");
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(
        froms[0].ends_with(&format!("/rust:{rust_version}-bookworm")),
        "{} is not Rust {rust_version} on bookworm",
        froms[0]
    );
    assert!(froms[1].ends_with("/debian:bookworm-slim"), "{}", froms[1]);

    // The build stage uses the project's recipe, with a flag the script knows.
    let script = read("scripts/install-toolchain.sh");
    assert!(
        ins.iter()
            .any(|(i, a)| i == "RUN" && a.contains("scripts/install-toolchain.sh --build-only")),
        "build stage does not run the toolchain recipe"
    );
    assert!(
        script.contains("\"--build-only\""),
        "install-toolchain.sh lacks --build-only"
    );

    // The artifact copied out is where the build stage puts it.
    let workdir = ins
        .iter()
        .find(|(i, _)| i == "WORKDIR")
        .map(|(_, a)| a.clone())
        .unwrap();
    let copy = ins
        .iter()
        .find(|(i, a)| i == "COPY" && a.starts_with("--from="))
        .map(|(_, a)| a.clone())
        .unwrap();
    assert!(
        copy.contains(&format!(" {workdir}/target/release/h2trace ")),
        "{copy} (WORKDIR {workdir})"
    );

    // Exec form: h2trace is PID 1 and gets SIGTERM itself; the default arguments parse.
    let json = |i: &str| -> Vec<String> {
        let a = &ins.iter().rfind(|(n, _)| n == i).unwrap().1;
        serde_json::from_str(a).unwrap_or_else(|e| panic!("{i} {a}: not exec form: {e}"))
    };
    assert_eq!(json("ENTRYPOINT"), ["/usr/local/bin/h2trace"]);
    let cmd = json("CMD");
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    assert_cli_accepts(&cmd, CONTAINERFILE);
}

// --- Log shippers ---------------------------------------------------------------------------

/// Every record of the recorded fixtures (real h2trace output).
fn fixture_records() -> Vec<Value> {
    let dir = repo().join("h2trace/tests/fixtures");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "ndjson") {
            for l in std::fs::read_to_string(&p).unwrap().lines() {
                out.push(serde_json::from_str(l).unwrap());
            }
        }
    }
    assert!(!out.is_empty());
    out
}

#[test]
fn shippers_read_what_the_unit_writes_and_route_real_findings() {
    let file = unit_one("StandardOutput")
        .strip_prefix("append:")
        .unwrap()
        .to_owned();
    let vector = read("deploy/vector.toml");
    let fluent = read("deploy/fluent-bit.conf");
    assert!(
        vector.contains(&format!("include = [\"{file}\"]")),
        "vector.toml tails {file}"
    );
    assert!(
        fluent
            .lines()
            .any(|l| l.split_whitespace().eq(["Path", file.as_str()])),
        "fluent-bit.conf tails {file}"
    );
    // Both route on event.action == "finding": real output has findings there, and only there.
    assert!(vector.contains(r#"route.finding = '.event.action == "finding"'"#));
    assert!(fluent.contains(r"Rule   $event['action'] ^finding$ h2trace.finding true"));
    let records = fixture_records();
    let findings = records
        .iter()
        .filter(|r| r["event"]["action"] == "finding")
        .count();
    assert!(findings > 0, "no finding in the fixtures");
    assert_eq!(
        findings,
        records
            .iter()
            .filter(|r| r["event"]["kind"] == "alert")
            .count(),
        "findings are exactly the alerts"
    );
    // Fluent Bit's parser takes its time from @timestamp with this format (%L: fraction).
    let parsers = read("deploy/fluent-bit-parsers.conf");
    assert!(fluent.contains("Parsers_File fluent-bit-parsers.conf"));
    assert!(fluent.contains("Parser           h2trace_ndjson"));
    assert!(parsers.contains("Name        h2trace_ndjson"));
    assert!(parsers.contains("Time_Key    @timestamp"));
    assert!(parsers.contains("Time_Format %Y-%m-%dT%H:%M:%S.%LZ"));
    for r in &records {
        let t = r["@timestamp"]
            .as_str()
            .expect("@timestamp on every record");
        chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.fZ")
            .unwrap_or_else(|e| panic!("@timestamp {t}: {e}"));
    }
}

#[test]
fn vector_config_parses_and_its_graph_is_connected() {
    // TOML syntax and the component graph; Vector itself (and its VRL checker) is not installable
    // from the registries this project uses, so `vector validate` cannot run here.
    let Some(py) = venv_bin("python") else { return };
    let o = run(Command::new(py)
        .args([
            "-c",
            "import json, sys, tomllib; json.dump(tomllib.load(open(sys.argv[1], 'rb')), sys.stdout)",
        ])
        .arg(repo().join("deploy/vector.toml")));
    assert!(o.status.success(), "deploy/vector.toml: {}", text(&o));
    let cfg: Value = serde_json::from_slice(&o.stdout).unwrap();
    let names = |k: &str| -> Vec<String> {
        cfg[k]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    let mut outputs: BTreeSet<String> = names("sources").into_iter().collect();
    for (name, t) in cfg["transforms"].as_object().unwrap() {
        outputs.insert(name.clone());
        if let Some(routes) = t["route"].as_object() {
            outputs.extend(routes.keys().map(|r| format!("{name}.{r}")));
        }
    }
    let mut used = BTreeSet::new();
    for kind in ["transforms", "sinks"] {
        for (name, c) in cfg[kind].as_object().unwrap() {
            for input in strs(&c["inputs"]) {
                assert!(outputs.contains(&input), "{kind}.{name}: no input {input}");
                used.insert(input.split('.').next().unwrap().to_owned());
            }
        }
    }
    for s in names("sources").iter().chain(&names("transforms")) {
        assert!(used.contains(s), "{s} feeds nothing");
    }
}
