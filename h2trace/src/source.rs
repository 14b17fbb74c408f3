//! Reading records out of the kernel: the ring buffer or the per-CPU perf buffers, and the
//! kernel's loss counters.
use aya::{
    Ebpf,
    maps::{
        MapData, PerCpuArray, RingBuf,
        perf::{PerfEvent, PerfEventArray, PerfEventArrayBuffer},
    },
    util::online_cpus,
};
use h2trace_common::counter;
use tokio::io::unix::AsyncFd;

use crate::probe::Transport;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("map {0} is missing from the eBPF object")]
    NoMap(&'static str),
    #[error("opening map {0}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("opening a perf buffer")]
    Perf(#[from] aya::maps::perf::PerfBufferError),
    #[error("listing online CPUs: {0}")]
    Cpus(String),
    #[error("registering the ring buffer with the event loop")]
    Io(#[from] std::io::Error),
}

pub enum Reader {
    Ring(AsyncFd<RingBuf<MapData>>),
    /// One buffer per online CPU; drained on a timer, merged by time downstream.
    Perf {
        bufs: Vec<PerfEventArrayBuffer<MapData>>,
        scratch: Vec<u8>,
    },
}

impl Reader {
    /// `perf_pages`: pages per CPU buffer (a power of two).
    pub fn open(
        ebpf: &mut Ebpf,
        transport: Transport,
        perf_pages: usize,
    ) -> Result<Self, SourceError> {
        match transport {
            Transport::Ringbuf => {
                let map = ebpf.take_map("RING").ok_or(SourceError::NoMap("RING"))?;
                let ring = RingBuf::try_from(map).map_err(|e| SourceError::Map("RING", e))?;
                // SAFETY: the ring owns its fd and stays inside the AsyncFd until both are dropped.
                let fd =
                    unsafe { AsyncFd::register(ring) }.map_err(|e| SourceError::Io(e.into()))?;
                Ok(Self::Ring(fd))
            }
            Transport::Perf => {
                let map = ebpf
                    .take_map("EVENTS")
                    .ok_or(SourceError::NoMap("EVENTS"))?;
                let mut array =
                    PerfEventArray::try_from(map).map_err(|e| SourceError::Map("EVENTS", e))?;
                let cpus =
                    online_cpus().map_err(|(msg, e)| SourceError::Cpus(format!("{msg}: {e}")))?;
                let bufs = cpus
                    .into_iter()
                    .map(|cpu| array.open(cpu, Some(perf_pages)))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Self::Perf {
                    bufs,
                    scratch: Vec::new(),
                })
            }
        }
    }

    /// Wait until the kernel signals data (ring buffer). Perf buffers are never awaited: the
    /// caller's timer drains them, so the kernel's per-record wake-ups cost nothing here.
    pub async fn readable(&mut self) {
        match self {
            Self::Ring(fd) => {
                if let Ok(mut guard) = fd.readable_mut().await {
                    guard.clear_ready();
                }
            }
            Self::Perf { .. } => std::future::pending().await,
        }
    }

    /// Hand waiting records to `f`, at most `limit` from the ring buffer (under a flood the
    /// ring never empties: the caller must get back to its signals); returns the samples the
    /// perf buffers reported lost.
    pub fn drain(&mut self, limit: usize, f: &mut impl FnMut(&[u8])) -> u64 {
        let mut lost = 0;
        match self {
            Self::Ring(fd) => {
                let ring = fd.get_mut();
                for _ in 0..limit {
                    let Some(item) = ring.next() else { break };
                    f(&item);
                }
            }
            Self::Perf { bufs, scratch } => {
                for buf in bufs.iter_mut() {
                    buf.for_each(|e| match e {
                        PerfEvent::Sample { head, tail: [] } => f(head),
                        PerfEvent::Sample { head, tail } => {
                            scratch.clear();
                            scratch.extend_from_slice(head);
                            scratch.extend_from_slice(tail);
                            f(scratch);
                        }
                        PerfEvent::Lost { count } => lost += count,
                    });
                }
            }
        }
        lost
    }
}

/// The kernel's per-CPU counters, summed.
pub struct Counters {
    map: PerCpuArray<MapData, u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterValues {
    pub ringbuf_full: u64,
    pub perf_output_failed: u64,
    pub tracked: u64,
    pub track_failed: u64,
    pub ended: u64,
    pub transitions_truncated: u64,
    pub listener_failed: u64,
    pub h2_track_failed: u64,
    pub h2_desync: u64,
    pub lives_lost: u64,
    pub states_shed: u64,
}

impl Counters {
    pub fn open(ebpf: &mut Ebpf) -> Result<Self, SourceError> {
        let map = ebpf
            .take_map("COUNTERS")
            .ok_or(SourceError::NoMap("COUNTERS"))?;
        Ok(Self {
            map: PerCpuArray::try_from(map).map_err(|e| SourceError::Map("COUNTERS", e))?,
        })
    }

    pub fn read(&self) -> CounterValues {
        let get = |i: u32| self.map.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
        CounterValues {
            ringbuf_full: get(counter::RINGBUF_FULL),
            perf_output_failed: get(counter::PERF_OUTPUT_FAIL),
            tracked: get(counter::SOCK_TRACKED),
            track_failed: get(counter::SOCK_TRACK_FAIL),
            ended: get(counter::SOCK_ENDED),
            transitions_truncated: get(counter::TRANSITIONS_TRUNCATED),
            listener_failed: get(counter::LISTENER_TRACK_FAIL),
            h2_track_failed: get(counter::H2_TRACK_FAIL),
            h2_desync: get(counter::H2_DESYNC),
            lives_lost: get(counter::LIFE_LOST),
            states_shed: get(counter::STATES_SHED),
        }
    }
}

/// Socket lives still in the kernel's table (at exit: those still open), one at a time: with
/// 100,000 live sockets, a collected table would be the agent's largest allocation.
pub fn for_each_open_life(ebpf: &Ebpf, mut f: impl FnMut(&h2trace_common::SockLife)) {
    let Some(map) = ebpf.map("SOCKS") else {
        return;
    };
    if let Ok(m) = aya::maps::HashMap::<_, u64, h2trace_common::SockLife>::try_from(map) {
        for (_, life) in m.iter().filter_map(Result::ok) {
            f(&life);
        }
    }
}
