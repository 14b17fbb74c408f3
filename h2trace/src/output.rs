//! Sinks: NDJSON for log pipelines, aligned text for people.
//!
//! The NDJSON shape is documented in `docs/ndjson.md` and `docs/h2trace.schema.json`; field
//! names follow Elastic ECS where ECS has one, everything else is under `h2trace.*`.
//! `source` is always the local end of the socket and `destination` the remote end.
use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::{IpAddr, SocketAddr},
};

use base64::Engine as _;
use serde::Serialize;
use serde_json::json;
use sha1::{Digest, Sha1};

use crate::{
    conntrack::{
        self as ct, CtEvent, CtKind, CtNamespace, Tuple,
        join::{CtJoin, CtVerdict},
    },
    correlate::Facts,
    detect::{DetectConfig, Finding, Peer, PeerSummary},
    event::{Body, Event, Life, Origin, Owner, Socket, state_name},
    http2::{self, Frame, FrameBody},
    owner::snapshot::SnapSocket,
};

mod record;

pub const SCHEMA: &str = "h2trace/1";

/// Converts kernel CLOCK_MONOTONIC time to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Wall-clock ns minus monotonic ns, measured once at start.
    pub offset_ns: i128,
}

impl Clock {
    /// RFC 3339 in UTC with nanoseconds, as chrono's `to_rfc3339_opts(Nanos, true)` writes it.
    /// Records come in bursts within the same second: the date and time of day are formatted
    /// once per second (per thread) and reused.
    pub fn rfc3339(&self, ktime_ns: u64) -> String {
        let mut out = Vec::with_capacity(30);
        self.write_rfc3339(ktime_ns, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// The same, appended to a line being written.
    pub fn write_rfc3339(&self, ktime_ns: u64, out: &mut Vec<u8>) {
        thread_local! {
            static SECOND: std::cell::Cell<(i64, [u8; 19])> = const { std::cell::Cell::new((i64::MIN, [0; 19])) };
        }
        let wall = ktime_ns as i128 + self.offset_ns;
        let secs = wall.div_euclid(1_000_000_000) as i64;
        let nanos = wall.rem_euclid(1_000_000_000) as u32;
        let prefix = SECOND.with(|c| {
            let (at, p) = c.get();
            if at == secs {
                return Some(p);
            }
            let dt = chrono::DateTime::from_timestamp(secs, 0)?;
            let p: [u8; 19] = dt
                .format("%Y-%m-%dT%H:%M:%S")
                .to_string()
                .into_bytes()
                .try_into()
                .ok()?;
            c.set((secs, p));
            Some(p)
        });
        // Years outside 0..=9999 (never from a sane clock): chrono's own spelling.
        let Some(prefix) = prefix else {
            let s = chrono::DateTime::from_timestamp(secs, nanos)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
            out.extend_from_slice(s.as_bytes());
            return;
        };
        out.extend_from_slice(&prefix);
        out.push(b'.');
        let mut digits = itoa::Buffer::new();
        let n = digits.format(nanos);
        out.extend(std::iter::repeat_n(b'0', 9 - n.len()));
        out.extend_from_slice(n.as_bytes());
        out.push(b'Z');
    }
}

/// Community ID v1 (seed 0) of a TCP flow: the same for both ends of a connection, so
/// records from client and server (and from other tools) join on it.
pub fn community_id(a: SocketAddr, b: SocketAddr) -> String {
    String::from_utf8_lossy(&community_id_bytes(a, b)).into_owned()
}

/// [`community_id`] as its 30 ASCII bytes ("1:" and 28 base64 digits).
fn community_id_bytes(a: SocketAddr, b: SocketAddr) -> [u8; 30] {
    // The hash input: seed, the lower (address, port) end first, then the other.
    let key = |s: &SocketAddr| match s.ip() {
        IpAddr::V4(ip) => (ip.to_ipv6_mapped().octets(), 4, s.port()),
        IpAddr::V6(ip) => (ip.octets(), 16, s.port()),
    };
    let (mut src, mut dst) = (key(&a), key(&b));
    fn addr(k: &([u8; 16], usize, u16)) -> (&[u8], u16) {
        (&k.0[16 - k.1..], k.2)
    }
    if addr(&src) > addr(&dst) {
        std::mem::swap(&mut src, &mut dst);
    }
    let mut input = [0u8; 2 + 16 + 16 + 2 + 4];
    let mut n = 2;
    for k in [&src, &dst] {
        let (a, _) = addr(k);
        input[n..n + a.len()].copy_from_slice(a);
        n += a.len();
    }
    input[n] = 6;
    n += 2;
    input[n..n + 2].copy_from_slice(&src.2.to_be_bytes());
    input[n + 2..n + 4].copy_from_slice(&dst.2.to_be_bytes());
    let digest = Sha1::digest(&input[..n + 4]);
    let mut out = *b"1:============================";
    // 20 bytes are exactly 28 base64 digits: this cannot fail.
    let _ = base64::engine::general_purpose::STANDARD.encode_slice(digest, &mut out[2..]);
    out
}

/// `community_id`, appended to `out`: the hot path of connection records. Both ends of a
/// connection between two traced sockets (every loopback or same-node connection) carry the
/// same ID, and their records come close together: the IDs of the flows seen last are
/// remembered, so the hash is computed about once per connection rather than once per record.
pub(crate) fn push_community_id(a: SocketAddr, b: SocketAddr, out: &mut Vec<u8>) {
    const SLOTS: usize = 256;
    // The ID inline ("1:" and 28 base64 digits): no allocation when a slot is reused.
    type Slot = Option<((SocketAddr, SocketAddr), [u8; 30])>;
    thread_local! {
        static SEEN: std::cell::RefCell<Vec<Slot>> = std::cell::RefCell::new(vec![None; SLOTS]);
    }
    let key = if a <= b { (a, b) } else { (b, a) };
    // The ports vary the most between flows (the client's is ephemeral).
    let slot = usize::from(a.port() ^ b.port()) % SLOTS;
    SEEN.with_borrow_mut(|seen| {
        let id = match &mut seen[slot] {
            Some((k, id)) if *k == key => id,
            s => &s.insert((key, community_id_bytes(a, b))).1,
        };
        out.extend_from_slice(id);
    });
}

/// Loss and health counters, cumulative since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Losses {
    /// Records the kernel could not put in the ring buffer (it was full).
    pub ringbuf_full: u64,
    /// Records `bpf_perf_event_output` refused.
    pub perf_output_failed: u64,
    /// Samples the perf buffers reported lost.
    pub perf_lost: u64,
    /// Socket lives the kernel could not start tracking.
    pub sockets_untracked: u64,
    /// Listener owners the kernel could not remember.
    pub listeners_untracked: u64,
    /// Records that did not decode.
    pub malformed: u64,
    /// `--pid` events dropped because too many waited for their owner.
    pub filter_overflow: u64,
    /// ctnetlink reads that failed with ENOBUFS: the kernel dropped conntrack events.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub conntrack_overruns: u64,
    /// ctnetlink messages that did not decode.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub conntrack_malformed: u64,
    /// HTTP/2 connections whose parse state the kernel could not store: no frames seen.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub http2_untracked: u64,
    /// HTTP/2 directions that lost frame boundaries (their later frames were not seen; the
    /// connection record says which, under `http2.desync`).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub http2_desync: u64,
    /// Of `ringbuf_full` and `perf_output_failed`, the records that were socket lives (so
    /// every life the kernel ended is either written or here). Not added to the total: it
    /// is a part of those two.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub lives_lost: u64,
    /// `--events all` state changes the kernel did not write because the ring buffer was more
    /// than half full: the room left went to socket lives, which list every state change.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub states_shed: u64,
}

impl Losses {
    pub fn total(&self) -> u64 {
        self.ringbuf_full
            + self.perf_output_failed
            + self.perf_lost
            + self.sockets_untracked
            + self.listeners_untracked
            + self.malformed
            + self.filter_overflow
            + self.conntrack_overruns
            + self.conntrack_malformed
            + self.http2_untracked
            + self.http2_desync
            + self.states_shed
    }

    /// The counters that are not zero, in an operator's words, each with what helps. For the
    /// terminal: the NDJSON loss record keeps the counters themselves.
    pub fn explain(&self) -> String {
        let dropped = self.ringbuf_full + self.perf_output_failed + self.perf_lost;
        let mut parts = Vec::new();
        if dropped > 0 {
            let buffer = if self.ringbuf_full > 0 {
                "ring buffer"
            } else {
                "perf buffers"
            };
            let lives = match self.lives_lost {
                0 => String::new(),
                n => format!(" ({n} of them connection records)"),
            };
            parts.push(format!(
                "{dropped} kernel records found no room in the {buffer}{lives}, as h2trace read \
                 them more slowly than the kernel wrote them (--events all writes the most, and a \
                 larger --ring-size or --perf-pages absorbs bursts, not a sustained rate)"
            ));
        }
        let mut say = |n: u64, what: &str| {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        };
        say(
            self.sockets_untracked,
            "sockets not tracked (the kernel's table was full: raise --max-sockets)",
        );
        say(
            self.listeners_untracked,
            "listeners not remembered (their accepted sockets get owners from their I/O)",
        );
        say(self.malformed, "kernel records that did not decode");
        say(
            self.filter_overflow,
            "events dropped while waiting to learn their process (--pid)",
        );
        say(
            self.conntrack_overruns,
            "conntrack event reads that overran (the kernel dropped conntrack events)",
        );
        say(
            self.conntrack_malformed,
            "conntrack messages that did not decode",
        );
        say(
            self.http2_untracked,
            "HTTP/2 connections whose frames could not be followed (kernel table full)",
        );
        say(
            self.http2_desync,
            "HTTP/2 directions that lost frame boundaries",
        );
        say(
            self.states_shed,
            "--events all state changes not written while the ring buffer was over half full \
             (kept for connection records, which list every state change)",
        );
        parts.join("; ")
    }
}

/// What a run saw, for the summary at exit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Summary {
    pub duration_ns: u64,
    pub connections: u64,
    pub events: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub retransmits: u64,
    /// Socket lives tracked in the kernel.
    pub tracked: u64,
    /// Socket lives whose end was seen.
    pub ended: u64,
    /// Lives still open at exit.
    pub open_at_exit: u64,
    /// Child sockets the kernel discarded in a handshake race (`correlate::discarded_child`):
    /// not connections, so not written, only counted.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub discarded_children: u64,
    /// HTTP/2 control frames written (`--http2`).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub http2_frames: u64,
    /// Lives the kernel's LRU map evicted before they ended (tracked − ended − open).
    pub evicted: u64,
    /// Records that arrived after newer ones had been emitted.
    pub out_of_order: u64,
    /// Finding records emitted (new and updates).
    #[serde(default)]
    pub findings: u64,
    /// Live events not written on their own: their socket's life record came while they
    /// were held, and says what they would have (`h2trace.connection.folded`).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub folded: u64,
    /// Conntrack events written.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub conntrack_events: u64,
    /// Conntrack entries forgotten to keep the join table bounded.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub conntrack_evicted: u64,
    /// Peers the detector dropped to stay within `max_peers` (`--max-peers`), each written
    /// as a `peer-summary` marked `forgotten` when it went.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub peers_forgotten: u64,
    pub losses: Losses,
}

/// Everything the run reports that is not a kernel event.
pub enum Notice<'a> {
    Started {
        ktime_ns: u64,
        probe: &'a serde_json::Value,
        detect: &'a DetectConfig,
        /// How long live events wait to be folded into their socket's life record.
        live_hold_ns: u64,
        /// From a recording (`replay`), not this run's kernel.
        replayed: bool,
    },
    Loss {
        ktime_ns: u64,
        losses: &'a Losses,
    },
    Summary {
        ktime_ns: u64,
        summary: &'a Summary,
    },
    /// Time passed with no event (see `Pipeline::tick`).
    Tick {
        ktime_ns: u64,
    },
    /// `--follow-forks`: a followed process created `child`, followed from now on.
    Fork {
        ktime_ns: u64,
        parent: u32,
        child: u32,
    },
    /// A followed process has exited (`--pid`); `open_sockets` of its sockets are still open.
    Exit {
        ktime_ns: u64,
        pid: u32,
        open_sockets: u32,
    },
    /// A conntrack table h2trace follows.
    ConntrackSource {
        ktime_ns: u64,
        ns: &'a CtNamespace,
    },
}

pub trait Sink {
    /// A socket event; `facts`: a connection record's derived facts (`correlate::of_event`).
    fn event(&mut self, ev: &Event, facts: Option<&Facts>) -> io::Result<()>;
    /// A socket that existed when tracing started.
    fn snapshot(&mut self, ktime_ns: u64, s: &SnapSocket) -> io::Result<()>;
    /// A conntrack event; `old`: the entry's state before it, as far as h2trace saw.
    fn conntrack(&mut self, ev: &CtEvent, old: Option<u8>) -> io::Result<()>;
    fn finding(&mut self, f: &Finding) -> io::Result<()>;
    /// The per-peer table at the end of a run.
    fn peers(&mut self, ktime_ns: u64, peers: &[PeerSummary]) -> io::Result<()>;
    fn notice(&mut self, n: &Notice<'_>) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
    /// Replay learns the recorded run's clock from its first record.
    fn set_clock(&mut self, clock: Clock);
    /// Replay learns the recorded kernel's reset reason names from the `started` record.
    fn set_reset_reasons(&mut self, names: BTreeMap<u32, String>);
}

pub struct Ndjson<W: Write> {
    out: W,
    clock: Clock,
    reset_reasons: BTreeMap<u32, String>,
    /// The line being written (kept: one allocation for the run).
    line: Vec<u8>,
}

impl<W: Write> Ndjson<W> {
    pub fn new(out: W, clock: Clock, reset_reasons: BTreeMap<u32, String>) -> Self {
        Self {
            out,
            clock,
            reset_reasons,
            line: Vec::with_capacity(4096),
        }
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// ECS `container.*`, from the owner's cgroup path.
#[derive(Serialize)]
struct ContainerInfo {
    id: String,
    runtime: &'static str,
}

fn container(o: &Owner) -> Option<ContainerInfo> {
    let c = crate::owner::cgroup::container_of(o.cgroup_path.as_deref()?)?;
    Some(ContainerInfo {
        id: c.id,
        runtime: c.runtime,
    })
}

/// An HTTP/2 control frame (`http2-frame`).
#[derive(Serialize)]
struct FrameOut<'a> {
    direction: &'static str,
    side: &'static str,
    #[serde(rename = "type")]
    ty: &'static str,
    stream_id: u32,
    length: u32,
    flags: u8,
    /// Silence on the connection before the call that carried the frame (omitted when 0, as
    /// in recordings made before it existed).
    #[serde(skip_serializing_if = "is_zero_u64")]
    idle_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    ack: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    settings: Option<BTreeMap<String, u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    opaque: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_stream_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    debug: Option<&'a str>,
}

impl<'a> From<&'a Frame> for FrameOut<'a> {
    fn from(f: &'a Frame) -> Self {
        let mut o = FrameOut {
            direction: if f.received { "received" } else { "sent" },
            side: f.side.as_str(),
            ty: f.body.type_name(),
            stream_id: f.stream_id,
            length: f.length,
            flags: f.flags,
            idle_ns: f.idle_ns,
            ack: None,
            settings: None,
            opaque: None,
            code: None,
            error: None,
            last_stream_id: None,
            debug: None,
        };
        match &f.body {
            FrameBody::Settings { ack, values } => {
                o.ack = Some(*ack);
                o.settings = (!*ack).then(|| {
                    values
                        .iter()
                        .map(|&(k, v)| (http2::setting_name(k), v))
                        .collect()
                });
            }
            FrameBody::Ping { ack, opaque } => {
                o.ack = Some(*ack);
                o.opaque = Some(format!("{opaque:016x}"));
            }
            FrameBody::RstStream { code } => {
                o.code = Some(*code);
                o.error = Some(http2::error_name(*code));
            }
            FrameBody::GoAway {
                last_stream_id,
                code,
                debug,
            } => {
                o.code = Some(*code);
                o.error = Some(http2::error_name(*code));
                o.last_stream_id = Some(*last_stream_id);
                o.debug = Some(debug);
            }
        }
        o
    }
}

/// A connection's HTTP/2 facts (`--http2`): the kernel's stream counts and its control frames.
#[derive(Serialize)]
struct Http2Out<'a> {
    side: &'static str,
    /// Streams the client opened: the requests (RPCs) the connection carried.
    requests: u32,
    streams_opened_local: u32,
    streams_opened_peer: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    desync: Vec<&'static str>,
    /// Read from the TLS library's plaintext (`--http2 all`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    tls: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    frames: Option<&'a http2::Frames>,
}

fn http2_out(l: &Life) -> Option<Http2Out<'_>> {
    let h = &l.http2;
    Some(Http2Out {
        side: h.side?.as_str(),
        requests: h.requests(),
        streams_opened_local: h.opened_local,
        streams_opened_peer: h.opened_peer,
        desync: [(1, "sent"), (2, "received")]
            .into_iter()
            .filter(|(bit, _)| h.desync & bit != 0)
            .map(|(_, d)| d)
            .collect(),
        tls: h.tls,
        frames: l.frames.as_deref(),
    })
}

/// Counters added after `h2trace/1` first shipped are written only when non-zero, so older
/// recordings replay to themselves byte for byte.
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn role(s: &Socket) -> &'static str {
    match s.origin {
        Origin::Active => "client",
        Origin::Passive => "server",
        Origin::MidLife | Origin::Snapshot => "unknown",
    }
}

/// When the socket moved to CLOSE (the end of its TCP life, before the kernel freed it).
pub fn closed_ns(l: &Life) -> Option<u64> {
    l.transitions
        .iter()
        .rev()
        .find(|t| t.state == h2trace_common::tcp_state::CLOSE)
        .map(|t| t.ts_ns)
}

fn reason_name(names: &BTreeMap<u32, String>, code: u32) -> &str {
    names.get(&code).map(String::as_str).unwrap_or("UNKNOWN")
}

fn ct_tuple(t: &Tuple) -> serde_json::Value {
    json!({ "src_ip": t.src.ip(), "src_port": t.src.port(), "dst_ip": t.dst.ip(), "dst_port": t.dst.port() })
}

impl CtVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forgot { .. } => "forgot-live-connection",
            Self::ClosedEarly { .. } => "closed-while-established",
        }
    }
}

/// `h2trace.connection.conntrack`: the entry and what it did to this connection.
fn ct_join(j: &CtJoin) -> serde_json::Value {
    let e = &j.entry;
    let mut v = json!({
        "netns": e.netns, "id": e.id, "zone": e.zone, "nat": j.nat,
        "orig": ct_tuple(&e.orig), "reply": ct_tuple(&e.reply),
        "states": e.states.iter().map(|&(t, s)| json!({ "state": ct::state_name(s), "ktime_ns": t })).collect::<Vec<_>>(),
    });
    if let Some(end) = &e.end {
        v["end"] = json!({ "ktime_ns": end.ts_ns, "expired": end.expired, "state": end.state.map(ct::state_name) });
    }
    if let Some(t) = j.timeout_established_s {
        v["timeout_established_s"] = json!(t);
    }
    if let Some(n) = &j.netns_name {
        v["netns_name"] = json!(n);
    }
    if let Some(verdict) = j.verdict {
        let (at, state) = match verdict {
            CtVerdict::Forgot { at_ns } => (at_ns, None),
            CtVerdict::ClosedEarly { at_ns, state } => (at_ns, Some(ct::state_name(state))),
        };
        v["verdict"] = json!({ "kind": verdict.as_str(), "ktime_ns": at, "state": state });
    }
    v
}

impl<W: Write> Ndjson<W> {
    fn line(&mut self, v: &impl Serialize) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, v)?;
        self.out.write_all(b"\n")
    }
}

impl<W: Write> Sink for Ndjson<W> {
    fn event(&mut self, ev: &Event, facts: Option<&Facts>) -> io::Result<()> {
        self.line.clear();
        record::write(&mut self.line, &self.clock, &self.reset_reasons, ev, facts);
        self.out.write_all(&self.line)
    }

    fn snapshot(&mut self, ktime_ns: u64, s: &SnapSocket) -> io::Result<()> {
        let mut v = json!({
            "@timestamp": self.clock.rfc3339(ktime_ns),
            "schema": SCHEMA,
            "event": { "kind": "state", "category": ["network"], "type": ["info"], "action": "socket-snapshot", "dataset": "h2trace.snapshot" },
            "source": { "ip": s.local.ip(), "port": s.local.port(), "bytes": s.bytes_sent },
            "destination": { "ip": s.remote.ip(), "port": s.remote.port(), "bytes": s.bytes_received },
            "network": { "transport": "tcp", "type": if s.local.is_ipv6() { "ipv6" } else { "ipv4" }, "iana_number": "6",
                         "community_id": community_id(s.local, s.remote) },
            "h2trace": { "ktime_ns": ktime_ns, "netns": s.netns, "snapshot": {
                "state": state_name(s.state), "inode": s.inode, "uid": s.uid,
                "last_send_ns": s.last_send_ns, "last_recv_ns": s.last_recv_ns } },
        });
        if let Some(o) = &s.owner {
            v["process"] = json!({ "pid": o.tgid, "name": o.comm, "thread": { "id": o.pid } });
            v["h2trace"]["owner_source"] = json!(o.source.as_str());
            v["h2trace"]["cgroup_id"] = json!(o.cgroup_id);
            if let Some(p) = &o.cgroup_path {
                v["h2trace"]["cgroup_path"] = json!(&**p);
            }
            if let Some(c) = container(o) {
                v["container"] = json!(c);
            }
        }
        self.line(&v)
    }

    fn conntrack(&mut self, ev: &CtEvent, old: Option<u8>) -> io::Result<()> {
        let ty = match ev.kind {
            CtKind::New => "start",
            CtKind::Update => "change",
            CtKind::Destroy => "end",
        };
        let (src, dst) = (ev.orig.src, ev.orig.dst);
        let mut c = json!({
            "source": ev.source.as_str(), "id": ev.id, "zone": ev.zone, "mark": ev.mark, "status": ev.status,
            "orig": ct_tuple(&ev.orig), "reply": ct_tuple(&ev.reply), "nat": ev.nat(),
            "state": { "old": old.map(ct::state_name), "new": ev.state.map(ct::state_name) },
            "timeout_s": ev.timeout_s,
        });
        if ev.kind == CtKind::Destroy {
            c["expired"] = json!(ev.expired());
        }
        let v = json!({
            "@timestamp": self.clock.rfc3339(ev.ts_ns),
            "schema": SCHEMA,
            "event": { "kind": "event", "category": ["network"], "type": [ty], "action": ev.kind.action(), "dataset": "h2trace.conntrack" },
            "source": { "ip": src.ip(), "port": src.port() },
            "destination": { "ip": dst.ip(), "port": dst.port() },
            "network": { "transport": "tcp", "type": if src.is_ipv6() { "ipv6" } else { "ipv4" }, "iana_number": "6",
                         "community_id": community_id(src, dst) },
            "h2trace": { "ktime_ns": ev.ts_ns, "netns": ev.netns, "conntrack": c },
        });
        self.line(&v)
    }

    fn notice(&mut self, n: &Notice<'_>) -> io::Result<()> {
        let (ktime, kind, action, body) = match n {
            Notice::Started {
                ktime_ns,
                probe,
                detect,
                live_hold_ns,
                ..
            } => {
                // What replay needs to decide and print as this run did.
                let mut h = json!({ "probe": probe, "detect": detect, "reset_reasons": self.reset_reasons });
                // Only when events were held: older recordings replay to themselves.
                if *live_hold_ns > 0 {
                    h["live_hold_ns"] = json!(live_hold_ns);
                }
                (*ktime_ns, "event", "started", h)
            }
            Notice::Loss { ktime_ns, losses } => {
                (*ktime_ns, "metric", "loss", json!({ "loss": losses }))
            }
            Notice::Summary { ktime_ns, summary } => (
                *ktime_ns,
                "metric",
                "summary",
                json!({ "summary": summary }),
            ),
            Notice::Tick { ktime_ns } => (*ktime_ns, "event", "tick", json!({})),
            Notice::ConntrackSource { ktime_ns, ns } => (
                *ktime_ns,
                "event",
                "conntrack-source",
                json!({ "netns": ns.netns, "conntrack_source": ns }),
            ),
            Notice::Fork {
                ktime_ns,
                parent,
                child,
            } => (
                *ktime_ns,
                "event",
                "process-fork",
                json!({ "fork": { "parent": parent, "child": child } }),
            ),
            Notice::Exit {
                ktime_ns,
                pid,
                open_sockets,
            } => (
                *ktime_ns,
                "event",
                "process-exited",
                json!({ "exit": { "pid": pid, "open_sockets": open_sockets } }),
            ),
        };
        let mut h2 = body;
        h2["ktime_ns"] = json!(ktime);
        if matches!(n, Notice::Started { .. }) {
            // Lets `replay` print the same @timestamp values as the live run.
            h2["clock_offset_ns"] = json!(self.clock.offset_ns as i64);
        }
        let v = json!({
            "@timestamp": self.clock.rfc3339(ktime),
            "schema": SCHEMA,
            "event": { "kind": kind, "category": ["process"], "type": ["info"], "action": action, "dataset": "h2trace.agent" },
            "h2trace": h2,
        });
        self.line(&v)
    }

    fn finding(&mut self, f: &Finding) -> io::Result<()> {
        let mut v = json!({
            "@timestamp": self.clock.rfc3339(f.ts_ns),
            "schema": SCHEMA,
            "event": { "kind": "alert", "category": ["network"], "type": ["info"], "action": "finding", "dataset": "h2trace.finding" },
            "rule": { "id": f.pattern.as_str(), "name": f.pattern.as_str() },
            "message": f.summary,
            "h2trace": {
                "ktime_ns": f.ts_ns,
                "netns": f.netns,
                "finding": {
                    "id": f.id, "pattern": f.pattern.as_str(), "status": f.status, "peer": f.peer.to_string(),
                    "window": { "start_ns": f.window_start_ns, "end_ns": f.window_end_ns },
                    "numbers": f.numbers, "confidence": f.confidence, "evidence": f.evidence, "remedies": f.remedies,
                },
            },
        });
        if f.tgid != 0 {
            v["process"] = json!({ "pid": f.tgid, "name": f.comm });
        }
        if let Peer::Remote(a) = f.peer {
            v["destination"] = json!({ "ip": a.ip(), "port": a.port() });
        }
        self.line(&v)
    }

    fn peers(&mut self, ktime_ns: u64, peers: &[PeerSummary]) -> io::Result<()> {
        for p in peers {
            let mut v = json!({
                "@timestamp": self.clock.rfc3339(ktime_ns),
                "schema": SCHEMA,
                "event": { "kind": "metric", "category": ["network"], "type": ["info"],
                           "action": if p.window.is_some() { "peer-window" } else { "peer-summary" }, "dataset": "h2trace.peers" },
                "h2trace": {
                    "ktime_ns": ktime_ns,
                    "netns": p.netns,
                    "peer": {
                        "peer": p.peer.to_string(), "connections": p.connections, "rate_per_s": p.rate_per_s,
                        "concurrent_max": p.concurrent_max,
                        "lifetime_p50_ns": p.lifetime_p50_ns, "lifetime_p90_ns": p.lifetime_p90_ns, "lifetime_p99_ns": p.lifetime_p99_ns,
                        "idle_before_close_p50_ns": p.idle_before_close_ns[0],
                        "idle_before_close_p90_ns": p.idle_before_close_ns[1],
                        "idle_before_close_p99_ns": p.idle_before_close_ns[2],
                        "time_wait": p.time_wait, "retransmits": p.retransmits,
                        "close_wait_open": p.close_wait_open, "close_wait_max_ns": p.close_wait_max_ns,
                        "closers": p.closers, "ends": p.ends, "findings": p.findings,
                    },
                },
            });
            if p.tgid != 0 {
                v["process"] = json!({ "pid": p.tgid, "name": p.comm });
            }
            if let Some((start, end)) = p.window {
                v["h2trace"]["peer"]["window"] = json!({ "start_ns": start, "end_ns": end });
            }
            if p.forgotten {
                v["h2trace"]["peer"]["forgotten"] = json!(true);
            }
            if p.http2_connections > 0 {
                v["h2trace"]["peer"]["http2"] = json!({
                    "connections": p.http2_connections,
                    "requests": p.http2_requests,
                    "requests_per_connection": p.http2_requests as f64 / p.http2_connections as f64,
                });
            }
            self.line(&v)?;
        }
        Ok(())
    }

    fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    fn set_reset_reasons(&mut self, names: BTreeMap<u32, String>) {
        self.reset_reasons = names;
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Aligned columns, like tcpstates/tcplife.
pub struct Text<W: Write> {
    out: W,
    clock: Clock,
    reset_reasons: BTreeMap<u32, String>,
    header_done: bool,
}

impl<W: Write> Text<W> {
    pub fn new(out: W, clock: Clock, reset_reasons: BTreeMap<u32, String>) -> Self {
        Self {
            out,
            clock,
            reset_reasons,
            header_done: false,
        }
    }
}

fn ms(ns: u64) -> String {
    format!("{:.3}ms", ns as f64 / 1e6)
}

impl<W: Write> Sink for Text<W> {
    fn event(&mut self, ev: &Event, _facts: Option<&Facts>) -> io::Result<()> {
        if !self.header_done {
            writeln!(
                self.out,
                "{:<15} {:<10} {:>7} {:<15} {:<45} {:<45} DETAIL",
                "TIME", "EVENT", "PID", "COMM", "LOCAL", "REMOTE"
            )?;
            self.header_done = true;
        }
        let s = &ev.socket;
        let time = self.clock.rfc3339(ev.ts_ns);
        let time = time.get(11..23).unwrap_or(&time);
        let (pid, comm) = match &s.owner {
            Some(o) => (o.tgid.to_string(), o.comm.as_str()),
            None => ("-".to_string(), "-"),
        };
        let (what, detail) = match &ev.body {
            Body::Life(l) | Body::Open(l) => {
                let states: Vec<_> = l.states().map(state_name).collect();
                let life = closed_ns(l)
                    .unwrap_or(ev.ts_ns)
                    .saturating_sub(s.id.start_ns);
                let mut d = format!(
                    "{} {} {} tx={} rx={}",
                    role(s),
                    states.join(">"),
                    ms(life),
                    l.bytes_sent,
                    l.bytes_received
                );
                if l.resets_sent > 0 {
                    let reason = l
                        .reset_sent_reason
                        .map(|r| reason_name(&self.reset_reasons, r))
                        .unwrap_or("-");
                    d.push_str(&format!(" rst_sent={}({reason})", l.resets_sent));
                }
                if l.resets_received > 0 {
                    d.push_str(&format!(" rst_recv={}", l.resets_received));
                }
                if l.retransmits > 0 {
                    d.push_str(&format!(" retrans={}", l.retransmits));
                }
                if let Some(side) = l.http2.side {
                    d.push_str(&format!(
                        " h2={} requests={}",
                        side.as_str(),
                        l.http2.requests()
                    ));
                    if let Some(f) = &l.frames {
                        for (dir, g) in [("sent", &f.sent), ("recv", &f.received)] {
                            if let Some(g) = &g.goaway {
                                d.push_str(&format!(" goaway_{dir}={}({:?})", g.error, g.debug));
                            }
                        }
                    }
                }
                if let Some(j) = &l.conntrack {
                    let states: Vec<_> = j
                        .entry
                        .states
                        .iter()
                        .map(|&(_, s)| ct::state_name(s))
                        .collect();
                    d.push_str(&format!(" ct[{}]={}", j.entry.netns, states.join(">")));
                    if let Some(end) = &j.entry.end {
                        d.push_str(if end.expired {
                            ">expired"
                        } else {
                            ">destroyed"
                        });
                    }
                    if let Some(v) = j.verdict {
                        d.push_str(&format!(" CONNTRACK:{}", v.as_str()));
                    }
                }
                (
                    if matches!(ev.body, Body::Life(_)) {
                        "close"
                    } else {
                        "open"
                    },
                    d,
                )
            }
            Body::State { old, new } => (
                "state",
                format!("{} -> {}", state_name(*old), state_name(*new)),
            ),
            Body::ResetSent { state, reason } => (
                "rst-sent",
                format!(
                    "in {} reason {}",
                    state_name(*state),
                    reason
                        .map(|r| reason_name(&self.reset_reasons, r))
                        .unwrap_or("-")
                ),
            ),
            Body::ResetReceived { state } => ("rst-recv", format!("in {}", state_name(*state))),
            Body::Retransmit { state, err } => {
                ("retrans", format!("in {} err {err}", state_name(*state)))
            }
            // On a terminal only what ends streams or connections; PINGs and SETTINGS are in
            // the connection's line.
            Body::Frame(f) => {
                let dir = if f.received { "received" } else { "sent" };
                let d = match &f.body {
                    FrameBody::GoAway {
                        last_stream_id,
                        code,
                        debug,
                    } => format!(
                        "GOAWAY {dir} {} last_stream={last_stream_id} {debug:?}",
                        http2::error_name(*code)
                    ),
                    FrameBody::RstStream { code } if *code != http2::NO_ERROR => format!(
                        "RST_STREAM {dir} {} stream={}",
                        http2::error_name(*code),
                        f.stream_id
                    ),
                    _ => return Ok(()),
                };
                ("h2", d)
            }
        };
        writeln!(
            self.out,
            "{time:<15} {what:<10} {pid:>7} {comm:<15} {:<45} {:<45} {detail}",
            s.local.to_string(),
            s.remote.to_string()
        )
    }

    fn snapshot(&mut self, ktime_ns: u64, s: &SnapSocket) -> io::Result<()> {
        let time = self.clock.rfc3339(ktime_ns);
        let time = time.get(11..23).unwrap_or(&time);
        let (pid, comm) = match &s.owner {
            Some(o) => (o.tgid.to_string(), o.comm.as_str()),
            None => ("-".into(), "-"),
        };
        writeln!(
            self.out,
            "{time:<15} {:<10} {pid:>7} {comm:<15} {:<45} {:<45} {} tx={} rx={}",
            "existing",
            s.local.to_string(),
            s.remote.to_string(),
            state_name(s.state),
            s.bytes_sent,
            s.bytes_received
        )
    }

    fn conntrack(&mut self, ev: &CtEvent, old: Option<u8>) -> io::Result<()> {
        let time = self.clock.rfc3339(ev.ts_ns);
        let time = time.get(11..23).unwrap_or(&time);
        let what = match ev.kind {
            CtKind::New => "ct-new",
            CtKind::Update => "ct-update",
            CtKind::Destroy if ev.expired() => "ct-expire",
            CtKind::Destroy => "ct-destroy",
        };
        let new = match ev.kind {
            CtKind::Destroy if ev.expired() => "expired",
            CtKind::Destroy => "destroyed",
            _ => ev.state.map_or("-", ct::state_name),
        };
        let mut detail = format!(
            "netns {} {} -> {new} ({})",
            ev.netns,
            old.map_or("-", ct::state_name),
            ev.source.as_str()
        );
        if ev.nat() {
            detail.push_str(&format!(" nat {} -> {}", ev.reply.dst, ev.reply.src));
        }
        if let Some(t) = ev.timeout_s {
            detail.push_str(&format!(" timeout {t}s"));
        }
        writeln!(
            self.out,
            "{time:<15} {what:<10} {:>7} {:<15} {:<45} {:<45} {detail}",
            "-",
            "conntrack",
            ev.orig.src.to_string(),
            ev.orig.dst.to_string()
        )
    }

    fn notice(&mut self, n: &Notice<'_>) -> io::Result<()> {
        match n {
            Notice::Started {
                probe, replayed, ..
            } => {
                let (hook, transport) = (
                    probe["state_hook"].as_str().unwrap_or("?"),
                    probe["transport"].as_str().unwrap_or("?"),
                );
                if *replayed {
                    writeln!(
                        self.out,
                        "h2trace: replaying a recording of a run with {hook} (transport {transport})"
                    )
                } else {
                    writeln!(
                        self.out,
                        "h2trace: tracing with {hook} (transport {transport}); Ctrl-C to stop"
                    )
                }
            }
            Notice::Loss { losses, .. } => {
                writeln!(self.out, "h2trace: LOSS so far: {}", losses.explain())
            }
            Notice::Tick { .. } => Ok(()),
            Notice::Fork { parent, child, .. } => writeln!(
                self.out,
                "h2trace: following {child}, forked by {parent} (--follow-forks)"
            ),
            Notice::Exit {
                pid, open_sockets, ..
            } => match open_sockets {
                0 => writeln!(self.out, "h2trace: process {pid} has exited"),
                n => writeln!(
                    self.out,
                    "h2trace: process {pid} has exited; {n} of its sockets are still open and followed to their end"
                ),
            },
            Notice::ConntrackSource { ns, .. } => writeln!(
                self.out,
                "h2trace: following conntrack of {} (netns {}) via {}; established timeout {}",
                ns.name,
                ns.netns,
                ns.source,
                ns.timeout_established_s
                    .map_or("unknown".into(), |t| format!("{t}s"))
            ),
            Notice::Summary { summary: s, .. } => {
                writeln!(
                    self.out,
                    "\nSummary over {:.1}s:",
                    s.duration_ns as f64 / 1e9
                )?;
                writeln!(self.out, "  connections closed   {}", s.connections)?;
                writeln!(self.out, "  live events          {}", s.events)?;
                writeln!(
                    self.out,
                    "  resets sent/received {}/{}",
                    s.resets_sent, s.resets_received
                )?;
                writeln!(self.out, "  retransmissions      {}", s.retransmits)?;
                writeln!(self.out, "  open at exit         {}", s.open_at_exit)?;
                writeln!(self.out, "  evicted (untraced)   {}", s.evicted)?;
                if s.discarded_children > 0 {
                    writeln!(
                        self.out,
                        "  discarded children   {} (handshake races, not connections)",
                        s.discarded_children
                    )?;
                }
                writeln!(self.out, "  findings             {}", s.findings)?;
                if s.peers_forgotten > 0 {
                    writeln!(
                        self.out,
                        "  peers forgotten      {} (least recently active, past --max-peers: one-off peers are summed in \"other peers\", -f ndjson writes the others' numbers as they go)",
                        s.peers_forgotten
                    )?;
                }
                writeln!(self.out, "  records lost         {}", s.losses.total())
            }
        }
    }

    fn finding(&mut self, f: &Finding) -> io::Result<()> {
        writeln!(
            self.out,
            "\n!! FINDING {} [{}] {} (confidence {:.2})\n   {}\n   evidence: {} connection(s), e.g. {}",
            f.pattern,
            f.status,
            f.peer,
            f.confidence,
            f.summary,
            f.evidence.len(),
            f.evidence.first().map(String::as_str).unwrap_or("-")
        )?;
        for r in f.remedies {
            writeln!(self.out, "   - {r}")?;
        }
        writeln!(self.out)
    }

    fn peers(&mut self, _ktime_ns: u64, peers: &[PeerSummary]) -> io::Result<()> {
        // People get the table at exit; the per-window numbers, and those of peers forgotten
        // on the way (counted in the summary), are for the NDJSON stream.
        let peers: Vec<&PeerSummary> = peers
            .iter()
            .filter(|p| p.window.is_none() && !p.forgotten)
            .collect();
        if peers.is_empty() {
            return Ok(());
        }
        writeln!(
            self.out,
            "\nPer peer:\n{:>7} {:<15} {:<45} {:>6} {:>8} {:>8} {:>5} {:>10} {:>10} {:>10} {:<28} {:<28} FINDINGS",
            "PID",
            "COMM",
            "PEER",
            "CONNS",
            "REQ/CONN",
            "RATE/s",
            "CONC",
            "LIFE p50",
            "LIFE p99",
            "IDLE p50",
            "FIRST FIN",
            "ENDS"
        )?;
        let counts = |m: &std::collections::BTreeMap<&'static str, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        for p in peers {
            writeln!(
                self.out,
                "{:>7} {:<15} {:<45} {:>6} {:>8} {:>8.1} {:>5} {:>10} {:>10} {:>10} {:<28} {:<28} {}",
                p.tgid,
                p.comm,
                p.peer.to_string(),
                p.connections,
                // HTTP/2 streams per connection: the reuse figure (1.0 = none).
                if p.http2_connections > 0 {
                    format!(
                        "{:.1}",
                        p.http2_requests as f64 / p.http2_connections as f64
                    )
                } else {
                    "-".to_string()
                },
                p.rate_per_s,
                // A sum of peers has no concurrency of its own.
                if p.peer == Peer::Others {
                    "-".to_string()
                } else {
                    p.concurrent_max.to_string()
                },
                ms(p.lifetime_p50_ns),
                ms(p.lifetime_p99_ns),
                ms(p.idle_before_close_ns[0]),
                counts(&p.closers),
                counts(&p.ends),
                if p.findings.is_empty() {
                    "-".to_string()
                } else {
                    p.findings.join(",")
                }
            )?;
        }
        Ok(())
    }

    fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    fn set_reset_reasons(&mut self, names: BTreeMap<u32, String>) {
        self.reset_reasons = names;
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::{Owner, OwnerSource, SocketId, Transition};

    #[test]
    fn losses_are_explained_in_words_with_what_helps() {
        assert_eq!(Losses::default().explain(), "");
        let ring = Losses {
            ringbuf_full: 340,
            lives_lost: 56,
            sockets_untracked: 3,
            ..Losses::default()
        };
        let text = ring.explain();
        assert!(
            text.starts_with("340 kernel records found no room in the ring buffer (56 of them connection records), ")
                && text.contains("--ring-size")
                && text.ends_with("; 3 sockets not tracked (the kernel's table was full: raise --max-sockets)"),
            "{text}"
        );
        // Perf samples lost in the buffers count with those the kernel could not write.
        let perf = Losses {
            perf_output_failed: 2,
            perf_lost: 5,
            ..Losses::default()
        };
        assert!(
            perf.explain()
                .starts_with("7 kernel records found no room in the perf buffers, as")
        );
        // Every counter the total adds is explained.
        let all = Losses {
            ringbuf_full: 1,
            perf_output_failed: 1,
            perf_lost: 1,
            sockets_untracked: 1,
            listeners_untracked: 1,
            malformed: 1,
            filter_overflow: 1,
            conntrack_overruns: 1,
            conntrack_malformed: 1,
            http2_untracked: 1,
            http2_desync: 1,
            lives_lost: 0,
            states_shed: 1,
        };
        assert_eq!(all.explain().split("; ").count(), 10);
    }

    #[test]
    fn community_id_matches_the_spec_example() {
        // The example flow of the Community ID specification (TCP, seed 0).
        let a: SocketAddr = "128.232.110.120:34855".parse().unwrap();
        let b: SocketAddr = "66.35.250.204:80".parse().unwrap();
        assert_eq!(community_id(a, b), "1:LQU9qZlK+B5F3KDmev6m5PMibrg=");
        assert_eq!(community_id(b, a), community_id(a, b));
        // IPv6, and one address at both ends (the ports decide the order): values computed
        // with the reference implementation (PyPI `communityid`).
        for (a, b, id) in [
            (
                "[fe80::1]:443",
                "[fe80::2]:51000",
                "1:QqxEIV8d68Z1AcZYUm6fl/VBTlQ=",
            ),
            (
                "[2001:db8::9]:8080",
                "[2001:db8::1]:40000",
                "1:71MMypyD5ULFAHT9S/uE2g5aLHw=",
            ),
            (
                "10.0.0.1:5000",
                "10.0.0.1:4000",
                "1:7/sC/6I25Kzn/NrOBdNZehxk0B8=",
            ),
        ] {
            let (a, b) = (a.parse().unwrap(), b.parse().unwrap());
            assert_eq!(community_id(a, b), id);
            assert_eq!(community_id(b, a), id);
        }
    }

    #[test]
    fn remembered_community_ids_are_the_computed_ones() {
        // Flows that share a slot (the same port xor), both directions, repeated: what the
        // memo hands out is always what the hash gives.
        let flows: Vec<(SocketAddr, SocketAddr)> = (0..600u16)
            .map(|i| {
                let c = SocketAddr::from(([127, 0, 0, 1], 40_000 + i % 300));
                let s = SocketAddr::from(([127, 0, (i / 300) as u8, 2], 8080 + (i % 7)));
                (c, s)
            })
            .collect();
        for _ in 0..2 {
            for &(c, s) in &flows {
                for (a, b) in [(c, s), (s, c)] {
                    let mut out = b"x".to_vec();
                    push_community_id(a, b, &mut out);
                    assert_eq!(&out[1..], community_id(a, b).as_bytes());
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn rfc3339_is_chronos(ktime in 0u64..u64::MAX / 2, offset in -(1i128 << 62)..(1i128 << 62)) {
            let c = Clock { offset_ns: offset };
            let wall = ktime as i128 + offset;
            let chrono = chrono::DateTime::from_timestamp(
                wall.div_euclid(1_000_000_000) as i64,
                wall.rem_euclid(1_000_000_000) as u32,
            )
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
            // Twice: the second is served from the per-second cache.
            proptest::prop_assert_eq!(c.rfc3339(ktime), chrono.clone());
            proptest::prop_assert_eq!(c.rfc3339(ktime), chrono);
        }
    }

    #[test]
    fn clock_formats_rfc3339_with_nanoseconds() {
        let c = Clock {
            offset_ns: 1_700_000_000_000_000_000,
        };
        assert_eq!(c.rfc3339(123), "2023-11-14T22:13:20.000000123Z");
    }

    pub fn life_event() -> Event {
        use h2trace_common::tcp_state::*;
        Event {
            ts_ns: 5_000,
            cpu: 1,
            socket: Socket {
                id: SocketId {
                    skaddr: 0xabc,
                    start_ns: 1_000,
                },
                netns: 4026531840,
                local: "127.0.0.1:40000".parse().unwrap(),
                remote: "127.0.0.1:8080".parse().unwrap(),
                owner: Some(Owner {
                    tgid: 7,
                    pid: 8,
                    comm: "client".into(),
                    cgroup_id: 9,
                    cgroup_path: None,
                    source: OwnerSource::Connect,
                }),
                origin: Origin::Active,
            },
            body: Body::Life(Box::new(Life {
                first_state: CLOSE,
                transitions: [SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE]
                    .iter()
                    .enumerate()
                    .map(|(i, s)| Transition {
                        ts_ns: 1_000 + 100 * i as u64,
                        state: *s,
                    })
                    .collect(),
                transitions_dropped: 0,
                bytes_sent: 10,
                bytes_received: 20,
                last_send_ns: Some(1_100),
                last_recv_ns: None,
                resets_sent: 1,
                resets_received: 0,
                first_reset_sent_ns: Some(1_450),
                first_reset_received_ns: None,
                reset_sent_reason: Some(12),
                reset_received_state: None,
                retransmits: 0,
                last_retransmit_ns: None,
                active_before_close_ns: None,
                longest_request_gap: None,
                first_bytes: Default::default(),
                conntrack: None,
                http2: Default::default(),
                frames: None,
                folded: Default::default(),
            })),
        }
    }

    #[test]
    fn ndjson_life_record_shape() {
        let mut sink = Ndjson::new(
            Vec::new(),
            Clock { offset_ns: 0 },
            [(12, "TCP_ABORT_ON_LINGER".into())].into(),
        );
        let ev = life_event();
        sink.event(&ev, crate::correlate::of_event(&ev).as_ref())
            .unwrap();
        let out = String::from_utf8(sink.into_inner()).unwrap();
        assert!(out.ends_with('\n') && out.lines().count() == 1);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["schema"], SCHEMA);
        assert_eq!(v["event"]["action"], "connection-closed");
        assert_eq!(v["event"]["duration"], 300);
        assert_eq!(v["h2trace"]["connection"]["analysis"]["end"], "rst-sent");
        assert_eq!(v["h2trace"]["connection"]["analysis"]["time_wait"], false);
        assert_eq!(v["process"]["pid"], 7);
        assert_eq!(v["process"]["thread"]["id"], 8);
        assert_eq!(v["source"]["port"], 40000);
        assert_eq!(v["source"]["bytes"], 10);
        assert_eq!(v["destination"]["ip"], "127.0.0.1");
        assert_eq!(v["network"]["type"], "ipv4");
        let c = &v["h2trace"]["connection"];
        assert_eq!(c["states"][4]["state"], "CLOSE");
        assert_eq!(c["states"][4]["offset_ns"], 400);
        assert_eq!(c["reset_sent_reason"], "TCP_ABORT_ON_LINGER");
        assert_eq!(c["fin_first"], "local");
        assert_eq!(v["h2trace"]["socket"]["role"], "client");
        assert_eq!(v["h2trace"]["owner_source"], "connect");
    }

    #[test]
    fn a_state_change_before_the_tuple_is_complete_has_no_community_id() {
        use h2trace_common::tcp_state::*;
        let id = |local: &str, remote: &str| {
            let mut ev = life_event();
            ev.socket.local = local.parse().unwrap();
            ev.socket.remote = remote.parse().unwrap();
            ev.body = Body::State {
                old: CLOSE,
                new: SYN_SENT,
            };
            let mut sink = Ndjson::new(Vec::new(), Clock { offset_ns: 0 }, BTreeMap::new());
            sink.event(&ev, None).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&sink.into_inner()).unwrap();
            assert_eq!(v["network"]["iana_number"], "6");
            v["network"]["community_id"].as_str().map(str::to_owned)
        };
        // connect() sets SYN_SENT before it picks the local port; a listener has no peer.
        assert_eq!(id("10.0.0.1:0", "10.0.0.2:443"), None);
        assert_eq!(id("0.0.0.0:8080", "0.0.0.0:0"), None);
        assert_eq!(id("[::]:8080", "[::]:0"), None);
        assert_eq!(
            id("10.0.0.1:40000", "10.0.0.2:443").as_deref(),
            Some(
                community_id(
                    "10.0.0.1:40000".parse().unwrap(),
                    "10.0.0.2:443".parse().unwrap()
                )
                .as_str()
            )
        );
    }

    #[test]
    fn text_has_header_and_states() {
        let mut sink = Text::new(Vec::new(), Clock { offset_ns: 0 }, BTreeMap::new());
        let ev = life_event();
        sink.event(&ev, crate::correlate::of_event(&ev).as_ref())
            .unwrap();
        let out = String::from_utf8(sink.out).unwrap();
        let lines: Vec<_> = out.lines().collect();
        assert!(lines[0].starts_with("TIME"));
        assert!(
            lines[1].contains("CLOSE>SYN_SENT>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE"),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains("rst_sent=1(UNKNOWN)"));
    }
}
