//! Which capabilities h2trace has, and which it needs.
use caps::{CapSet, Capability};

use super::ProbeError;

/// Each capability h2trace may use and what for (also printed by `check`). All are needed at
/// start only: once programs are attached and sockets opened, `drop_all` gives them up.
pub const USED: [(Capability, &str); 7] = [
    (
        Capability::CAP_BPF,
        "load eBPF programs and create maps (Linux ≥ 5.8)",
    ),
    (
        Capability::CAP_PERFMON,
        "attach tracepoints/kprobes and read kernel memory from programs (Linux ≥ 5.8)",
    ),
    (
        Capability::CAP_SYS_ADMIN,
        "setns() into other network namespaces (conntrack, snapshot); mount tracefs if needed; replaces CAP_BPF+CAP_PERFMON before Linux 5.8",
    ),
    (
        Capability::CAP_DAC_READ_SEARCH,
        "read tracefs format files and /proc of other users",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "read /proc/PID/fd and /proc/PID/ns/net of other users' processes (snapshot owners)",
    ),
    (
        Capability::CAP_NET_ADMIN,
        "subscribe to conntrack events (ctnetlink) in the followed namespaces",
    ),
    (
        Capability::CAP_SYS_RESOURCE,
        "raise RLIMIT_MEMLOCK for BPF maps before Linux 5.11",
    ),
];

/// Give up every capability (effective, permitted, inheritable, ambient): once the programs
/// are attached and the sockets open, reading them needs none, so a bug in the parsing of
/// kernel records or netlink messages cannot be turned into privileged actions.
pub fn drop_all() -> Result<(), caps::errors::CapsError> {
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::clear(None, CapSet::Effective)?;
    caps::clear(None, CapSet::Permitted)
}

pub fn has(cap: Capability) -> bool {
    caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false)
}

/// Tracing needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN (which implies both).
pub fn require_tracing_caps() -> Result<(), ProbeError> {
    if has(Capability::CAP_SYS_ADMIN) || has(Capability::CAP_BPF) && has(Capability::CAP_PERFMON) {
        return Ok(());
    }
    let missing = [Capability::CAP_BPF, Capability::CAP_PERFMON]
        .into_iter()
        .filter(|c| !has(*c))
        .map(|c| match c {
            Capability::CAP_BPF => "CAP_BPF",
            _ => "CAP_PERFMON",
        })
        .collect();
    Err(ProbeError::Privileges(missing))
}
