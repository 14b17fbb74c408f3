//! What the connection tracker of a network namespace (a NAT router, a firewall, the host
//! itself) thought of each TCP connection.
//!
//! `netlink` subscribes to ctnetlink events (NEW / UPDATE / DESTROY) in the namespaces h2trace
//! follows; `join` (pure) keeps each entry's state history and ties it to the sockets it
//! belongs to, through NAT and across namespaces, so a connection record can say what the
//! middlebox thought of it and `detect` can tell "conntrack forgot a live connection".
pub mod join;
pub mod netlink;

use std::net::SocketAddr;

/// Conntrack's own TCP states (`enum tcp_conntrack` in
/// include/uapi/linux/netfilter/nf_conntrack_tcp.h), not the socket states.
pub mod ct_state {
    pub const NONE: u8 = 0;
    pub const SYN_SENT: u8 = 1;
    pub const SYN_RECV: u8 = 2;
    pub const ESTABLISHED: u8 = 3;
    pub const FIN_WAIT: u8 = 4;
    pub const CLOSE_WAIT: u8 = 5;
    pub const LAST_ACK: u8 = 6;
    pub const TIME_WAIT: u8 = 7;
    pub const CLOSE: u8 = 8;
    pub const SYN_SENT2: u8 = 9;
}

const STATE_NAMES: [&str; 10] = [
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
];

pub fn state_name(s: u8) -> &'static str {
    STATE_NAMES.get(s as usize).copied().unwrap_or("UNKNOWN")
}

pub fn state_from_name(name: &str) -> Option<u8> {
    STATE_NAMES.iter().position(|n| *n == name).map(|i| i as u8)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtKind {
    New,
    Update,
    Destroy,
}

impl CtKind {
    /// The `event.action` of the record.
    pub fn action(self) -> &'static str {
        match self {
            Self::New => "conntrack-new",
            Self::Update => "conntrack-update",
            Self::Destroy => "conntrack-destroy",
        }
    }

    pub fn from_action(a: &str) -> Option<Self> {
        [Self::New, Self::Update, Self::Destroy]
            .into_iter()
            .find(|k| k.action() == a)
    }
}

/// Where a conntrack event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtSource {
    /// ctnetlink (stamped when read: no kernel time).
    Netlink,
    /// Kernel-side hooks (exact kernel time); see `probe::conntrack`.
    Fentry,
    Kprobe,
    BtfTracepoint,
}

impl CtSource {
    const ALL: [CtSource; 4] = [
        Self::Netlink,
        Self::Fentry,
        Self::Kprobe,
        Self::BtfTracepoint,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Netlink => "ctnetlink",
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::BtfTracepoint => "tp_btf",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// One direction of a conntrack entry: the packet's source and destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl Tuple {
    pub fn reversed(self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
        }
    }
}

/// One conntrack event of a TCP entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtEvent {
    /// CLOCK_MONOTONIC ns when h2trace received it (ctnetlink carries no time).
    pub ts_ns: u64,
    pub source: CtSource,
    /// Inode of the network namespace whose table holds the entry.
    pub netns: u32,
    pub kind: CtKind,
    /// The kernel's id of the entry (`CTA_ID`), unique within its namespace while it lives.
    pub id: u32,
    /// As the first packet travelled (before NAT).
    pub orig: Tuple,
    /// As the answers travel (after NAT: a rewritten address shows here).
    pub reply: Tuple,
    /// Conntrack TCP state after the event (`ct_state`), when the event carries it.
    pub state: Option<u8>,
    /// Seconds left before the entry expires; on DESTROY absent (or 0) when it expired.
    pub timeout_s: Option<u32>,
    /// `IPS_*` status bits.
    pub status: u32,
    pub mark: u32,
    pub zone: u16,
}

impl CtEvent {
    /// A DESTROY because the entry timed out, not because something deleted it early.
    pub fn expired(&self) -> bool {
        self.kind == CtKind::Destroy && self.timeout_s.unwrap_or(0) == 0
    }

    /// Address or port rewritten in either direction.
    pub fn nat(&self) -> bool {
        self.reply != self.orig.reversed()
    }
}

/// A namespace whose conntrack table h2trace follows, and what it knows about it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CtNamespace {
    pub netns: u32,
    /// How the operator named it: `host`, `pid:N`, a name under /run/netns, or a path.
    pub name: String,
    /// `ctnetlink`, or why it is not followed.
    pub source: String,
    /// `net.netfilter.nf_conntrack_tcp_timeout_established` in that namespace, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_established_s: Option<u32>,
    /// Whether the namespace follows mid-stream connections (`nf_conntrack_tcp_loose`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_loose: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for s in 0..10 {
            assert_eq!(state_from_name(state_name(s)), Some(s));
        }
        assert_eq!(state_name(42), "UNKNOWN");
        assert_eq!(state_name(ct_state::ESTABLISHED), "ESTABLISHED");
    }
}
