//! The tracing run: probes → source → order → filter → sink, until a signal, the end of
//! `--duration`, or a closed output.
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{self, BufWriter, Write},
    time::{Duration, Instant},
};

use nix::time::{ClockId, clock_gettime};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::Format,
    config::{Config, ConntrackConfig},
    conntrack::netlink::{CtError, Listener},
    event::{Event, Input, Socket, decode},
    netns::{NetnsSpec, netns_inode},
    order::Reorder,
    output::{Clock, Losses, Ndjson, Notice, Sink, Text},
    owner::{cgroup::Cgroups, exits::Exits, snapshot},
    pipeline::Pipeline,
    probe::{self, Probes},
    source::{CounterValues, Counters, Reader, for_each_open_life},
};

/// How often the buffers are drained even without a wake-up (batching bound on latency).
const DRAIN_EVERY: Duration = Duration::from_millis(50);
/// Records taken from the ring per loop iteration, so signals are served under a flood
/// (~ a few ms of work).
const DRAIN_BATCH: usize = 4_096;
/// How often loss counters are checked.
const LOSS_EVERY: Duration = Duration::from_secs(1);
/// A record is in its buffer this long after its timestamp at the latest (see `order`).
const ORDER_SLACK_NS: u64 = 5_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `--duration` ended, SIGTERM, or the reader of our output went away.
    Done,
    /// SIGINT.
    Interrupted,
}

fn now_ns(clock: ClockId) -> i128 {
    clock_gettime(clock)
        .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
        .unwrap_or(0)
}

fn monotonic() -> u64 {
    now_ns(ClockId::CLOCK_MONOTONIC) as u64
}

/// The reader's side: decode and put in kernel-time order, then hand to the pipeline.
struct Ordered {
    reorder: Reorder<Input>,
    pipeline: Pipeline,
    /// Enrichment that needs the host: cgroup id → path (written into the records, so
    /// `replay` needs no host).
    cgroups: Cgroups,
}

impl Ordered {
    fn ingest(&mut self, bytes: &[u8]) {
        match decode(bytes) {
            Ok(mut i) => {
                match &mut i {
                    Input::Socket(Event {
                        socket: Socket { owner: Some(o), .. },
                        ..
                    }) => o.cgroup_path = self.cgroups.path(o.cgroup_id),
                    // The kernel reports threads too; a thread shares its process's tgid,
                    // which is followed already.
                    Input::Fork { child, .. } if is_thread(*child) => return,
                    _ => {}
                }
                self.reorder.push(i)
            }
            Err(_) => self.pipeline.summary.losses.malformed += 1,
        }
    }

    fn release(&mut self, until: u64) {
        let Self {
            reorder, pipeline, ..
        } = self;
        reorder.release(until, &mut |i| pipeline.deliver_input(i));
        pipeline.summary.out_of_order = reorder.late;
    }
}

/// Whether task `tid` is a thread of another process (false once it is gone).
fn is_thread(tid: u32) -> bool {
    procfs::process::Process::new(tid as i32)
        .and_then(|p| p.status())
        .is_ok_and(|s| s.tgid != tid as i32)
}

/// Open sockets per owning process, from the kernel's table of live sockets.
fn open_sockets(ebpf: &aya::Ebpf, pids: &HashSet<u32>) -> HashMap<u32, u32> {
    let mut n = HashMap::new();
    for_each_open_life(ebpf, |l| {
        if pids.contains(&l.meta.tgid) {
            *n.entry(l.meta.tgid).or_default() += 1;
        }
    });
    n
}

/// `--pid`: says when a followed process exits, and ends the run once all have and their
/// sockets have ended too (nothing is left to follow).
struct ExitWatch {
    exits: Exits,
    /// The table of live sockets is read at each exit, then, once every process has exited,
    /// at growing intervals (it holds every socket of the host: 100,000 entries take ~0.1 s).
    next_scan: Instant,
    backoff: Duration,
}

impl ExitWatch {
    /// True when the run should end.
    fn check(&mut self, o: &mut Ordered, ebpf: &aya::Ebpf, now: u64) -> bool {
        let Some(pids) = o.pipeline.followed_pids().cloned() else {
            return false;
        };
        let gone = self.exits.poll(&pids);
        if !gone.is_empty() {
            let open = open_sockets(ebpf, &pids);
            for pid in gone {
                // In time order with everything else; its sockets stay followed.
                o.reorder.push(Input::Exit {
                    ts_ns: now,
                    pid,
                    open_sockets: open.get(&pid).copied().unwrap_or(0),
                });
            }
            return false;
        }
        // A fork just before the last exit is still in the reorder window: it has been
        // delivered (and its child is in `pids`) by the next check.
        if !self.exits.all(&pids) || Instant::now() < self.next_scan {
            return false;
        }
        if open_sockets(ebpf, &pids).is_empty() {
            return true;
        }
        self.next_scan = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(16));
        false
    }
}

/// One listener per followed namespace (the same namespace named twice is followed once).
/// A table that cannot be followed is an error when it was asked for, a warning otherwise.
fn open_conntrack(
    cfg: &ConntrackConfig,
    kernel_states: Option<&str>,
) -> Result<Vec<Listener>, RunError> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (spec, required) in &cfg.namespaces {
        let opened = netns_inode(spec).map_err(CtError::from).and_then(|ino| {
            if !seen.insert(ino) {
                return Ok(None);
            }
            Listener::open(spec, kernel_states, cfg.buffer).map(Some)
        });
        match opened {
            Ok(Some(l)) => out.push(l),
            Ok(None) => {}
            Err(e) if *required => return Err(RunError::Conntrack(e)),
            Err(e) => eprintln!(
                "h2trace: warning: conntrack not followed: {}",
                probe::error_chain(&e)
            ),
        }
    }
    Ok(out)
}

/// Resolves when any conntrack listener has events waiting.
async fn any_readable(ls: &[Listener]) {
    std::future::poll_fn(|cx| {
        if ls.iter().any(|l| l.poll_readable(cx).is_ready()) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// True when standard output is a pipe or socket whose reader has gone (`| head`): stop at
/// once instead of waiting for the next write to fail.
fn stdout_reader_gone() -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let out = io::stdout();
    let mut fds = [PollFd::new(out.as_fd(), PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP))
}

fn apply_counters(l: &mut Losses, c: &CounterValues, perf_lost: u64) {
    l.ringbuf_full = c.ringbuf_full;
    l.perf_output_failed = c.perf_output_failed;
    l.perf_lost = perf_lost;
    l.sockets_untracked = c.track_failed;
    l.listeners_untracked = c.listener_failed;
    l.http2_untracked = c.h2_track_failed;
    l.http2_desync = c.h2_desync;
    l.lives_lost = c.lives_lost;
    l.states_shed = c.states_shed;
}

fn drain_conntrack(cts: &mut [Listener], stamp: u64, o: &mut Ordered) {
    for l in cts {
        l.drain(stamp, &mut |ev| o.reorder.push(Input::Conntrack(ev)));
    }
}

fn apply_conntrack(l: &mut Losses, cts: &[Listener]) {
    l.conntrack_overruns = cts.iter().map(|c| c.overruns).sum();
    l.conntrack_malformed = cts.iter().map(|c| c.malformed).sum();
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
    #[error("reading from the kernel")]
    Source(#[from] crate::source::SourceError),
    #[error("opening {0}")]
    Output(String, #[source] io::Error),
    #[error("writing output")]
    Write(#[source] io::Error),
    #[error("installing signal handlers")]
    Signal(#[source] io::Error),
    #[error("following conntrack (--conntrack off to trace without it)")]
    Conntrack(#[source] CtError),
}

pub async fn trace(cfg: Config) -> Result<Outcome, RunError> {
    // Open the output first: an unwritable path is an error before anything is loaded.
    let out: Box<dyn Write> = match &cfg.output {
        Some(p) => {
            Box::new(File::create(p).map_err(|e| RunError::Output(p.display().to_string(), e))?)
        }
        None => Box::new(io::stdout()),
    };
    let mut probes: Probes = probe::load(&cfg.probe)?;
    // A fallback or a missing optional hook changes what the output can show: say so.
    for h in probes.hooks.iter().filter(|h| !h.ok) {
        eprintln!("h2trace: warning: {}", h.detail);
    }
    let mut reader = Reader::open(&mut probes.ebpf, probes.transport, cfg.perf_pages)?;
    let counters = Counters::open(&mut probes.ebpf)?;
    let mut cts = open_conntrack(&cfg.conntrack, probes.ct_hook.map(|h| h.name()))?;
    // The kernel-side hook reports the followed namespaces only (the same ones, by inode).
    if probes.ct_hook.is_some() {
        let inodes: Vec<u32> = cfg
            .conntrack
            .namespaces
            .iter()
            .filter_map(|(spec, _)| netns_inode(spec).ok())
            .collect();
        probes.follow_ct_netns(&inodes)?;
    }

    let clock = Clock {
        offset_ns: now_ns(ClockId::CLOCK_REALTIME) - now_ns(ClockId::CLOCK_MONOTONIC),
    };
    let out = BufWriter::with_capacity(64 * 1024, out);
    let reasons = probes.reset_reasons.clone();
    let sink: Box<dyn Sink> = match cfg.format {
        Format::Ndjson => Box::new(Ndjson::new(out, clock, reasons)),
        Format::Text => Box::new(Text::new(out, clock, reasons)),
    };
    let mut o = Ordered {
        reorder: Reorder::default(),
        pipeline: Pipeline::new(cfg.filter.clone(), cfg.detect.clone(), sink),
        cgroups: Cgroups::new(),
    };
    // Sockets that predate us, taken once the programs are attached: anything opened since is
    // seen by the kernel as well, and matched, not duplicated.
    let specs: Vec<NetnsSpec> = match &cfg.filter.pids {
        Some(pids) => {
            let mut p: Vec<u32> = pids.iter().copied().collect();
            p.sort_unstable();
            p.into_iter().map(NetnsSpec::Pid).collect()
        }
        None => snapshot::all_namespaces(),
    };
    let existing = snapshot::take(&specs, monotonic(), &mut o.cgroups).unwrap_or_else(|e| {
        eprintln!(
            "h2trace: warning: sockets opened before the start are not attributed: {}",
            probe::error_chain(&e)
        );
        Vec::new()
    });
    // Everything privileged is done: programs attached, maps and sockets open, /proc read.
    // Dropped before anything is written: once `started` is visible, h2trace holds none.
    if let Err(e) = crate::probe::caps::drop_all() {
        eprintln!("h2trace: warning: could not drop capabilities: {e}");
    }
    // Loading parsed the kernel's BTF several times (offsets, CO-RE, fentry targets): tens of
    // MiB the allocator keeps after they are freed. Give them back before the long run.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory; no pointer is invalidated.
    unsafe {
        libc::malloc_trim(0);
    }
    // Handle signals before `started` is visible: whoever waits for it may signal at once, and
    // the default action would end the run without a summary or detaching the programs.
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let started = monotonic();
    let describe = probes.describe();
    o.pipeline.set_live_hold(cfg.live_hold_ns);
    o.pipeline.notice(&Notice::Started {
        live_hold_ns: cfg.live_hold_ns,
        detect: &cfg.detect,
        ktime_ns: started,
        probe: &describe,
        replayed: false,
    });
    for l in &cts {
        o.pipeline.conntrack_namespace(started, l.ns.clone());
    }
    for s in existing {
        o.pipeline.snapshot(started, s);
    }
    o.pipeline.flush();
    // ctnetlink events carry no time. One read in loop iteration k arrived after the reads of
    // iteration k-1 began, so it is stamped with that start: never later than it happened,
    // at most one iteration (≤ DRAIN_EVERY) earlier.
    let mut ct_stamp = started;

    let deadline = cfg.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_loss_check = Instant::now();
    let mut reported = Losses::default();
    let mut perf_lost = 0u64;
    let mut exit_watch = ExitWatch {
        exits: Exits::default(),
        next_scan: Instant::now(),
        backoff: LOSS_EVERY,
    };

    let outcome = loop {
        // Biased: signals first, so a flood that keeps the buffers readable cannot delay them.
        let stop = tokio::select! {
            biased;
            _ = sigint.recv() => Some(Outcome::Interrupted),
            _ = sigterm.recv() => Some(Outcome::Done),
            _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => Some(Outcome::Done),
            _ = reader.readable() => None,
            _ = any_readable(&cts), if !cts.is_empty() => None,
            _ = tick.tick() => None,
        };
        // Everything stamped before `now` is in the buffers once they are drained.
        let now = monotonic();
        perf_lost += reader.drain(DRAIN_BATCH, &mut |b| o.ingest(b));
        drain_conntrack(&mut cts, ct_stamp, &mut o);
        ct_stamp = now;
        o.release(now.saturating_sub(ORDER_SLACK_NS));
        let periodic = last_loss_check.elapsed() >= LOSS_EVERY;
        let traced_gone = periodic && exit_watch.check(&mut o, &probes.ebpf, now);
        let p = &mut o.pipeline;
        // Held live events are written once due, and CLOSE_WAIT sockets become stuck, even
        // when nothing else happens.
        p.tick(now.saturating_sub(ORDER_SLACK_NS), periodic);
        if periodic {
            last_loss_check = Instant::now();
            apply_counters(&mut p.summary.losses, &counters.read(), perf_lost);
            apply_conntrack(&mut p.summary.losses, &cts);
            if p.summary.losses != reported {
                reported = p.summary.losses.clone();
                p.notice(&Notice::Loss {
                    ktime_ns: now,
                    losses: &reported,
                });
            }
        }
        p.flush();
        if p.write_error.is_some() || cfg.output.is_none() && stdout_reader_gone() {
            break Outcome::Done;
        }
        if let Some(o) = stop {
            break o;
        }
        if traced_gone {
            eprintln!(
                "h2trace: every traced process has exited and its sockets have closed: nothing left to follow"
            );
            break Outcome::Done;
        }
    };

    // Drain what is left, report the lives still open, the findings and per-peer table, then
    // the summary.
    // What was in the ring when we stopped, and no more: under a flood it never empties.
    perf_lost += reader.drain(cfg.probe.ring_bytes as usize / 64, &mut |b| o.ingest(b));
    drain_conntrack(&mut cts, ct_stamp, &mut o);
    let end = monotonic();
    o.release(u64::MAX);
    // The lives still open, stamped `end`, after everything else: straight to the pipeline.
    let mut open = 0;
    for_each_open_life(&probes.ebpf, |l| {
        open += 1;
        match crate::event::open_life(l, end) {
            Ok(ev) => o.pipeline.deliver(ev),
            Err(_) => o.pipeline.summary.losses.malformed += 1,
        }
    });
    let mut p = o.pipeline;
    let c = counters.read();
    apply_counters(&mut p.summary.losses, &c, perf_lost);
    apply_conntrack(&mut p.summary.losses, &cts);
    if p.summary.losses != reported {
        let losses = p.summary.losses.clone();
        p.notice(&Notice::Loss {
            ktime_ns: end,
            losses: &losses,
        });
    }
    // Same order as `replay`: last loss record, findings and per-peer table, summary.
    p.finish(end);
    let s = &mut p.summary;
    s.duration_ns = end - started;
    s.tracked = c.tracked;
    s.ended = c.ended;
    s.open_at_exit = open;
    s.evicted = c.tracked.saturating_sub(c.ended + s.open_at_exit);
    let summary = p.summary.clone();
    p.notice(&Notice::Summary {
        ktime_ns: end,
        summary: &summary,
    });
    p.flush();
    drop(probes); // detaches every program
    match p.write_error {
        Some(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(RunError::Write(e)),
        _ => Ok(outcome),
    }
}
