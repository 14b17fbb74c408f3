//! Conntrack entries tied to sockets. Pure: conntrack events and socket lives in, joins out.
//!
//! A socket `(local, remote)` belongs to an entry when it equals the entry's original tuple
//! (the side that opened it, seen before NAT) or its reply tuple (the side that answered,
//! seen after NAT). That holds in any namespace: a client in one namespace, the router's
//! table in a second, the server in a third.
use std::collections::{BTreeMap, HashMap, VecDeque};

use super::{CtEvent, CtKind, CtNamespace, Tuple, ct_state};
use crate::event::{Life, Socket};

/// Entries remembered at most (the oldest are forgotten first, counted).
pub const MAX_ENTRIES: usize = 16_384;
/// States kept per entry.
const MAX_STATES: usize = 16;
/// Conntrack events carry the time h2trace read them, up to one drain interval late or
/// early against the socket's own times: comparisons allow this much.
pub const GRACE_NS: u64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtEnd {
    pub ts_ns: u64,
    /// Timed out (rather than deleted while it still had time left).
    pub expired: bool,
    pub state: Option<u8>,
}

/// What a middlebox's table did to a live connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtVerdict {
    /// The entry timed out in ESTABLISHED while this socket was still ESTABLISHED.
    Forgot { at_ns: u64 },
    /// The entry moved to CLOSE or TIME_WAIT while this socket stayed ESTABLISHED.
    ClosedEarly { at_ns: u64, state: u8 },
}

/// One entry as far as h2trace has seen it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub netns: u32,
    pub id: u32,
    pub orig: Tuple,
    pub reply: Tuple,
    pub zone: u16,
    pub first_ns: u64,
    /// (time, conntrack TCP state) at each change seen.
    pub states: Vec<(u64, u8)>,
    pub end: Option<CtEnd>,
}

/// An entry joined to one socket life, with what it means for that socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtJoin {
    pub entry: Entry,
    pub nat: bool,
    /// How the operator named the table's namespace (`host`, `pid:N`, a name, a path).
    pub netns_name: Option<String>,
    pub timeout_established_s: Option<u32>,
    pub verdict: Option<CtVerdict>,
}

type Key = (u32, Tuple);

#[derive(Default)]
pub struct Joiner {
    namespaces: BTreeMap<u32, CtNamespace>,
    entries: HashMap<Key, Entry>,
    /// Socket view `(local, remote)` → entries that match it.
    by_socket: HashMap<Tuple, Vec<Key>>,
    /// Keys in the order they were created, for eviction.
    order: VecDeque<Key>,
    /// Entries forgotten to stay within `MAX_ENTRIES`.
    pub evicted: u64,
}

impl Joiner {
    pub fn namespace(&mut self, ns: CtNamespace) {
        self.namespaces.insert(ns.netns, ns);
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &CtNamespace> {
        self.namespaces.values()
    }

    /// Record the event; returns the entry's state before it (the "old" of old → new).
    pub fn on_event(&mut self, ev: &CtEvent) -> Option<u8> {
        let key = (ev.netns, ev.orig);
        if ev.kind == CtKind::New || !self.entries.contains_key(&key) {
            self.insert(key, ev);
        }
        let e = self.entries.get_mut(&key).expect("inserted");
        let old = e.states.last().map(|&(_, s)| s);
        if let Some(s) = ev.state
            && old != Some(s)
        {
            if e.states.len() == MAX_STATES {
                e.states.remove(1);
            }
            e.states.push((ev.ts_ns, s));
        }
        if ev.kind == CtKind::Destroy {
            e.end = Some(CtEnd {
                ts_ns: ev.ts_ns,
                expired: ev.expired(),
                state: ev.state.or(old),
            });
        }
        old
    }

    fn insert(&mut self, key: Key, ev: &CtEvent) {
        if self.entries.contains_key(&key) {
            self.unlink(&key);
        }
        while self.entries.len() >= MAX_ENTRIES {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            if self.entries.contains_key(&k) {
                self.unlink(&k);
                self.evicted += 1;
            }
        }
        for view in [ev.orig, ev.reply] {
            let keys = self.by_socket.entry(view).or_default();
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        self.order.push_back(key);
        self.entries.insert(
            key,
            Entry {
                netns: ev.netns,
                id: ev.id,
                orig: ev.orig,
                reply: ev.reply,
                zone: ev.zone,
                first_ns: ev.ts_ns,
                states: Vec::new(),
                end: None,
            },
        );
    }

    fn unlink(&mut self, key: &Key) {
        if let Some(e) = self.entries.remove(key) {
            for view in [e.orig, e.reply] {
                if let Some(keys) = self.by_socket.get_mut(&view) {
                    keys.retain(|k| k != key);
                    if keys.is_empty() {
                        self.by_socket.remove(&view);
                    }
                }
            }
        }
        // `order` keeps the stale key; eviction skips keys no longer present.
        if self.order.len() > 2 * MAX_ENTRIES {
            let entries = &self.entries;
            self.order.retain(|k| entries.contains_key(k));
        }
    }

    /// The entry this socket life belongs to, if a followed table had one during the life.
    /// Several tables can track one connection (host and router): a verdict wins, then the
    /// latest entry.
    pub fn join(&self, s: &Socket, l: &Life, end_ns: u64) -> Option<CtJoin> {
        let view = Tuple {
            src: s.local,
            dst: s.remote,
        };
        let start = s.id.start_ns;
        self.by_socket
            .get(&view)?
            .iter()
            .filter_map(|k| self.entries.get(k))
            .filter(|e| {
                e.first_ns <= end_ns.saturating_add(GRACE_NS)
                    && e.end
                        .as_ref()
                        .is_none_or(|x| x.ts_ns.saturating_add(GRACE_NS) >= start)
            })
            .map(|e| {
                let ns = self.namespaces.get(&e.netns);
                CtJoin {
                    verdict: verdict(e, l, start),
                    nat: e.reply != e.orig.reversed(),
                    netns_name: ns.map(|n| n.name.clone()),
                    timeout_established_s: ns.and_then(|n| n.timeout_established_s),
                    entry: e.clone(),
                }
            })
            .max_by_key(|j| (j.verdict.is_some(), j.entry.first_ns))
    }
}

/// When the socket entered ESTABLISHED and when it left it.
fn established_span(l: &Life, start_ns: u64) -> Option<(u64, Option<u64>)> {
    use h2trace_common::tcp_state::ESTABLISHED;
    let mut at = (l.first_state == ESTABLISHED).then_some(start_ns);
    for t in &l.transitions {
        match at {
            None if t.state == ESTABLISHED => at = Some(t.ts_ns),
            Some(a) if t.state != ESTABLISHED => return Some((a, Some(t.ts_ns))),
            _ => {}
        }
    }
    at.map(|a| (a, None))
}

fn verdict(e: &Entry, l: &Life, start_ns: u64) -> Option<CtVerdict> {
    let (est, left) = established_span(l, start_ns)?;
    let live_at = |t: u64| est < t && left.is_none_or(|x| x.saturating_add(GRACE_NS) > t);
    if let Some(end) = &e.end
        && end.expired
        && end.state == Some(ct_state::ESTABLISHED)
        && live_at(end.ts_ns)
    {
        return Some(CtVerdict::Forgot { at_ns: end.ts_ns });
    }
    e.states
        .iter()
        .find(|&&(t, s)| {
            matches!(s, ct_state::CLOSE | ct_state::TIME_WAIT)
                && est < t
                && left.is_none_or(|x| x > t.saturating_add(GRACE_NS))
        })
        .map(|&(t, s)| CtVerdict::ClosedEarly { at_ns: t, state: s })
}

#[cfg(test)]
mod tests {
    use h2trace_common::tcp_state as tcp;

    use super::*;
    use crate::event::{Origin, SocketId, Transition};

    const S: u64 = 1_000_000_000;

    fn ct(kind: CtKind, ts: u64, state: u8, timeout: Option<u32>) -> CtEvent {
        CtEvent {
            ts_ns: ts,
            source: super::super::CtSource::Netlink,
            netns: 7,
            kind,
            id: 1,
            orig: Tuple {
                src: "10.1.0.2:40000".parse().unwrap(),
                dst: "10.2.0.2:8080".parse().unwrap(),
            },
            reply: Tuple {
                src: "10.2.0.2:8080".parse().unwrap(),
                dst: "10.2.0.1:40000".parse().unwrap(),
            },
            state: Some(state),
            timeout_s: timeout,
            status: 0,
            mark: 0,
            zone: 0,
        }
    }

    fn sock(local: &str, remote: &str) -> Socket {
        Socket {
            id: SocketId {
                skaddr: 1,
                start_ns: S,
            },
            netns: 1,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            owner: None,
            origin: Origin::Active,
        }
    }

    fn life(steps: &[(u64, u8)]) -> Life {
        Life {
            first_state: tcp::CLOSE,
            transitions: steps
                .iter()
                .map(|&(ts_ns, state)| Transition { ts_ns, state })
                .collect(),
            ..Life::default()
        }
    }

    fn joiner(events: &[CtEvent]) -> Joiner {
        let mut j = Joiner::default();
        j.namespace(CtNamespace {
            netns: 7,
            name: "router".into(),
            source: "ctnetlink".into(),
            timeout_established_s: Some(3),
            tcp_loose: Some(false),
        });
        for e in events {
            j.on_event(e);
        }
        j
    }

    #[test]
    fn expiry_under_an_established_socket_is_forgetting_on_both_sides() {
        let j = joiner(&[
            ct(CtKind::New, S, ct_state::SYN_SENT, Some(120)),
            ct(CtKind::Update, S + 1, ct_state::ESTABLISHED, Some(3)),
            ct(CtKind::Destroy, 6 * S, ct_state::ESTABLISHED, None),
        ]);
        // Client: reset 1 ms after the entry went (the router rejected its next packet).
        let client = life(&[
            (S, tcp::SYN_SENT),
            (S + 2, tcp::ESTABLISHED),
            (6 * S - 1_000, tcp::CLOSE),
        ]);
        let c = j
            .join(&sock("10.1.0.2:40000", "10.2.0.2:8080"), &client, 6 * S)
            .unwrap();
        assert_eq!(c.verdict, Some(CtVerdict::Forgot { at_ns: 6 * S }));
        assert!(c.nat);
        assert_eq!(c.timeout_established_s, Some(3));
        assert_eq!(
            c.entry.states,
            [(S, ct_state::SYN_SENT), (S + 1, ct_state::ESTABLISHED)]
        );
        // Server, seen after NAT: still ESTABLISHED at the end of the trace.
        let server = life(&[(S + 2, tcp::SYN_RECV), (S + 3, tcp::ESTABLISHED)]);
        let s = j
            .join(&sock("10.2.0.2:8080", "10.2.0.1:40000"), &server, 9 * S)
            .unwrap();
        assert!(matches!(s.verdict, Some(CtVerdict::Forgot { .. })));
        // Unrelated socket: no join.
        assert!(
            j.join(&sock("10.1.0.2:40001", "10.2.0.2:8080"), &client, 9 * S)
                .is_none()
        );
    }

    #[test]
    fn normal_close_and_healthy_connections_have_no_verdict() {
        let j = joiner(&[
            ct(CtKind::New, S, ct_state::SYN_SENT, Some(120)),
            ct(CtKind::Update, S + 1, ct_state::ESTABLISHED, Some(3)),
            ct(CtKind::Update, 3 * S, ct_state::FIN_WAIT, Some(120)),
            ct(CtKind::Update, 3 * S + 5, ct_state::TIME_WAIT, Some(120)),
            ct(CtKind::Destroy, 120 * S, ct_state::TIME_WAIT, None),
        ]);
        let client = life(&[
            (S, tcp::SYN_SENT),
            (S + 2, tcp::ESTABLISHED),
            (3 * S, tcp::FIN_WAIT1),
            (3 * S + 4, tcp::FIN_WAIT2),
            (3 * S + 6, tcp::CLOSE),
        ]);
        let c = j
            .join(&sock("10.1.0.2:40000", "10.2.0.2:8080"), &client, 3 * S)
            .unwrap();
        assert_eq!(c.verdict, None);
        assert_eq!(c.entry.end.as_ref().map(|e| e.expired), Some(true));
    }

    #[test]
    fn close_seen_by_the_table_but_not_by_the_socket() {
        let j = joiner(&[
            ct(CtKind::New, S, ct_state::SYN_SENT, Some(120)),
            ct(CtKind::Update, S + 1, ct_state::ESTABLISHED, Some(3)),
            ct(CtKind::Update, 2 * S, ct_state::CLOSE, Some(10)),
        ]);
        let open = life(&[(S, tcp::SYN_SENT), (S + 2, tcp::ESTABLISHED)]);
        let c = j
            .join(&sock("10.1.0.2:40000", "10.2.0.2:8080"), &open, 9 * S)
            .unwrap();
        assert_eq!(
            c.verdict,
            Some(CtVerdict::ClosedEarly {
                at_ns: 2 * S,
                state: ct_state::CLOSE
            })
        );
    }

    #[test]
    fn table_is_bounded() {
        let mut j = Joiner::default();
        for i in 0..(MAX_ENTRIES as u16 + 10) {
            let mut e = ct(CtKind::New, u64::from(i), ct_state::SYN_SENT, Some(1));
            e.orig.src.set_port(i);
            e.reply.dst.set_port(i);
            j.on_event(&e);
        }
        assert_eq!(j.entries.len(), MAX_ENTRIES);
        assert_eq!(j.evicted, 10);
        assert!(j.by_socket.len() <= 2 * MAX_ENTRIES);
    }
}
