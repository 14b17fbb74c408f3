//! Options validated and resolved into what the run needs.
use std::{io::IsTerminal as _, path::PathBuf, time::Duration};

use crate::{
    cli::{ConntrackChoice, DetectArgs, Events, Format, Http2Choice, TraceArgs},
    detect::DetectConfig,
    filter::{CgroupSel, Filter},
    netns::NetnsSpec,
    netns::netns_inode,
    owner::cgroup,
    probe::ProbeOptions,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no process with pid {0} (is it running? h2trace follows live processes only)")]
    NoSuchPid(u32),
    #[error("invalid --{0} {1:?}: {2} (examples: 30s, 5m, 1h30m, 500ms)")]
    Duration(&'static str, String, String),
    #[error("invalid --{0}: must be more than 0")]
    Zero(String),
    #[error("invalid --ring-size {0:?}: {1}")]
    RingSize(String, String),
    #[error("invalid --perf-pages {0}: must be a power of two")]
    PerfPages(usize),
    #[error("invalid --max-sockets 0: must be at least 1")]
    MaxSockets,
    #[error("--conntrack-netns {0}: no such network namespace ({1})")]
    Netns(String, String),
    #[error("--conntrack-netns given with --conntrack off")]
    NetnsWithoutConntrack,
    #[error("invalid --conntrack-buffer {0:?}: {1}")]
    CtBuffer(String, String),
    #[error("--cgroup {0}: no such cgroup ({1})")]
    Cgroup(String, String),
    #[error("--netns {0}: no such network namespace ({1})")]
    NetnsFilter(String, String),
    #[error("{0}")]
    Http2(String),
    #[error(
        "--live-hold {0:?} must be shorter than --close-wait-stuck ({1:?}): lower the one or \
         raise the other"
    )]
    LiveHold(String, Duration),
}

/// Which conntrack tables to follow, and whether failing to is an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConntrackConfig {
    /// Each namespace, and whether not following it is an error (`--conntrack on`, or named
    /// with `--conntrack-netns`) or a warning.
    pub namespaces: Vec<(NetnsSpec, bool)>,
    /// Receive buffer of each ctnetlink socket, in bytes.
    pub buffer: usize,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub filter: Filter,
    pub duration: Option<Duration>,
    pub format: Format,
    pub output: Option<PathBuf>,
    pub probe: ProbeOptions,
    pub perf_pages: usize,
    pub detect: DetectConfig,
    /// How long live events wait to be folded into their connection's record (0: never).
    pub live_hold_ns: u64,
    pub conntrack: ConntrackConfig,
}

fn duration(flag: &'static str, v: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v)
        .map_err(|e| ConfigError::Duration(flag, v.to_string(), e.to_string()))
}

fn ns(flag: &'static str, v: &str) -> Result<u64, ConfigError> {
    Ok(duration(flag, v)?.as_nanos().min(u64::MAX as u128) as u64)
}

/// The thresholds: `base` (the defaults, or what a recorded stream used) with the flags given.
pub fn detect_config(a: &DetectArgs, base: DetectConfig) -> Result<DetectConfig, ConfigError> {
    let mut c = base;
    let dur =
        |flag, v: &Option<String>, default: u64| v.as_deref().map_or(Ok(default), |v| ns(flag, v));
    c.window_ns = dur("window", &a.window, c.window_ns)?;
    c.min_conns = a.min_conns.unwrap_or(c.min_conns);
    c.short_lifetime_ns = dur("short-lifetime", &a.short_lifetime, c.short_lifetime_ns)?;
    c.close_wait_stuck_ns = dur(
        "close-wait-stuck",
        &a.close_wait_stuck,
        c.close_wait_stuck_ns,
    )?;
    c.idle_gap_ns = dur("idle-gap", &a.idle_gap, c.idle_gap_ns)?;
    c.time_wait_pileup = a.time_wait_pileup.unwrap_or(c.time_wait_pileup);
    c.rst_storm = a.rst_storm.unwrap_or(c.rst_storm);
    c.cancel_storm = a.cancel_storm.unwrap_or(c.cancel_storm);
    c.max_peers = a.max_peers.unwrap_or(c.max_peers);
    // The detector's own rule, which a recorded stream's thresholds are held to as well. Each
    // field is named after its flag (`window_ns`: `--window`).
    if let Some(field) = c.invalid_field() {
        let flag = field.trim_end_matches("_ns").replace('_', "-");
        return Err(ConfigError::Zero(flag));
    }
    Ok(c)
}

/// Whether any threshold was given on the command line.
pub fn detect_overridden(a: &DetectArgs) -> bool {
    a.window.is_some()
        || a.min_conns.is_some()
        || a.short_lifetime.is_some()
        || a.close_wait_stuck.is_some()
        || a.idle_gap.is_some()
        || a.time_wait_pileup.is_some()
        || a.rst_storm.is_some()
        || a.cancel_storm.is_some()
        || a.max_peers.is_some()
}

/// Text on a terminal (when writing to standard output), NDJSON otherwise.
pub fn default_format(chosen: Option<Format>, to_file: bool) -> Format {
    chosen.unwrap_or(if !to_file && std::io::stdout().is_terminal() {
        Format::Text
    } else {
        Format::Ndjson
    })
}

/// Wake the agent when this much waits in the ring (it also drains on a timer).
const WAKE_BYTES: u32 = 256 * 1024;

pub fn resolve(a: &TraceArgs) -> Result<Config, ConfigError> {
    for &pid in &a.pid {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() || pid == 0 {
            return Err(ConfigError::NoSuchPid(pid));
        }
    }
    let duration = a
        .duration
        .as_deref()
        .map(|d| duration("duration", d))
        .transpose()?;
    let ring: bytesize::ByteSize = a
        .ring_size
        .parse()
        .map_err(|e: String| ConfigError::RingSize(a.ring_size.clone(), e))?;
    let ring_bytes = u32::try_from(ring.as_u64())
        .ok()
        .filter(|b| b.is_power_of_two() && *b >= 4096)
        .ok_or_else(|| {
            ConfigError::RingSize(
                a.ring_size.clone(),
                "must be a power of two from 4KiB to 2GiB".into(),
            )
        })?;
    if !a.perf_pages.is_power_of_two() {
        return Err(ConfigError::PerfPages(a.perf_pages));
    }
    if a.max_sockets == 0 {
        return Err(ConfigError::MaxSockets);
    }
    let format = default_format(a.format, a.output.is_some());
    let detect = detect_config(&a.detect, DetectConfig::default())?;
    // A CLOSE_WAIT held past the stuck threshold would be found stuck late, or never.
    let live_hold_ns = match (a.events, ns("live-hold", &a.live_hold)?) {
        (Events::All, _) => 0,
        (_, h) if h >= detect.close_wait_stuck_ns => {
            return Err(ConfigError::LiveHold(
                a.live_hold.clone(),
                Duration::from_nanos(detect.close_wait_stuck_ns),
            ));
        }
        (_, h) => h,
    };
    let conntrack = conntrack_config(a)?;
    Ok(Config {
        filter: Filter {
            pids: (!a.pid.is_empty()).then(|| a.pid.iter().copied().collect()),
            local_ports: a.local_port.clone(),
            remote_ports: a.remote_port.clone(),
            ipv6: if a.ipv4 {
                Some(false)
            } else if a.ipv6 {
                Some(true)
            } else {
                None
            },
            cgroups: a
                .cgroup
                .iter()
                .map(|c| cgroup_sel(c))
                .collect::<Result<_, _>>()?,
            netns: a
                .netns
                .iter()
                .map(|n| {
                    netns_inode(&NetnsSpec::Named(n.clone()))
                        .map_err(|e| ConfigError::NetnsFilter(n.clone(), e.to_string()))
                })
                .collect::<Result<_, _>>()?,
        },
        duration,
        format,
        output: a.output.clone(),
        probe: ProbeOptions {
            probe: a.probe,
            transport: a.transport,
            emit_all_transitions: a.events == Events::All,
            fold_closed_resets: live_hold_ns > 0,
            peek: a.peek,
            h2c: a.http2 != Http2Choice::Off,
            tls_lib: tls_lib(a)?,
            go_binaries: go_binaries(a)?,
            ring_bytes,
            max_sockets: a.max_sockets,
            wake_bytes: WAKE_BYTES.min(ring_bytes / 4),
            conntrack: (!conntrack.namespaces.is_empty()).then_some(a.conntrack_probe),
            follow_forks: if a.follow_forks {
                a.pid.clone()
            } else {
                Vec::new()
            },
        },
        perf_pages: a.perf_pages,
        detect,
        live_hold_ns,
        conntrack,
    })
}

/// `--http2 all`: the OpenSSL library given, or the distribution's.
fn tls_lib(a: &TraceArgs) -> Result<Option<PathBuf>, ConfigError> {
    match (a.http2, &a.tls_lib) {
        (Http2Choice::All, Some(p)) if p.is_file() => Ok(Some(p.clone())),
        (Http2Choice::All, Some(p)) => Err(ConfigError::Http2(format!(
            "--tls-lib {}: not a file",
            p.display()
        ))),
        (Http2Choice::All, None) => crate::probe::TLS_LIB_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .map(Some)
            .ok_or_else(|| {
                ConfigError::Http2(format!(
                    "--http2 all: no OpenSSL 3 libssl in {}: name it with --tls-lib",
                    crate::probe::TLS_LIB_PATHS.join(", ")
                ))
            }),
        (_, Some(_)) => Err(ConfigError::Http2(
            "--tls-lib needs --http2 all".to_string(),
        )),
        (_, None) => Ok(None),
    }
}

/// `--go-binary`: files, and only with `--http2 all`.
fn go_binaries(a: &TraceArgs) -> Result<Vec<PathBuf>, ConfigError> {
    if !a.go_binary.is_empty() && a.http2 != Http2Choice::All {
        return Err(ConfigError::Http2("--go-binary needs --http2 all".into()));
    }
    match a.go_binary.iter().find(|p| !p.is_file()) {
        Some(p) => Err(ConfigError::Http2(format!(
            "--go-binary {}: not a file",
            p.display()
        ))),
        None => Ok(a.go_binary.clone()),
    }
}

fn cgroup_sel(c: &str) -> Result<CgroupSel, ConfigError> {
    let id = cgroup::id_of(c).map_err(|e| ConfigError::Cgroup(c.to_string(), e.to_string()))?;
    // Descendants are matched by path, relative to the v2 root like the records' paths.
    let rel = match cgroup::v2_root() {
        Some(root) => std::path::Path::new(c)
            .strip_prefix(&root)
            .map(|r| format!("/{}", r.display()))
            .unwrap_or_else(|_| format!("/{}", c.trim_start_matches('/'))),
        None => c.to_string(),
    };
    Ok(CgroupSel { id, path: rel })
}

fn conntrack_config(a: &TraceArgs) -> Result<ConntrackConfig, ConfigError> {
    if a.conntrack == ConntrackChoice::Off {
        if !a.conntrack_netns.is_empty() {
            return Err(ConfigError::NetnsWithoutConntrack);
        }
        return Ok(ConntrackConfig::default());
    }
    let buffer: bytesize::ByteSize = a
        .conntrack_buffer
        .parse()
        .map_err(|e: String| ConfigError::CtBuffer(a.conntrack_buffer.clone(), e))?;
    let buffer = usize::try_from(buffer.as_u64())
        .ok()
        .filter(|b| (4096..=1 << 30).contains(b))
        .ok_or_else(|| {
            ConfigError::CtBuffer(a.conntrack_buffer.clone(), "must be 4KiB to 1GiB".into())
        })?;
    let on = a.conntrack == ConntrackChoice::On;
    let mut namespaces = vec![(NetnsSpec::Host, on)];
    namespaces.extend(a.pid.iter().map(|&p| (NetnsSpec::Pid(p), on)));
    for n in &a.conntrack_netns {
        let spec = NetnsSpec::Named(n.clone());
        if let Err(e) = std::fs::metadata(spec.path()) {
            return Err(ConfigError::Netns(
                n.clone(),
                format!("{}: {e}", spec.path().display()),
            ));
        }
        namespaces.push((spec, true));
    }
    Ok(ConntrackConfig { namespaces, buffer })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    fn args(v: &[&str]) -> TraceArgs {
        Cli::try_parse_from(std::iter::once("h2trace").chain(v.iter().copied()))
            .unwrap()
            .trace
    }

    #[test]
    fn resolves_defaults_and_filters() {
        let me = std::process::id().to_string();
        let c = resolve(&args(&[
            "--pid",
            &me,
            "-L",
            "80,443",
            "-4",
            "--duration",
            "1m30s",
            "-f",
            "ndjson",
        ]))
        .unwrap();
        assert_eq!(c.filter.pids.unwrap().len(), 1);
        assert_eq!(c.filter.local_ports, [80, 443]);
        assert_eq!(c.filter.ipv6, Some(false));
        assert_eq!(c.duration, Some(Duration::from_secs(90)));
        assert_eq!(c.probe.ring_bytes, 8 << 20);
        assert!(!c.probe.emit_all_transitions);
        // Held live events: the kernel folds the RSTs of abortive closes, unless nothing is held.
        assert!(c.probe.fold_closed_resets);
        for nothing_held in [&["--live-hold", "0"][..], &["--events", "all"]] {
            assert!(
                !resolve(&args(nothing_held))
                    .unwrap()
                    .probe
                    .fold_closed_resets
            );
        }
        // Conntrack: the host's table and the traced process's, ctnetlink buffer 8 MiB.
        assert_eq!(c.conntrack.namespaces.len(), 2);
        assert_eq!(c.conntrack.buffer, 8 << 20);
        assert!(c.probe.conntrack.is_some());
    }

    #[test]
    fn rejects_bad_values_with_their_reason() {
        let err = resolve(&args(&["--pid", "4194304"])).unwrap_err();
        assert!(matches!(err, ConfigError::NoSuchPid(4194304)));
        assert!(
            resolve(&args(&["--duration", "soon"]))
                .unwrap_err()
                .to_string()
                .contains("soon")
        );
        assert!(resolve(&args(&["--ring-size", "3000"])).is_err());
        assert!(resolve(&args(&["--perf-pages", "3"])).is_err());
        assert!(Cli::try_parse_from(["h2trace", "-4", "-6"]).is_err());
        assert!(Cli::try_parse_from(["h2trace", "--probe", "uprobe"]).is_err());
        assert!(resolve(&args(&["--conntrack-buffer", "12"])).is_err());
        assert!(matches!(
            resolve(&args(&["--conntrack", "off", "--conntrack-netns", "x"])),
            Err(ConfigError::NetnsWithoutConntrack)
        ));
        let e = resolve(&args(&["--conntrack-netns", "no-such-ns-h2t"])).unwrap_err();
        assert!(e.to_string().contains("/run/netns/no-such-ns-h2t"), "{e}");
    }
}
