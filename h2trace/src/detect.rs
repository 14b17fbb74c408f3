//! From connections to verdicts: per-peer sliding windows and the reuse-failure patterns.
//!
//! Pure: events in (already ordered), findings out. Time is the events' kernel time, never
//! the wall clock, so a replay of a recorded stream finds exactly what the live run found.
//! Maps are ordered (BTreeMap) so that output order never depends on hashing.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fmt,
    net::SocketAddr,
};

use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};

use crate::{
    conntrack::{
        self as ct,
        join::{CtVerdict, GRACE_NS},
    },
    correlate::{EndKind, Facts, Protocol, Role},
    event::{Body, Event, FinFirst, Life, SocketId},
    http2,
};

/// Thresholds. The defaults are chosen so that a healthy client reusing one connection, and
/// the server serving it, produce no finding. Recorded in the stream's `started` record, so
/// that `replay` decides with the same ones.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DetectConfig {
    /// Sliding window for rates and counts.
    pub window_ns: u64,
    /// Dial per request: connections to one peer within the window.
    pub min_conns: usize,
    /// Dial per request: a median lifetime at most this long is "short".
    pub short_lifetime_ns: u64,
    /// Fixed-age rotation: closed lifetimes needed, and their allowed spread around the median.
    pub min_age_samples: usize,
    pub age_jitter: f64,
    /// Fixed-age rotation: the replacement connection starts within this of the close.
    pub reconnect_gap_ns: u64,
    /// Idle close by peer: closes needed.
    pub min_idle_closes: usize,
    /// CLOSE_WAIT longer than this is stuck.
    pub close_wait_stuck_ns: u64,
    /// Handshake failure: ends this soon after establishment with at most this many bytes.
    pub handshake_ns: u64,
    pub handshake_bytes: u64,
    pub min_handshake_failures: usize,
    /// Black hole / reset after idle: silence before the retransmissions or the RST.
    pub idle_gap_ns: u64,
    /// Per process, within the window.
    pub time_wait_pileup: usize,
    pub rst_storm: usize,
    /// HTTP/2 streams cancelled (RST_STREAM CANCEL, either way) per process within the window.
    /// Written only when not the default, so that recordings made before it existed replay to
    /// themselves byte for byte (and read back with the default).
    #[serde(
        default = "default_cancel_storm",
        skip_serializing_if = "is_default_cancel_storm"
    )]
    pub cancel_storm: usize,
    /// Peers (process and remote address, or process and local port) the detector keeps at
    /// once: past it, the least recently active are dropped (see `forget_peers`). Written only
    /// when not the default, as `cancel_storm`.
    #[serde(
        default = "default_max_peers",
        skip_serializing_if = "is_default_max_peers"
    )]
    pub max_peers: usize,
}

impl DetectConfig {
    /// The first threshold the detector cannot decide with: a zero window (it would stop the
    /// detector's clock), stuck time (every CLOSE_WAIT stuck) or count. The command line
    /// refuses these, and `replay` a recorded stream holding one.
    pub fn invalid_field(&self) -> Option<&'static str> {
        [
            ("window_ns", self.window_ns),
            ("close_wait_stuck_ns", self.close_wait_stuck_ns),
            ("min_conns", self.min_conns as u64),
            ("time_wait_pileup", self.time_wait_pileup as u64),
            ("rst_storm", self.rst_storm as u64),
            ("cancel_storm", self.cancel_storm as u64),
            ("max_peers", self.max_peers as u64),
        ]
        .into_iter()
        .find_map(|(name, v)| (v == 0).then_some(name))
    }
}

fn default_cancel_storm() -> usize {
    50
}

fn default_max_peers() -> usize {
    1024
}

fn is_default_max_peers(n: &usize) -> bool {
    *n == default_max_peers()
}

fn is_default_cancel_storm(n: &usize) -> bool {
    *n == default_cancel_storm()
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            window_ns: 10_000_000_000,
            min_conns: 10,
            short_lifetime_ns: 1_000_000_000,
            min_age_samples: 4,
            age_jitter: 0.2,
            reconnect_gap_ns: 1_000_000_000,
            min_idle_closes: 3,
            close_wait_stuck_ns: 5_000_000_000,
            handshake_ns: 100_000_000,
            handshake_bytes: 4096,
            min_handshake_failures: 3,
            idle_gap_ns: 1_000_000_000,
            time_wait_pileup: 500,
            rst_storm: 100,
            cancel_storm: default_cancel_storm(),
            max_peers: default_max_peers(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pattern {
    DialPerRequest,
    FixedAgeRotation,
    IdleCloseByPeer,
    CloseWaitStuck,
    HandshakeFailureLoop,
    BlackHole,
    ResetAfterIdle,
    ProxyUpstreamChurn,
    TimeWaitPileup,
    RstStorm,
    ConntrackForgot,
    ConntrackClosedEarly,
    TooManyPings,
    StreamCancelStorm,
    PortReuseCollision,
}

impl Pattern {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DialPerRequest => "dial-per-request",
            Self::FixedAgeRotation => "fixed-age-rotation",
            Self::IdleCloseByPeer => "idle-close-by-peer",
            Self::CloseWaitStuck => "close-wait-stuck",
            Self::HandshakeFailureLoop => "handshake-failure-loop",
            Self::BlackHole => "black-hole",
            Self::ResetAfterIdle => "reset-after-idle",
            Self::ProxyUpstreamChurn => "proxy-upstream-churn",
            Self::TimeWaitPileup => "time-wait-pileup",
            Self::RstStorm => "rst-storm",
            Self::ConntrackForgot => "conntrack-forgot-connection",
            Self::ConntrackClosedEarly => "conntrack-closed-early",
            Self::TooManyPings => "too-many-pings",
            Self::StreamCancelStorm => "stream-cancel-storm",
            Self::PortReuseCollision => "port-reuse-collision",
        }
    }

    fn remedies(self) -> &'static [&'static str] {
        match self {
            Self::DialPerRequest => &[
                "create one gRPC channel / HTTP client per target and share it across requests instead of one per call",
                "HTTP/1.1 clients: enable keep-alive (a pooled client, no `Connection: close`)",
                "check pool limits (max idle connections per host) so connections are returned to the pool, not closed",
            ],
            Self::StreamCancelStorm => &[
                "find why callers give up: deadlines shorter than the server's latency, hedged or retried requests, clients that cancel on shutdown",
                "proxies: keep upstream connections across stream cancellations (HTTP/2 upstreams, or keep-alive that survives a client abort, e.g. nginx proxy_ignore_client_abort)",
                "servers: stop work for cancelled streams (honour the context/cancellation) so it does not pile up",
            ],
            Self::TooManyPings => &[
                "make the client's keepalive time (gRPC keepalive_time / Keepalive.Time) at least the server's minimum ping interval (grpc-go EnforcementPolicy.MinTime, default 5 min; grpc core grpc.http2.min_ping_interval_without_data_ms)",
                "or relax the server's policy: allow the client's interval, and PermitWithoutStream if the client pings while idle",
                "do not ping idle connections from the client (keepalive_permit_without_calls off) unless the server permits it",
            ],
            Self::FixedAgeRotation => &[
                "gRPC servers: keep MaxConnectionAge if you want rebalancing, but set MaxConnectionAgeGrace so in-flight RPCs finish",
                "raise the maximum connection age (server, proxy or client pool) if the churn costs more than the rebalancing gains",
                "proxies: align the upstream connection lifetime with the backend's limit",
            ],
            Self::IdleCloseByPeer => &[
                "send HTTP/2 PINGs / gRPC keepalive more often than the peer's idle timeout",
                "or close idle pooled connections on the client before the peer does (client idle timeout below the peer's)",
                "or raise the peer's idle timeout (e.g. nginx keepalive_timeout, Envoy idle_timeout)",
            ],
            Self::CloseWaitStuck => &[
                "make the application notice EOF/errors and close (or return to its pool) connections the peer closed",
                "look for leaked sockets: file descriptors that are never closed",
            ],
            Self::PortReuseCollision => &[
                "find why the peer keeps connections its clients closed (CLOSE_WAIT: it never closes them); h2trace on its node names it as close-wait-stuck",
                "do not bind clients to fixed source ports; with many connections to one peer, widen net.ipv4.ip_local_port_range so a port comes back less often",
                "a NAT or load balancer in between may hand out ports whose old connections the server still holds: check its port allocation",
            ],
            Self::HandshakeFailureLoop => &[
                "look at the peer's logs for the handshake error (TLS version/cipher/ALPN, certificates, SNI, h2c vs TLS)",
                "check that client and server agree on TLS and HTTP/2 (a plaintext client to a TLS port closes right after connecting)",
            ],
            Self::BlackHole | Self::ResetAfterIdle => &[
                "send HTTP/2 PINGs / gRPC keepalive (or TCP keepalive) more often than the middlebox's idle timeout",
                "or raise the idle timeout of the NAT/firewall/load balancer (e.g. nf_conntrack_tcp_timeout_established)",
                "or let clients close idle connections before the middlebox forgets them",
            ],
            Self::ProxyUpstreamChurn => &[
                "enable upstream keep-alive in the proxy (nginx: `keepalive N` in the upstream and `proxy_http_version 1.1`, or grpc_pass with keepalive)",
                "check whether cancelled requests make the proxy tear down the upstream connection",
            ],
            Self::TimeWaitPileup => &[
                "reuse connections instead of closing them after each request",
                "clients that must churn: net.ipv4.tcp_tw_reuse=1; avoid SO_LINGER 0 as a workaround (it turns closes into resets)",
            ],
            Self::ConntrackForgot => &[
                "send HTTP/2 PINGs / gRPC keepalive (or TCP keepalive) at an interval below the table's established timeout (in the finding's numbers)",
                "or raise net.netfilter.nf_conntrack_tcp_timeout_established in that namespace (the router, NAT or node)",
                "or close pooled connections on the client before they sit idle that long",
            ],
            Self::ConntrackClosedEarly => &[
                "find what made the table see the connection end (a forged or stray RST/FIN, an asymmetric route, a conntrack flush)",
                "packets of the connection will be INVALID once the entry is gone: check INVALID drop rules on that middlebox",
            ],
            Self::RstStorm => &[
                "find which side resets and why (reset reasons in the connection records)",
                "check for SO_LINGER 0, closes with unread data, and middleboxes forging resets",
            ],
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is talking to whom: a process and either the peer it dials or the port it serves.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey {
    pub tgid: u32,
    pub netns: u32,
    pub peer: Peer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Connections this process opened to that address.
    Remote(SocketAddr),
    /// Connections this process accepted on that local port.
    Listen(u16),
    /// All of the process's connections (process-wide findings).
    All,
    /// The process's peers and ports dropped past `max_peers` that had too little to be
    /// written on their own: their numbers added together.
    Others,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Remote(a) => write!(f, "{a}"),
            Self::Listen(p) => write!(f, "clients on port {p}"),
            Self::All => f.write_str("all peers"),
            Self::Others => f.write_str("other peers"),
        }
    }
}

/// A finding, as emitted: once when it fires, again when its evidence has doubled.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub id: String,
    pub pattern: Pattern,
    /// "new" or "update".
    pub status: &'static str,
    pub ts_ns: u64,
    pub tgid: u32,
    pub comm: String,
    pub netns: u32,
    pub peer: Peer,
    pub window_start_ns: u64,
    pub window_end_ns: u64,
    pub numbers: Map<String, Value>,
    pub confidence: f64,
    pub evidence: Vec<String>,
    pub summary: String,
    pub remedies: &'static [&'static str],
}

/// One closed (or still open) connection as the windows keep it.
#[derive(Debug, Clone)]
struct Conn {
    id: SocketId,
    f: Facts,
    bytes_sent: u64,
    bytes_received: u64,
    retransmits: u32,
    /// The peer's RST came while the connection was still established (not after its FIN).
    reset_in_established: bool,
    /// A followed conntrack table forgot or closed this connection under it.
    ct: Option<CtSeen>,
    /// HTTP/2: the GOAWAY that ended the connection (the peer's, else this side's).
    goaway: Option<GoAwaySeen>,
    /// HTTP/2: shortest gap between the client's PINGs.
    client_ping_min_ns: Option<u64>,
    /// HTTP/2: the streams the client opened (requests), when the connection spoke it.
    requests: Option<u32>,
}

#[derive(Debug, Clone)]
struct GoAwaySeen {
    received: bool,
    code: u32,
    debug: String,
    /// Silence on the connection before it.
    idle_before_ns: u64,
}

impl GoAwaySeen {
    fn of(l: &Life) -> Option<Self> {
        let f = l.frames.as_deref()?;
        let (received, g) = match (&f.received.goaway, &f.sent.goaway) {
            (Some(g), _) => (true, g),
            (None, Some(g)) => (false, g),
            (None, None) => return None,
        };
        Some(Self {
            received,
            code: g.code,
            debug: g.debug.clone(),
            idle_before_ns: g.idle_before_ns,
        })
    }

    fn describe(&self) -> String {
        match self.debug.as_str() {
            "" => format!("GOAWAY({})", http2::error_name(self.code)),
            d => format!("GOAWAY({}, {d:?})", http2::error_name(self.code)),
        }
    }
}

#[derive(Debug, Clone)]
struct CtSeen {
    verdict: CtVerdict,
    netns: u32,
    /// The namespace as the operator named it, else its inode.
    table: String,
    timeout_s: Option<u32>,
    /// What the connection ran into afterwards: "retransmissions", "reset" or "nothing yet".
    then: &'static str,
}

impl CtSeen {
    fn of(l: &Life) -> Option<Self> {
        let j = l.conntrack.as_deref()?;
        let verdict = j.verdict?;
        let at = match verdict {
            CtVerdict::Forgot { at_ns } | CtVerdict::ClosedEarly { at_ns, .. } => at_ns,
        };
        let after = |t: Option<u64>| t.is_some_and(|t| t.saturating_add(GRACE_NS) >= at);
        let then = if l.retransmits > 0 && after(l.last_retransmit_ns) {
            "retransmissions"
        } else if l.resets_received > 0 && after(l.first_reset_received_ns) {
            "reset"
        } else {
            "nothing yet"
        };
        Some(Self {
            verdict,
            netns: j.entry.netns,
            table: j
                .netns_name
                .clone()
                .unwrap_or_else(|| j.entry.netns.to_string()),
            timeout_s: j.timeout_established_s,
            then,
        })
    }
}

#[derive(Default)]
struct Group {
    comm: String,
    /// Recent connections, by end time; older than the window are dropped, but the last
    /// `AGE_HISTORY` stay for fixed-age detection (ages can exceed the window).
    recent: VecDeque<Conn>,
    /// Closes per 100 ms over the window: exact counts without keeping every connection.
    closes: Buckets,
    window_closes: u64,
    /// Event time of the next evaluation (busy groups are evaluated at most every
    /// `CHECK_EVERY_NS`).
    next_check_ns: u64,
    /// Connection start times within the window (rate and replacement checks).
    starts: VecDeque<u64>,
    // Totals for the per-peer summary.
    total: u64,
    first_ns: u64,
    last_ns: u64,
    lifetimes: Dist,
    idles: Dist,
    closers: BTreeMap<&'static str, u64>,
    time_waits: u64,
    retransmits: u64,
    close_wait_max_ns: u64,
    /// Connections still open in CLOSE_WAIT when tracing stopped.
    close_wait_open: u64,
    ends: BTreeMap<&'static str, u64>,
    findings: BTreeSet<Pattern>,
    /// HTTP/2 connections and the streams their clients opened (reuse health).
    http2_connections: u64,
    http2_requests: u64,
}

impl Group {
    /// Add a dropped group's totals into this one (its process's [`Peer::Others`]). Its
    /// recent connections go with it: the sum has no window or concurrency of its own.
    fn absorb(&mut self, g: Group, now: u64) {
        if self.comm.is_empty() {
            self.comm = g.comm;
            self.first_ns = g.first_ns;
        }
        self.total += g.total;
        self.first_ns = self.first_ns.min(g.first_ns);
        // As recent as the last group it took in: the sum is not the next one dropped.
        self.last_ns = self.last_ns.max(g.last_ns).max(now);
        self.lifetimes.absorb(g.lifetimes);
        self.idles.absorb(g.idles);
        for (k, n) in g.closers {
            *self.closers.entry(k).or_default() += n;
        }
        for (k, n) in g.ends {
            *self.ends.entry(k).or_default() += n;
        }
        self.time_waits += g.time_waits;
        self.retransmits += g.retransmits;
        self.close_wait_max_ns = self.close_wait_max_ns.max(g.close_wait_max_ns);
        self.close_wait_open += g.close_wait_open;
        self.http2_connections += g.http2_connections;
        self.http2_requests += g.http2_requests;
    }
}

const AGE_HISTORY: usize = 32;
/// Connections kept per group for the statistics (the newest); counts come from `Buckets`.
const MAX_RECENT: usize = 512;
/// Per-process TIME_WAIT/reset entries kept within the window.
const MAX_PROCESS_EVENTS: usize = 65_536;
/// Groups with at most this many connections are evaluated on every connection.
const EAGER: u64 = 64;
/// Busy groups are evaluated at most this often (event time).
const CHECK_EVERY_NS: u64 = 200_000_000;
const BUCKET_NS: u64 = 100_000_000;

/// Event counts in fixed time buckets, for exact counts over a sliding window.
#[derive(Default)]
struct Buckets {
    q: VecDeque<(u64, u64)>,
    total: u64,
}

impl Buckets {
    fn add(&mut self, t: u64) {
        let b = t / BUCKET_NS;
        match self.q.back_mut() {
            Some((last, n)) if *last == b => *n += 1,
            // Events arrive nearly in time order; a late one counts in the newest bucket.
            Some((last, n)) if *last > b => *n += 1,
            _ => self.q.push_back((b, 1)),
        }
        self.total += 1;
    }

    fn in_window(&mut self, from: u64) -> u64 {
        while self
            .q
            .front()
            .is_some_and(|(b, _)| (b + 1).saturating_mul(BUCKET_NS) <= from)
        {
            let (_, n) = self.q.pop_front().expect("checked");
            self.total -= n;
        }
        self.total
    }
}
/// Reconnect backoff is measured in tens of milliseconds at least.
const BACKOFF_MIN_GAP_NS: u64 = 10_000_000;
/// Closed "right after use": at most this long after the last byte.
const AFTER_USE_NS: u64 = 100_000_000;
/// Connection ids listed as evidence, at most.
const MAX_EVIDENCE: usize = 20;

/// Per-process counters over the window (TIME_WAIT, resets).
#[derive(Default)]
struct Process {
    comm: String,
    netns: u32,
    time_waits: VecDeque<(u64, SocketId)>,
    resets: VecDeque<(u64, SocketId)>,
    closes: VecDeque<u64>,
    /// HTTP/2 streams cancelled (RST_STREAM CANCEL), and whether this process sent it.
    cancels: VecDeque<(u64, SocketId, bool)>,
}

struct Emitted {
    evidence: usize,
}

/// Per-peer totals at the end of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSummary {
    /// `Some((start, end))` for a sliding-window record, `None` for the whole run.
    pub window: Option<(u64, u64)>,
    /// The whole run's numbers of a peer dropped early to keep the table within `max_peers`
    /// (written when dropped; a later connection starts a new entry).
    pub forgotten: bool,
    pub tgid: u32,
    pub comm: String,
    pub netns: u32,
    pub peer: Peer,
    pub connections: u64,
    pub rate_per_s: f64,
    pub lifetime_p50_ns: u64,
    pub lifetime_p90_ns: u64,
    pub lifetime_p99_ns: u64,
    /// Idle time before the close began (p50, p90, p99), over connections that had one.
    pub idle_before_close_ns: [u64; 3],
    /// Most connections open at the same time, among the recent ones.
    pub concurrent_max: u64,
    pub closers: BTreeMap<&'static str, u64>,
    pub ends: BTreeMap<&'static str, u64>,
    /// Connections that left a TIME_WAIT socket behind.
    pub time_wait: u64,
    pub retransmits: u64,
    /// Sockets still in CLOSE_WAIT at the end, and the longest CLOSE_WAIT seen (closed or not).
    pub close_wait_open: u64,
    pub close_wait_max_ns: u64,
    pub findings: Vec<&'static str>,
    /// HTTP/2 connections, and the streams (requests) they carried: requests per connection
    /// is the reuse health HTTP/2 asks for (1 = no reuse at all).
    pub http2_connections: u64,
    pub http2_requests: u64,
}

/// A socket in CLOSE_WAIT: since when, its group, and its process's name as the event gave it
/// (the group may be forgotten, past `max_peers`, before the socket becomes stuck).
struct Waiting {
    since_ns: u64,
    key: GroupKey,
    comm: compact_str::CompactString,
}

pub struct Detector {
    cfg: DetectConfig,
    groups: BTreeMap<GroupKey, Group>,
    processes: BTreeMap<u32, Process>,
    /// Sockets now in CLOSE_WAIT.
    close_wait: BTreeMap<SocketId, Waiting>,
    /// The same sockets by the time they entered: which became stuck since the last check is
    /// a range lookup, not a walk over all of them at every event (a leaking server can hold
    /// thousands).
    close_wait_since: BTreeSet<(u64, SocketId)>,
    /// `now` at the last look for stuck sockets.
    close_wait_checked_ns: u64,
    emitted: BTreeMap<(Pattern, GroupKey), Emitted>,
    now: u64,
    /// End of the current window (event time); 0 before the first event.
    next_window_ns: u64,
    /// Per-peer records to write (windows that ended, peers forgotten), with their time, for
    /// the caller to take.
    windows: Vec<(u64, PeerSummary)>,
    /// Peers dropped to stay within `max_peers` (each written as it went).
    pub peers_forgotten: u64,
}

/// Significant digits of the lifetime and idle percentiles: two (within 1 %) is what people
/// read, and keeps a peer's histogram at a few KiB. Three took up to 200 KiB per peer and
/// per histogram, whose scattered counters the agent's hot path kept missing in the cache.
const HIST_DIGITS: u8 = 2;

fn histogram(values: &[u64]) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new(HIST_DIGITS).expect("valid significant digits");
    for &v in values {
        h.record(v).expect("auto-resizing histogram");
    }
    h
}

fn percentile(values: &[u64], q: f64) -> u64 {
    histogram(values).value_at_quantile(q)
}

/// Values a [`Dist`] keeps as they are before it builds a histogram.
const FEW: usize = 32;

/// One duration over a peer's whole run: the values themselves while there are few (most
/// peers of a busy node see a handful of connections, and a histogram costs KiB), a
/// histogram once there are more. The quantiles are the same either way.
#[derive(Default)]
struct Dist {
    few: Vec<u64>,
    hist: Option<Histogram<u64>>,
}

impl Dist {
    fn record(&mut self, v: u64) {
        let v = v.max(1);
        if let Some(h) = &mut self.hist {
            h.record(v).expect("auto-resizing histogram");
            return;
        }
        self.few.push(v);
        if self.few.len() > FEW {
            self.hist = Some(histogram(&std::mem::take(&mut self.few)));
        }
    }

    /// `None` before any value.
    fn with<T>(&self, f: impl FnOnce(&Histogram<u64>) -> T) -> Option<T> {
        match &self.hist {
            Some(h) => Some(f(h)),
            None if self.few.is_empty() => None,
            None => Some(f(&histogram(&self.few))),
        }
    }

    /// Several at once: a peer with few values builds its histogram once, not per quantile.
    fn quantiles<const N: usize>(&self, qs: [f64; N]) -> [u64; N] {
        self.with(|h| qs.map(|q| h.value_at_quantile(q)))
            .unwrap_or([0; N])
    }

    fn quantile(&self, q: f64) -> u64 {
        self.quantiles([q])[0]
    }

    fn max(&self) -> u64 {
        self.with(|h| h.max()).unwrap_or(0)
    }

    fn absorb(&mut self, other: Dist) {
        for v in other.few {
            self.record(v);
        }
        if let Some(h) = other.hist {
            let mine = self
                .hist
                .get_or_insert_with(|| histogram(&std::mem::take(&mut self.few)));
            mine.add(h).expect("auto-resizing histogram");
        }
    }
}

/// The most intervals `(start, end)` that overlap at one instant.
fn max_concurrent(spans: impl Iterator<Item = (u64, u64)>) -> u64 {
    let mut edges: Vec<(u64, i64)> = spans.flat_map(|(s, e)| [(s, 1), (e, -1)]).collect();
    // At equal times, ends before starts: back-to-back connections do not overlap.
    edges.sort_unstable();
    let (mut now, mut max) = (0i64, 0i64);
    for (_, d) in edges {
        now += d;
        max = max.max(now);
    }
    max as u64
}

fn ms(ns: u64) -> String {
    if ns >= 10_000_000_000 {
        format!("{:.0}s", ns as f64 / 1e9)
    } else if ns >= 1_000_000_000 {
        format!("{:.1}s", ns as f64 / 1e9)
    } else {
        format!("{:.1}ms", ns as f64 / 1e6)
    }
}

fn clustered(values: &[u64], jitter: f64) -> Option<(u64, f64)> {
    let med = percentile(values, 0.5);
    if med == 0 {
        return None;
    }
    let within = values
        .iter()
        .filter(|&&v| (v as f64 - med as f64).abs() <= jitter * med as f64)
        .count();
    let share = within as f64 / values.len() as f64;
    (share >= 0.8).then_some((med, share))
}

fn group_key(ev: &Event) -> GroupKey {
    let s = &ev.socket;
    let peer = match Role::of(s) {
        Role::Client => Peer::Remote(s.remote),
        Role::Server => Peer::Listen(s.local.port()),
        // Seen mid-life: an ephemeral remote port means we are the server.
        Role::Unknown if s.remote.port() >= 32768 && s.local.port() < 32768 => {
            Peer::Listen(s.local.port())
        }
        Role::Unknown => Peer::Remote(s.remote),
    };
    GroupKey {
        tgid: s.owner.as_ref().map_or(0, |o| o.tgid),
        netns: s.netns,
        peer,
    }
}

/// Bounded memory: past `MAX_PROCESS_EVENTS`, the oldest entries go (counts saturate).
fn cap<T>(q: &mut VecDeque<T>) {
    while q.len() > MAX_PROCESS_EVENTS {
        q.pop_front();
    }
}

fn prune<T>(q: &mut VecDeque<T>, keep_from: u64, ts: impl Fn(&T) -> u64) {
    while q.front().is_some_and(|x| ts(x) < keep_from) {
        q.pop_front();
    }
}

impl Detector {
    pub fn new(cfg: DetectConfig) -> Self {
        Self {
            cfg,
            groups: BTreeMap::new(),
            processes: BTreeMap::new(),
            close_wait: BTreeMap::new(),
            close_wait_since: BTreeSet::new(),
            close_wait_checked_ns: 0,
            emitted: BTreeMap::new(),
            now: 0,
            next_window_ns: 0,
            windows: Vec::new(),
            peers_forgotten: 0,
        }
    }

    /// Per-peer records written since the last call, with their kernel times (taken).
    pub fn take_windows(&mut self) -> Vec<(u64, PeerSummary)> {
        std::mem::take(&mut self.windows)
    }

    /// Per group with sockets in CLOSE_WAIT now: how many, and since when the oldest.
    fn close_wait_by_group(&self) -> BTreeMap<&GroupKey, (u64, u64)> {
        let mut m: BTreeMap<&GroupKey, (u64, u64)> = BTreeMap::new();
        for w in self.close_wait.values() {
            let e = m.entry(&w.key).or_insert((0, w.since_ns));
            e.0 += 1;
            e.1 = e.1.min(w.since_ns);
        }
        m
    }

    /// Close every window that ended before `now`: one record per peer active in it.
    fn roll_windows(&mut self, now: u64) {
        let w = self.cfg.window_ns;
        if self.next_window_ns == 0 {
            self.next_window_ns = now.saturating_add(w);
            return;
        }
        if now < self.next_window_ns {
            return;
        }
        let (from, to) = (self.next_window_ns - w, self.next_window_ns);
        let cw = self.close_wait_by_group();
        let records: Vec<(u64, PeerSummary)> = self
            .groups
            .iter()
            .filter_map(|(k, g)| {
                let active = g
                    .recent
                    .iter()
                    .any(|c| c.f.end_ns >= from && c.f.end_ns < to)
                    || cw.contains_key(k);
                active.then(|| (to, self.summarize(k, g, Some((from, to)), cw.get(k))))
            })
            .collect();
        self.windows.extend(records);
        // Events arrive in time order: the windows between `to` and `now` are empty.
        self.next_window_ns = to.saturating_add(w.saturating_mul((now - to) / w + 1));
        // A process with nothing left in the window is dropped: its entry holds only windowed
        // counts, and pids come and go for as long as h2trace runs. Should it come back, its
        // findings start afresh.
        let keep_from = to.saturating_sub(w);
        let mut quiet = Vec::new();
        self.processes.retain(|&tgid, p| {
            prune(&mut p.time_waits, keep_from, |x| x.0);
            prune(&mut p.resets, keep_from, |x| x.0);
            prune(&mut p.closes, keep_from, |x| *x);
            prune(&mut p.cancels, keep_from, |x| x.0);
            let empty = p.time_waits.is_empty()
                && p.resets.is_empty()
                && p.closes.is_empty()
                && p.cancels.is_empty();
            if empty {
                quiet.push(tgid);
            }
            !empty
        });
        if !quiet.is_empty() {
            self.emitted
                .retain(|(_, k), _| k.peer != Peer::All || !quiet.contains(&k.tgid));
        }
    }

    /// Past `max_peers`, drop the least recently active eighth of the peers (at least one).
    /// One with findings or at least `min_conns` connections is written out first with its
    /// whole run's numbers and last findings; the rest, a node's one-off peers, are added
    /// into their process's [`Peer::Others`], so that ever new peers do not make a record
    /// each.
    fn forget_peers(&mut self, out: &mut Vec<Finding>) {
        let n = (self.cfg.max_peers / 8).max(1);
        let mut by_age: Vec<(u64, GroupKey)> = self
            .groups
            .iter()
            .map(|(k, g)| (g.last_ns, k.clone()))
            .collect();
        if by_age.len() > n {
            by_age.select_nth_unstable(n - 1);
            by_age.truncate(n);
        }
        // Written in key order, whatever order the selection left.
        by_age.sort_unstable_by(|a, b| a.1.cmp(&b.1));
        for (_, k) in &by_age {
            self.check_group(k, out);
        }
        let on_its_own = |k: &GroupKey, g: &Group| {
            k.peer == Peer::Others || !g.findings.is_empty() || g.total >= self.cfg.min_conns as u64
        };
        let cw = self.close_wait_by_group();
        let summaries: Vec<(u64, PeerSummary)> = by_age
            .iter()
            .filter_map(|(_, k)| {
                let g = self.groups.get(k).filter(|g| on_its_own(k, g))?;
                let mut s = self.summarize(k, g, None, cw.get(k));
                s.forgotten = true;
                Some((self.now, s))
            })
            .collect();
        self.windows.extend(summaries);
        for (_, k) in &by_age {
            let Some(g) = self.groups.remove(k) else {
                continue;
            };
            if !on_its_own(k, &g) {
                let others = GroupKey {
                    peer: Peer::Others,
                    ..k.clone()
                };
                self.groups.entry(others).or_default().absorb(g, self.now);
            }
        }
        let gone: BTreeSet<&GroupKey> = by_age.iter().map(|(_, k)| k).collect();
        self.emitted.retain(|(_, k), _| !gone.contains(k));
        self.peers_forgotten += by_age.len() as u64;
    }

    /// Numbers for one peer: over a window (from the group's recent connections), or over
    /// the whole run.
    /// `cw`: the group's sockets in CLOSE_WAIT now (`close_wait_by_group`).
    fn summarize(
        &self,
        k: &GroupKey,
        g: &Group,
        window: Option<(u64, u64)>,
        cw: Option<&(u64, u64)>,
    ) -> PeerSummary {
        let (close_wait_open, cw_longest) =
            cw.map_or((0, 0), |&(n, since)| (n, self.now.saturating_sub(since)));
        let Some((from, to)) = window else {
            let span = g.last_ns.saturating_sub(g.first_ns).max(1);
            let [p50, p90, p99] = g.lifetimes.quantiles([0.5, 0.9, 0.99]);
            return PeerSummary {
                window: None,
                forgotten: false,
                tgid: k.tgid,
                comm: g.comm.clone(),
                netns: k.netns,
                peer: k.peer,
                connections: g.total,
                rate_per_s: ((g.total as f64 / (span as f64 / 1e9)) * 10.0).round() / 10.0,
                lifetime_p50_ns: p50,
                lifetime_p90_ns: p90,
                lifetime_p99_ns: p99,
                idle_before_close_ns: g.idles.quantiles([0.5, 0.9, 0.99]),
                concurrent_max: max_concurrent(g.recent.iter().map(|c| (c.f.start_ns, c.f.end_ns))),
                closers: g.closers.clone(),
                ends: g.ends.clone(),
                time_wait: g.time_waits,
                retransmits: g.retransmits,
                close_wait_open: g.close_wait_open + close_wait_open,
                close_wait_max_ns: g.close_wait_max_ns.max(cw_longest),
                findings: g.findings.iter().map(|p| p.as_str()).collect(),
                http2_connections: g.http2_connections,
                http2_requests: g.http2_requests,
            };
        };
        let conns: Vec<&Conn> = g
            .recent
            .iter()
            .filter(|c| c.f.end_ns >= from && c.f.end_ns < to)
            .collect();
        let lifetimes: Vec<u64> = conns.iter().map(|c| c.f.lifetime_ns).collect();
        let idles: Vec<u64> = conns
            .iter()
            .filter_map(|c| c.f.idle_before_close_ns)
            .collect();
        let pct = |v: &[u64], q| if v.is_empty() { 0 } else { percentile(v, q) };
        let mut closers = BTreeMap::new();
        let mut ends = BTreeMap::new();
        for c in &conns {
            *closers.entry(c.f.fin_first.as_str()).or_default() += 1;
            *ends.entry(c.f.end.as_str()).or_default() += 1;
        }
        PeerSummary {
            window: Some((from, to)),
            forgotten: false,
            tgid: k.tgid,
            comm: g.comm.clone(),
            netns: k.netns,
            peer: k.peer,
            connections: conns.len() as u64,
            rate_per_s: ((conns.len() as f64 / ((to - from) as f64 / 1e9)) * 10.0).round() / 10.0,
            lifetime_p50_ns: pct(&lifetimes, 0.5),
            lifetime_p90_ns: pct(&lifetimes, 0.9),
            lifetime_p99_ns: pct(&lifetimes, 0.99),
            idle_before_close_ns: [0.5, 0.9, 0.99].map(|q| pct(&idles, q)),
            concurrent_max: max_concurrent(conns.iter().map(|c| (c.f.start_ns, c.f.end_ns))),
            closers,
            ends,
            time_wait: conns.iter().filter(|c| c.f.time_wait).count() as u64,
            retransmits: conns.iter().map(|c| u64::from(c.retransmits)).sum(),
            close_wait_open,
            close_wait_max_ns: conns
                .iter()
                .filter_map(|c| c.f.close_wait_ns)
                .max()
                .unwrap_or(0)
                .max(cw_longest),
            findings: g.findings.iter().map(|p| p.as_str()).collect(),
            http2_connections: conns.iter().filter(|c| c.requests.is_some()).count() as u64,
            http2_requests: conns.iter().filter_map(|c| c.requests).map(u64::from).sum(),
        }
    }

    pub fn config(&self) -> &DetectConfig {
        &self.cfg
    }

    /// Time passes without events (the agent's `tick` records): CLOSE_WAIT can become stuck.
    pub fn advance(&mut self, now: u64, out: &mut Vec<Finding>) {
        self.roll_windows(now);
        self.now = self.now.max(now);
        // A finding about stuck sockets changes only when one more becomes stuck.
        if self.close_wait_crossed() {
            self.check_close_wait(out);
        }
    }

    /// Whether a socket has been in CLOSE_WAIT past the limit since the last check.
    fn close_wait_crossed(&self) -> bool {
        let limit = self.cfg.close_wait_stuck_ns;
        // Stuck at `t`: entered before `t - limit`.
        let Some(stuck_before) = self.now.checked_sub(limit) else {
            return false;
        };
        let checked_before = self.close_wait_checked_ns.saturating_sub(limit);
        let first = SocketId {
            skaddr: 0,
            start_ns: 0,
        };
        self.close_wait_since
            .range((checked_before, first)..)
            .next()
            .is_some_and(|(t, _)| *t < stuck_before)
    }

    /// Whether anything waits for time to pass (sockets in CLOSE_WAIT).
    pub fn wants_tick(&self) -> bool {
        !self.close_wait.is_empty()
    }

    /// `facts`: a connection record's derived facts (`correlate::of_event`), which the
    /// pipeline has already derived for the output.
    pub fn on_event(&mut self, ev: &Event, facts: Option<Facts>, out: &mut Vec<Finding>) {
        // Time has passed up to this event: windows may have ended, a socket may have become
        // stuck before it closes.
        self.advance(ev.ts_ns, out);
        let key = group_key(ev);
        // Borrowed: copied only into a group or process seen for the first time.
        let comm = ev.socket.owner.as_ref().map_or("", |o| o.comm.as_str());
        match &ev.body {
            Body::State { new, .. } if *new == h2trace_common::tcp_state::CLOSE_WAIT => {
                let w = Waiting {
                    since_ns: ev.ts_ns,
                    key,
                    comm: comm.into(),
                };
                if let Some(old) = self.close_wait.insert(ev.socket.id, w) {
                    self.close_wait_since.remove(&(old.since_ns, ev.socket.id));
                }
                self.close_wait_since.insert((ev.ts_ns, ev.socket.id));
            }
            Body::Frame(f) if matches!(f.body, http2::FrameBody::RstStream { code } if code == http2::CANCEL) =>
            {
                let p = self.process(&key, comm);
                p.cancels.push_back((ev.ts_ns, ev.socket.id, !f.received));
                cap(&mut p.cancels);
                self.check_process(key.tgid, out);
            }
            Body::ResetSent { .. } | Body::ResetReceived { .. } => {
                let p = self.process(&key, comm);
                p.resets.push_back((ev.ts_ns, ev.socket.id));
                cap(&mut p.resets);
                self.check_process(key.tgid, out);
            }
            Body::Life(l) | Body::Open(l) => {
                // `of_event` derives them for every life.
                let Some(f) = facts else { return };
                if let Some(w) = self.close_wait.remove(&ev.socket.id) {
                    self.close_wait_since.remove(&(w.since_ns, ev.socket.id));
                }
                // Resets whose live events were folded into this record count as if seen.
                let folded = [
                    (l.folded.resets_sent, l.first_reset_sent_ns),
                    (l.folded.resets_received, l.first_reset_received_ns),
                ];
                if folded.iter().any(|&(n, _)| n > 0) {
                    let p = self.process(&key, comm);
                    for (n, at) in folded {
                        for _ in 0..n {
                            p.resets.push_back((at.unwrap_or(ev.ts_ns), ev.socket.id));
                        }
                    }
                    cap(&mut p.resets);
                    self.check_process(key.tgid, out);
                }
                let conn = Conn {
                    id: ev.socket.id,
                    bytes_sent: l.bytes_sent,
                    bytes_received: l.bytes_received,
                    retransmits: l.retransmits,
                    reset_in_established: l.reset_received_state
                        == Some(h2trace_common::tcp_state::ESTABLISHED),
                    ct: CtSeen::of(l),
                    goaway: GoAwaySeen::of(l),
                    requests: l.http2.side.map(|_| l.http2.requests()),
                    client_ping_min_ns: l.frames.as_deref().and_then(|fr| match l.http2.side {
                        Some(http2::Side::Client) => fr.sent.pings.min_interval_ns,
                        Some(http2::Side::Server) => fr.received.pings.min_interval_ns,
                        None => None,
                    }),
                    f,
                };
                self.add(key, comm, conn, out);
            }
            _ => {}
        }
    }

    fn process(&mut self, key: &GroupKey, comm: &str) -> &mut Process {
        let p = self.processes.entry(key.tgid).or_default();
        if p.comm.is_empty() {
            p.comm = comm.to_string();
            p.netns = key.netns;
        }
        p
    }

    fn add(&mut self, key: GroupKey, comm: &str, c: Conn, out: &mut Vec<Finding>) {
        let window_from = self.now.saturating_sub(self.cfg.window_ns);
        {
            let p = self.process(&key, comm);
            if c.f.time_wait {
                p.time_waits.push_back((c.f.end_ns, c.id));
            }
            if c.f.end != EndKind::Open {
                p.closes.push_back(c.f.end_ns);
            }
            cap(&mut p.time_waits);
            cap(&mut p.closes);
        }
        // A round that drops one peer into a new `Others` entry leaves the count as it was: go
        // again.
        while self.groups.len() >= self.cfg.max_peers && !self.groups.contains_key(&key) {
            self.forget_peers(out);
        }
        let g = self.groups.entry(key.clone()).or_default();
        if g.comm.is_empty() {
            g.comm = comm.to_string();
            g.first_ns = c.f.start_ns;
        }
        g.total += 1;
        g.first_ns = g.first_ns.min(c.f.start_ns);
        g.last_ns = g.last_ns.max(c.f.end_ns);
        g.lifetimes.record(c.f.lifetime_ns);
        if let Some(idle) = c.f.idle_before_close_ns {
            g.idles.record(idle);
        }
        *g.closers.entry(c.f.fin_first.as_str()).or_default() += 1;
        *g.ends.entry(c.f.end.as_str()).or_default() += 1;
        g.time_waits += u64::from(c.f.time_wait);
        if let Some(r) = c.requests {
            g.http2_connections += 1;
            g.http2_requests += u64::from(r);
        }
        g.retransmits += u64::from(c.retransmits);
        g.close_wait_max_ns = g.close_wait_max_ns.max(c.f.close_wait_ns.unwrap_or(0));
        if c.f.end == EndKind::Open && c.f.close_wait_ns.is_some() {
            g.close_wait_open += 1;
        }
        if c.f.end != EndKind::Open {
            g.closes.add(c.f.end_ns);
        }
        g.window_closes = g.closes.in_window(window_from);
        // Starts arrive with their (later) close, so keep them sorted.
        let pos = g.starts.partition_point(|&s| s <= c.f.start_ns);
        g.starts.insert(pos, c.f.start_ns);
        g.recent.push_back(c);
        prune(
            &mut g.starts,
            window_from.min(
                self.now
                    .saturating_sub(self.cfg.reconnect_gap_ns.saturating_mul(2)),
            ),
            |s| *s,
        );
        while g.starts.len() > MAX_RECENT {
            g.starts.pop_front();
        }
        while g.recent.len() > MAX_RECENT
            || g.recent.len() > AGE_HISTORY
                && g.recent.front().is_some_and(|c| c.f.end_ns < window_from)
        {
            g.recent.pop_front();
        }
        // Evaluating a group costs O(MAX_RECENT): at high churn, at most every CHECK_EVERY_NS.
        if g.total <= EAGER || self.now >= g.next_check_ns {
            g.next_check_ns = self.now.saturating_add(CHECK_EVERY_NS);
            self.check_group(&key, out);
            self.check_process(key.tgid, out);
        }
    }

    /// Whether a finding with `n` pieces of evidence would be written by `emit`: new, or its
    /// evidence has doubled since it was last written.
    fn due(&self, pattern: Pattern, key: &GroupKey, n: usize) -> bool {
        match self.emitted.get(&(pattern, key.clone())) {
            None => true,
            Some(e) => n >= 2 * e.evidence.max(1),
        }
    }

    fn emit(&mut self, pattern: Pattern, key: &GroupKey, mut f: Finding, out: &mut Vec<Finding>) {
        let n = f.evidence.len().max(
            f.numbers
                .get("connections")
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize,
        );
        let slot = (pattern, key.clone());
        let status = match self.emitted.get(&slot) {
            None => "new",
            // Updated only when the evidence has doubled: the finding persists, not repeats.
            Some(e) if n >= 2 * e.evidence.max(1) => "update",
            Some(_) => return,
        };
        self.emitted.insert(slot, Emitted { evidence: n });
        if let Some(g) = self.groups.get_mut(key) {
            g.findings.insert(pattern);
        }
        f.status = status;
        f.evidence.dedup();
        f.evidence.truncate(MAX_EVIDENCE);
        out.push(f);
    }

    /// The process's name as its connections or live events gave it, if any did.
    fn process_name(&self, key: &GroupKey) -> Option<&str> {
        let group = self.groups.get(key).map(|g| g.comm.as_str());
        let process = || self.processes.get(&key.tgid).map(|p| p.comm.as_str());
        group
            .filter(|c| !c.is_empty())
            .or_else(|| process().filter(|c| !c.is_empty()))
    }

    /// A finding over the current window; the process name comes from what was seen of it.
    fn finding(
        &self,
        pattern: Pattern,
        key: &GroupKey,
        numbers: Value,
        confidence: f64,
        evidence: Vec<String>,
        summary: String,
    ) -> Finding {
        let id_src = format!("{pattern}|{}|{}|{}", key.tgid, key.netns, key.peer);
        let digest = sha1::Digest::finalize(<sha1::Sha1 as sha1::Digest>::new_with_prefix(
            id_src.as_bytes(),
        ));
        let comm = self.process_name(key).unwrap_or_default();
        let from = self.now.saturating_sub(self.cfg.window_ns);
        Finding {
            id: digest[..8].iter().map(|b| format!("{b:02x}")).collect(),
            pattern,
            status: "new",
            ts_ns: self.now,
            tgid: key.tgid,
            comm: comm.to_string(),
            netns: key.netns,
            peer: key.peer,
            window_start_ns: from,
            window_end_ns: self.now,
            numbers: match numbers {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            confidence: (confidence.clamp(0.0, 1.0) * 100.0).round() / 100.0,
            evidence,
            summary,
            remedies: pattern.remedies(),
        }
    }

    fn check_group(&mut self, key: &GroupKey, out: &mut Vec<Finding>) {
        let cfg = self.cfg.clone();
        let now = self.now;
        let from = now.saturating_sub(cfg.window_ns);
        // `Others` is a sum of peers with too little to judge, and has no connections of its own.
        let Some(g) = self.groups.get(key).filter(|_| key.peer != Peer::Others) else {
            return;
        };
        let who = if key.tgid == 0 {
            g.comm.clone()
        } else {
            format!("{} (pid {})", g.comm, key.tgid)
        };
        let window: Vec<&Conn> = g.recent.iter().filter(|c| c.f.end_ns >= from).collect();
        let closed: Vec<&Conn> = window
            .iter()
            .copied()
            .filter(|c| c.f.end != EndKind::Open)
            .collect();
        let mut found = Vec::new();
        let ids = |cs: &[&Conn]| {
            cs.iter()
                .rev()
                .map(|c| c.id.to_string())
                .collect::<Vec<_>>()
        };

        // Dial per request: many short connections to one peer, each one exchange, closed by us.
        if let (Peer::Remote(_), true) = (key.peer, closed.len() >= cfg.min_conns) {
            let lifetimes: Vec<u64> = closed.iter().map(|c| c.f.lifetime_ns).collect();
            let p50 = percentile(&lifetimes, 0.5);
            let local = closed
                .iter()
                .filter(|c| {
                    matches!(c.f.fin_first, FinFirst::Local)
                        || matches!(c.f.end, EndKind::ResetSent | EndKind::LocalAbort)
                })
                .count() as f64
                / closed.len() as f64;
            let exchanged = closed
                .iter()
                .filter(|c| c.bytes_sent > 0 && c.bytes_received > 0)
                .count() as f64
                / closed.len() as f64;
            // Closed right after use, by either side (HTTP/1.0-style servers close first).
            let after_use = closed
                .iter()
                .filter(|c| c.f.idle_before_close_ns.is_none_or(|i| i <= AFTER_USE_NS))
                .count() as f64
                / closed.len() as f64;
            if p50 <= cfg.short_lifetime_ns && after_use >= 0.6 && exchanged >= 0.8 {
                // The statistics come from the newest MAX_RECENT; the count is exact.
                let n = g.window_closes.max(closed.len() as u64);
                let first = closed.iter().map(|c| c.f.start_ns).min().unwrap_or(now);
                let span = if n > closed.len() as u64 {
                    cfg.window_ns.min(now.saturating_sub(g.first_ns))
                } else {
                    now - first
                }
                .max(1);
                let rate = n as f64 / (span as f64 / 1e9);
                let sent = percentile(
                    &closed.iter().map(|c| c.bytes_sent).collect::<Vec<_>>(),
                    0.5,
                );
                let recv = percentile(
                    &closed.iter().map(|c| c.bytes_received).collect::<Vec<_>>(),
                    0.5,
                );
                let mut numbers = json!({
                    "connections": n, "rate_per_s": (rate * 10.0).round() / 10.0,
                    "lifetime_p50_ns": p50, "lifetime_p90_ns": percentile(&lifetimes, 0.9), "lifetime_p99_ns": percentile(&lifetimes, 0.99),
                    "concurrent_max": max_concurrent(closed.iter().map(|c| (c.f.start_ns, c.f.end_ns))),
                    "bytes_sent_p50": sent, "bytes_received_p50": recv, "closed_by_local_share": (local * 100.0).round() / 100.0,
                });
                let mut summary = format!(
                    "{who} opens a new connection to {} for every request: {} connections in {} ({rate:.1}/s), each living {} and carrying one exchange (~{sent} B out, ~{recv} B in), closed right after use ({}% by {}).",
                    key.peer,
                    n,
                    ms(span),
                    ms(p50),
                    ((if local >= 0.5 { local } else { 1.0 - local }) * 100.0).round(),
                    if local >= 0.5 {
                        "the client"
                    } else {
                        "the server"
                    }
                );
                // What the first bytes said (`--peek`), else what it could be.
                let proto = |p| {
                    closed.iter().filter(|c| c.f.protocol == Some(p)).count() * 2 > closed.len()
                };
                // HTTP/2 counts the streams: one per connection is no reuse at all.
                let h2: Vec<u32> = closed.iter().filter_map(|c| c.requests).collect();
                let single = h2.iter().filter(|&&r| r <= 1).count();
                if h2.len() * 2 > closed.len() {
                    numbers["http2_connections"] = json!(h2.len());
                    numbers["single_stream_connections"] = json!(single);
                }
                summary.push_str(if h2.len() * 2 > closed.len() && single * 10 >= h2.len() * 9 {
                    " HTTP/2 proves it: each connection carried a single stream, so nothing was reused (a new channel or client per call)."
                } else if proto(Protocol::Http1) {
                    " The connections carry HTTP/1.x: a client without keep-alive (or a server that closes after each response)."
                } else if proto(Protocol::H2c) {
                    " The connections carry HTTP/2: a new channel or client per call."
                } else if proto(Protocol::Tls) {
                    " The connections carry TLS: every request also pays a handshake."
                } else {
                    " HTTP/1.1 without keep-alive looks the same (--peek tells them apart)."
                });
                let conf = (closed.len() as f64 / cfg.min_conns.saturating_mul(2) as f64).min(1.0)
                    * after_use;
                found.push((
                    Pattern::DialPerRequest,
                    self.finding(
                        Pattern::DialPerRequest,
                        key,
                        numbers,
                        conf,
                        ids(&closed),
                        summary,
                    ),
                ));
            }
        }

        // Fixed-age rotation: lifetimes cluster at one age and each close is followed (or
        // preceded, with GOAWAY) by a replacement within milliseconds.
        let aged: Vec<&Conn> = g
            .recent
            .iter()
            .filter(|c| c.f.end != EndKind::Open && c.f.established_ns.is_some())
            .collect();
        if aged.len() >= cfg.min_age_samples {
            let ages: Vec<u64> = aged
                .iter()
                .map(|c| {
                    c.f.close_start_ns
                        .unwrap_or(c.f.end_ns)
                        .saturating_sub(c.f.established_ns.unwrap_or(c.f.start_ns))
                })
                .collect();
            if let Some((age, share)) = clustered(&ages, cfg.age_jitter) {
                let replaced = aged
                    .iter()
                    .filter(|c| {
                        let close = c.f.close_start_ns.unwrap_or(c.f.end_ns);
                        g.starts.iter().any(|&s| {
                            s != c.f.start_ns
                                && s.saturating_add(cfg.reconnect_gap_ns) >= close
                                && s <= close.saturating_add(cfg.reconnect_gap_ns)
                        })
                    })
                    .count() as f64
                    / aged.len() as f64;
                if age >= 2 * cfg.reconnect_gap_ns.min(250_000_000)
                    && age > cfg.short_lifetime_ns / 2
                    && replaced >= 0.75
                {
                    let spread = percentile(&ages, 0.9).saturating_sub(percentile(&ages, 0.1));
                    let numbers = json!({
                        "connections": aged.len(), "age_p50_ns": age, "age_p10_ns": percentile(&ages, 0.1), "age_p90_ns": percentile(&ages, 0.9),
                        "replaced_share": (replaced * 100.0).round() / 100.0,
                    });
                    let mut numbers = numbers;
                    let mut summary = format!(
                        "Connections between {who} and {} are closed at a fixed age of {} (spread {}) and replaced at once: a maximum connection age (gRPC MaxConnectionAge, a proxy or pool lifetime limit).",
                        key.peer,
                        ms(age),
                        ms(spread)
                    );
                    // HTTP/2 turns the inference into proof: the server announced the
                    // rotation with GOAWAY(NO_ERROR), gRPC with the debug text "max_age".
                    let goaways: Vec<&GoAwaySeen> = aged
                        .iter()
                        .filter_map(|c| c.goaway.as_ref())
                        .filter(|g| g.code == http2::NO_ERROR)
                        .collect();
                    let max_age = goaways
                        .iter()
                        .filter(|g| g.debug.contains("max_age"))
                        .count();
                    let mut confidence = share * replaced;
                    if let Some(g) = goaways.first() {
                        numbers["goaways"] = json!(goaways.len());
                        numbers["goaway_max_age"] = json!(max_age);
                        let from = if g.received { "the peer" } else { "this side" };
                        summary.push_str(&format!(
                            " Proven by HTTP/2: {from} sent {} before the close on {} of {} connections.",
                            g.describe(),
                            goaways.len(),
                            aged.len()
                        ));
                        confidence = confidence.max(goaways.len() as f64 / aged.len() as f64);
                    }
                    found.push((
                        Pattern::FixedAgeRotation,
                        self.finding(
                            Pattern::FixedAgeRotation,
                            key,
                            numbers,
                            confidence,
                            ids(&aged),
                            summary,
                        ),
                    ));
                }
            }
        }

        // Too many pings: the server's keepalive enforcement ended connections with
        // GOAWAY(ENHANCE_YOUR_CALM), gRPC with the debug text "too_many_pings".
        let calm: Vec<&Conn> = g
            .recent
            .iter()
            .filter(|c| {
                c.goaway
                    .as_ref()
                    .is_some_and(|g| g.code == http2::ENHANCE_YOUR_CALM)
            })
            .collect();
        if let Some(first) = calm.first().and_then(|c| c.goaway.as_ref()) {
            let ping = calm.iter().filter_map(|c| c.client_ping_min_ns).min();
            let (server, client) = if first.received {
                (key.peer.to_string(), who.clone())
            } else {
                (who.clone(), key.peer.to_string())
            };
            let mut summary = format!(
                "{server} ended {} HTTP/2 connection(s) with {} to {client}: ",
                calm.len(),
                first.describe()
            );
            summary.push_str(&match ping {
                Some(p) => format!(
                    "the client pinged every {} (keepalive), more often than the server's keepalive policy allows; the server closes the connection and fails its in-flight calls (UNAVAILABLE).",
                    ms(p)
                ),
                None => "the client's keepalive pings are more frequent than the server's keepalive policy allows; the server closes the connection and fails its in-flight calls (UNAVAILABLE).".into(),
            });
            let numbers = json!({ "connections": calm.len(), "client_ping_min_interval_ns": ping });
            found.push((
                Pattern::TooManyPings,
                self.finding(
                    Pattern::TooManyPings,
                    key,
                    numbers,
                    1.0,
                    ids(&calm),
                    summary,
                ),
            ));
        }

        // Idle close by peer: the peer closes after a consistent idle period. An HTTP/2 peer
        // announces it with GOAWAY(NO_ERROR): the client then often closes first, and the
        // GOAWAY is the last byte, so the silence that counts is the one before the GOAWAY.
        let idle_of = |c: &Conn| -> Option<u64> {
            match &c.goaway {
                Some(g) if g.received && g.code == http2::NO_ERROR => Some(g.idle_before_ns),
                _ if c.f.fin_first == FinFirst::Peer => c.f.idle_before_close_ns,
                _ => None,
            }
        };
        let by_peer: Vec<&Conn> = g.recent.iter().filter(|c| idle_of(c).is_some()).collect();
        if by_peer.len() >= cfg.min_idle_closes {
            let idles: Vec<u64> = by_peer.iter().filter_map(|c| idle_of(c)).collect();
            if let Some((idle, share)) = clustered(&idles, cfg.age_jitter)
                && idle >= 100_000_000
            {
                let cw: Vec<u64> = by_peer.iter().filter_map(|c| c.f.close_wait_ns).collect();
                let cw50 = if cw.is_empty() {
                    0
                } else {
                    percentile(&cw, 0.5)
                };
                let mut numbers = json!({
                    "connections": by_peer.len(), "idle_before_close_p50_ns": idle,
                    "close_wait_p50_ns": cw50, "close_wait_max_ns": cw.iter().max().copied().unwrap_or(0),
                });
                let then = if cw.is_empty() {
                    String::new()
                } else {
                    format!("; {who} then stayed {} in CLOSE_WAIT", ms(cw50))
                };
                let mut summary = format!(
                    "{} closes connections of {who} after {} of inactivity (its idle timeout){then}. The client keeps connections idle longer than the peer allows.",
                    key.peer,
                    ms(idle),
                );
                // HTTP/2 says who the timer belongs to: an HTTP/2 endpoint announces the close
                // with GOAWAY; a bare FIN comes from below HTTP/2.
                let h2: Vec<&&Conn> = by_peer.iter().filter(|c| c.requests.is_some()).collect();
                let announced: Vec<&GoAwaySeen> = h2
                    .iter()
                    .filter_map(|c| c.goaway.as_ref().filter(|g| g.received))
                    .collect();
                if !h2.is_empty() {
                    numbers["http2_connections"] = json!(h2.len());
                    numbers["goaway_before_close"] = json!(announced.len());
                    summary.push_str(&match announced.first() {
                        Some(g) if announced.len() * 2 >= h2.len() => format!(
                            " HTTP/2 confirms it: the peer announced {} of {} closes with {} (an HTTP/2 idle timeout: gRPC MaxConnectionIdle, nginx keepalive_timeout, Envoy idle_timeout).",
                            announced.len(),
                            h2.len(),
                            g.describe()
                        ),
                        _ => format!(
                            " {} of {} of these HTTP/2 connections were closed with a bare FIN, without GOAWAY: the timer is below HTTP/2 (a TCP proxy, load balancer or middlebox idle timeout), or a server that does not announce its closes.",
                            h2.len() - announced.len(),
                            h2.len()
                        ),
                    });
                }
                found.push((
                    Pattern::IdleCloseByPeer,
                    self.finding(
                        Pattern::IdleCloseByPeer,
                        key,
                        numbers,
                        share,
                        ids(&by_peer),
                        summary,
                    ),
                ));
            }
        }

        // Handshake-failure loop: connections that end right after establishment with little
        // data, repeating with growing gaps (backoff) or closed by the peer.
        let failed: Vec<&Conn> = window
            .iter()
            .copied()
            .filter(|c| {
                matches!(key.peer, Peer::Remote(_))
                    && c.f.end != EndKind::Open
                    && c.f.established_ns.is_some()
                    && c.f.lifetime_ns <= cfg.handshake_ns
                    && c.bytes_sent.saturating_add(c.bytes_received) <= cfg.handshake_bytes
            })
            .collect();
        if failed.len() >= cfg.min_handshake_failures {
            let mut starts: Vec<u64> = failed.iter().map(|c| c.f.start_ns).collect();
            starts.sort_unstable();
            let gaps: Vec<u64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
            // Backoff: gaps of at least BACKOFF_MIN_GAP_NS that mostly grow, the last at least
            // 1.5 times the first. Scheduling jitter between back-to-back dials is not backoff.
            let steps = gaps
                .windows(2)
                .filter(|w| w[1] as f64 >= 1.2 * w[0] as f64)
                .count() as f64
                / (gaps.len().max(2) - 1) as f64;
            let trend = match (gaps.first(), gaps.last()) {
                (Some(&a), Some(&b)) => a >= BACKOFF_MIN_GAP_NS && b as f64 >= 1.5 * a as f64,
                _ => false,
            };
            let growing = if trend { steps } else { 0.0 };
            let by_peer = failed
                .iter()
                .filter(|c| {
                    matches!(c.f.fin_first, FinFirst::Peer) || c.f.end == EndKind::ResetReceived
                })
                .count() as f64
                / failed.len() as f64;
            // A rejection carries next to nothing back (a TLS alert, an HTTP/2 GOAWAY); a short
            // request/response carries a response.
            let rejected = failed.iter().filter(|c| c.bytes_received <= 128).count() as f64
                / failed.len() as f64;
            if growing >= 0.5 || by_peer >= 0.5 && rejected >= 0.5 {
                let numbers = json!({
                    "connections": failed.len(), "lifetime_p50_ns": percentile(&failed.iter().map(|c| c.f.lifetime_ns).collect::<Vec<_>>(), 0.5),
                    "gaps_ns": gaps, "growing_gaps_share": (growing * 100.0).round() / 100.0, "closed_by_peer_share": (by_peer * 100.0).round() / 100.0,
                });
                let summary = format!(
                    "{who} keeps connecting to {} and the connection ends within {} of being established with almost no data ({} times{}): a handshake (TLS/ALPN/HTTP/2 preface) that fails and is retried.",
                    key.peer,
                    ms(cfg.handshake_ns),
                    failed.len(),
                    if growing >= 0.5 {
                        ", with growing gaps: backoff"
                    } else {
                        ""
                    }
                );
                found.push((
                    Pattern::HandshakeFailureLoop,
                    self.finding(
                        Pattern::HandshakeFailureLoop,
                        key,
                        numbers,
                        growing.max(by_peer),
                        ids(&failed),
                        summary,
                    ),
                ));
            }
        }

        // Port reuse collision: connections whose SYN met a connection the peer still held on
        // the same ports; the peer answered for the old one, this side reset that and sent the
        // SYN again (`handshake_reset`). What it costs is the wait before the SYN goes again.
        // Seen from the side that connects.
        let collided: Vec<&Conn> = window
            .iter()
            .copied()
            .filter(|c| c.f.handshake_reset)
            .collect();
        if matches!(key.peer, Peer::Remote(_)) && collided.len() >= cfg.min_handshake_failures {
            let delays: Vec<u64> = collided
                .iter()
                .filter_map(|c| c.f.established_ns.map(|e| e.saturating_sub(c.f.start_ns)))
                .collect();
            let p50 = percentile(&delays, 0.5);
            let numbers = json!({ "connections": collided.len(), "handshake_p50_ns": p50 });
            let summary = format!(
                "{} connection(s) of {who} to {} took a local port on which the peer still held an older connection (usually in CLOSE_WAIT: a server that does not close what its clients closed): the SYN was answered for the old connection, reset, and sent again, which delayed connect() by {} (p50).",
                collided.len(),
                key.peer,
                ms(p50)
            );
            found.push((
                Pattern::PortReuseCollision,
                self.finding(
                    Pattern::PortReuseCollision,
                    key,
                    numbers,
                    0.9,
                    ids(&collided),
                    summary,
                ),
            ));
        }

        // Black hole / reset after idle: silence, then retransmissions into nothing or a RST.
        for (pattern, pick) in [
            (
                Pattern::BlackHole,
                (|c: &Conn| {
                    c.retransmits >= 2
                        && matches!(
                            c.f.end,
                            EndKind::Timeout | EndKind::Open | EndKind::ResetReceived
                        )
                }) as fn(&Conn) -> bool,
            ),
            (Pattern::ResetAfterIdle, |c: &Conn| {
                c.f.end == EndKind::ResetReceived && c.reset_in_established && c.retransmits < 2
            }),
        ] {
            let hit: Vec<&Conn> = window
                .iter()
                .copied()
                .filter(|c| pick(c) && c.f.silent_gap_ns.is_some_and(|gap| gap >= cfg.idle_gap_ns))
                .collect();
            if let Some(last) = hit.last() {
                let gap = last.f.silent_gap_ns.unwrap_or(0);
                let numbers = json!({
                    "connections": hit.len(), "idle_gap_ns": gap, "retransmits": last.retransmits,
                    "ended": last.f.end.as_str(),
                });
                let summary = match pattern {
                    Pattern::BlackHole => format!(
                        "After {} idle, a connection of {who} to {} went into a black hole: {} retransmissions with no answer. A NAT, firewall or load balancer forgot the idle connection.",
                        ms(gap),
                        key.peer,
                        last.retransmits
                    ),
                    _ => format!(
                        "After {} idle, a connection of {who} to {} was reset at its first packet: the peer or a middlebox no longer knew it.",
                        ms(gap),
                        key.peer
                    ),
                };
                found.push((
                    pattern,
                    self.finding(pattern, key, numbers, 0.8, ids(&hit), summary),
                ));
            }
        }

        // Conntrack: proof from the middlebox's own table rather than inference from timing.
        for pattern in [Pattern::ConntrackForgot, Pattern::ConntrackClosedEarly] {
            let hit: Vec<&Conn> = window
                .iter()
                .copied()
                .filter(|c| {
                    c.ct.as_ref().is_some_and(|x| {
                        matches!(
                            (pattern, x.verdict),
                            (Pattern::ConntrackForgot, CtVerdict::Forgot { .. })
                                | (Pattern::ConntrackClosedEarly, CtVerdict::ClosedEarly { .. })
                        )
                    })
                })
                .collect();
            let Some(last) = hit.last() else {
                continue;
            };
            let x = last.ct.as_ref().expect("filtered");
            let mut then: BTreeMap<&str, u64> = BTreeMap::new();
            for c in &hit {
                *then
                    .entry(c.ct.as_ref().expect("filtered").then)
                    .or_default() += 1;
            }
            let idle = last.f.silent_gap_ns.or(last.f.idle_before_close_ns);
            let timeout = x.timeout_s.map_or("unknown".into(), |t| format!("{t} s"));
            let (summary, numbers) = match x.verdict {
                CtVerdict::Forgot { at_ns } => (
                    format!(
                        "The conntrack table of network namespace {} forgot {} live connection(s) of {who} to {}: the entry timed out in ESTABLISHED{} while the sockets were still ESTABLISHED (nf_conntrack_tcp_timeout_established = {timeout}); afterwards: {}.",
                        x.table,
                        hit.len(),
                        key.peer,
                        idle.map_or(String::new(), |i| format!(" after {} idle", ms(i))),
                        x.then
                    ),
                    json!({ "connections": hit.len(), "conntrack_netns": x.netns, "conntrack_table": x.table, "forgotten_at_ns": at_ns,
                            "idle_gap_ns": idle, "timeout_established_s": x.timeout_s, "afterwards": then }),
                ),
                CtVerdict::ClosedEarly { at_ns, state } => (
                    format!(
                        "The conntrack table of network namespace {} moved {} connection(s) of {who} to {} to {} while the sockets stayed ESTABLISHED; their next packets may be dropped as INVALID.",
                        x.table,
                        hit.len(),
                        key.peer,
                        ct::state_name(state)
                    ),
                    json!({ "connections": hit.len(), "conntrack_netns": x.netns, "conntrack_table": x.table, "closed_at_ns": at_ns,
                            "conntrack_state": ct::state_name(state), "afterwards": then }),
                ),
            };
            found.push((
                pattern,
                self.finding(pattern, key, numbers, 0.95, ids(&hit), summary),
            ));
        }

        for (p, f) in found {
            self.emit(p, key, f, out);
        }
        self.check_proxy(key.tgid, out);
    }

    /// A process that accepts long-lived connections while dialing a new short upstream
    /// connection per request.
    fn check_proxy(&mut self, tgid: u32, out: &mut Vec<Finding>) {
        if tgid == 0 {
            return;
        }
        let upstream = self
            .emitted
            .keys()
            .find(|(p, k)| *p == Pattern::DialPerRequest && k.tgid == tgid)
            .map(|(_, k)| k.clone());
        let Some(up) = upstream else { return };
        let Some(ug) = self.groups.get(&up) else {
            return;
        };
        let up_p50 = ug.lifetimes.quantile(0.5);
        let down = self.groups.iter().find(|(k, g)| {
            k.tgid == tgid
                && matches!(k.peer, Peer::Listen(_))
                && g.lifetimes.max() >= 10 * up_p50.max(1)
                && ug.total >= 2 * g.total
        });
        let Some((dk, dg)) = down else {
            return;
        };
        let numbers = json!({
            "connections": ug.total, "upstream_lifetime_p50_ns": up_p50, "downstream_connections": dg.total,
            "downstream_lifetime_max_ns": dg.lifetimes.max(),
        });
        let summary = format!(
            "{} (pid {tgid}) keeps its clients' connections ({}) open but opens a new upstream connection to {} per request ({} upstream connections living {} each): a proxy without upstream keep-alive.",
            ug.comm,
            dk.peer,
            up.peer,
            ug.total,
            ms(up_p50)
        );
        let evidence = ug.recent.iter().rev().map(|c| c.id.to_string()).collect();
        let f = self.finding(
            Pattern::ProxyUpstreamChurn,
            &up,
            numbers,
            0.8,
            evidence,
            summary,
        );
        self.emit(Pattern::ProxyUpstreamChurn, &up, f, out);
    }

    fn check_process(&mut self, tgid: u32, out: &mut Vec<Finding>) {
        let from = self.now.saturating_sub(self.cfg.window_ns);
        let Some(p) = self.processes.get_mut(&tgid) else {
            return;
        };
        prune(&mut p.time_waits, from, |x| x.0);
        prune(&mut p.resets, from, |x| x.0);
        prune(&mut p.closes, from, |x| *x);
        prune(&mut p.cancels, from, |x| x.0);
        let (tw, rst, closes) = (p.time_waits.len(), p.resets.len(), p.closes.len());
        let cancels = p.cancels.len();
        let sent = p.cancels.iter().filter(|c| c.2).count();
        let key = GroupKey {
            tgid,
            netns: p.netns,
            peer: Peer::All,
        };
        // Checked at every reset and close: build a finding only when `emit` would write it.
        let tw_due = tw >= self.cfg.time_wait_pileup && self.due(Pattern::TimeWaitPileup, &key, tw);
        let rst_due = rst >= self.cfg.rst_storm
            && rst * 2 >= closes
            && self.due(Pattern::RstStorm, &key, rst);
        let cancel_due =
            cancels >= self.cfg.cancel_storm && self.due(Pattern::StreamCancelStorm, &key, cancels);
        if !tw_due && !rst_due && !cancel_due {
            return;
        }
        let Some(p) = self.processes.get(&tgid) else {
            return;
        };
        let comm = p.comm.clone();
        let ids = |q: &VecDeque<(u64, SocketId)>| -> Vec<String> {
            q.iter()
                .rev()
                .take(MAX_EVIDENCE)
                .map(|x| x.1.to_string())
                .collect()
        };
        let (tw_ids, rst_ids) = (ids(&p.time_waits), ids(&p.resets));
        // One entry per cancelled stream, so that the finding is updated as they double; `emit`
        // folds repeats of a connection.
        let cancel_ids: Vec<String> = p.cancels.iter().rev().map(|c| c.1.to_string()).collect();
        let who = format!("{comm} (pid {tgid})");
        let w = ms(self.cfg.window_ns);
        if tw_due {
            let summary = format!(
                "{who} closed {tw} connections first within {w}, each leaving a TIME_WAIT socket behind: connections are not being reused."
            );
            let f = self.finding(
                Pattern::TimeWaitPileup,
                &key,
                json!({"connections": tw, "time_wait": tw}),
                0.9,
                tw_ids,
                summary,
            );
            self.emit(Pattern::TimeWaitPileup, &key, f, out);
        }
        if rst_due {
            let summary = format!(
                "{who} saw {rst} resets within {w} ({closes} connections closed): connections end in RSTs, not FINs."
            );
            let f = self.finding(
                Pattern::RstStorm,
                &key,
                json!({"connections": rst, "resets": rst, "closes": closes}),
                0.9,
                rst_ids,
                summary,
            );
            self.emit(Pattern::RstStorm, &key, f, out);
        }
        if cancel_due {
            let by = if sent * 2 >= cancels {
                "it cancelled them itself: its callers gave up on the requests"
            } else {
                "its peers cancelled them: their callers gave up on the requests"
            };
            let mut summary = format!(
                "{who} saw {cancels} HTTP/2 streams cancelled with RST_STREAM(CANCEL) within {w} ({sent} sent, {} received): {by} (deadlines, client aborts).",
                cancels - sent
            );
            let churn = self
                .groups
                .iter()
                .any(|(k, g)| k.tgid == tgid && g.findings.contains(&Pattern::ProxyUpstreamChurn));
            if churn {
                summary.push_str(" This process also churns its upstream connections (proxy-upstream-churn): a proxy that tears down an upstream connection for every cancelled stream.");
            }
            let f = self.finding(
                Pattern::StreamCancelStorm,
                &key,
                json!({
                    "connections": cancel_ids.iter().collect::<BTreeSet<_>>().len(),
                    "cancelled_streams": cancels, "sent": sent, "received": cancels - sent,
                }),
                0.9,
                cancel_ids,
                summary,
            );
            self.emit(Pattern::StreamCancelStorm, &key, f, out);
        }
    }

    fn check_close_wait(&mut self, out: &mut Vec<Finding>) {
        let limit = self.cfg.close_wait_stuck_ns;
        let now = self.now;
        self.close_wait_checked_ns = now;
        // Per group: the stuck sockets, and the process name the first of them carried.
        let mut stuck: BTreeMap<GroupKey, (Vec<(SocketId, u64)>, String)> = BTreeMap::new();
        for (id, w) in &self.close_wait {
            if now.saturating_sub(w.since_ns) > limit {
                let e = stuck.entry(w.key.clone()).or_default();
                e.0.push((*id, now - w.since_ns));
                if e.1.is_empty() {
                    e.1 = w.comm.to_string();
                }
            }
        }
        for (key, (socks, sock_comm)) in stuck {
            let longest = socks.iter().map(|s| s.1).max().unwrap_or(0);
            let comm = self.process_name(&key).map_or(sock_comm, str::to_string);
            let who = match (key.tgid, comm.is_empty()) {
                (0, _) => "a process".to_string(),
                (pid, true) => format!("pid {pid}"),
                (pid, false) => format!("{comm} (pid {pid})"),
            };
            let summary = format!(
                "{} connection(s) of {who} with {} were closed by the peer {} ago and are still in CLOSE_WAIT: the application has not noticed the close, or leaks the sockets.",
                socks.len(),
                key.peer,
                ms(longest)
            );
            let numbers = json!({"connections": socks.len(), "close_wait_longest_ns": longest});
            let ids = socks.iter().map(|s| s.0.to_string()).collect();
            let mut f = self.finding(Pattern::CloseWaitStuck, &key, numbers, 0.9, ids, summary);
            f.comm = comm;
            // The window of this finding is the longest dwell.
            f.window_start_ns = now.saturating_sub(longest);
            self.emit(Pattern::CloseWaitStuck, &key, f, out);
        }
    }

    /// End of the stream at kernel time `end_ns`: last checks, then the per-peer table.
    pub fn finish(&mut self, end_ns: u64, out: &mut Vec<Finding>) -> Vec<PeerSummary> {
        self.now = self.now.max(end_ns);
        self.check_close_wait(out);
        // Busy groups were evaluated every CHECK_EVERY_NS: once more with everything seen.
        let keys: Vec<GroupKey> = self.groups.keys().cloned().collect();
        for k in &keys {
            self.check_group(k, out);
        }
        let cw = self.close_wait_by_group();
        self.groups
            .iter()
            .map(|(k, g)| self.summarize(k, g, None, cw.get(k)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_counts_overlaps_not_back_to_back() {
        assert_eq!(max_concurrent([(0, 10), (10, 20), (20, 30)].into_iter()), 1);
        assert_eq!(
            max_concurrent([(0, 10), (5, 20), (6, 7), (15, 30)].into_iter()),
            3
        );
        assert_eq!(max_concurrent(std::iter::empty()), 0);
    }

    #[test]
    fn windows_report_each_active_peer_once_per_window() {
        let cfg = DetectConfig {
            window_ns: 1_000_000_000,
            ..DetectConfig::default()
        };
        let mut d = Detector::new(cfg);
        let mut out = Vec::new();
        // One short connection every 100 ms for 3.5 s, then a quiet gap and one more.
        let times: Vec<u64> = (0..35)
            .map(|i| i * 100_000_000)
            .chain([9_000_000_000])
            .collect();
        for (i, &t) in times.iter().enumerate() {
            let ev = closed(i as u64, t, "10.0.0.2:80", None);
            d.on_event(&ev, crate::correlate::of_event(&ev), &mut out);
        }
        let (at, w): (Vec<u64>, Vec<PeerSummary>) = d.take_windows().into_iter().unzip();
        // Windows of 1 s from the first event: three full, one with the last five; the quiet
        // ones before the connection at 9 s are skipped, and its own window is still open.
        assert_eq!(w.len(), 4, "{w:?}");
        assert_eq!(
            w.iter().map(|p| p.connections).collect::<Vec<_>>(),
            [10, 10, 10, 5]
        );
        assert_eq!(w[1].window.unwrap().0, w[0].window.unwrap().1);
        assert_eq!(w[0].ends.get("fin"), Some(&10));
        assert!(
            at.iter()
                .zip(&w)
                .all(|(t, p)| Some(*t) == p.window.map(|w| w.1))
        );
    }

    /// A connection to `remote` that the client closed first, from `t` to `t + 2 ms`.
    fn closed(id: u64, t: u64, remote: &str, tgid: Option<u32>) -> Event {
        use crate::event::{Life, Transition};
        use h2trace_common::tcp_state::*;
        let mut ev = socket_event(id, t + 2_000_000, remote, tgid);
        ev.socket.id.start_ns = t;
        ev.body = Body::Life(Box::new(Life {
            first_state: CLOSE,
            transitions: [
                (t, SYN_SENT),
                (t + 1_000, ESTABLISHED),
                (t + 1_000_000, FIN_WAIT1),
                (t + 2_000_000, CLOSE),
            ]
            .map(|(ts_ns, state)| Transition { ts_ns, state })
            .into_iter()
            .collect(),
            ..Life::default()
        }));
        ev
    }

    /// An event of a client socket to `remote` at `t` (a state change to CLOSE_WAIT).
    fn socket_event(id: u64, t: u64, remote: &str, tgid: Option<u32>) -> Event {
        use crate::event::{Origin, Owner, OwnerSource, Socket};
        Event {
            ts_ns: t,
            cpu: 0,
            socket: Socket {
                id: SocketId {
                    skaddr: id,
                    start_ns: 0,
                },
                netns: 1,
                local: "10.0.0.1:40000".parse().unwrap(),
                remote: remote.parse().unwrap(),
                owner: tgid.map(|tgid| Owner {
                    tgid,
                    pid: tgid,
                    comm: "client".into(),
                    cgroup_id: 1,
                    cgroup_path: None,
                    source: OwnerSource::Connect,
                }),
                origin: Origin::Active,
            },
            body: Body::State {
                old: h2trace_common::tcp_state::ESTABLISHED,
                new: h2trace_common::tcp_state::CLOSE_WAIT,
            },
        }
    }

    #[test]
    fn past_max_peers_the_least_recently_active_are_dropped_and_the_one_offs_summed() {
        let cfg = DetectConfig {
            max_peers: 8,
            ..DetectConfig::default()
        };
        let min_conns = cfg.min_conns as u64;
        let mut d = Detector::new(cfg);
        let mut out = Vec::new();
        let mut written = Vec::new();
        let mut feed = |d: &mut Detector, id: u64, t: u64, remote: &str| {
            let ev = closed(id, t, remote, Some(7));
            d.on_event(&ev, crate::correlate::of_event(&ev), &mut out);
            assert!(d.groups.len() <= 8);
            written.extend(d.take_windows());
        };
        // A busy peer first (`min_conns` connections), then 20 peers of one connection
        // each, 10 ms apart; the first of them comes back last.
        for j in 0..min_conns {
            feed(&mut d, 1000 + j, j * 1_000_000, "10.0.2.1:80");
        }
        let t0 = 100_000_000;
        for i in 0..21u64 {
            feed(
                &mut d,
                i,
                t0 + i * 10_000_000,
                &format!("10.0.1.{}:80", i % 20),
            );
        }
        // The busy peer went first, written out with its numbers; the one-off peers that
        // went after it (the oldest, one at a time) were added into `other peers`.
        assert_eq!(written.len(), 1, "{written:#?}");
        let (_, busy) = &written[0];
        assert!(busy.forgotten && busy.window.is_none());
        assert_eq!(
            (busy.peer.to_string(), busy.connections, busy.tgid),
            ("10.0.2.1:80".to_string(), min_conns, 7)
        );
        // The table at the end: `other peers` and the 7 newest.
        let last = d.finish(t0 + 300_000_000, &mut out);
        assert_eq!(last.len(), 8);
        let others: Vec<&PeerSummary> = last.iter().filter(|p| p.peer == Peer::Others).collect();
        assert_eq!(others.len(), 1);
        let o = others[0];
        assert_eq!((o.connections, o.tgid, o.forgotten), (14, 7, false));
        assert_eq!(o.ends.values().sum::<u64>(), 14);
        // Every one lived 2 ms.
        assert_eq!(o.lifetime_p50_ns / 1_000_000, 2);
        assert_eq!(d.peers_forgotten, 1 + 14);
        let kept: Vec<String> = last
            .iter()
            .filter(|p| p.peer != Peer::Others)
            .map(|p| p.peer.to_string())
            .collect();
        let mut expected: Vec<String> = (14..20).map(|i| format!("10.0.1.{i}:80")).collect();
        expected.push("10.0.1.0:80".to_string());
        expected.sort();
        assert_eq!(kept, expected);
        let total: u64 = last
            .iter()
            .chain(written.iter().map(|(_, p)| p))
            .map(|p| p.connections)
            .sum();
        assert_eq!(
            total,
            min_conns + 21,
            "every connection is in exactly one peer's numbers"
        );
    }

    #[test]
    fn a_process_quiet_for_a_whole_window_is_dropped() {
        let mut d = Detector::new(DetectConfig::default());
        let mut out = Vec::new();
        for (i, tgid) in [(0, 7), (1, 8)] {
            let ev = closed(i, 0, "10.0.0.2:80", Some(tgid));
            d.on_event(&ev, crate::correlate::of_event(&ev), &mut out);
        }
        assert_eq!(d.processes.len(), 2);
        // Process 8 stays busy; 7 says nothing for more than a window.
        for i in 2..30 {
            let ev = closed(i, i * 1_000_000_000, "10.0.0.2:80", Some(8));
            d.on_event(&ev, crate::correlate::of_event(&ev), &mut out);
        }
        assert_eq!(d.processes.keys().copied().collect::<Vec<_>>(), [8]);
    }

    #[test]
    fn syns_that_met_the_peers_old_connection_are_a_port_reuse_collision() {
        let mut d = Detector::new(DetectConfig::default());
        let mut out = Vec::new();
        // One connection a second to the same peer; from the third on, each SYN meets the
        // peer's older connection on the same ports and goes again 0.4 ms later.
        for i in 0..6u64 {
            let t = i * 1_000_000_000;
            let mut ev = closed(i, t, "10.0.0.2:80", Some(7));
            if i >= 2 {
                let Body::Life(l) = &mut ev.body else {
                    unreachable!()
                };
                l.transitions[1].ts_ns = t + 500_000;
                l.resets_sent = 1;
                l.first_reset_sent_ns = Some(t + 50_000);
                l.retransmits = 1;
                l.last_retransmit_ns = Some(t + 400_000);
            }
            d.on_event(&ev, crate::correlate::of_event(&ev), &mut out);
        }
        let hits: Vec<&Finding> = out
            .iter()
            .filter(|f| f.pattern == Pattern::PortReuseCollision)
            .collect();
        // Named at the third such connection; the fourth does not double the evidence.
        assert_eq!(hits.len(), 1, "{out:#?}");
        let f = hits[0];
        assert_eq!(f.numbers["connections"], 3);
        // Two significant digits.
        let p50 = f.numbers["handshake_p50_ns"].as_u64().unwrap();
        assert!((495_000..=505_000).contains(&p50), "{p50}");
        assert_eq!(f.peer.to_string(), "10.0.0.2:80");
        // They ended with a FIN like the others: the reset was the handshake's.
        assert!(out.iter().all(|f| f.pattern != Pattern::RstStorm));
    }

    #[test]
    fn stuck_close_waits_are_reported_as_they_cross_the_limit() {
        let mut d = Detector::new(DetectConfig::default());
        let limit = d.cfg.close_wait_stuck_ns;
        let mut out = Vec::new();
        // Two sockets enter CLOSE_WAIT at 0, two more at 1 s, and stay.
        for (id, t) in [(1, 0), (2, 0), (3, 1_000_000_000), (4, 1_000_000_000)] {
            d.on_event(&socket_event(id, t, "10.0.0.2:80", Some(7)), None, &mut out);
        }
        let stuck = |out: &mut Vec<Finding>| -> Vec<(&'static str, u64)> {
            out.drain(..)
                .filter(|f| f.pattern == Pattern::CloseWaitStuck)
                .map(|f| (f.status, f.numbers["connections"].as_u64().unwrap()))
                .collect()
        };
        d.advance(limit, &mut out);
        assert!(
            stuck(&mut out).is_empty(),
            "exactly at the limit is not past it"
        );
        d.advance(limit + 1, &mut out);
        // Named after the process the sockets carried: it has no group of its own yet (no
        // connection of it has closed), or has one no longer (forgotten past `max_peers`).
        let f = out.iter().find(|f| f.pattern == Pattern::CloseWaitStuck);
        let f = f.expect("a stuck finding");
        assert_eq!(f.comm, "client");
        assert!(
            f.summary.contains(" of client (pid 7) with "),
            "{}",
            f.summary
        );
        assert_eq!(stuck(&mut out), [("new", 2)]);
        // Nothing new crosses: nothing more to say, however often time advances.
        for t in [limit + 2, limit + 500_000_000] {
            d.advance(t, &mut out);
        }
        assert!(stuck(&mut out).is_empty());
        // The other two cross: twice the evidence, an update.
        d.advance(limit + 1_000_000_001, &mut out);
        assert_eq!(stuck(&mut out), [("update", 4)]);
        // One closes; the rest stay stuck and the finding stands.
        let mut ev = closed(1, 0, "10.0.0.2:80", Some(7));
        ev.ts_ns = limit + 2_000_000_000;
        d.on_event(&ev, crate::correlate::of_event(&ev), &mut out);
        assert!(stuck(&mut out).is_empty());
        assert_eq!(d.close_wait.len(), 3);
        assert_eq!(d.close_wait_since.len(), 3);
    }

    /// Idle closes of HTTP/2 connections: announced with GOAWAY (the client then closes
    /// first), or a bare FIN from the peer.
    #[test]
    fn http2_says_whose_idle_timeout_it_was() {
        use crate::{
            event::{Life, Origin, Socket, Transition},
            http2::{Frames, GoAway, Side, Streams},
        };
        use h2trace_common::tcp_state::*;
        let run = |goaway: bool| {
            let mut d = Detector::new(DetectConfig::default());
            let mut out = Vec::new();
            for i in 0..4u64 {
                let t = i * 2_000_000_000;
                let (idle, close) = (t + 10_000_000, t + 510_000_000);
                // With GOAWAY the client closes first, right after it; else the peer's FIN.
                let states: &[(u64, u8)] = if goaway {
                    &[
                        (close, FIN_WAIT1),
                        (close + 1_000, FIN_WAIT2),
                        (close + 2_000, CLOSE),
                    ]
                } else {
                    &[
                        (close, CLOSE_WAIT),
                        (close + 1_000, LAST_ACK),
                        (close + 2_000, CLOSE),
                    ]
                };
                let mut transitions = vec![(t, SYN_SENT), (t + 1_000, ESTABLISHED)];
                transitions.extend_from_slice(states);
                let frames = goaway.then(|| {
                    let mut f = Frames::default();
                    f.received.goaway = Some(GoAway {
                        ktime_ns: close - 100_000,
                        idle_before_ns: close - 100_000 - idle,
                        last_stream_id: 1,
                        code: http2::NO_ERROR,
                        error: "NO_ERROR",
                        debug: String::new(),
                    });
                    Box::new(f)
                });
                let ev = Event {
                    ts_ns: close + 2_000,
                    cpu: 0,
                    socket: Socket {
                        id: SocketId {
                            skaddr: i,
                            start_ns: t,
                        },
                        netns: 1,
                        local: "10.0.0.1:40000".parse().unwrap(),
                        remote: "10.0.0.2:443".parse().unwrap(),
                        owner: None,
                        origin: Origin::Active,
                    },
                    body: Body::Life(Box::new(Life {
                        first_state: CLOSE,
                        transitions: transitions
                            .into_iter()
                            .map(|(ts_ns, state)| Transition { ts_ns, state })
                            .collect(),
                        bytes_sent: 100,
                        bytes_received: 100,
                        last_send_ns: Some(idle),
                        last_recv_ns: Some(if goaway { close - 100_000 } else { idle }),
                        http2: Streams {
                            side: Some(Side::Client),
                            opened_local: 1,
                            ..Streams::default()
                        },
                        frames,
                        ..Life::default()
                    })),
                };
                d.on_event(&ev, crate::correlate::of_event(&ev), &mut out);
            }
            out.into_iter()
                .find(|f| f.pattern == Pattern::IdleCloseByPeer)
                .expect("idle close by peer")
        };
        // The finding is first written at the third close (`min_idle_closes`).
        let announced = run(true);
        assert!(
            announced.summary.contains("HTTP/2 confirms it"),
            "{}",
            announced.summary
        );
        assert_eq!(announced.numbers["goaway_before_close"], 3);
        let idle = announced.numbers["idle_before_close_p50_ns"]
            .as_u64()
            .unwrap();
        assert!((480_000_000..520_000_000).contains(&idle), "{idle}");
        let bare = run(false);
        assert!(bare.summary.contains("bare FIN"), "{}", bare.summary);
        assert_eq!(bare.numbers["goaway_before_close"], 0);
    }

    #[test]
    fn clusters_need_four_fifths_within_the_jitter() {
        assert!(clustered(&[700, 720, 690, 710, 705], 0.2).is_some());
        assert!(clustered(&[700, 100, 690, 2000, 705], 0.2).is_none());
        assert!(clustered(&[0, 0, 0], 0.2).is_none());
    }
}
