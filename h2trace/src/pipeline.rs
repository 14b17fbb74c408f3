//! What live runs and replays share: filter → detect → sink, in event order.
use std::io;

use crate::{
    conntrack::{CtEvent, CtNamespace, CtSource, join::Joiner},
    detect::{DetectConfig, Detector, Finding},
    event::{Body, Event, Input},
    filter::{Filter, Selector},
    output::{Notice, Sink, Summary},
};

pub struct Pipeline {
    selector: Selector,
    detector: Detector,
    joiner: Joiner,
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
        }
    }

    /// One event, in kernel-time order.
    pub fn deliver(&mut self, ev: Event) {
        let mut selected = Vec::new();
        self.selector.offer(ev, &mut |e| selected.push(e));
        self.summary.losses.filter_overflow = self.selector.overflowed;
        for mut ev in selected {
            if let Body::Life(l) | Body::Open(l) = &mut ev.body {
                l.conntrack = self.joiner.join(&ev.socket, l, ev.ts_ns).map(Box::new);
            }
            let s = &mut self.summary;
            match &ev.body {
                Body::Life(_) => s.connections += 1,
                Body::Open(_) => {}
                Body::ResetSent { .. } => s.resets_sent += 1,
                Body::ResetReceived { .. } => s.resets_received += 1,
                Body::Retransmit { .. } => s.retransmits += 1,
                Body::State { .. } => {}
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
        let mut found = std::mem::take(&mut self.findings);
        self.detector.advance(ct.ts_ns, &mut found);
        self.findings = found;
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

    /// The stream ended at kernel time `end_ns`: last findings and the per-peer table.
    pub fn finish(&mut self, end_ns: u64) {
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
