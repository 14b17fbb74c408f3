//! Kernel-time ordering of records read from several per-CPU buffers.
//!
//! Each per-CPU perf buffer is in order on its own, but buffers are drained one after the
//! other. A record stamped at `t` is in its buffer a few microseconds after `t` (programs
//! run with migration disabled), so once every buffer has been drained after kernel time
//! `now`, nothing stamped before `now - slack` can still arrive: those records are released,
//! in time order. Pure: the caller supplies the clock.
//!
//! Records mostly arrive in order (the ring buffer is shared by all CPUs; a perf buffer is in
//! order on its own): those are appended to a queue, and only the ones older than the queue's
//! newest go to a heap. Release merges the two. A record is a few hundred bytes, so keeping it
//! out of the heap's sift-up and sift-down saves moving it a dozen times.
use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
};

use crate::event::Event;

/// Anything with a kernel (CLOCK_MONOTONIC) time.
pub trait Stamped {
    fn ts_ns(&self) -> u64;
}

impl Stamped for Event {
    fn ts_ns(&self) -> u64 {
        self.ts_ns
    }
}

struct Pending<T> {
    ts_ns: u64,
    seq: u64,
    event: T,
}

impl<T> PartialEq for Pending<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.ts_ns, self.seq) == (other.ts_ns, other.seq)
    }
}
impl<T> Eq for Pending<T> {}
impl<T> PartialOrd for Pending<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Pending<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.ts_ns, self.seq).cmp(&(other.ts_ns, other.seq))
    }
}

pub struct Reorder<T = Event> {
    /// In (time, arrival) order.
    queue: VecDeque<Pending<T>>,
    /// Records that arrived older than the queue's newest.
    heap: BinaryHeap<Reverse<Pending<T>>>,
    seq: u64,
    /// Highest timestamp released so far; a later record older than this is out of order.
    released_until: u64,
    /// Records that arrived after newer ones had been released (counted, still delivered).
    pub late: u64,
}

impl<T> Default for Reorder<T> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            heap: BinaryHeap::new(),
            seq: 0,
            released_until: 0,
            late: 0,
        }
    }
}

impl<T: Stamped> Reorder<T> {
    pub fn push(&mut self, event: T) {
        let ts_ns = event.ts_ns();
        if ts_ns < self.released_until {
            self.late += 1;
        }
        self.seq += 1;
        let p = Pending {
            ts_ns,
            seq: self.seq,
            event,
        };
        // Equal times keep arrival order: the newer arrival has the higher `seq`.
        if self.queue.back().is_none_or(|b| b.ts_ns <= ts_ns) {
            self.queue.push_back(p);
        } else {
            self.heap.push(Reverse(p));
        }
    }

    /// The older of the two heads, if it is stamped at or before `until`.
    fn pop_until(&mut self, until: u64) -> Option<Pending<T>> {
        let from_heap = match (self.queue.front(), self.heap.peek()) {
            (Some(q), Some(Reverse(h))) => h < q,
            (None, Some(_)) => true,
            (_, None) => false,
        };
        if from_heap {
            let Reverse(h) = self.heap.peek()?;
            (h.ts_ns <= until).then(|| self.heap.pop().expect("peeked").0)
        } else {
            let q = self.queue.front()?;
            (q.ts_ns <= until).then(|| self.queue.pop_front().expect("peeked"))
        }
    }

    /// Release, oldest first, every record stamped at or before `until`.
    pub fn release(&mut self, until: u64, out: &mut impl FnMut(T)) {
        while let Some(p) = self.pop_until(until) {
            self.released_until = self.released_until.max(p.ts_ns);
            out(p.event);
        }
    }

    pub fn release_all(&mut self, out: &mut impl FnMut(T)) {
        self.release(u64::MAX, out);
    }

    pub fn len(&self) -> usize {
        self.queue.len() + self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Body, Origin, Socket, SocketId};

    fn ev(ts: u64, cpu: u32) -> Event {
        Event {
            ts_ns: ts,
            cpu,
            socket: Socket {
                id: SocketId {
                    skaddr: 1,
                    start_ns: 0,
                },
                netns: 0,
                local: "127.0.0.1:1".parse().unwrap(),
                remote: "127.0.0.1:2".parse().unwrap(),
                owner: None,
                origin: Origin::Active,
            },
            body: Body::State { old: 1, new: 4 },
        }
    }

    #[test]
    fn merges_per_cpu_streams_by_kernel_time() {
        let mut r = Reorder::default();
        // Two CPUs drained one after the other: each in order, interleaved in time.
        for (ts, cpu) in [(10, 0), (30, 0), (50, 0), (20, 1), (40, 1), (60, 1)] {
            r.push(ev(ts, cpu));
        }
        let mut out = vec![];
        r.release(45, &mut |e| out.push((e.ts_ns, e.cpu)));
        assert_eq!(out, [(10, 0), (20, 1), (30, 0), (40, 1)]);
        assert_eq!(r.len(), 2);
        r.release_all(&mut |e| out.push((e.ts_ns, e.cpu)));
        assert_eq!(
            out.iter().map(|p| p.0).collect::<Vec<_>>(),
            [10, 20, 30, 40, 50, 60]
        );
        assert_eq!(r.late, 0);
    }

    /// Whatever the arrival order, release is in (time, arrival) order: the queue and the heap
    /// merge as one heap would.
    #[test]
    fn release_order_is_time_then_arrival_for_any_input() {
        let mut state = 7u64;
        for round in 0..200 {
            let mut r = Reorder::default();
            let mut expected = Vec::new();
            let mut out = Vec::new();
            for i in 0..100u32 {
                // A drifting clock with jitter and ties: mostly in order, sometimes not.
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let ts = u64::from(i) * 3 + (state >> 60) % (1 + round % 7);
                r.push(ev(ts, i));
                expected.push((ts, i));
                if i % 17 == 16 {
                    r.release(ts.saturating_sub(5), &mut |e| out.push((e.ts_ns, e.cpu)));
                }
            }
            r.release_all(&mut |e| out.push((e.ts_ns, e.cpu)));
            assert_eq!(out.len(), expected.len());
            // Released in order within each release call, and every record exactly once.
            let mut sorted = out.clone();
            sorted.sort_by_key(|&(ts, i)| (ts, i));
            expected.sort_by_key(|&(ts, i)| (ts, i));
            assert_eq!(sorted, expected);
            if r.late == 0 {
                assert_eq!(out, expected, "round {round}");
            }
        }
    }

    #[test]
    fn equal_timestamps_keep_arrival_order_and_late_records_are_counted() {
        let mut r = Reorder::default();
        r.push(ev(10, 0));
        r.push(ev(10, 1));
        let mut out = vec![];
        r.release(10, &mut |e| out.push(e.cpu));
        assert_eq!(out, [0, 1]);
        r.push(ev(5, 1));
        r.release_all(&mut |e| out.push(e.cpu));
        assert_eq!(r.late, 1);
        assert!(r.is_empty());
    }
}
