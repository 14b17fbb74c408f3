//! h2trace kernel programs: keep facts per TCP socket life, emit one record when it ends.
//!
//! Policy (what is a churn, what is a finding) lives in userspace; these programs only
//! record what happened to each socket and when. Every record that cannot be delivered is
//! counted in `COUNTERS`, which the agent reports as loss.
#![no_std]
#![no_main]

use core::{ffi::c_void, ptr::addr_of};

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_perf_event_output, bpf_probe_read_kernel,
        bpf_probe_read_user, bpf_ringbuf_output, bpf_ringbuf_query,
    },
    macros::{btf_tracepoint, fentry, kprobe, kretprobe, map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, PerfEventArray, RingBuf},
    programs::{
        BtfTracePointContext, FEntryContext, ProbeContext, RetProbeContext, TracePointContext,
    },
};
use h2trace_common::{
    ABSENT, CT_STATE_UNKNOWN, CtRecord, ForkRecord, Header, LifeRecord, LiveRecord,
    MAX_TRANSITIONS, ProgConfig, SockLife, SockMeta, counter, ct_hook, flags, kind, origin,
    owner_src, tcp_state,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u8 = 6;
const BPF_F_CURRENT_CPU: u64 = 0xffff_ffff;
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const MSG_PEEK: i32 = 2;

/// Set by the agent at load time (tracepoint layouts, BTF offsets, mode flags).
#[unsafe(no_mangle)]
static CONFIG: ProgConfig = ProgConfig::zeroed();

/// Read a field of [`CONFIG`] through a volatile load, so the compiler cannot fold the
/// all-zero initial value that the agent replaces at load time.
macro_rules! config {
    // Often used inside another unsafe block, where this one is redundant but harmless.
    ($($field:tt)+) => {{
        #[allow(unused_unsafe)]
        unsafe { core::ptr::read_volatile(&CONFIG.$($field)+) }
    }};
}

mod h2;
mod tls;

/// Socket lives in progress, keyed by `struct sock *`. LRU so that a flood of sockets can
/// never exhaust it; evictions are reconciled from the counters by the agent.
#[map]
static SOCKS: LruHashMap<u64, SockLife> = LruHashMap::with_max_entries(65536, 0);

/// Owner of each listening socket, keyed by (netns, family, port), so that sockets created
/// by the listener in softirq context start with a plausible owner.
#[map]
static LISTENERS: LruHashMap<u64, Owner> = LruHashMap::with_max_entries(4096, 0);

/// Per-CPU scratch space: a `LifeRecord` does not fit the 512-byte stack with the rest.
#[map]
static SCRATCH: PerCpuArray<LifeRecord> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[map]
static RING: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

#[map]
static EVENTS: PerfEventArray<u8> = PerfEventArray::new(0);

/// Last TCP state reported per conntrack entry, keyed by `struct nf_conn *`: a record is
/// emitted only when it changes.
#[map]
static CT_STATES: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65536, 0);

/// `--follow-forks`: processes whose children join the traced set (seeded with `--pid`, grown
/// here at each fork, so grandchildren follow too).
#[map]
static FOLLOW: LruHashMap<u32, u8> = LruHashMap::with_max_entries(16384, 0);

/// Network namespaces (inode) whose conntrack entries are reported, with
/// `flags::CT_NETNS_FILTER`.
#[map]
static CT_NETNS: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);

/// Kernels without `sock:sock_send_length` (before 6.3): the socket a thread's `tcp_sendmsg`
/// is working on, from the kprobe at entry to the kretprobe that reads the byte count.
#[map]
static IO_SOCK: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

/// The user memory a send or receive went through.
#[derive(Clone, Copy)]
struct UserBuf {
    ptr: u64,
    /// The length argument: bytes (`h2::BUF`) or iovecs (`h2::IOVEC`).
    count: u64,
    /// `h2::BUF`: the data, `h2::IOVEC`: a `struct iovec *`, `h2::MSGHDR`: a
    /// `struct user_msghdr *`.
    kind: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Owner {
    tgid: u32,
    pid: u32,
    cgroup_id: u64,
    comm: [u8; 16],
}

/// Endpoints as the hook saw them. The addresses come first and 8-aligned, so that zeroing
/// and copying them is two 64-bit moves each (the BPF target has no unaligned access: at
/// alignment 2 it is eight 16-bit ones).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Tuple {
    saddr: [u8; 16],
    daddr: [u8; 16],
    family: u16,
    sport: u16,
    dport: u16,
}

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

#[inline(always)]
unsafe fn read<T>(base: *const u8, off: u16) -> Option<T> {
    if off == ABSENT {
        return None;
    }
    unsafe { bpf_probe_read_kernel(base.add(off as usize) as *const T).ok() }
}

/// Deliver one record through the transport the agent chose; false if it was lost (counted).
#[inline(always)]
fn emit<C: EbpfContext, T>(ctx: &C, data: *const T) -> bool {
    emit_raw(ctx.as_ptr(), data)
}

/// [`emit`] with the program's context as a pointer (for `bpf_loop` callbacks).
#[inline(always)]
fn emit_raw<T>(ctx: *mut c_void, data: *const T) -> bool {
    let len = core::mem::size_of::<T>() as u64;
    if config!(flags) & flags::USE_PERF != 0 {
        let map = addr_of!(EVENTS) as *mut c_void;
        let r =
            unsafe { bpf_perf_event_output(ctx, map, BPF_F_CURRENT_CPU, data as *mut c_void, len) };
        if r < 0 {
            count(counter::PERF_OUTPUT_FAIL);
        }
        r >= 0
    } else {
        let map = addr_of!(RING) as *mut c_void;
        // Batch wake-ups: the agent also drains on a short timer, so it only needs a wake-up
        // when enough has piled up, and only once: a wake-up costs an interrupt (~7 µs per
        // record measured here when every record past the mark forced one). An agent busy
        // when it came finds the ring readable as soon as it polls again.
        let waiting = unsafe { bpf_ringbuf_query(map, BPF_RB_AVAIL_DATA) };
        let mark = config!(wake_bytes) as u64;
        let wake = if waiting < mark && waiting + len >= mark {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
        let r = unsafe { bpf_ringbuf_output(map, data as *mut c_void, len, wake) };
        if r < 0 {
            count(counter::RINGBUF_FULL);
        }
        r >= 0
    }
}

#[inline(always)]
fn header(k: u16, now: u64) -> Header {
    Header {
        kind: k,
        _pad: 0,
        cpu: unsafe { bpf_get_smp_processor_id() },
        ts_ns: now,
    }
}

#[inline(always)]
fn current_owner() -> Option<Owner> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == 0 {
        return None; // idle task / softirq on an idle CPU
    }
    Some(Owner {
        tgid,
        pid: pid_tgid as u32,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    })
}

/// Take the current task as owner if `src` is stronger than what the socket has, or if another
/// process now does its I/O. Only call from hooks that run in the owner's process context.
#[inline(always)]
fn claim_owner(meta: &mut SockMeta, src: u8) {
    // I/O by another process moves the owner whatever it was learned from: the socket was
    // handed over (fd passing, a forked worker, a pool shared across processes).
    let handed_over = src == owner_src::IO
        && meta.owner_src != owner_src::NONE
        && (bpf_get_current_pid_tgid() >> 32) as u32 != meta.tgid;
    if meta.owner_src >= src && !handed_over {
        return;
    }
    if let Some(o) = current_owner() {
        set_owner(meta, &o, src);
    }
}

#[inline(always)]
fn set_owner(meta: &mut SockMeta, o: &Owner, src: u8) {
    meta.tgid = o.tgid;
    meta.pid = o.pid;
    meta.cgroup_id = o.cgroup_id;
    meta.comm = o.comm;
    meta.owner_src = src;
}

/// Network namespace inode of a socket: `sk->__sk_common.skc_net.net->ns.inum`.
#[inline(always)]
fn netns_of(sk: *const u8) -> u32 {
    if config!(flags) & flags::HAVE_SOCK_OFFSETS == 0 {
        return 0;
    }
    let (net_off, inum_off) = (config!(sock.skc_net), config!(sock.net_ns_inum));
    let net: u64 = match unsafe { read(sk, net_off) } {
        Some(p) => p,
        None => return 0,
    };
    unsafe { read(net as *const u8, inum_off) }.unwrap_or(0)
}

#[inline(always)]
fn listener_key(netns: u32, family: u16, port: u16) -> u64 {
    ((netns as u64) << 32) | ((family as u64) << 16) | port as u64
}

fn emit_live<C: EbpfContext>(
    ctx: &C,
    k: u16,
    meta: &SockMeta,
    old: u8,
    new: u8,
    reason: u32,
    now: u64,
) {
    let rec = LiveRecord {
        hdr: header(k, now),
        meta: *meta,
        old_state: old,
        new_state: new,
        _pad: 0,
        reason,
    };
    emit(ctx, &rec as *const LiveRecord);
}

/// A state change written only because of `--events all`. While the ring buffer is more than
/// half full it is shed (counted) instead: the agent is behind, and the room left is kept for
/// the socket lives, which say every state change anyway. Perf buffers cannot be asked how
/// full they are.
#[inline(always)]
fn emit_state_change<C: EbpfContext>(ctx: &C, meta: &SockMeta, old: u8, new: u8, at: u64) {
    if config!(flags) & flags::USE_PERF == 0 {
        let map = addr_of!(RING) as *mut c_void;
        let waiting = unsafe { bpf_ringbuf_query(map, BPF_RB_AVAIL_DATA) };
        if waiting > config!(shed_bytes) as u64 {
            count(counter::STATES_SHED);
            return;
        }
    }
    emit_live(ctx, kind::STATE, meta, old, new, 0, at);
}

/// Emit the life record of a tracked socket (the entry stays; callers remove or reuse it).
#[inline(always)]
fn end_life<C: EbpfContext>(ctx: &C, life: *mut SockLife, now: u64) {
    count(counter::SOCK_ENDED);
    h2::end(ctx, unsafe { &mut *life });
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    unsafe {
        (*rec).hdr = header(kind::LIFE, now);
        // Not `(*rec).life = *life`: the two may overlap as far as the compiler knows, and
        // it copies through the stack, which the 328 bytes overflow.
        core::ptr::copy_nonoverlapping(life, &mut (*rec).life, 1);
    }
    if !emit(ctx, rec as *const LifeRecord) {
        count(counter::LIFE_LOST);
    }
}

/// Start tracking a socket life; returns the map entry.
#[inline(always)]
fn start_life(sk: u64, old: u8, new: u8, t: &Tuple, netns: u32, now: u64) -> Option<*mut SockLife> {
    let rec = SCRATCH.get_ptr_mut(0)?;
    let life = unsafe { &mut (*rec).life };
    *life = SockLife::zeroed();
    life.rst_sent_reason = u32::MAX;
    life.first_state = old;
    life.meta.skaddr = sk;
    life.meta.start_ns = now;
    life.meta.netns = netns;
    life.meta.family = t.family;
    life.meta.origin = if old == tcp_state::CLOSE && new == tcp_state::SYN_SENT {
        origin::ACTIVE
    } else if new == tcp_state::SYN_RECV || old == tcp_state::SYN_RECV {
        origin::PASSIVE
    } else {
        origin::MID_LIFE
    };
    // A child socket goes LISTEN → SYN_RECV in `inet_csk_clone_lock` through
    // `inet_sk_set_state`: the tracepoint sees it, a hook on `tcp_set_state` does not, and sees
    // SYN_RECV first. The clone happens when the handshake's last ACK arrives, microseconds
    // before SYN_RECV → ESTABLISHED, so stamping the step with now is exact enough.
    if old == tcp_state::SYN_RECV {
        life.first_state = tcp_state::LISTEN;
        life.trans_ns[0] = now;
        life.trans_state[0] = tcp_state::SYN_RECV;
        life.n_trans = 1;
    }
    if life.meta.origin == origin::PASSIVE {
        let key = listener_key(netns, t.family, t.sport);
        if let Some(o) = unsafe { LISTENERS.get(&key) } {
            set_owner(&mut life.meta, o, owner_src::LISTENER);
        }
    }
    if SOCKS.insert(&sk, &*life, 0).is_err() {
        count(counter::SOCK_TRACK_FAIL);
        return None;
    }
    count(counter::SOCK_TRACKED);
    SOCKS.get_ptr_mut(&sk)
}

/// Shared by the tracepoint and the kprobe: one state transition of one TCP socket.
#[inline(always)]
fn on_state<C: EbpfContext>(ctx: &C, sk: u64, old: u8, new: u8, t: &Tuple) {
    let now = unsafe { bpf_ktime_get_ns() };
    let emit_all = config!(flags) & flags::EMIT_ALL_TRANSITIONS != 0;
    // Two kernel reads: only where a life or a listener starts, not at every transition.
    let netns = || netns_of(sk as *const u8);

    // Listening sockets have no connection life; remember who listens, for the children.
    if new == tcp_state::LISTEN || old == tcp_state::LISTEN && new == tcp_state::CLOSE {
        let netns = netns();
        let key = listener_key(netns, t.family, t.sport);
        if new == tcp_state::LISTEN {
            remember_listener(key);
        } else {
            let _ = LISTENERS.remove(&key);
        }
        if emit_all {
            let mut meta = SockMeta::default();
            meta.skaddr = sk;
            meta.start_ns = now;
            meta.netns = netns;
            fill_tuple(&mut meta, t);
            if let Some(o) = current_owner() {
                set_owner(&mut meta, &o, owner_src::LISTENER);
            }
            emit_state_change(ctx, &meta, old, new, now);
        }
        return;
    }

    let life = match SOCKS.get_ptr_mut(&sk) {
        // CLOSE → SYN_SENT on a socket we know: connect() after a disconnect; a new life.
        Some(p) if old == tcp_state::CLOSE => {
            end_life(ctx, p, now);
            start_life(sk, old, new, t, netns(), now)
        }
        Some(p) => Some(p),
        None => start_life(sk, old, new, t, netns(), now),
    };
    let Some(life) = life else { return };
    let life = unsafe { &mut *life };

    // The source port is picked after CLOSE → SYN_SENT: refresh endpoints while they fill in.
    if t.sport != 0 || life.meta.sport == 0 {
        fill_tuple(&mut life.meta, t);
    }
    // An accepted socket's LISTEN → SYN_RECV is written live once it leaves SYN_RECV, stamped
    // with its own time. The tracepoint sees the step in `inet_csk_clone_lock`, where 6.1 and
    // 6.12 have not yet filled in the peer (`tcp_v4_syn_recv_sock` does it after the clone);
    // a hook on `tcp_set_state` never sees it, and start_life added it. Either way the tuple
    // is whole by the next step, microseconds later.
    if emit_all
        && old == tcp_state::SYN_RECV
        && life.n_trans == 1
        && life.first_state == tcp_state::LISTEN
    {
        let at = life.trans_ns[0];
        emit_state_change(ctx, &life.meta, tcp_state::LISTEN, old, at);
    }
    let n = life.n_trans as usize;
    if n < MAX_TRANSITIONS {
        life.trans_ns[n] = now;
        life.trans_state[n] = new;
    } else {
        count(counter::TRANSITIONS_TRUNCATED);
    }
    life.n_trans = life.n_trans.saturating_add(1);
    if old == tcp_state::ESTABLISHED {
        life.active_before_close_ns = life.last_send_ns.max(life.last_recv_ns);
    }

    // Only these transitions run in the owner's process context (connect(), close(),
    // shutdown()); the others run in softirq on whatever task was on the CPU.
    match (old, new) {
        (tcp_state::CLOSE, tcp_state::SYN_SENT) => claim_owner(&mut life.meta, owner_src::CONNECT),
        (tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1)
        | (tcp_state::SYN_RECV, tcp_state::FIN_WAIT1)
        | (tcp_state::CLOSE_WAIT, tcp_state::LAST_ACK) => {
            claim_owner(&mut life.meta, owner_src::CLOSE)
        }
        _ => {}
    }

    // CLOSE_WAIT is written in every mode and never shed: a socket stuck there has no life
    // record to come, and the diagnosis needs to know it is there.
    if new == tcp_state::CLOSE_WAIT {
        emit_live(ctx, kind::STATE, &life.meta, old, new, 0, now);
    } else if emit_all && old != tcp_state::LISTEN {
        emit_state_change(ctx, &life.meta, old, new, now);
    }
    if new == tcp_state::CLOSE && config!(flags) & flags::END_AT_CLOSE != 0 {
        end_life(ctx, life, now);
        let _ = SOCKS.remove(&sk);
    }
}

/// The process that called listen() owns the children the listener will create in softirq.
#[inline(always)]
fn remember_listener(key: u64) {
    if let Some(o) = current_owner() {
        if LISTENERS.insert(&key, &o, 0).is_err() {
            count(counter::LISTENER_TRACK_FAIL);
        }
    }
}

/// `inet_csk_listen_start(sk)`, beside the fentry/kprobe state hooks: it moves the socket to
/// LISTEN with `inet_sk_state_store`, which `tcp_set_state` never sees. Runs in listen(), after
/// bind() set the port (a listen() without bind() picks its port later; such a listener's
/// children get their owner from their I/O instead).
#[kprobe]
pub fn listen_start_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<*const u8>(0) {
        if let Some((_, t)) = sock_tuple(sk) {
            remember_listener(listener_key(netns_of(sk), t.family, t.sport));
        }
    }
    0
}

#[inline(always)]
fn fill_tuple(meta: &mut SockMeta, t: &Tuple) {
    meta.family = t.family;
    meta.sport = t.sport;
    meta.dport = t.dport;
    meta.saddr = t.saddr;
    meta.daddr = t.daddr;
}

/// `sock:inet_sock_set_state` (`inet_sk_state_store`/`tcp_set_state`, Linux ≥ 4.16).
#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_set_state_tp(&ctx);
    0
}

fn try_set_state_tp(ctx: &TracePointContext) -> Option<()> {
    let base = ctx.as_ptr() as *const u8;
    if config!(flags) & flags::SET_STATE_USUAL != 0 {
        return set_state_usual(ctx, base);
    }
    let l = config!(set_state);
    // The width of `protocol` changed between kernels (u8 → u16); little-endian, so the first
    // byte is the protocol either way.
    let proto: u8 = unsafe { read(base, l.protocol)? };
    if proto != IPPROTO_TCP {
        return None;
    }
    let family: u16 = unsafe { read(base, l.family)? };
    let mut t = Tuple {
        family,
        sport: unsafe { read(base, l.sport)? },
        dport: unsafe { read(base, l.dport)? },
        saddr: [0; 16],
        daddr: [0; 16],
    };
    if family == AF_INET {
        let s: [u8; 4] = unsafe { read(base, l.saddr)? };
        let d: [u8; 4] = unsafe { read(base, l.daddr)? };
        t.saddr[..4].copy_from_slice(&s);
        t.daddr[..4].copy_from_slice(&d);
    } else if family == AF_INET6 {
        t.saddr = unsafe { read(base, l.saddr_v6)? };
        t.daddr = unsafe { read(base, l.daddr_v6)? };
    } else {
        return None;
    }
    let sk: u64 = unsafe { read(base, l.skaddr)? };
    let old: i32 = unsafe { read(base, l.oldstate)? };
    let new: i32 = unsafe { read(base, l.newstate)? };
    on_state(ctx, sk, old as u8, new as u8, &t);
    Some(())
}

/// [`try_set_state_tp`] for [`SetStateLayout::USUAL`]: plain loads at constant offsets (the
/// verifier allows them into a tracepoint's record), where the generic path makes a helper
/// call per field.
#[inline(always)]
fn set_state_usual(ctx: &TracePointContext, base: *const u8) -> Option<()> {
    // SAFETY: the agent checked the format (SET_STATE_USUAL): every offset below is a field of
    // that size inside the record, naturally aligned.
    unsafe {
        let at = |off: usize| base.add(off);
        if core::ptr::read(at(30)) != IPPROTO_TCP {
            return None;
        }
        let family: u16 = core::ptr::read(at(28) as *const u16);
        let mut t = Tuple {
            family,
            sport: core::ptr::read(at(24) as *const u16),
            dport: core::ptr::read(at(26) as *const u16),
            saddr: [0; 16],
            daddr: [0; 16],
        };
        // Whole words: a byte array read from the context would be copied through a moving
        // pointer, which the verifier refuses for a context.
        let word = |off: usize| core::ptr::read(at(off) as *const u64).to_ne_bytes();
        if family == AF_INET {
            t.saddr[..4].copy_from_slice(&core::ptr::read(at(32) as *const u32).to_ne_bytes());
            t.daddr[..4].copy_from_slice(&core::ptr::read(at(36) as *const u32).to_ne_bytes());
        } else if family == AF_INET6 {
            t.saddr[..8].copy_from_slice(&word(40));
            t.saddr[8..].copy_from_slice(&word(48));
            t.daddr[..8].copy_from_slice(&word(56));
            t.daddr[8..].copy_from_slice(&word(64));
        } else {
            return None;
        }
        let sk = core::ptr::read(at(8) as *const u64);
        let old = core::ptr::read(at(16) as *const i32);
        let new = core::ptr::read(at(20) as *const i32);
        on_state(ctx, sk, old as u8, new as u8, &t);
    }
    Some(())
}

/// `sock:inet_sock_set_state` as a BTF tracepoint (`trace_inet_sock_set_state(sk, oldstate,
/// newstate)`, the same call sites as the classic one): the kernel passes its arguments as
/// they are, without first assembling the trace record the classic tracepoint fills on every
/// hit, whoever listens. The protocol and endpoints are read from the socket (BTF offsets).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: *const u8 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let _ = set_state_btf(&ctx, sk, old, new);
    0
}

/// Whether a BTF tracepoint's `struct sock *` is a TCP socket.
#[inline(always)]
fn btf_is_tcp(sk: *const u8) -> bool {
    if config!(flags) & flags::HAVE_SOCK_OFFSETS == 0 {
        return false;
    }
    // SAFETY: `sk` is a BTF tracepoint's BTF-typed `struct sock *`, and the offsets come from
    // the frozen config, so the verifier sees them as constants and checks each load against
    // the kernel's BTF: plain loads (a fault reads as zero), no helper call per field.
    // `sk_protocol` is a u16 since Linux 5.6 and a byte-aligned 8-bit field before: its low
    // byte (little-endian) is the protocol either way.
    unsafe { core::ptr::read(sk.add(config!(sock.sk_protocol) as usize)) == IPPROTO_TCP }
}

fn set_state_btf(ctx: &BtfTracePointContext, sk: *const u8, old: i32, new: i32) -> Option<()> {
    if !btf_is_tcp(sk) {
        return None;
    }
    let o = config!(sock);
    // SAFETY: as in [`btf_is_tcp`].
    unsafe {
        let at = |off: u16| sk.add(off as usize);
        let family: u16 = core::ptr::read(at(o.skc_family) as *const u16);
        let mut t = Tuple {
            family,
            sport: core::ptr::read(at(o.skc_num) as *const u16),
            dport: u16::from_be(core::ptr::read(at(o.skc_dport) as *const u16)),
            saddr: [0; 16],
            daddr: [0; 16],
        };
        // 32-bit words: the width of the address members the verifier checks the loads against.
        let words = |off: u16, n: usize, to: &mut [u8; 16]| {
            for i in 0..n {
                let w = core::ptr::read(at(off + 4 * i as u16) as *const u32);
                to[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
            }
        };
        if family == AF_INET {
            words(o.skc_rcv_saddr, 1, &mut t.saddr);
            words(o.skc_daddr, 1, &mut t.daddr);
        } else if family == AF_INET6 {
            words(o.skc_v6_rcv_saddr, 4, &mut t.saddr);
            words(o.skc_v6_daddr, 4, &mut t.daddr);
        } else {
            return None;
        }
        on_state(ctx, sk as u64, old as u8, new as u8, &t);
    }
    Some(())
}

/// `tcp_set_state(struct sock *sk, int state)` for kernels without the tracepoint. Reads the
/// old state and the endpoints from `struct sock_common` with offsets from the kernel's BTF.
#[kprobe]
pub fn tcp_set_state_kprobe(ctx: ProbeContext) -> u32 {
    if let (Some(sk), Some(new)) = (ctx.arg::<*const u8>(0), ctx.arg::<i32>(1)) {
        let _ = set_state_from_sock(&ctx, sk, new);
    }
    0
}

/// The same hook as an fentry program, where the kernel allows it (cheaper than a kprobe).
#[fentry(function = "tcp_set_state")]
pub fn tcp_set_state_fentry(ctx: FEntryContext) -> u32 {
    let sk: *const u8 = ctx.arg(0);
    let new: i32 = ctx.arg(1);
    let _ = set_state_from_sock(&ctx, sk, new);
    0
}

fn set_state_from_sock<C: EbpfContext>(ctx: &C, sk: *const u8, new: i32) -> Option<()> {
    let (old, t) = sock_tuple(sk)?;
    on_state(ctx, sk as u64, old, new as u8, &t);
    Some(())
}

/// The state and endpoints of a socket, read from `struct sock_common` (BTF offsets).
#[inline(always)]
fn sock_tuple(sk: *const u8) -> Option<(u8, Tuple)> {
    if config!(flags) & flags::HAVE_SOCK_OFFSETS == 0 {
        return None;
    }
    let o = config!(sock);
    let old: u8 = unsafe { read(sk, o.skc_state)? };
    let family: u16 = unsafe { read(sk, o.skc_family)? };
    let dport_be: u16 = unsafe { read(sk, o.skc_dport)? };
    let mut t = Tuple {
        family,
        sport: unsafe { read(sk, o.skc_num)? },
        dport: u16::from_be(dport_be),
        saddr: [0; 16],
        daddr: [0; 16],
    };
    if family == AF_INET {
        let s: [u8; 4] = unsafe { read(sk, o.skc_rcv_saddr)? };
        let d: [u8; 4] = unsafe { read(sk, o.skc_daddr)? };
        t.saddr[..4].copy_from_slice(&s);
        t.daddr[..4].copy_from_slice(&d);
    } else if family == AF_INET6 {
        t.saddr = unsafe { read(sk, o.skc_v6_rcv_saddr)? };
        t.daddr = unsafe { read(sk, o.skc_v6_daddr)? };
    } else {
        return None;
    }
    Some((old, t))
}

/// A socket seen for the first time by its I/O: it predates the tracer (or its entry was
/// evicted). Track it from now on, so its bytes and activity are counted like any other's.
#[inline(always)]
fn adopt(sk: u64, now: u64) -> Option<*mut SockLife> {
    let (state, t) = sock_tuple(sk as *const u8)?;
    let life = start_life(sk, state, state, &t, netns_of(sk as *const u8), now)?;
    fill_tuple(unsafe { &mut (*life).meta }, &t);
    Some(life)
}

/// The tracked life of the socket a `tcp:*` trace record names, with the record's base.
#[inline(always)]
fn tracked(
    ctx: &TracePointContext,
    skaddr_off: u16,
) -> Option<(u64, *const u8, &'static mut SockLife)> {
    let base = ctx.as_ptr() as *const u8;
    let sk: u64 = unsafe { read(base, skaddr_off)? };
    let life = SOCKS.get_ptr_mut(&sk)?;
    Some((sk, base, unsafe { &mut *life }))
}

/// `tcp:tcp_send_reset` (`tcp_v4_send_reset`/`tcp_send_active_reset`).
#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let l = config!(send_reset);
    let Some((_, base, life)) = tracked(&ctx, l.skaddr) else {
        return 0;
    };
    let reason = unsafe { read::<u32>(base, l.reason) }.unwrap_or(u32::MAX);
    let now = unsafe { bpf_ktime_get_ns() };
    if life.rst_sent == 0 {
        life.first_rst_sent_ns = now;
        life.rst_sent_reason = reason;
    }
    life.rst_sent = life.rst_sent.saturating_add(1);
    let state = current_state(life);
    if state == tcp_state::CLOSE && config!(flags) & flags::FOLD_CLOSED_RESETS != 0 {
        life.rst_sent_folded = life.rst_sent_folded.saturating_add(1);
        return 0;
    }
    emit_live(
        &ctx,
        kind::RESET_SENT,
        &life.meta,
        state,
        state,
        reason,
        now,
    );
    0
}

/// `tcp:tcp_receive_reset` (`tcp_reset`). Also fires when the kernel aborts a socket itself
/// (data after close): userspace tells the two apart with the RST it then sends.
#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    if let Some((_, _, life)) = tracked(&ctx, config!(receive_reset.skaddr)) {
        receive_reset(&ctx, life);
    }
    0
}

/// [`tcp_receive_reset`] as a BTF tracepoint (`trace_tcp_receive_reset(sk)`).
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    if let Some(life) = SOCKS.get_ptr_mut(&sk) {
        receive_reset(&ctx, unsafe { &mut *life });
    }
    0
}

#[inline(always)]
fn receive_reset<C: EbpfContext>(ctx: &C, life: &mut SockLife) {
    let now = unsafe { bpf_ktime_get_ns() };
    let state = current_state(life);
    if life.rst_recv == 0 {
        life.first_rst_recv_ns = now;
        life.rst_recv_state = state;
    }
    life.rst_recv = life.rst_recv.saturating_add(1);
    emit_live(
        ctx,
        kind::RESET_RECEIVED,
        &life.meta,
        state,
        state,
        u32::MAX,
        now,
    );
}

/// `tcp:tcp_retransmit_skb` (`__tcp_retransmit_skb`).
#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let l = config!(retransmit);
    let Some((_, base, life)) = tracked(&ctx, l.skaddr) else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    life.retrans = life.retrans.saturating_add(1);
    life.last_retrans_ns = now;
    let state = current_state(life);
    // On an established socket a retransmission is the only trace a black hole leaves.
    if state == tcp_state::ESTABLISHED || config!(flags) & flags::EMIT_ALL_TRANSITIONS != 0 {
        let err = unsafe { read::<i32>(base, l.reason) }.unwrap_or(0);
        emit_live(
            &ctx,
            kind::RETRANSMIT,
            &life.meta,
            state,
            state,
            err as u32,
            now,
        );
    }
    0
}

/// `tcp:tcp_destroy_sock` (`tcp_v4_destroy_sock`): the socket's life is over, after any
/// RST that followed its move to CLOSE.
#[tracepoint]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    if let Some((sk, _, life)) = tracked(&ctx, config!(destroy.skaddr)) {
        destroy(&ctx, sk, life);
    }
    0
}

/// [`tcp_destroy_sock`] as a BTF tracepoint (`trace_tcp_destroy_sock(sk)`).
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn tcp_destroy_sock_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    if let Some(life) = SOCKS.get_ptr_mut(&sk) {
        destroy(&ctx, sk, life);
    }
    0
}

#[inline(always)]
fn destroy<C: EbpfContext>(ctx: &C, sk: u64, life: *mut SockLife) {
    end_life(ctx, life, unsafe { bpf_ktime_get_ns() });
    let _ = SOCKS.remove(&sk);
}

/// `sock:sock_send_length` (`sock_sendmsg`), process context: bytes, activity, owner.
#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    on_length(&ctx, true);
    0
}

/// `sock:sock_recv_length` (`sock_recvmsg`), process context: bytes, activity, owner.
#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    on_length(&ctx, false);
    0
}

/// [`sock_send_length`] as a BTF tracepoint (`trace_sock_send_length(sk, ret, flags)`).
#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length_btf(ctx: BtfTracePointContext) -> u32 {
    length_btf(&ctx, true);
    0
}

/// [`sock_recv_length`] as a BTF tracepoint (`trace_sock_recv_length(sk, ret, flags)`).
#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length_btf(ctx: BtfTracePointContext) -> u32 {
    length_btf(&ctx, false);
    0
}

#[inline(always)]
fn length_btf(ctx: &BtfTracePointContext, send: bool) -> Option<()> {
    let sk: *const u8 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let msg_flags: i32 = ctx.arg(2);
    if !btf_is_tcp(sk) {
        return None;
    }
    // As in [`on_length`]: a MSG_PEEK receive is neither counted nor walked.
    if !send && msg_flags & MSG_PEEK != 0 {
        return on_io(ctx, sk as u64, ret.min(0), send);
    }
    on_io(ctx, sk as u64, ret, send)
}

#[inline(always)]
fn on_length(ctx: &TracePointContext, send: bool) -> Option<()> {
    let base = ctx.as_ptr() as *const u8;
    // These fire for every send and receive of every socket: with the usual layout, plain
    // loads from the record (the verifier allows constant offsets into a tracepoint's ctx).
    let (proto, sk, ret) = if config!(flags) & flags::LENGTH_USUAL != 0 {
        // SAFETY: the agent checked the format: sk at 8 (u64), protocol at 18 (u16), ret at
        // 20 (i32), all aligned and inside the record.
        unsafe {
            (
                core::ptr::read(base.add(18) as *const u16) as u8,
                core::ptr::read(base.add(8) as *const u64),
                core::ptr::read(base.add(20) as *const i32),
            )
        }
    } else {
        let l = config!(length);
        unsafe {
            (
                read::<u8>(base, l.protocol)?,
                read::<u64>(base, l.sk)?,
                read::<i32>(base, l.ret)?,
            )
        }
    };
    if proto != IPPROTO_TCP {
        return None;
    }
    // A MSG_PEEK receive leaves the data to be read again: its bytes are neither counted nor
    // walked twice (only its owner is taken).
    if !send && flags_of(base) & MSG_PEEK != 0 {
        return on_io(ctx, sk, ret.min(0), send);
    }
    on_io(ctx, sk, ret, send)
}

/// The `flags` of a length record (at 24 in the usual layout; other layouts are not read).
#[inline(always)]
fn flags_of(base: *const u8) -> i32 {
    if config!(flags) & flags::LENGTH_USUAL != 0 {
        // SAFETY: the usual layout has `flags` (i32) at 24, inside the record.
        unsafe { core::ptr::read(base.add(24) as *const i32) }
    } else {
        0
    }
}

/// One send or receive call on a TCP socket, in its process: bytes, activity, owner.
#[inline(always)]
fn on_io<C: EbpfContext>(ctx: &C, sk: u64, ret: i32, send: bool) -> Option<()> {
    let now = unsafe { bpf_ktime_get_ns() };
    let life = match SOCKS.get_ptr_mut(&sk) {
        Some(p) => p,
        None => adopt(sk, now)?,
    };
    let life = unsafe { &mut *life };
    if ret > 0 {
        // Inside an OpenSSL call the bytes are TLS records: the call's return walks the
        // plaintext instead.
        let in_tls = config!(flags) & flags::H2_TLS != 0 && tls::note_socket(sk);
        let h2 = config!(flags) & flags::H2C != 0 && !in_tls && h2::wants(life, send);
        let peek = send && life.first_bytes_len == 0 && config!(flags) & flags::PEEK != 0;
        if (h2 || peek)
            && let Some(b) = h2::syscall_buf(send, ret as u32)
        {
            if peek {
                peek_first_bytes(life, &b, ret);
            }
            if h2 {
                let first = if send {
                    life.bytes_sent == 0
                } else {
                    life.bytes_recv == 0
                };
                // Nothing the other way yet: where a server's SETTINGS may precede the preface.
                let quiet = if send {
                    life.bytes_recv == 0
                } else {
                    life.bytes_sent == 0
                };
                let d = if send { 0 } else { 1 };
                h2::on_io(ctx, life, sk, &b, ret as u32, d, first, quiet);
            }
        }
        if send {
            // A send after the previous one was answered opens a new exchange: remember the
            // longest silence before one (what an idle-timeout middlebox measures).
            if life.last_send_ns <= life.last_recv_ns {
                let last = life.last_recv_ns.max(life.meta.start_ns);
                let gap = now.saturating_sub(last);
                if gap > life.longest_request_gap_ns {
                    life.longest_request_gap_ns = gap;
                    life.longest_request_gap_end_ns = now;
                }
            }
            life.bytes_sent += ret as u64;
            life.last_send_ns = now;
        } else {
            life.bytes_recv += ret as u64;
            life.last_recv_ns = now;
        }
    }
    claim_owner(&mut life.meta, owner_src::IO);
    Some(())
}

/// `tcp_sendmsg(sk, msg, size)` at entry, where `sock:sock_send_length` is missing: remember
/// the socket for the return probe.
#[kprobe]
pub fn tcp_sendmsg_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        let _ = IO_SOCK.insert(&bpf_get_current_pid_tgid(), &sk, 0);
    }
    0
}

/// `tcp_sendmsg` returns the bytes queued, like `sock_sendmsg` in `sock:sock_send_length`.
#[kretprobe]
pub fn tcp_sendmsg_kretprobe(ctx: RetProbeContext) -> u32 {
    io_return(&ctx, true);
    0
}

/// `tcp_cleanup_rbuf(sk, copied)`, where `sock:sock_recv_length` is missing: `tcp_recvmsg`
/// calls it once it has copied `copied` bytes to the reader, in the reader's context. A
/// kretprobe on `tcp_recvmsg` would be exact too, but a reader blocked inside holds one of
/// the kernel's few kretprobe instances, and with more blocked readers than instances the
/// returns would go unseen.
#[kprobe]
pub fn tcp_cleanup_rbuf_kprobe(ctx: ProbeContext) -> u32 {
    if let (Some(sk), Some(copied)) = (ctx.arg::<u64>(0), ctx.arg::<i32>(1)) {
        on_io(&ctx, sk, copied, false);
    }
    0
}

#[inline(always)]
fn io_return(ctx: &RetProbeContext, send: bool) -> Option<()> {
    let key = bpf_get_current_pid_tgid();
    let sk = unsafe { IO_SOCK.get(&key) }.copied()?;
    let _ = IO_SOCK.remove(&key);
    on_io(ctx, sk, ctx.ret::<i32>(), send)
}

/// The first bytes of this send, from the buffer of the thread's syscall.
#[inline(always)]
fn peek_first_bytes(life: &mut SockLife, b: &UserBuf, sent: i32) {
    let Some((ptr, _, _, _)) = h2::first_segment(b) else {
        return;
    };
    if let Ok(bytes) = unsafe { bpf_probe_read_user(ptr as *const [u8; 8]) } {
        life.first_bytes = bytes;
        life.first_bytes_len = if sent >= 8 { 8 } else { sent as u8 };
    }
}

#[inline(always)]
fn current_state(life: &SockLife) -> u8 {
    match life.n_trans as usize {
        0 => life.first_state,
        n => life.trans_state[(n - 1).min(MAX_TRANSITIONS - 1)],
    }
}

/// `sched:sched_process_fork` (only with `--follow-forks`): runs in the forking task.
#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if unsafe { FOLLOW.get(&parent) }.is_none() {
        return 0;
    }
    let Some(child) = (unsafe { read::<i32>(ctx.as_ptr() as *const u8, config!(fork_child_pid)) })
    else {
        return 0;
    };
    let child = child as u32;
    let _ = FOLLOW.insert(&child, &1, 0);
    let rec = ForkRecord {
        hdr: header(kind::FORK, unsafe { bpf_ktime_get_ns() }),
        parent,
        child,
    };
    emit(&ctx, &rec as *const ForkRecord);
    0
}

// ---- Conntrack: state changes of TCP entries, from the kernel side ----------------------
//
// No tracepoint reports conntrack state. Where kprobes or fentry exist, the hook is
// `__nf_ct_refresh_acct()` (net/netfilter/nf_conntrack_core.c): the TCP tracker calls it
// for every packet right after updating `ct->proto.tcp.state` (nf_conntrack_proto_tcp.c).
// Elsewhere BTF tracepoints read the entry attached to a packet (`skb->_nfct`):
// `net_dev_start_xmit` (include/trace/events/net.h) for every transmitted packet (forwarded
// and locally sent ones have passed conntrack by then), and `kfree_skb`
// (include/trace/events/skb.h) for packets dropped after conntrack saw them, such as a RST
// a firewall filters: its state change would otherwise show only at the next packet.

/// `IPS_TEMPLATE`: a template attached by the CT target, not a tracked connection.
const IPS_TEMPLATE: u32 = 1 << 11;

#[inline(always)]
fn ct_tuple(ct: *const u8, tuple: u16, addr: &mut [u8; 16], port: &mut u16, src: bool) {
    let (a, p) = if src {
        (config!(ct.src_u3), config!(ct.src_port))
    } else {
        (config!(ct.dst_u3), config!(ct.dst_port))
    };
    let base = unsafe { ct.add(tuple as usize) };
    *addr = unsafe { read(base, a) }.unwrap_or([0; 16]);
    *port = u16::from_be(unsafe { read(base, p) }.unwrap_or(0));
}

#[inline(always)]
fn ct_seen<C: EbpfContext>(ctx: &C, ct: *const u8, hook: u8) -> Option<()> {
    if config!(flags) & flags::CONNTRACK == 0 || ct.is_null() {
        return None;
    }
    // Fast path, taken by almost every packet: the entry's state has not changed. Entries
    // that are not TCP or not in a followed namespace are remembered the same way (their
    // bytes at this offset do not change either), so they also stop here after the first.
    let state: u8 = unsafe { read(ct, config!(ct.tcp_state)) }?;
    let key = ct as u64;
    let old = unsafe { CT_STATES.get(&key) }
        .copied()
        .unwrap_or(CT_STATE_UNKNOWN);
    if old == state {
        return None;
    }
    if CT_STATES.insert(&key, &state, 0).is_err() {
        count(counter::CT_TRACK_FAIL);
    }
    let orig = config!(ct.tuple_orig);
    let proto: u8 = unsafe { read(ct.add(orig as usize), config!(ct.protonum)) }?;
    if proto != IPPROTO_TCP {
        return None;
    }
    let status: u64 = unsafe { read(ct, config!(ct.status)) }?;
    if status as u32 & IPS_TEMPLATE != 0 {
        return None;
    }
    let net: u64 = unsafe { read(ct, config!(ct.ct_net)) }?;
    let netns: u32 = unsafe { read(net as *const u8, config!(sock.net_ns_inum)) }.unwrap_or(0);
    if config!(flags) & flags::CT_NETNS_FILTER != 0 && unsafe { CT_NETNS.get(&netns) }.is_none() {
        return None;
    }
    let reply = config!(ct.tuple_reply);
    let mut rec = CtRecord {
        hdr: header(kind::CT_STATE, unsafe { bpf_ktime_get_ns() }),
        ct: key,
        netns,
        family: unsafe { read(ct.add(orig as usize), config!(ct.l3num)) }.unwrap_or(0),
        old_state: old,
        new_state: state,
        status: status as u32,
        mark: unsafe { read(ct, config!(ct.mark)) }.unwrap_or(0),
        zone: unsafe { read(ct, config!(ct.zone)) }.unwrap_or(0),
        hook,
        ..CtRecord::default()
    };
    ct_tuple(ct, orig, &mut rec.orig_src, &mut rec.orig_sport, true);
    ct_tuple(ct, orig, &mut rec.orig_dst, &mut rec.orig_dport, false);
    ct_tuple(ct, reply, &mut rec.reply_src, &mut rec.reply_sport, true);
    ct_tuple(ct, reply, &mut rec.reply_dst, &mut rec.reply_dport, false);
    emit(ctx, &rec as *const CtRecord);
    Some(())
}

#[kprobe]
pub fn ct_refresh_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(ct) = ctx.arg::<*const u8>(0) {
        let _ = ct_seen(&ctx, ct, ct_hook::KPROBE);
    }
    0
}

#[fentry(function = "__nf_ct_refresh_acct")]
pub fn ct_refresh_fentry(ctx: FEntryContext) -> u32 {
    let ct: *const u8 = ctx.arg(0);
    let _ = ct_seen(&ctx, ct, ct_hook::FENTRY);
    0
}

#[inline(always)]
fn ct_of_packet(ctx: &BtfTracePointContext) {
    let skb: *const u8 = ctx.arg(0);
    let off = config!(ct.skb_nfct);
    if config!(flags) & flags::CONNTRACK != 0 && off != ABSENT {
        // SAFETY: `skb` is the tracepoint's BTF-typed `struct sk_buff *` and `off` a constant
        // of the frozen config, so the verifier checks this plain load against the kernel's
        // BTF (a fault reads as zero), as in [`btf_is_tcp`]: this runs for every packet the
        // host sends, and a helper call would cost more than the rest of the fast path.
        let nfct: u64 = unsafe { core::ptr::read(skb.add(off as usize) as *const u64) };
        // The low three bits are the packet's `enum ip_conntrack_info`.
        let _ = ct_seen(ctx, (nfct & !7) as *const u8, ct_hook::BTF_TRACEPOINT);
    }
}

#[btf_tracepoint(function = "net_dev_start_xmit")]
pub fn ct_xmit(ctx: BtfTracePointContext) -> u32 {
    ct_of_packet(&ctx);
    0
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn ct_drop(ctx: BtfTracePointContext) -> u32 {
    ct_of_packet(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
