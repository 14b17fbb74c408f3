//! What live runs and replays share: filter → detect → sink, in event order.
use std::{collections::BTreeMap, io, net::SocketAddr};

use foldhash::HashMap;
use smallvec::SmallVec;

use crate::{
    conntrack::{CtEvent, CtNamespace, CtSource, join::Joiner},
    detect::{DetectConfig, Detector, Finding},
    event::{Body, Event, Folded, Input, Life, Origin, Socket, SocketId},
    filter::{Filter, Selector},
    http2::Frames,
    output::{Notice, Sink, Summary},
    owner::snapshot::SnapSocket,
};

/// Connections whose HTTP/2 frames are summed while they are open.
const MAX_FRAME_CONNS: usize = 65_536;
/// Live events waiting for their socket's end, at most; past it the oldest is written at once.
const MAX_HELD: usize = 65_536;

/// Live events (CLOSE_WAIT, resets, retransmissions) wait here for `hold_ns` of event time.
/// When the socket's life record comes first, they are folded into it: under churn nearly
/// every such event is followed within microseconds by the record that already holds its
/// facts, and writing both doubled the agent's work per connection. An event still held when
/// time has moved `hold_ns` past it is written as usual, in time order.
///
/// Live and replay take the same decisions: an event is released only by a later event or
/// tick (both written), and folded events never reach the stream, so a recording holds
/// exactly the released ones, which replay releases at the same places.
#[derive(Default)]
struct Hold {
    hold_ns: u64,
    /// By (time, arrival): released in time order even when events arrive out of order.
    queue: BTreeMap<(u64, u64), Event>,
    /// A socket rarely has more than one event held (CLOSE_WAIT, or a reset).
    by_socket: HashMap<SocketId, SmallVec<[(u64, u64); 2]>>,
    arrivals: u64,
}

impl Hold {
    fn push(&mut self, ev: Event) {
        let key = (ev.ts_ns, self.arrivals);
        self.arrivals += 1;
        self.by_socket.entry(ev.socket.id).or_default().push(key);
        self.queue.insert(key, ev);
    }

    /// Whether the oldest event is due at `now_ns` (or the queue is over its cap).
    fn due(&self, now_ns: u64) -> bool {
        self.queue.first_key_value().is_some_and(|(k, _)| {
            k.0.saturating_add(self.hold_ns) <= now_ns || self.queue.len() > MAX_HELD
        })
    }

    /// The oldest event, if it is due.
    fn pop_due(&mut self, now_ns: u64) -> Option<Event> {
        if !self.due(now_ns) {
            return None;
        }
        let (key, ev) = self.queue.pop_first()?;
        if let Some(keys) = self.by_socket.get_mut(&ev.socket.id) {
            keys.retain(|k| *k != key);
            if keys.is_empty() {
                self.by_socket.remove(&ev.socket.id);
            }
        }
        Some(ev)
    }

    /// Takes the held events of a socket whose life record has come.
    fn fold(&mut self, id: &SocketId, into: &mut Folded) {
        for key in self.by_socket.remove(id).unwrap_or_default() {
            if let Some(ev) = self.queue.remove(&key) {
                into.add(&ev.body);
            }
        }
    }
}

pub struct Pipeline {
    selector: Selector,
    detector: Detector,
    joiner: Joiner,
    /// Sockets found at start, by (netns, local, remote), with the snapshot's time; `true`
    /// once a record matched one.
    snapshot: BTreeMap<(u32, SocketAddr, SocketAddr), (SnapSocket, u64, bool)>,
    /// When the snapshot was taken (the latest of its records).
    snapshot_until: u64,
    /// HTTP/2 control frames of connections still open, until their record joins them.
    frames: HashMap<SocketId, Frames>,
    hold: Hold,
    /// What the selector let through for the event being delivered.
    selected: Vec<Event>,
    sink: Box<dyn Sink>,
    findings: Vec<Finding>,
    pub summary: Summary,
    /// First write error; a closed pipe ends the run quietly.
    pub write_error: Option<io::Error>,
}

impl Pipeline {
    pub fn new(filter: Filter, detect: DetectConfig, sink: Box<dyn Sink>) -> Self {
        Self {
            selector: Selector::new(filter),
            detector: Detector::new(detect),
            joiner: Joiner::default(),
            snapshot: BTreeMap::new(),
            snapshot_until: 0,
            frames: HashMap::default(),
            hold: Hold::default(),
            selected: Vec::new(),
            sink,
            findings: Vec::new(),
            summary: Summary::default(),
            write_error: None,
        }
    }

    fn write(&mut self, f: impl FnOnce(&mut dyn Sink) -> io::Result<()>) {
        if self.write_error.is_none()
            && let Err(e) = f(self.sink.as_mut())
        {
            self.write_error = Some(e);
        }
    }

    pub fn deliver_input(&mut self, i: Input) {
        match i {
            Input::Socket(e) => self.deliver(e),
            Input::Conntrack(c) => self.deliver_ct(c),
            Input::Fork {
                ts_ns,
                parent,
                child,
            } => self.fork(ts_ns, parent, child),
            Input::Exit {
                ts_ns,
                pid,
                open_sockets,
            } => self.exit(ts_ns, pid, open_sockets),
        }
    }

    /// A followed process has exited. Its sockets stay followed to their end (their owner
    /// still matches): this only says so.
    pub fn exit(&mut self, ktime_ns: u64, pid: u32, open_sockets: u32) {
        self.write(|sink| {
            sink.notice(&Notice::Exit {
                ktime_ns,
                pid,
                open_sockets,
            })
        });
    }

    /// `--pid`: the processes followed now (with `--follow-forks`, their children too).
    pub fn followed_pids(&self) -> Option<&std::collections::HashSet<u32>> {
        self.selector.pids()
    }

    /// `--follow-forks`: `child` of a followed `parent` is followed from now on (replay: the
    /// recorded fork).
    pub fn fork(&mut self, ktime_ns: u64, parent: u32, child: u32) {
        self.selector.follow(parent, child);
        self.write(|sink| {
            sink.notice(&Notice::Fork {
                ktime_ns,
                parent,
                child,
            })
        });
    }

    /// A socket that existed at start (live: the snapshot; replay: its record).
    pub fn snapshot(&mut self, ktime_ns: u64, s: SnapSocket) {
        if !self.selector.snapshot_match(&s) {
            return;
        }
        self.write(|sink| sink.snapshot(ktime_ns, &s));
        self.snapshot_until = self.snapshot_until.max(ktime_ns);
        self.snapshot
            .insert((s.netns, s.local, s.remote), (s, ktime_ns, false));
    }

    /// A socket first seen mid-life that the snapshot found predates h2trace: say so, and
    /// give it the owner /proc named if the kernel has not learned one.
    fn enrich(&mut self, ev: &mut Event) {
        let s = &mut ev.socket;
        let Some((snap, _, matched)) = self.snapshot.get_mut(&(s.netns, s.local, s.remote)) else {
            return;
        };
        *matched = true;
        if !matches!(s.origin, Origin::MidLife | Origin::Snapshot) {
            return; // opened after the tracer started, in the moment before the snapshot
        }
        s.origin = Origin::Snapshot;
        if s.owner.is_none() {
            s.owner = snap.owner.clone();
        }
    }

    /// One event, in kernel-time order.
    pub fn deliver(&mut self, mut ev: Event) {
        // Only a socket seen mid-life, or born before the snapshot was taken, can be in it:
        // a connection opened since (every one, under churn) skips the lookup.
        let s = &ev.socket;
        if !self.snapshot.is_empty()
            && (matches!(s.origin, Origin::MidLife | Origin::Snapshot)
                || s.id.start_ns <= self.snapshot_until)
        {
            self.enrich(&mut ev);
        }
        // Reused: one allocation for the run, not one per event.
        let mut selected = std::mem::take(&mut self.selected);
        self.selector.offer(ev, &mut |e| selected.push(e));
        self.summary.losses.filter_overflow = self.selector.overflowed;
        for mut ev in selected.drain(..) {
            if let Body::Life(l) = &ev.body
                && crate::correlate::discarded_child(&ev.socket, l)
            {
                self.summary.discarded_children += 1;
                continue;
            }
            self.release_held(ev.ts_ns);
            if self.hold.hold_ns > 0 && Folded::folds(&ev.body) {
                self.hold.push(ev);
                continue;
            }
            if let Body::Life(l) = &mut ev.body {
                self.hold.fold(&ev.socket.id, &mut l.folded);
            }
            self.emit(ev);
        }
        self.selected = selected;
    }

    /// Live events whose hold has run out by `now_ns`, written in time order.
    fn release_held(&mut self, now_ns: u64) {
        while let Some(ev) = self.hold.pop_due(now_ns) {
            self.emit(ev);
        }
    }

    /// Write one selected event and let the detector see it.
    fn emit(&mut self, mut ev: Event) {
        match &mut ev.body {
            Body::Life(l) | Body::Open(l) => {
                l.conntrack = self.joiner.join(&ev.socket, l, ev.ts_ns).map(Box::new);
                l.frames = self.frames.remove(&ev.socket.id).map(Box::new);
            }
            // Bounded: a connection whose record never comes (evicted in the kernel) must not
            // hold its frames forever. Past the cap, frames of connections not yet seen are
            // written but not summed.
            Body::Frame(f)
                if self.frames.len() < MAX_FRAME_CONNS
                    || self.frames.contains_key(&ev.socket.id) =>
            {
                self.frames
                    .entry(ev.socket.id)
                    .or_default()
                    .add(ev.ts_ns, f);
            }
            _ => {}
        }
        let s = &mut self.summary;
        match &ev.body {
            Body::Life(l) => {
                s.connections += 1;
                // What the folded events would have counted.
                s.resets_sent += u64::from(l.folded.resets_sent);
                s.resets_received += u64::from(l.folded.resets_received);
                s.retransmits += u64::from(l.folded.retransmits);
                s.folded += l.folded.total();
            }
            Body::Open(_) => {}
            Body::ResetSent { .. } => s.resets_sent += 1,
            Body::ResetReceived { .. } => s.resets_received += 1,
            Body::Retransmit { .. } => s.retransmits += 1,
            Body::State { .. } => {}
            Body::Frame(_) => s.http2_frames += 1,
        }
        if !matches!(ev.body, Body::Life(_) | Body::Open(_)) {
            s.events += 1;
        }
        let facts = crate::correlate::of_event(&ev);
        self.write(|sink| sink.event(&ev, facts.as_ref()));
        self.detector.on_event(&ev, facts, &mut self.findings);
        self.drain_findings();
    }

    /// How long live events wait for their socket's life record (0: written at once). Live:
    /// from the options; replay: the recorded value. Before any event only.
    pub fn set_live_hold(&mut self, hold_ns: u64) {
        self.hold.hold_ns = hold_ns;
    }

    /// A conntrack table followed from here on (live: at start; replay: its record).
    pub fn conntrack_namespace(&mut self, ktime_ns: u64, ns: CtNamespace) {
        self.write(|sink| sink.notice(&Notice::ConntrackSource { ktime_ns, ns: &ns }));
        self.joiner.namespace(ns);
    }

    /// One conntrack event, in time order with the socket events.
    pub fn deliver_ct(&mut self, ct: CtEvent) {
        if !self.selector.conntrack_match(&ct) {
            return;
        }
        let old = self.joiner.on_event(&ct);
        // A kernel-side record says only "the state is now X": when ctnetlink already said so
        // (the entry's creation), it is not news.
        if ct.source != CtSource::Netlink && old == ct.state {
            return;
        }
        self.summary.conntrack_events += 1;
        self.summary.conntrack_evicted = self.joiner.evicted;
        self.write(|sink| sink.conntrack(&ct, old));
        self.detector.advance(ct.ts_ns, &mut self.findings);
        self.drain_findings();
    }

    fn drain_findings(&mut self) {
        for (at, w) in self.detector.take_windows() {
            self.write(|sink| sink.peers(at, std::slice::from_ref(&w)));
        }
        self.summary.peers_forgotten = self.detector.peers_forgotten;
        let found = std::mem::take(&mut self.findings);
        self.summary.findings += found.len() as u64;
        for f in &found {
            self.write(|sink| sink.finding(f));
        }
    }

    /// Kernel time has reached `ktime_ns` without events. Written to the stream (so replay
    /// sees the same passage of time) only when the detector waits for time to pass.
    /// `periodic`: the detector may be served (once a second); held live events that are due
    /// are released at every tick, and the tick is written then too, so that replay releases
    /// them at the same place.
    pub fn tick(&mut self, ktime_ns: u64, periodic: bool) {
        if self.hold.due(ktime_ns) || periodic && self.detector.wants_tick() {
            self.tick_recorded(ktime_ns);
        }
    }

    /// A tick that is written (live) or was written (replay) to the stream.
    pub fn tick_recorded(&mut self, ktime_ns: u64) {
        self.release_held(ktime_ns);
        self.write(|sink| sink.notice(&Notice::Tick { ktime_ns }));
        self.detector.advance(ktime_ns, &mut self.findings);
        self.drain_findings();
    }

    pub fn notice(&mut self, n: &Notice<'_>) {
        self.write(|sink| sink.notice(n));
    }

    /// The stream ended at kernel time `end_ns`: sockets of the snapshot that did nothing
    /// while traced (still open, as found), last findings and the per-peer table.
    pub fn finish(&mut self, end_ns: u64) {
        self.release_held(u64::MAX);
        let idle: Vec<(SnapSocket, u64)> = std::mem::take(&mut self.snapshot)
            .into_values()
            .filter(|(_, _, matched)| !matched)
            .map(|(s, t, _)| (s, t))
            .collect();
        for (s, taken_ns) in idle {
            let life = Life {
                first_state: s.state,
                bytes_sent: s.bytes_sent,
                bytes_received: s.bytes_received,
                last_send_ns: s.last_send_ns,
                last_recv_ns: s.last_recv_ns,
                ..Life::default()
            };
            let socket = Socket {
                // Never seen by the kernel programs, so no kernel address: the socket inode
                // stands in, and the life starts when the snapshot found it.
                id: SocketId {
                    skaddr: u64::from(s.inode),
                    start_ns: taken_ns,
                },
                netns: s.netns,
                local: s.local,
                remote: s.remote,
                owner: None,
                origin: Origin::Snapshot,
            };
            self.snapshot
                .insert((s.netns, s.local, s.remote), (s, taken_ns, false));
            self.deliver(Event {
                ts_ns: end_ns,
                cpu: 0,
                socket,
                body: Body::Open(Box::new(life)),
            });
        }
        let peers = self.detector.finish(end_ns, &mut self.findings);
        self.drain_findings();
        self.write(|sink| sink.peers(end_ns, &peers));
    }

    pub fn set_clock(&mut self, clock: crate::output::Clock) {
        self.sink.set_clock(clock);
    }

    pub fn set_reset_reasons(&mut self, names: std::collections::BTreeMap<u32, String>) {
        self.sink.set_reset_reasons(names);
    }

    /// Decide with these thresholds (replay: the recorded ones). Before any event only.
    pub fn set_detect(&mut self, cfg: DetectConfig) {
        self.detector = Detector::new(cfg);
    }

    pub fn detect_config(&self) -> &DetectConfig {
        self.detector.config()
    }

    pub fn flush(&mut self) {
        self.write(|sink| sink.flush());
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, io::Write, rc::Rc};

    use h2trace_common::tcp_state::*;
    use serde_json::Value;

    use super::*;
    use crate::{
        event::{Owner, OwnerSource, Transition},
        output::{Clock, Ndjson},
    };

    #[derive(Clone, Default)]
    struct Shared(Rc<RefCell<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn pipeline(hold_ns: u64) -> (Pipeline, Shared) {
        let out = Shared::default();
        let sink = Ndjson::new(out.clone(), Clock { offset_ns: 0 }, BTreeMap::new());
        let detect = DetectConfig {
            rst_storm: 20,
            ..DetectConfig::default()
        };
        let mut p = Pipeline::new(Filter::default(), detect.clone(), Box::new(sink));
        p.set_live_hold(hold_ns);
        p.notice(&Notice::Started {
            ktime_ns: 1,
            probe: &serde_json::json!({}),
            detect: &detect,
            live_hold_ns: hold_ns,
            replayed: false,
        });
        (p, out)
    }

    fn event(skaddr: u64, ts_ns: u64, body: Body) -> Event {
        Event {
            ts_ns,
            cpu: 0,
            socket: Socket {
                id: SocketId {
                    skaddr,
                    start_ns: 1_000,
                },
                netns: 1,
                local: format!("10.0.0.1:{}", 30_000 + skaddr).parse().unwrap(),
                remote: "10.0.0.2:80".parse().unwrap(),
                owner: Some(Owner {
                    tgid: 7,
                    pid: 7,
                    comm: "client".into(),
                    cgroup_id: 1,
                    cgroup_path: None,
                    source: OwnerSource::Connect,
                }),
                origin: Origin::Active,
            },
            body,
        }
    }

    fn life(states: &[(u64, u8)], resets_sent: u16) -> Body {
        Body::Life(Box::new(Life {
            first_state: CLOSE,
            transitions: states
                .iter()
                .map(|&(ts_ns, state)| Transition { ts_ns, state })
                .collect(),
            resets_sent,
            first_reset_sent_ns: (resets_sent > 0).then(|| states.last().unwrap().0),
            ..Life::default()
        }))
    }

    /// 30 aborted connections (each reset, then ended 10 µs later), one that sits 1 s in
    /// CLOSE_WAIT, and a reset of a socket whose life never comes.
    fn run(hold_ns: u64) -> (String, Summary) {
        let (mut p, out) = pipeline(hold_ns);
        const MS: u64 = 1_000_000;
        for i in 0..30u64 {
            let t = 10 * MS + i * MS;
            let rst = Body::ResetSent {
                state: ESTABLISHED,
                reason: None,
            };
            p.deliver(event(i, t, rst));
            let states = [
                (t - 50_000, SYN_SENT),
                (t - 40_000, ESTABLISHED),
                (t, CLOSE),
            ];
            p.deliver(event(i, t + 10_000, life(&states, 1)));
        }
        let cw = Body::State {
            old: ESTABLISHED,
            new: CLOSE_WAIT,
        };
        p.deliver(event(100, 50 * MS, cw));
        let orphan = Body::ResetSent {
            state: ESTABLISHED,
            reason: None,
        };
        p.deliver(event(101, 60 * MS, orphan));
        p.tick(400 * MS, false);
        let states = [
            (2 * MS, SYN_SENT),
            (3 * MS, ESTABLISHED),
            (50 * MS, CLOSE_WAIT),
            (1_050 * MS, LAST_ACK),
            (1_051 * MS, CLOSE),
        ];
        p.deliver(event(100, 1_051 * MS, life(&states, 0)));
        p.finish(2_000 * MS);
        let summary = p.summary.clone();
        p.notice(&Notice::Summary {
            ktime_ns: 2_000 * MS,
            summary: &summary,
        });
        p.flush();
        let text = String::from_utf8(out.0.borrow().clone()).unwrap();
        (text, summary)
    }

    fn actions(ndjson: &str) -> Vec<(String, u64)> {
        ndjson
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .map(|v| {
                let skaddr = v["h2trace"]["socket"]["id"]
                    .as_str()
                    .and_then(|id| u64::from_str_radix(id.split('-').next()?, 16).ok())
                    .unwrap_or(u64::MAX);
                (v["event"]["action"].as_str().unwrap().to_string(), skaddr)
            })
            .collect()
    }

    fn count(a: &[(String, u64)], what: &str) -> usize {
        a.iter().filter(|(x, _)| x == what).count()
    }

    #[test]
    fn live_events_of_sockets_that_end_within_the_hold_are_folded() {
        let (held, hs) = run(250_000_000);
        let (live, ls) = run(0);
        let (a, b) = (actions(&held), actions(&live));
        // Without a hold: every event written. With it: the 30 resets are in their lives.
        assert_eq!(count(&b, "reset-sent"), 31);
        assert_eq!(count(&a, "reset-sent"), 1, "{held}");
        assert_eq!(count(&a, "connection-closed"), 31);
        let lives: Vec<Value> = held
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v["event"]["action"] == "connection-closed")
            .collect();
        assert!(
            lives[..30]
                .iter()
                .all(|v| v["h2trace"]["connection"]["folded"]
                    == serde_json::json!({"resets_sent": 1}))
        );
        // The CLOSE_WAIT lasted 1 s, longer than the hold: written, before its life, in time
        // order with the orphan reset (which no life claims: written once due, at the tick).
        let pos = |what: &str, sk: u64| a.iter().position(|x| x.0 == what && x.1 == sk).unwrap();
        assert!(pos("state-change", 100) < pos("reset-sent", 101));
        assert!(pos("reset-sent", 101) < pos("tick", u64::MAX));
        assert!(pos("tick", u64::MAX) < pos("connection-closed", 100));
        // The diagnosis and the counts do not change: the same RST storm, the same totals.
        assert_eq!(count(&a, "finding"), count(&b, "finding"));
        assert!(held.contains("\"rst-storm\""));
        assert_eq!(
            (hs.resets_sent, hs.connections, hs.findings),
            (ls.resets_sent, ls.connections, ls.findings)
        );
        assert_eq!((hs.events, hs.folded), (2, 30));
        assert_eq!((ls.events, ls.folded), (32, 0));
    }

    #[test]
    fn a_held_run_replays_to_itself() {
        for hold in [0, 250_000_000] {
            let (recorded, _) = run(hold);
            let replayed = Shared::default();
            let sink = Ndjson::new(replayed.clone(), Clock { offset_ns: 0 }, BTreeMap::new());
            let mut p = Pipeline::new(Filter::default(), DetectConfig::default(), Box::new(sink));
            let mut errors = Vec::new();
            crate::replay::replay(recorded.as_bytes(), &mut p, true, &mut errors).unwrap();
            assert!(errors.is_empty());
            let replayed = String::from_utf8(replayed.0.borrow().clone()).unwrap();
            for (i, (a, b)) in recorded.lines().zip(replayed.lines()).enumerate() {
                assert_eq!(a, b, "hold {hold}: line {}", i + 1);
            }
            assert_eq!(
                recorded.lines().count(),
                replayed.lines().count(),
                "hold {hold}"
            );
        }
    }
}
