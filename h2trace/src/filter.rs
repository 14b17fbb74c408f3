//! Which events the operator asked for (`--pid`, `--cgroup`, `--netns`, `-L`, `-D`, `-4`/`-6`).
//! Pure.
//!
//! A server-side socket changes state in softirq context before its owner touches it, so its
//! first events carry no owner. With `--pid`, such events wait here until a later event of
//! the same socket life names the owner (first read, close, or the life record), and are
//! then delivered or dropped with it: the process's sockets are kept whole, others not at all.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use crate::{
    conntrack::CtEvent,
    event::{Body, Event, Owner, SocketId},
    owner::snapshot::SnapSocket,
};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Keep only sockets owned by these processes (thread group ids).
    pub pids: Option<HashSet<u32>>,
    pub local_ports: Vec<u16>,
    pub remote_ports: Vec<u16>,
    /// `Some(false)`: IPv4 only; `Some(true)`: IPv6 only.
    pub ipv6: Option<bool>,
    /// Keep only sockets owned by processes in these cgroups or below them.
    pub cgroups: Vec<CgroupSel>,
    /// Keep only sockets of these network namespaces (inodes).
    pub netns: Vec<u32>,
}

/// A cgroup to keep: its id, and its path (relative to the v2 root) for its descendants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSel {
    pub id: u64,
    pub path: String,
}

impl CgroupSel {
    fn contains(&self, o: &Owner) -> bool {
        o.cgroup_id == self.id
            || o.cgroup_path.as_deref().is_some_and(|p| {
                p.strip_prefix(self.path.trim_end_matches('/'))
                    .is_some_and(|rest| rest.starts_with('/'))
            })
    }
}

/// Events waiting for their socket's owner are capped; past that they are dropped and counted.
pub const PENDING_CAP: usize = 65_536;

#[derive(Default)]
pub struct Selector {
    filter: Filter,
    pending: HashMap<SocketId, Vec<Event>>,
    pending_len: usize,
    /// Events dropped because the pending table was full.
    pub overflowed: u64,
}

impl Selector {
    pub fn new(filter: Filter) -> Self {
        Self {
            filter,
            ..Default::default()
        }
    }

    fn endpoint_match(&self, ev: &Event) -> bool {
        self.view_match(ev.socket.local, ev.socket.remote)
    }

    fn view_match(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        let f = &self.filter;
        (f.local_ports.is_empty() || f.local_ports.contains(&local.port()))
            && (f.remote_ports.is_empty() || f.remote_ports.contains(&remote.port()))
            && f.ipv6.is_none_or(|v6| v6 == local.is_ipv6())
    }

    /// `--follow-forks`: a followed process forked `child`; it is followed from now on.
    pub fn follow(&mut self, parent: u32, child: u32) {
        if let Some(pids) = &mut self.filter.pids
            && pids.contains(&parent)
        {
            pids.insert(child);
        }
    }

    /// `--pid`: the processes followed now.
    pub fn pids(&self) -> Option<&HashSet<u32>> {
        self.filter.pids.as_ref()
    }

    /// Filters that need the owner: `--pid`, `--cgroup`.
    fn by_owner(&self) -> bool {
        self.filter.pids.is_some() || !self.filter.cgroups.is_empty()
    }

    fn owner_match(&self, o: &Owner) -> bool {
        let f = &self.filter;
        f.pids.as_ref().is_none_or(|p| p.contains(&o.tgid))
            && (f.cgroups.is_empty() || f.cgroups.iter().any(|c| c.contains(o)))
    }

    fn netns_match(&self, netns: u32) -> bool {
        self.filter.netns.is_empty() || self.filter.netns.contains(&netns)
    }

    /// A socket of the start-up snapshot passes when its owner (from /proc) and endpoints do.
    pub fn snapshot_match(&self, s: &SnapSocket) -> bool {
        let owner_ok = !self.by_owner() || s.owner.as_ref().is_some_and(|o| self.owner_match(o));
        owner_ok && self.netns_match(s.netns) && self.view_match(s.local, s.remote)
    }

    /// A conntrack entry passes when one of the sockets it can belong to would (the ports and
    /// family filters; `--pid` cannot apply to a table entry).
    pub fn conntrack_match(&self, ct: &CtEvent) -> bool {
        [ct.orig, ct.reply]
            .iter()
            .any(|t| self.view_match(t.src, t.dst))
    }

    /// Deliver `ev` (and any events of the same socket that were waiting for it) to `out`,
    /// or keep it until its owner is known, or drop it.
    pub fn offer(&mut self, ev: Event, out: &mut impl FnMut(Event)) {
        // Ports can still be 0 in the first transition (picked after CLOSE → SYN_SENT), so
        // port filters are decided like owners: wait for a later event of the same life.
        let ports_known = ev.socket.local.port() != 0;
        let is_life = matches!(ev.body, Body::Life(_) | Body::Open(_));
        if !self.netns_match(ev.socket.netns) {
            return;
        }
        if !self.by_owner() {
            if !ports_known && !is_life && self.has_port_filter() {
                self.park(ev);
            } else if self.endpoint_match(&ev) {
                self.flush(ev, out);
            } else {
                self.discard(&ev.socket.id);
            }
            return;
        };
        match &ev.socket.owner {
            Some(o) if ports_known || is_life => {
                if self.owner_match(o) && self.endpoint_match(&ev) {
                    self.flush(ev, out);
                } else {
                    self.discard(&ev.socket.id);
                }
            }
            _ if is_life => self.discard(&ev.socket.id),
            _ => self.park(ev),
        }
    }

    fn has_port_filter(&self) -> bool {
        !self.filter.local_ports.is_empty() || !self.filter.remote_ports.is_empty()
    }

    fn park(&mut self, ev: Event) {
        if self.pending_len >= PENDING_CAP {
            self.overflowed += 1;
            return;
        }
        self.pending_len += 1;
        self.pending.entry(ev.socket.id).or_default().push(ev);
    }

    fn flush(&mut self, ev: Event, out: &mut impl FnMut(Event)) {
        // Nearly always nothing waits (no owner or port filter): skip hashing the id.
        if self.pending_len > 0
            && let Some(waiting) = self.pending.remove(&ev.socket.id)
        {
            self.pending_len -= waiting.len();
            for mut w in waiting {
                // The owner was learned after these happened; it owned the socket all along.
                if w.socket.owner.is_none() {
                    w.socket.owner.clone_from(&ev.socket.owner);
                }
                out(w);
            }
        }
        out(ev);
    }

    fn discard(&mut self, id: &SocketId) {
        if self.pending_len > 0
            && let Some(waiting) = self.pending.remove(id)
        {
            self.pending_len -= waiting.len();
        }
    }

    /// Events still waiting for an owner.
    pub fn pending(&self) -> usize {
        self.pending_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Life, Origin, Owner, OwnerSource, Socket};

    fn ev(skaddr: u64, tgid: Option<u32>, body: Body) -> Event {
        Event {
            ts_ns: 1,
            cpu: 0,
            socket: Socket {
                id: SocketId {
                    skaddr,
                    start_ns: 7,
                },
                netns: 1,
                local: "10.0.0.1:8080".parse().unwrap(),
                remote: "10.0.0.2:50000".parse().unwrap(),
                owner: tgid.map(|tgid| Owner {
                    tgid,
                    pid: tgid,
                    comm: "srv".into(),
                    cgroup_id: 0,
                    cgroup_path: None,
                    source: OwnerSource::Io,
                }),
                origin: Origin::Passive,
            },
            body,
        }
    }

    fn life() -> Body {
        Body::Life(Box::new(Life {
            first_state: 10,
            ..Life::default()
        }))
    }

    fn run(sel: &mut Selector, evs: Vec<Event>) -> Vec<(u64, bool)> {
        let mut out = vec![];
        for e in evs {
            sel.offer(e, &mut |e| out.push(e));
        }
        out.iter()
            .map(|e| (e.socket.id.skaddr, matches!(e.body, Body::Life(_))))
            .collect()
    }

    #[test]
    fn softirq_transitions_wait_for_the_owner() {
        let mut sel = Selector::new(Filter {
            pids: Some([42].into()),
            ..Default::default()
        });
        let st = |a, o| ev(a, o, Body::State { old: 3, new: 1 });
        let out = run(
            &mut sel,
            vec![
                st(1, None),
                st(2, None),
                st(1, Some(42)),
                st(2, Some(99)),
                ev(1, Some(42), life()),
            ],
        );
        // Socket 1's ownerless transition is delivered once the owner shows up; socket 2's is
        // dropped with it.
        assert_eq!(out, [(1, false), (1, false), (1, true)]);
        assert_eq!(sel.pending(), 0);
    }

    #[test]
    fn released_events_carry_the_owner_learned_later() {
        let mut sel = Selector::new(Filter {
            pids: Some([42].into()),
            ..Default::default()
        });
        let mut out = vec![];
        for e in [
            ev(1, None, Body::State { old: 3, new: 1 }),
            ev(1, Some(42), Body::State { old: 1, new: 8 }),
        ] {
            sel.offer(e, &mut |e| out.push(e));
        }
        assert!(
            out.iter()
                .all(|e| e.socket.owner.as_ref().is_some_and(|o| o.tgid == 42))
        );
    }

    #[test]
    fn life_without_owner_discards_waiting_events() {
        let mut sel = Selector::new(Filter {
            pids: Some([42].into()),
            ..Default::default()
        });
        let out = run(
            &mut sel,
            vec![
                ev(1, None, Body::State { old: 3, new: 1 }),
                ev(1, None, life()),
            ],
        );
        assert!(out.is_empty());
        assert_eq!(sel.pending(), 0);
    }

    #[test]
    fn ports_and_family() {
        let mut sel = Selector::new(Filter {
            local_ports: vec![8080],
            ipv6: Some(false),
            ..Default::default()
        });
        assert_eq!(run(&mut sel, vec![ev(1, None, life())]).len(), 1);
        let mut sel = Selector::new(Filter {
            remote_ports: vec![1],
            ..Default::default()
        });
        assert!(run(&mut sel, vec![ev(1, None, life())]).is_empty());
        let mut sel = Selector::new(Filter {
            ipv6: Some(true),
            ..Default::default()
        });
        assert!(run(&mut sel, vec![ev(1, None, life())]).is_empty());
    }

    #[test]
    fn no_filter_passes_everything() {
        let mut sel = Selector::new(Filter::default());
        assert_eq!(
            run(&mut sel, vec![ev(1, None, Body::State { old: 7, new: 2 })]).len(),
            1
        );
    }
}
