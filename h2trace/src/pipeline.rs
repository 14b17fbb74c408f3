//! What live runs and replays share: filter → detect → sink, in event order.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::SocketAddr,
};

use crate::{
    conntrack::{CtEvent, CtNamespace, CtSource, join::Joiner},
    detect::{DetectConfig, Detector, Finding},
    event::{Body, Event, Input, Life, Origin, Socket, SocketId},
    filter::{Filter, Selector},
    http2::Frames,
    output::{Notice, Sink, Summary},
    owner::snapshot::SnapSocket,
};

/// Connections whose HTTP/2 frames are summed while they are open.
const MAX_FRAME_CONNS: usize = 65_536;

pub struct Pipeline {
    selector: Selector,
    detector: Detector,
    joiner: Joiner,
    /// Sockets found at start, by (netns, local, remote), with the snapshot's time; `true`
    /// once a record matched one.
    snapshot: BTreeMap<(u32, SocketAddr, SocketAddr), (SnapSocket, u64, bool)>,
    /// HTTP/2 control frames of connections still open, until their record joins them.
    frames: HashMap<SocketId, Frames>,
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
            frames: HashMap::new(),
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
        if !self.snapshot.is_empty() {
            self.enrich(&mut ev);
        }
        let mut selected = Vec::new();
        self.selector.offer(ev, &mut |e| selected.push(e));
        self.summary.losses.filter_overflow = self.selector.overflowed;
        for mut ev in selected {
            if let Body::Life(l) = &ev.body
                && crate::correlate::discarded_child(&ev.socket, l)
            {
                self.summary.discarded_children += 1;
                continue;
            }
            match &mut ev.body {
                Body::Life(l) | Body::Open(l) => {
                    l.conntrack = self.joiner.join(&ev.socket, l, ev.ts_ns).map(Box::new);
                    l.frames = self.frames.remove(&ev.socket.id).map(Box::new);
                }
                Body::Frame(f) => {
                    // Bounded: a connection whose record never comes (evicted in the kernel)
                    // must not hold its frames forever. Past the cap, frames of connections
                    // not yet seen are written but not summed.
                    if self.frames.len() < MAX_FRAME_CONNS
                        || self.frames.contains_key(&ev.socket.id)
                    {
                        self.frames
                            .entry(ev.socket.id)
                            .or_default()
                            .add(ev.ts_ns, f);
                    }
                }
                _ => {}
            }
            let s = &mut self.summary;
            match &ev.body {
                Body::Life(_) => s.connections += 1,
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
            self.write(|sink| sink.event(&ev));
            self.detector.on_event(&ev, &mut self.findings);
            self.drain_findings();
        }
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
        for w in self.detector.take_windows() {
            let end = w.window.map_or(0, |(_, to)| to);
            self.write(|sink| sink.peers(end, std::slice::from_ref(&w)));
        }
        let found = std::mem::take(&mut self.findings);
        self.summary.findings += found.len() as u64;
        for f in &found {
            self.write(|sink| sink.finding(f));
        }
    }

    /// Kernel time has reached `ktime_ns` without events. Written to the stream (so replay
    /// sees the same passage of time) only when the detector waits for time to pass.
    pub fn tick(&mut self, ktime_ns: u64) {
        if self.detector.wants_tick() {
            self.tick_recorded(ktime_ns);
        }
    }

    /// A tick that is written (live) or was written (replay) to the stream.
    pub fn tick_recorded(&mut self, ktime_ns: u64) {
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
