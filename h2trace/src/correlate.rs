//! What a socket life means: derived facts of one connection. Pure function of its events.
use h2trace_common::tcp_state::*;

use crate::event::{FinFirst, Life, Origin, Socket};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
    Unknown,
}

impl Role {
    pub fn of(s: &Socket) -> Self {
        match s.origin {
            Origin::Active => Self::Client,
            Origin::Passive => Self::Server,
            Origin::MidLife | Origin::Snapshot => Self::Unknown,
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EndKind {
    /// Orderly FIN exchange.
    Fin,
    /// This side reset the connection (e.g. SO_LINGER 0, close with unread data).
    ResetSent,
    /// The peer reset the connection.
    ResetReceived,
    /// This side aborted after closing because data still arrived (the kernel reports this as
    /// a received reset followed by a RST it sends itself).
    LocalAbort,
    /// Retransmissions ran out: no answer from the peer.
    Timeout,
    /// Never established (refused or unanswered connect, or a dropped handshake).
    ConnectFailed,
    /// Still open when tracing stopped.
    Open,
}

impl EndKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fin => "fin",
            Self::ResetSent => "rst-sent",
            Self::ResetReceived => "rst-received",
            Self::LocalAbort => "local-abort",
            Self::Timeout => "timeout",
            Self::ConnectFailed => "connect-failed",
            Self::Open => "open",
        }
    }

    pub const ALL: [EndKind; 7] = [
        Self::Fin,
        Self::ResetSent,
        Self::ResetReceived,
        Self::LocalAbort,
        Self::Timeout,
        Self::ConnectFailed,
        Self::Open,
    ];
}

/// What the first bytes a socket sent say about the protocol (`--peek`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.x request ("GET ", "POST", …) or response ("HTTP/1.").
    Http1,
    /// HTTP/2 in cleartext: the client preface ("PRI * HTTP/2.0") or a server's SETTINGS frame.
    H2c,
    /// A TLS record (handshake or alert).
    Tls,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http/1",
            Self::H2c => "h2c",
            Self::Tls => "tls",
        }
    }

    pub fn of(first: &[u8]) -> Option<Self> {
        const METHODS: [&[u8]; 8] = [
            b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN",
        ];
        if first.is_empty() {
            return None; // not captured (no --peek): the usual case, asked for every record
        }
        if first.starts_with(b"HTTP/1.") || METHODS.iter().any(|m| first.starts_with(m)) {
            Some(Self::Http1)
        } else if first.starts_with(b"PRI * HT")
            || first.len() >= 8
                && first[0] == 0
                && first[3] == 4
                && first[4] & !1 == 0
                && first[5..8] == [0, 0, 0]
        {
            // A server's first frame is SETTINGS: 24-bit length, type 4, flags, stream 0.
            Some(Self::H2c)
        } else if first.len() >= 3
            && matches!(first[0], 0x14..=0x17)
            && first[1] == 0x03
            && first[2] <= 0x04
        {
            Some(Self::Tls)
        } else {
            None
        }
    }
}

/// A received RST this close to a sent one, on a socket this side had already closed, is the
/// kernel aborting the socket itself, not the peer resetting it.
const LOCAL_ABORT_WINDOW_NS: u64 = 1_000_000;

/// Derived facts about one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub role: Role,
    pub start_ns: u64,
    pub established_ns: Option<u64>,
    /// When the socket reached CLOSE, or `end_ns` if it is still open.
    pub end_ns: u64,
    /// From established (or start) to end.
    pub lifetime_ns: u64,
    /// When the close began: the first transition out of ESTABLISHED.
    pub close_start_ns: Option<u64>,
    /// From the last byte sent or received (or establishment) to the start of the close.
    pub idle_before_close_ns: Option<u64>,
    pub fin_first: FinFirst,
    pub end: EndKind,
    /// Time spent in CLOSE_WAIT (until the application closed, or until `end_ns`).
    pub close_wait_ns: Option<u64>,
    /// The socket went FIN_WAIT2/CLOSING → CLOSE: a TIME_WAIT socket took over.
    pub time_wait: bool,
    /// Idle gap before retransmissions or a reset into the silence, for black-hole and
    /// reset-after-idle diagnoses: from the last byte received to the last send (retransmitted),
    /// or to the RST.
    pub silent_gap_ns: Option<u64>,
    /// From the first bytes sent, when captured (`--peek`).
    pub protocol: Option<Protocol>,
    /// This side sent a RST before the connection was established, and it was established
    /// after all: its SYN met a connection the peer still held on the same ports (the peer
    /// answered with an ACK for that one, which this side reset), and was sent again.
    pub handshake_reset: bool,
}

fn first_at(l: &Life, pred: impl Fn(u8) -> bool) -> Option<u64> {
    l.transitions
        .iter()
        .find(|t| pred(t.state))
        .map(|t| t.ts_ns)
}

/// A child socket the kernel created and threw away at once: two CPUs handled the last ACK of
/// the same handshake (the client's ACK and its first data segment, say), each cloned the
/// listener, and the one that lost `inet_ehash_nolisten` in `inet_csk_complete_hashdance` was
/// closed from SYN_RECV (`tcp_done`) having sent and received nothing. Not a connection, and
/// not a failed handshake: the other child carries the connection.
pub fn discarded_child(s: &Socket, l: &Life) -> bool {
    s.origin == Origin::Passive
        && l.first_state == LISTEN
        && l.states().skip(1).eq([SYN_RECV, CLOSE])
        && l.bytes_sent == 0
        && l.bytes_received == 0
        && l.resets_sent == 0
        && l.resets_received == 0
        && l.retransmits == 0
}

/// The derived facts of a connection record (`connection-closed` or `connection-open`), computed
/// once per record: the pipeline hands them to both the output and the detector.
pub fn of_event(ev: &crate::event::Event) -> Option<Facts> {
    match &ev.body {
        crate::event::Body::Life(l) => Some(facts(&ev.socket, l, false, ev.ts_ns)),
        crate::event::Body::Open(l) => Some(facts(&ev.socket, l, true, ev.ts_ns)),
        _ => None,
    }
}

/// `end_ns` is when the record was produced (the socket's destruction, or the end of tracing).
pub fn facts(s: &Socket, l: &Life, open: bool, end_ns: u64) -> Facts {
    let start_ns = s.id.start_ns;
    let established_ns =
        first_at(l, |st| st == ESTABLISHED).or((l.first_state == ESTABLISHED).then_some(start_ns));
    let closed = first_at(l, |st| st == CLOSE);
    let end = closed.filter(|_| !open).unwrap_or(end_ns);
    // The close begins with the first transition out of ESTABLISHED.
    let close_start_ns = l
        .states()
        .zip(l.transitions.iter())
        .find(|(from, _)| *from == ESTABLISHED)
        .map(|(_, t)| t.ts_ns);
    let last_activity = [l.active_before_close_ns, established_ns]
        .into_iter()
        .flatten()
        .max();
    let idle_before_close_ns = match (close_start_ns, last_activity) {
        (Some(c), Some(a)) => Some(c.saturating_sub(a)),
        _ => None,
    };
    let close_wait_ns = l
        .transitions
        .iter()
        .position(|t| t.state == CLOSE_WAIT)
        .map(|i| {
            let next = l.transitions.get(i + 1).map_or(end, |t| t.ts_ns);
            next.saturating_sub(l.transitions[i].ts_ns)
        });
    // Consecutive states, without collecting them: this runs for every record written.
    let steps = || l.states().zip(l.transitions.iter().map(|t| t.state));
    // Not how the connection ended, nor are the handshake's retransmissions (the SYN again).
    let handshake_reset = established_ns
        .zip(l.first_reset_sent_ns)
        .is_some_and(|(e, r)| r < e);
    // Saturating: a replayed record need not be consistent.
    let resets_sent = l.resets_sent.saturating_sub(u16::from(handshake_reset));
    let retransmitted_after_handshake = l.retransmits > 0
        && established_ns
            .zip(l.last_retransmit_ns)
            .is_none_or(|(e, r)| r >= e);
    let no_rst = resets_sent == 0 && l.resets_received == 0;
    let time_wait = no_rst && steps().any(|w| matches!(w, (FIN_WAIT2, CLOSE) | (CLOSING, CLOSE)));
    let local_closed_first = matches!(l.fin_first(), FinFirst::Local | FinFirst::Simultaneous);
    let kind = if open {
        EndKind::Open
    } else if established_ns.is_none() && l.first_state != ESTABLISHED {
        EndKind::ConnectFailed
    } else if l.resets_received > 0 && resets_sent > 0 && local_closed_first && {
        let (r, t) = (
            l.first_reset_received_ns.unwrap_or(0),
            l.first_reset_sent_ns.unwrap_or(u64::MAX),
        );
        r.abs_diff(t) <= LOCAL_ABORT_WINDOW_NS
    } {
        EndKind::LocalAbort
    } else if l.resets_received > 0 {
        EndKind::ResetReceived
    } else if resets_sent > 0 {
        EndKind::ResetSent
    } else if retransmitted_after_handshake && steps().any(|w| w == (ESTABLISHED, CLOSE)) {
        EndKind::Timeout
    } else {
        EndKind::Fin
    };
    let last_recv = [l.last_recv_ns, established_ns].into_iter().flatten().max();
    // The silence before the trouble: the longest idle gap before a new request, if that
    // request came before the reset or the retransmissions; else from the last byte received.
    let trouble = match kind {
        EndKind::ResetReceived => l.first_reset_received_ns,
        _ if retransmitted_after_handshake => l.last_retransmit_ns,
        _ => None,
    };
    let silent_gap_ns = trouble.and_then(|t| match l.longest_request_gap {
        Some((gap, end)) if end <= t => Some(gap),
        _ => last_recv.map(|r| match kind {
            EndKind::ResetReceived => t.saturating_sub(r),
            _ => l.last_send_ns.unwrap_or(t).saturating_sub(r),
        }),
    });
    Facts {
        role: Role::of(s),
        start_ns,
        established_ns,
        end_ns: end,
        lifetime_ns: end.saturating_sub(established_ns.unwrap_or(start_ns)),
        close_start_ns,
        idle_before_close_ns,
        fin_first: l.fin_first(),
        end: kind,
        close_wait_ns,
        time_wait,
        silent_gap_ns,
        protocol: Protocol::of(&l.first_bytes),
        handshake_reset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{SocketId, Transition};

    fn sock(origin: Origin) -> Socket {
        Socket {
            id: SocketId {
                skaddr: 1,
                start_ns: 1_000,
            },
            netns: 1,
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.2:80".parse().unwrap(),
            owner: None,
            origin,
        }
    }

    fn life(first: u8, steps: &[(u64, u8)]) -> Life {
        Life {
            first_state: first,
            transitions: steps
                .iter()
                .map(|&(ts_ns, state)| Transition { ts_ns, state })
                .collect(),
            ..Life::default()
        }
    }

    #[test]
    fn a_child_discarded_in_a_handshake_race_is_no_connection() {
        let race = life(LISTEN, &[(1_000, SYN_RECV), (1_100, CLOSE)]);
        assert!(discarded_child(&sock(Origin::Passive), &race));
        assert!(!discarded_child(&sock(Origin::Active), &race));
        // A Fast Open child reset by its client, or one that talked, is a connection.
        let mut reset = race.clone();
        reset.resets_received = 1;
        assert!(!discarded_child(&sock(Origin::Passive), &reset));
        let mut talked = race.clone();
        talked.bytes_received = 10;
        assert!(!discarded_child(&sock(Origin::Passive), &talked));
        let served = life(
            LISTEN,
            &[(1_000, SYN_RECV), (1_100, ESTABLISHED), (9_000, CLOSE)],
        );
        assert!(!discarded_child(&sock(Origin::Passive), &served));
    }

    #[test]
    fn client_closing_first_enters_time_wait() {
        let mut l = life(
            CLOSE,
            &[
                (1_000, SYN_SENT),
                (2_000, ESTABLISHED),
                (10_000, FIN_WAIT1),
                (11_000, FIN_WAIT2),
                (12_000, CLOSE),
            ],
        );
        l.last_send_ns = Some(3_000);
        l.last_recv_ns = Some(4_000);
        l.active_before_close_ns = Some(4_000);
        let f = facts(&sock(Origin::Active), &l, false, 20_000);
        assert_eq!(f.role, Role::Client);
        assert_eq!(f.end, EndKind::Fin);
        assert_eq!(f.fin_first, FinFirst::Local);
        assert!(f.time_wait);
        assert_eq!(f.lifetime_ns, 10_000);
        assert_eq!(f.idle_before_close_ns, Some(6_000));
        assert_eq!(f.close_wait_ns, None);
    }

    #[test]
    fn a_reset_in_the_handshake_is_not_how_the_connection_ended() {
        // As recorded: the SYN met a connection the server still held in CLOSE_WAIT on the
        // same ports, its ACK was reset (TCP_INVALID_ACK_SEQUENCE), the SYN went again.
        let handshake = [
            (1_000, SYN_SENT),
            (11_000_000, ESTABLISHED),
            (11_200_000, FIN_WAIT1),
            (11_300_000, FIN_WAIT2),
            (11_400_000, CLOSE),
        ];
        let mut l = life(CLOSE, &handshake);
        l.resets_sent = 1;
        l.first_reset_sent_ns = Some(45_000);
        l.retransmits = 1;
        l.last_retransmit_ns = Some(10_000_000);
        let f = facts(&sock(Origin::Active), &l, false, 12_000_000);
        assert_eq!(f.end, EndKind::Fin);
        assert!(f.handshake_reset && f.time_wait);
        assert_eq!(f.silent_gap_ns, None);
        // A second reset, at the end, is how it ended.
        l.resets_sent = 2;
        let f = facts(&sock(Origin::Active), &l, false, 12_000_000);
        assert_eq!(f.end, EndKind::ResetSent);
        assert!(f.handshake_reset && !f.time_wait);
        // A reset after establishment is not the handshake's.
        l.resets_sent = 1;
        l.first_reset_sent_ns = Some(11_100_000);
        let f = facts(&sock(Origin::Active), &l, false, 12_000_000);
        assert_eq!(f.end, EndKind::ResetSent);
        assert!(!f.handshake_reset);
        // Nor is a handshake that never completed: the connect failed.
        let mut never = life(CLOSE, &[(1_000, SYN_SENT), (3_000_000, CLOSE)]);
        never.resets_sent = 1;
        never.first_reset_sent_ns = Some(45_000);
        let f = facts(&sock(Origin::Active), &never, false, 4_000_000);
        assert_eq!(f.end, EndKind::ConnectFailed);
        assert!(!f.handshake_reset);
    }

    #[test]
    fn peer_close_and_close_wait_dwell() {
        let l = life(
            LISTEN,
            &[
                (1_000, SYN_RECV),
                (1_500, ESTABLISHED),
                (5_000, CLOSE_WAIT),
                (9_000, LAST_ACK),
                (9_500, CLOSE),
            ],
        );
        let f = facts(&sock(Origin::Passive), &l, false, 9_600);
        assert_eq!(
            (f.role, f.fin_first, f.end),
            (Role::Server, FinFirst::Peer, EndKind::Fin)
        );
        assert_eq!(f.close_wait_ns, Some(4_000));
        assert!(!f.time_wait);
        // Still in CLOSE_WAIT at exit: the dwell runs to the end of tracing.
        let l = life(
            LISTEN,
            &[(1_000, SYN_RECV), (1_500, ESTABLISHED), (5_000, CLOSE_WAIT)],
        );
        let f = facts(&sock(Origin::Passive), &l, true, 8_000);
        assert_eq!((f.end, f.close_wait_ns), (EndKind::Open, Some(3_000)));
    }

    #[test]
    fn reset_direction_comes_from_the_evidence() {
        // A reset received while established: the peer reset us.
        let mut l = life(
            CLOSE,
            &[(1_000, SYN_SENT), (2_000, ESTABLISHED), (9_000, CLOSE)],
        );
        l.resets_received = 1;
        l.first_reset_received_ns = Some(9_000);
        l.last_recv_ns = Some(3_000);
        let f = facts(&sock(Origin::Active), &l, false, 9_100);
        assert_eq!(f.end, EndKind::ResetReceived);
        assert_eq!(f.silent_gap_ns, Some(6_000));
        // After our own FIN, "received" and sent within the same instant: a local abort.
        let mut l = life(
            CLOSE,
            &[
                (1_000, SYN_SENT),
                (2_000, ESTABLISHED),
                (3_000, FIN_WAIT1),
                (4_000, FIN_WAIT2),
                (5_000, CLOSE),
            ],
        );
        l.resets_received = 1;
        l.resets_sent = 1;
        l.first_reset_received_ns = Some(5_000);
        l.first_reset_sent_ns = Some(5_010);
        assert_eq!(
            facts(&sock(Origin::Active), &l, false, 6_000).end,
            EndKind::LocalAbort
        );
    }

    #[test]
    fn first_bytes_name_the_protocol() {
        assert_eq!(Protocol::of(b"GET / HT"), Some(Protocol::Http1));
        assert_eq!(Protocol::of(b"HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(Protocol::of(b"PRI * HT"), Some(Protocol::H2c));
        // A server's SETTINGS frame: length 0x000012, type 4, flags 0.
        assert_eq!(
            Protocol::of(&[0, 0, 0x12, 4, 0, 0, 0, 0]),
            Some(Protocol::H2c)
        );
        assert_eq!(
            Protocol::of(&[0x16, 3, 1, 2, 0, 1, 0, 1]),
            Some(Protocol::Tls)
        );
        assert_eq!(Protocol::of(b"\x00\x00\x00\x00"), None);
        assert_eq!(Protocol::of(b""), None);
        assert_eq!(Protocol::of(b"ping"), None);
    }

    #[test]
    fn timeouts_and_failed_connects() {
        let mut l = life(
            CLOSE,
            &[(1_000, SYN_SENT), (2_000, ESTABLISHED), (30_000, CLOSE)],
        );
        l.retransmits = 8;
        l.last_recv_ns = Some(2_500);
        l.last_send_ns = Some(14_000);
        l.last_retransmit_ns = Some(20_000);
        // The request that went into the silence was sent at 12.5 µs, 10 µs after the last
        // answer; later sends (at 14 µs) do not count.
        l.longest_request_gap = Some((10_000, 12_500));
        let f = facts(&sock(Origin::Active), &l, false, 30_000);
        assert_eq!(f.end, EndKind::Timeout);
        assert_eq!(f.silent_gap_ns, Some(10_000));
        let l = life(CLOSE, &[(1_000, SYN_SENT), (2_000, CLOSE)]);
        assert_eq!(
            facts(&sock(Origin::Active), &l, false, 2_000).end,
            EndKind::ConnectFailed
        );
    }
}
