//! Kernel records decoded into typed events. Pure: bytes in, values out.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use h2trace_common::{
    CtRecord, ForkRecord, FrameRecord, Header, LifeRecord, LiveRecord, MAX_TRANSITIONS, SockLife,
    SockMeta, ct_hook, kind, origin, owner_src,
};

use crate::{
    conntrack::{CtEvent, CtKind, CtSource, Tuple},
    http2::{self, Frame, FrameBody},
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than a header")]
    Short(usize),
    #[error("record kind {kind}: {len} bytes, expected {expected}")]
    Size {
        kind: u16,
        len: usize,
        expected: usize,
    },
    #[error("unknown record kind {0}")]
    UnknownKind(u16),
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("HTTP/2 frame record with an invalid {0}")]
    Field(&'static str),
}

/// TCP state names as the kernel spells them, without the `TCP_` prefix.
pub fn state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

/// The inverse of [`state_name`].
pub fn state_from_name(name: &str) -> Option<u8> {
    (1..=12).find(|&s| state_name(s) == name)
}

/// A socket life is `(kernel address, first-seen time)`: addresses are reused after free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketId {
    pub skaddr: u64,
    pub start_ns: u64,
}

impl SocketId {
    /// `SKADDR-START` in lowercase hex, appended to `out`: written in every record, so without
    /// the formatting machinery.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        fn hex(v: u64, out: &mut Vec<u8>) {
            let digits = (64 - v.leading_zeros()).div_ceil(4).max(1);
            for i in (0..digits).rev() {
                out.push(b"0123456789abcdef"[(v >> (4 * i) & 0xf) as usize]);
            }
        }
        hex(self.skaddr, out);
        out.push(b'-');
        hex(self.start_ns, out);
    }
}

impl std::fmt::Display for SocketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = Vec::with_capacity(33);
        self.write_to(&mut s);
        f.write_str(std::str::from_utf8(&s).map_err(|_| std::fmt::Error)?)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerSource {
    /// Inherited from the listening process at accept time.
    Listener,
    Close,
    Io,
    Connect,
    /// From /proc at start: the socket predates h2trace.
    Snapshot,
}

impl OwnerSource {
    pub(crate) const ALL: [Self; 5] = [
        Self::Listener,
        Self::Close,
        Self::Io,
        Self::Connect,
        Self::Snapshot,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Listener => "listener",
            Self::Close => "close",
            Self::Io => "io",
            Self::Connect => "connect",
            Self::Snapshot => "snapshot",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub tgid: u32,
    pub pid: u32,
    /// At most 15 bytes (the kernel's `TASK_COMM_LEN`): kept inline, no allocation per event.
    pub comm: compact_str::CompactString,
    pub cgroup_id: u64,
    /// The cgroup's path (relative to the v2 root), when the agent could resolve the id;
    /// shared with the agent's table of paths, not copied per event.
    pub cgroup_path: Option<std::sync::Arc<str>>,
    pub source: OwnerSource,
}

/// How the life began, as far as the tracer saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `connect()`: this side is the client.
    Active,
    /// Created by a listener: this side is the server.
    Passive,
    /// First seen mid-life (the socket predates the tracer, or its entry was evicted).
    MidLife,
    /// Found by the start-up snapshot: it predates the tracer.
    Snapshot,
}

impl Origin {
    pub(crate) const ALL: [Self; 4] = [Self::Active, Self::Passive, Self::MidLife, Self::Snapshot];

    /// `h2trace.socket.seen_from`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "connect",
            Self::Passive => "accept",
            Self::MidLife => "mid-life",
            Self::Snapshot => "snapshot",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    pub id: SocketId,
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub owner: Option<Owner>,
    pub origin: Origin,
}

impl Socket {
    pub fn is_ipv6(&self) -> bool {
        self.local.is_ipv6()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub ts_ns: u64,
    pub state: u8,
}

/// The kernel's facts about one finished socket life.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Life {
    pub first_state: u8,
    /// Inline up to the kernel record's capacity: decoding a life allocates only its box.
    pub transitions: smallvec::SmallVec<[Transition; MAX_TRANSITIONS]>,
    /// Transitions that happened but did not fit the record.
    pub transitions_dropped: u32,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub last_send_ns: Option<u64>,
    pub last_recv_ns: Option<u64>,
    pub resets_sent: u16,
    pub resets_received: u16,
    pub first_reset_sent_ns: Option<u64>,
    pub first_reset_received_ns: Option<u64>,
    pub reset_sent_reason: Option<u32>,
    pub reset_received_state: Option<u8>,
    pub retransmits: u32,
    pub last_retransmit_ns: Option<u64>,
    /// The last send or receive before the connection left ESTABLISHED.
    pub active_before_close_ns: Option<u64>,
    /// The longest silence before a send that opened a new exchange, and when it ended.
    pub longest_request_gap: Option<(u64, u64)>,
    /// The first bytes the socket sent (`--peek`; empty when not captured).
    pub first_bytes: smallvec::SmallVec<[u8; 8]>,
    /// What a followed conntrack table thought of the connection (joined by the pipeline).
    pub conntrack: Option<Box<crate::conntrack::join::CtJoin>>,
    /// HTTP/2 (`--http2`): the kernel's stream counts.
    pub http2: http2::Streams,
    /// HTTP/2 control frames of the connection (joined by the pipeline).
    pub frames: Option<Box<http2::Frames>>,
    /// Live events of this socket that were not written on their own because the socket's
    /// life ended while they were held (`Pipeline`'s live hold): this record says it all.
    pub folded: Folded,
}

/// Counts of the live events folded into a life record, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Folded {
    pub close_wait: u16,
    pub resets_sent: u16,
    pub resets_received: u16,
    pub retransmits: u16,
}

impl Folded {
    /// The count `body` goes to, if it is one of the live events a life record can stand for
    /// (CLOSE_WAIT, a reset, a retransmission).
    fn slot(&mut self, body: &Body) -> Option<&mut u16> {
        match body {
            Body::State { new, .. } if *new == h2trace_common::tcp_state::CLOSE_WAIT => {
                Some(&mut self.close_wait)
            }
            Body::ResetSent { .. } => Some(&mut self.resets_sent),
            Body::ResetReceived { .. } => Some(&mut self.resets_received),
            Body::Retransmit { .. } => Some(&mut self.retransmits),
            _ => None,
        }
    }

    /// Whether a life record can stand for `body`.
    pub fn folds(body: &Body) -> bool {
        Self::default().slot(body).is_some()
    }

    pub fn add(&mut self, body: &Body) {
        if let Some(n) = self.slot(body) {
            *n = n.saturating_add(1);
        }
    }

    pub fn total(&self) -> u64 {
        [
            self.close_wait,
            self.resets_sent,
            self.resets_received,
            self.retransmits,
        ]
        .iter()
        .map(|&n| u64::from(n))
        .sum()
    }
}

/// Which side sent the first FIN, read off the state sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinFirst {
    /// ESTABLISHED → FIN_WAIT1 before any CLOSE_WAIT: this side closed first.
    Local,
    /// ESTABLISHED → CLOSE_WAIT: the peer closed first.
    Peer,
    /// FIN_WAIT1 → CLOSING: both FINs crossed.
    Simultaneous,
    /// No FIN (reset, failed connect, or still open).
    None,
}

impl FinFirst {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Peer => "peer",
            Self::Simultaneous => "simultaneous",
            Self::None => "none",
        }
    }
}

impl Life {
    /// The states in order, starting with the state before the first transition.
    pub fn states(&self) -> impl Iterator<Item = u8> + '_ {
        std::iter::once(self.first_state).chain(self.transitions.iter().map(|t| t.state))
    }

    pub fn fin_first(&self) -> FinFirst {
        use h2trace_common::tcp_state::*;
        let mut local = false;
        for s in self.states() {
            match s {
                FIN_WAIT1 => local = true,
                CLOSING if local => return FinFirst::Simultaneous,
                CLOSE_WAIT => return FinFirst::Peer,
                _ => {}
            }
        }
        if local {
            FinFirst::Local
        } else {
            FinFirst::None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// The socket's life ended (the kernel destroyed it).
    Life(Box<Life>),
    /// The socket was still open when tracing stopped (read from the kernel's table at exit).
    Open(Box<Life>),
    State {
        old: u8,
        new: u8,
    },
    ResetSent {
        state: u8,
        reason: Option<u32>,
    },
    ResetReceived {
        state: u8,
    },
    Retransmit {
        state: u8,
        err: i32,
    },
    /// An HTTP/2 control frame (`--http2`).
    Frame(Box<Frame>),
}

/// What the live sources produce, merged into one time order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Socket(Event),
    Conntrack(CtEvent),
    /// A followed process created a task (`--follow-forks`).
    Fork {
        ts_ns: u64,
        parent: u32,
        child: u32,
    },
    /// A followed process has exited (`--pid`): noticed from /proc at `ts_ns`, when
    /// `open_sockets` of its sockets were still open (inherited by another process, or closing).
    Exit {
        ts_ns: u64,
        pid: u32,
        open_sockets: u32,
    },
}

impl crate::order::Stamped for Input {
    fn ts_ns(&self) -> u64 {
        match self {
            Self::Socket(e) => e.ts_ns,
            Self::Conntrack(c) => c.ts_ns,
            Self::Fork { ts_ns, .. } | Self::Exit { ts_ns, .. } => *ts_ns,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Kernel time (CLOCK_MONOTONIC ns).
    pub ts_ns: u64,
    pub cpu: u32,
    pub socket: Socket,
    pub body: Body,
}

fn read<T: Copy>(bytes: &[u8], k: u16) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    // Perf samples carry up to 7 bytes of alignment padding after the payload.
    if bytes.len() < expected || bytes.len() > expected + 7 {
        return Err(DecodeError::Size {
            kind: k,
            len: bytes.len(),
            expected,
        });
    }
    // SAFETY: length checked; T is a repr(C) integer-only wire type, valid for any bits.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn nonzero(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

/// Decode one record as the kernel wrote it.
pub fn decode(bytes: &[u8]) -> Result<Input, DecodeError> {
    if bytes.len() < size_of::<Header>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: length checked above; Header is integer-only.
    let hdr: Header = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    if hdr.kind == kind::CT_STATE {
        return conntrack(&read(bytes, hdr.kind)?).map(Input::Conntrack);
    }
    if hdr.kind == kind::FORK {
        let f: ForkRecord = read(bytes, hdr.kind)?;
        return Ok(Input::Fork {
            ts_ns: f.hdr.ts_ns,
            parent: f.parent,
            child: f.child,
        });
    }
    decode_socket(hdr, bytes).map(Input::Socket)
}

/// A kernel-side conntrack state change.
fn conntrack(r: &CtRecord) -> Result<CtEvent, DecodeError> {
    let addr = |a: &[u8; 16], port: u16| -> Result<SocketAddr, DecodeError> {
        Ok(SocketAddr::new(ip(r.family, a)?, port))
    };
    Ok(CtEvent {
        ts_ns: r.hdr.ts_ns,
        source: match r.hook {
            ct_hook::FENTRY => CtSource::Fentry,
            ct_hook::KPROBE => CtSource::Kprobe,
            _ => CtSource::BtfTracepoint,
        },
        netns: r.netns,
        kind: CtKind::Update,
        id: 0,
        orig: Tuple {
            src: addr(&r.orig_src, r.orig_sport)?,
            dst: addr(&r.orig_dst, r.orig_dport)?,
        },
        reply: Tuple {
            src: addr(&r.reply_src, r.reply_sport)?,
            dst: addr(&r.reply_dst, r.reply_dport)?,
        },
        state: Some(r.new_state),
        timeout_s: None,
        status: r.status,
        mark: r.mark,
        zone: r.zone,
    })
}

fn ip(family: u16, a: &[u8; 16]) -> Result<IpAddr, DecodeError> {
    match family {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
        AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*a))),
        f => Err(DecodeError::Family(f)),
    }
}

fn decode_socket(hdr: Header, bytes: &[u8]) -> Result<Event, DecodeError> {
    match hdr.kind {
        kind::LIFE => {
            let rec: LifeRecord = read(bytes, hdr.kind)?;
            let socket = socket(&rec.life.meta)?;
            Ok(Event {
                ts_ns: hdr.ts_ns,
                cpu: hdr.cpu,
                socket,
                body: Body::Life(Box::new(life(&rec.life))),
            })
        }
        kind::STATE | kind::RESET_SENT | kind::RESET_RECEIVED | kind::RETRANSMIT => {
            let rec: LiveRecord = read(bytes, hdr.kind)?;
            let body = match hdr.kind {
                kind::STATE => Body::State {
                    old: rec.old_state,
                    new: rec.new_state,
                },
                kind::RESET_SENT => Body::ResetSent {
                    state: rec.new_state,
                    reason: (rec.reason != u32::MAX).then_some(rec.reason),
                },
                kind::RESET_RECEIVED => Body::ResetReceived {
                    state: rec.new_state,
                },
                _ => Body::Retransmit {
                    state: rec.new_state,
                    err: rec.reason as i32,
                },
            };
            Ok(Event {
                ts_ns: hdr.ts_ns,
                cpu: hdr.cpu,
                socket: socket(&rec.meta)?,
                body,
            })
        }
        kind::H2_FRAME => {
            let rec: FrameRecord = read(bytes, hdr.kind)?;
            let captured = &rec.payload[..usize::from(rec.captured).min(rec.payload.len())];
            let frame = Frame {
                received: rec.received != 0,
                side: http2::Side::of(rec.side).ok_or(DecodeError::Field("side"))?,
                stream_id: rec.stream_id,
                length: rec.length,
                flags: rec.frame_flags,
                idle_ns: rec.hdr.ts_ns.saturating_sub(rec.prev_activity_ns),
                body: FrameBody::decode(rec.frame_type, rec.frame_flags, captured)
                    .ok_or(DecodeError::Field("frame payload"))?,
            };
            Ok(Event {
                ts_ns: hdr.ts_ns,
                cpu: hdr.cpu,
                socket: socket(&rec.meta)?,
                body: Body::Frame(Box::new(frame)),
            })
        }
        k => Err(DecodeError::UnknownKind(k)),
    }
}

/// A life still in the kernel's table when tracing stops, as a `connection-open` event.
pub fn open_life(l: &SockLife, ts_ns: u64) -> Result<Event, DecodeError> {
    Ok(Event {
        ts_ns,
        cpu: 0,
        socket: socket(&l.meta)?,
        body: Body::Open(Box::new(life(l))),
    })
}

fn life(l: &SockLife) -> Life {
    let stored = (l.n_trans as usize).min(MAX_TRANSITIONS);
    Life {
        first_state: l.first_state,
        transitions: (0..stored)
            .map(|i| Transition {
                ts_ns: l.trans_ns[i],
                state: l.trans_state[i],
            })
            .collect(),
        transitions_dropped: u32::from(l.n_trans) - stored as u32,
        bytes_sent: l.bytes_sent,
        bytes_received: l.bytes_recv,
        last_send_ns: nonzero(l.last_send_ns),
        last_recv_ns: nonzero(l.last_recv_ns),
        resets_sent: l.rst_sent,
        resets_received: l.rst_recv,
        first_reset_sent_ns: nonzero(l.first_rst_sent_ns),
        first_reset_received_ns: nonzero(l.first_rst_recv_ns),
        reset_sent_reason: (l.rst_sent > 0 && l.rst_sent_reason != u32::MAX)
            .then_some(l.rst_sent_reason),
        reset_received_state: (l.rst_recv > 0).then_some(l.rst_recv_state),
        retransmits: l.retrans,
        last_retransmit_ns: nonzero(l.last_retrans_ns),
        active_before_close_ns: nonzero(l.active_before_close_ns),
        longest_request_gap: (l.longest_request_gap_end_ns != 0)
            .then_some((l.longest_request_gap_ns, l.longest_request_gap_end_ns)),
        first_bytes: l.first_bytes[..(l.first_bytes_len as usize).min(8)].into(),
        conntrack: None,
        http2: http2::Streams {
            side: http2::Side::of(l.h2_side),
            opened_local: l.h2_streams[0],
            opened_peer: l.h2_streams[1],
            desync: l.h2_desync,
            tls: l.h2_tls & h2trace_common::h2_tls::TLS != 0,
        },
        frames: None,
        folded: Folded {
            resets_sent: l.rst_sent_folded,
            ..Folded::default()
        },
    }
}

fn socket(m: &SockMeta) -> Result<Socket, DecodeError> {
    let (local, remote) = (ip(m.family, &m.saddr)?, ip(m.family, &m.daddr)?);
    let source = match m.owner_src {
        owner_src::LISTENER => Some(OwnerSource::Listener),
        owner_src::CLOSE => Some(OwnerSource::Close),
        owner_src::IO => Some(OwnerSource::Io),
        owner_src::CONNECT => Some(OwnerSource::Connect),
        _ => None,
    };
    let owner = source.filter(|_| m.tgid != 0).map(|source| Owner {
        tgid: m.tgid,
        pid: m.pid,
        comm: comm(&m.comm),
        cgroup_id: m.cgroup_id,
        cgroup_path: None,
        source,
    });
    Ok(Socket {
        id: SocketId {
            skaddr: m.skaddr,
            start_ns: m.start_ns,
        },
        netns: m.netns,
        local: SocketAddr::new(local, m.sport),
        remote: SocketAddr::new(remote, m.dport),
        owner,
        origin: match m.origin {
            origin::ACTIVE => Origin::Active,
            origin::PASSIVE => Origin::Passive,
            _ => Origin::MidLife,
        },
    })
}

fn comm(raw: &[u8; 16]) -> compact_str::CompactString {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    // Checked as a whole first: the lossy conversion goes character by character.
    match std::str::from_utf8(&raw[..end]) {
        Ok(s) => compact_str::CompactString::new(s),
        Err(_) => compact_str::CompactString::from_utf8_lossy(&raw[..end]),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use h2trace_common::tcp_state::*;

    #[test]
    fn socket_ids_are_lowercase_hex() {
        let id = |skaddr, start_ns| SocketId { skaddr, start_ns }.to_string();
        assert_eq!(
            id(0xffff888102e5b780, 0x3d30cef3d5e),
            "ffff888102e5b780-3d30cef3d5e"
        );
        assert_eq!(id(0, 0), "0-0");
        assert_eq!(id(u64::MAX, 1), format!("{:x}-1", u64::MAX));
    }

    pub fn meta(family: u16) -> SockMeta {
        let mut m = SockMeta {
            skaddr: 0xffff_8880_1234_5678,
            start_ns: 1_000,
            netns: 4026531840,
            tgid: 42,
            pid: 43,
            family,
            sport: 40000,
            dport: 8080,
            owner_src: owner_src::CONNECT,
            origin: origin::ACTIVE,
            ..Default::default()
        };
        m.comm[..4].copy_from_slice(b"curl");
        if family == AF_INET {
            m.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
            m.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        } else {
            m.saddr = Ipv6Addr::LOCALHOST.octets();
            m.daddr = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
        }
        m
    }

    fn socket_event(b: &[u8]) -> Event {
        match decode(b).unwrap() {
            Input::Socket(e) => e,
            other => panic!("not a socket event: {other:?}"),
        }
    }

    #[test]
    fn decodes_a_kernel_conntrack_change() {
        let mut r = CtRecord {
            hdr: Header {
                kind: kind::CT_STATE,
                _pad: 0,
                cpu: 0,
                ts_ns: 77,
            },
            netns: 9,
            family: AF_INET,
            old_state: h2trace_common::CT_STATE_UNKNOWN,
            new_state: 3,
            orig_sport: 40000,
            orig_dport: 8080,
            reply_sport: 8080,
            reply_dport: 1234,
            hook: ct_hook::BTF_TRACEPOINT,
            ..CtRecord::default()
        };
        r.orig_src[..4].copy_from_slice(&[10, 1, 0, 2]);
        r.orig_dst[..4].copy_from_slice(&[10, 2, 0, 2]);
        r.reply_src[..4].copy_from_slice(&[10, 2, 0, 2]);
        r.reply_dst[..4].copy_from_slice(&[10, 2, 0, 1]);
        let Input::Conntrack(c) = decode(&bytes_of(&r)).unwrap() else {
            panic!("not conntrack")
        };
        assert_eq!((c.ts_ns, c.netns, c.state), (77, 9, Some(3)));
        assert_eq!(c.source, CtSource::BtfTracepoint);
        assert_eq!(c.orig.src, "10.1.0.2:40000".parse().unwrap());
        assert_eq!(c.reply.dst, "10.2.0.1:1234".parse().unwrap());
        assert!(c.nat());
        r.family = 0;
        assert_eq!(decode(&bytes_of(&r)), Err(DecodeError::Family(0)));
    }

    pub fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: test-only view of an integer-only repr(C) value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn decodes_a_life_record() {
        let mut life = SockLife::zeroed();
        life.meta = meta(AF_INET);
        life.first_state = CLOSE;
        for (i, s) in [SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE]
            .into_iter()
            .enumerate()
        {
            life.trans_ns[i] = 1_000 + i as u64 * 10;
            life.trans_state[i] = s;
        }
        life.n_trans = 5;
        life.bytes_sent = 100;
        life.rst_sent_reason = u32::MAX;
        life.rst_sent = 2;
        life.rst_sent_folded = 1;
        let rec = LifeRecord {
            hdr: Header {
                kind: kind::LIFE,
                _pad: 0,
                cpu: 1,
                ts_ns: 2_000,
            },
            life,
        };
        let ev = socket_event(&bytes_of(&rec));
        assert_eq!(ev.ts_ns, 2_000);
        assert_eq!(ev.socket.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(ev.socket.remote, "127.0.0.2:8080".parse().unwrap());
        assert_eq!(ev.socket.owner.as_ref().unwrap().comm, "curl");
        assert_eq!(ev.socket.origin, Origin::Active);
        let Body::Life(l) = ev.body else {
            panic!("not a life")
        };
        assert_eq!(
            l.states().collect::<Vec<_>>(),
            [CLOSE, SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE]
        );
        assert_eq!(l.bytes_sent, 100);
        assert_eq!(l.reset_sent_reason, None);
        assert_eq!(l.resets_sent, 2);
        // The RST the kernel counted instead of emitting: folded like a held live event.
        assert_eq!(
            l.folded,
            Folded {
                resets_sent: 1,
                ..Folded::default()
            }
        );
        assert_eq!(l.fin_first(), FinFirst::Local);
        assert_eq!(l.last_send_ns, None);
    }

    #[test]
    fn fin_first_from_state_sequences() {
        let life = |states: &[u8]| Life {
            first_state: states[0],
            transitions: states[1..]
                .iter()
                .map(|&state| Transition { ts_ns: 0, state })
                .collect(),
            ..Life::default()
        };
        assert_eq!(
            life(&[LISTEN, SYN_RECV, ESTABLISHED, CLOSE_WAIT, LAST_ACK, CLOSE]).fin_first(),
            FinFirst::Peer
        );
        assert_eq!(
            life(&[ESTABLISHED, FIN_WAIT1, CLOSING, CLOSE]).fin_first(),
            FinFirst::Simultaneous
        );
        assert_eq!(
            life(&[CLOSE, SYN_SENT, ESTABLISHED, CLOSE]).fin_first(),
            FinFirst::None
        );
    }

    #[test]
    fn decodes_live_records_and_unknown_owner() {
        let mut m = meta(AF_INET6);
        m.owner_src = owner_src::NONE;
        let rec = LiveRecord {
            hdr: Header {
                kind: kind::RESET_SENT,
                _pad: 0,
                cpu: 0,
                ts_ns: 5,
            },
            meta: m,
            old_state: ESTABLISHED,
            new_state: ESTABLISHED,
            _pad: 0,
            reason: 12,
        };
        let ev = socket_event(&bytes_of(&rec));
        assert_eq!(
            ev.body,
            Body::ResetSent {
                state: ESTABLISHED,
                reason: Some(12)
            }
        );
        assert!(ev.socket.owner.is_none());
        assert!(ev.socket.is_ipv6());
        assert_eq!(ev.socket.remote.ip(), "fd00::2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn rejects_malformed_records() {
        assert_eq!(decode(&[0; 4]), Err(DecodeError::Short(4)));
        let mut b = vec![0u8; 120];
        b[0] = 99;
        assert_eq!(decode(&b), Err(DecodeError::UnknownKind(99)));
        b[0] = kind::LIFE as u8;
        assert!(matches!(
            decode(&b),
            Err(DecodeError::Size {
                kind: 1,
                len: 120,
                ..
            })
        ));
        b[0] = kind::STATE as u8;
        assert_eq!(decode(&b), Err(DecodeError::Family(0)));
    }

    #[test]
    fn accepts_perf_alignment_padding() {
        let rec = LiveRecord {
            hdr: Header {
                kind: kind::STATE,
                _pad: 0,
                cpu: 0,
                ts_ns: 5,
            },
            meta: meta(AF_INET),
            old_state: ESTABLISHED,
            new_state: CLOSE_WAIT,
            _pad: 0,
            reason: 0,
        };
        let mut b = bytes_of(&rec);
        b.extend_from_slice(&[0; 4]);
        assert_eq!(
            socket_event(&b).body,
            Body::State {
                old: ESTABLISHED,
                new: CLOSE_WAIT
            }
        );
    }
}
