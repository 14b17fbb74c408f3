//! HTTP/2 frames of cleartext (h2c) sockets, read from the buffers of the owner's syscalls
//! (and of TLS sockets, from the library's plaintext: see `tls`).
//!
//! `sock:sock_send_length`/`sock_recv_length` fire inside the send or receive syscall with the
//! socket and the byte count, but without the data. The syscall's arguments are still in the
//! registers the thread entered the kernel with ([`syscall_buf`]), and the length hook walks
//! the `ret` bytes that went through. Only sockets whose first bytes were the client preface
//! (or, on the server, whose first send was SETTINGS and whose first receive the preface) are
//! walked; every other socket costs one read of those registers at its first send and first
//! receive.
//!
//! Frames do not line up with calls: a header can be split across iovecs or calls, a DATA
//! frame can span many. Each direction keeps where it is in the current frame (collecting the
//! 9-byte header, capturing a control frame's payload, or skipping a payload), and the walk is
//! a `bpf_loop`. A walk that runs out of steps or cannot read the buffer gives the direction up
//! (counted, and flagged in the life record).
use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user, generated},
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use h2trace_common::{FRAME_CAPTURE, FrameRecord, SockLife, counter, h2_side, h2_tls, kind};

use crate::{UserBuf, count, emit_raw, header};

/// `bpf_loop` steps per call: a step reads (part of) a frame header, captures or skips (part of) a
/// payload, or moves to the next iovec.
const STEPS: u32 = 1024;

const PREFACE: [u8; 24] = *b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// [`PREFACE`] as the little-endian words [`head`] returns.
const PREFACE_WORDS: [u64; 3] = {
    let mut w = [0u64; 3];
    let mut i = 0;
    while i < 24 {
        w[i / 8] |= (PREFACE[i] as u64) << (8 * (i % 8));
        i += 1;
    }
    w
};

/// Where a direction is in the current frame.
const HEADER: u8 = 0;
const CAPTURE: u8 = 1;
const SKIP: u8 = 2;
/// Frame boundaries lost: the direction is no longer walked.
const LOST: u8 = 3;

const HEADERS: u8 = 1;

const EEXIST: i32 = 17;

/// What a syscall's buffer argument points to (`UserBuf::kind`).
pub const BUF: u32 = 0;
pub const IOVEC: u32 = 1;
pub const MSGHDR: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Dir {
    /// Payload bytes left to capture (CAPTURE) or skip (SKIP).
    need: u32,
    /// The current frame's payload length.
    len: u32,
    /// Highest stream id that carried HEADERS this way: a higher one is a new stream.
    max_stream: u32,
    phase: u8,
    /// Header bytes (HEADER) or payload bytes (CAPTURE) collected so far.
    have: u8,
    _pad: [u8; 2],
    /// Sized so that masked offsets and lengths stay inside, for the verifier.
    hdr: [u8; 32],
    payload: [u8; 2 * FRAME_CAPTURE],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Conn {
    dirs: [Dir; 2],
    /// The unconfirmed side's first frame (the server's SETTINGS: sent by a server, received
    /// by a client), held until the client preface confirms HTTP/2.
    held: Dir,
    has_held: u64,
    /// `start_ns` of the life this entry belongs to (0 while its first `start` makes it).
    life_start: u64,
}

/// Parse state of HTTP/2 sockets, keyed by `struct sock *`. Removed when the life ends.
#[map]
static H2: LruHashMap<u64, Conn> = LruHashMap::with_max_entries(8192, 0);

/// Never written: the all-zero value a new [`H2`] entry starts from (too big for the stack).
#[map]
static H2_ZERO: PerCpuArray<Conn> = PerCpuArray::with_max_entries(1, 0);

/// Held frames delivered, keyed by socket and life start. Two calls on two CPUs can both find
/// the held frame before either clears `has_held`; the one whose `BPF_NOEXIST` insert succeeds
/// delivers it (the map update is atomic, which a plain store is not, and BPF atomics would
/// need ISA v3 and a `core` with them). One entry per HTTP/2 life that held a frame; old ones
/// age out of the LRU, and the life start keeps a reused `struct sock` from meeting its
/// predecessor's entry.
#[map]
static HELD_SENT: LruHashMap<[u64; 2], u8> = LruHashMap::with_max_entries(4096, 0);

#[map]
static FRAME_SCRATCH: PerCpuArray<FrameRecord> = PerCpuArray::with_max_entries(1, 0);

/// The buffer of the send- or receive-family syscall the current thread is in, if it is a
/// send (`send`) or a receive like this one, of at least `ret` bytes.
///
/// The length hooks fire inside `sock_sendmsg`/`sock_recvmsg`, which `write`, `sendto`,
/// `writev`, `sendmsg`, `read`, `recvfrom`, `readv` and `recvmsg` reach with the buffer (or
/// the iovec array, or the msghdr) as their second argument and its length (or the iovec
/// count) as their third. The registers the thread entered the kernel with still hold them:
/// `bpf_task_pt_regs` (Linux 5.15) reads them where they are needed, at a socket's first
/// send and receive and on HTTP/2 sockets, instead of an entry tracepoint on each of those
/// syscalls stashing every read and write on the host.
#[inline(always)]
pub fn syscall_buf(send: bool, ret: u32) -> Option<UserBuf> {
    // x86-64 `struct pt_regs` (the ptrace layout): dx at 96, si at 104, di at 112, orig_ax
    // (the syscall number) at 120.
    let r = unsafe {
        let regs = generated::bpf_task_pt_regs(generated::bpf_get_current_task_btf()) as u64;
        bpf_probe_read_kernel((regs + 96) as *const [u64; 4]).ok()?
    };
    let (count, ptr, nr) = (r[0], r[1], r[3]);
    // x86-64 syscall numbers. A 32-bit task's numbers mean other calls here, none of which
    // reaches a socket's sendmsg or recvmsg, and kernel threads (io_uring workers, in-kernel
    // socket users) carry zeroed registers: `read` of 0 bytes, which the length check turns
    // away.
    let (kind, is_send) = match nr {
        0 => (BUF, false),
        1 => (BUF, true),
        19 => (IOVEC, false),
        20 => (IOVEC, true),
        44 => (BUF, true),
        45 => (BUF, false),
        46 => (MSGHDR, true),
        47 => (MSGHDR, false),
        _ => return None,
    };
    if is_send != send || kind == BUF && count < ret as u64 {
        return None;
    }
    Some(UserBuf { ptr, count, kind })
}

/// The first segment of a syscall's buffer as (pointer, length), and the iovec array with its
/// length (0, 0 for a plain buffer).
#[inline(always)]
pub fn first_segment(b: &UserBuf) -> Option<(u64, u64, u64, u64)> {
    if b.kind == BUF {
        return Some((b.ptr, b.count, 0, 0));
    }
    let (iov, n) = if b.kind == MSGHDR {
        // struct user_msghdr: msg_name, msg_namelen (+pad), msg_iov at 16, msg_iovlen at 24.
        unsafe {
            (
                bpf_probe_read_user((b.ptr + 16) as *const u64).ok()?,
                bpf_probe_read_user((b.ptr + 24) as *const u64).ok()?,
            )
        }
    } else {
        (b.ptr, b.count)
    };
    if n == 0 {
        return None;
    }
    let v = unsafe { bpf_probe_read_user(iov as *const [u64; 2]).ok()? };
    Some((v[0], v[1], iov, n))
}

/// Does this syscall need its buffer? Not for sockets whose plaintext a TLS library hands
/// over; for sockets already known to speak HTTP/2, and for every socket's first send and
/// first receive (to look for the preface).
#[inline(always)]
pub fn wants(life: &SockLife, send: bool) -> bool {
    life.h2_tls & h2_tls::TLS == 0
        && (life.h2_side != h2_side::NONE
            || if send {
                life.bytes_sent == 0
            } else {
                life.bytes_recv == 0
            })
}

/// One send (`d` = 0) or receive (`d` = 1) of `ret` bytes of a socket's stream, before it is
/// counted. `first`: the first this way (where a preface can be); `other_quiet`: nothing yet
/// the other way (when a server's SETTINGS can come before the preface).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn on_io<C: EbpfContext>(
    ctx: &C,
    life: &mut SockLife,
    sk: u64,
    b: &UserBuf,
    ret: u32,
    d: usize,
    first: bool,
    other_quiet: bool,
) {
    let side = life.h2_side;
    if side == h2_side::NONE && !first {
        return;
    }
    if (side == h2_side::NONE
        || side == h2_side::MAYBE_SERVER && d == 1
        || side == h2_side::MAYBE_CLIENT && d == 0)
        && detect(life, sk, b, ret, d, other_quiet).is_none()
    {
        return;
    }
    walk(ctx, life, sk, b, ret, d);
}

/// At a socket's first send or receive: does it speak HTTP/2? `Some` when this call is to be
/// walked.
#[inline(always)]
fn detect(
    life: &mut SockLife,
    sk: u64,
    b: &UserBuf,
    ret: u32,
    d: usize,
    other_quiet: bool,
) -> Option<()> {
    let (ptr, len, iov, iov_n) = first_segment(b)?;
    let side = life.h2_side;
    if let Some(head) = head(ptr, len, iov, iov_n, ret) {
        if head == PREFACE_WORDS {
            life.h2_preface[d & 1] = 1;
            if side == h2_side::NONE {
                let side = if d == 0 {
                    h2_side::CLIENT
                } else {
                    h2_side::SERVER
                };
                start(life, sk, side)?;
            } else if !settle(life) {
                return None;
            }
            // The preface is not a frame: the walk steps over it (it may span iovecs).
            let c = H2.get_ptr_mut(&sk)?;
            let st = unsafe { &mut (*c).dirs[d & 1] };
            st.phase = SKIP;
            st.need = PREFACE.len() as u32;
            return Some(());
        }
    }
    if side == h2_side::MAYBE_SERVER || side == h2_side::MAYBE_CLIENT {
        if settle(life) {
            // The preface went this way already, in this way's first call (see `settle`).
            return Some(());
        }
        // No preface where it had to be: not HTTP/2 after all.
        life.h2_side = h2_side::NONE;
        let _ = H2.remove(&sk);
        return None;
    }
    if other_quiet && len >= 9 {
        // A server may send its SETTINGS before the client's preface arrives (seen sent by
        // the server, or received by a client that reads before it writes): frame type 4,
        // no flags, stream 0, a whole number of 6-byte settings.
        let h = unsafe { bpf_probe_read_user(ptr as *const [u8; 9]).ok()? };
        let n = ((h[1] as u32) << 8) | h[2] as u32;
        if h[0] == 0 && n % 6 == 0 && h[3] == 4 && h[4] == 0 && h[5..9] == [0, 0, 0, 0] {
            let maybe = if d == 0 {
                h2_side::MAYBE_SERVER
            } else {
                h2_side::MAYBE_CLIENT
            };
            start(life, sk, maybe)?;
            return Some(());
        }
    }
    None
}

/// The first 24 bytes of a call, from its first iovec or its first two (a preface may be
/// split, as readv into small buffers does), as three little-endian words: compared with
/// [`PREFACE_WORDS`] in three instructions.
#[inline(always)]
fn head(ptr: u64, len: u64, iov: u64, iov_n: u64, ret: u32) -> Option<[u64; 3]> {
    if ret < 24 {
        return None;
    }
    // Twice the size that is read, so that masked offsets and lengths stay inside; 8-aligned,
    // so that zeroing it is eight 64-bit stores, not 64 single bytes.
    #[repr(C, align(8))]
    struct Buf([u8; 64]);
    let mut buf = Buf([0; 64]);
    let first = len.min(24) as u32;
    read_user(buf.0.as_mut_ptr(), first & 31, ptr)?;
    if first < 24 {
        if iov_n < 2 {
            return None;
        }
        let v = unsafe { bpf_probe_read_user((iov + 16) as *const [u64; 2]).ok()? };
        let rest = 24 - first;
        if v[1] < rest as u64 {
            return None;
        }
        let dst = unsafe { buf.0.as_mut_ptr().add((first & 31) as usize) };
        read_user(dst, rest & 31, v[0])?;
    }
    // SAFETY: `buf` is 8-aligned and longer than 24 bytes.
    Some(unsafe { core::ptr::read(buf.0.as_ptr() as *const [u64; 3]) })
}

/// Make the socket's parse state and set its side.
///
/// A socket's first send and first receive can run at once on two CPUs (a client's reader
/// and writer, as grpc-go's, do), and both may start: the first entry is kept, so that the
/// frame one of them holds in it is not replaced by the other's empty one.
#[inline(always)]
fn start(life: &mut SockLife, sk: u64, side: u8) -> Option<()> {
    let zero = H2_ZERO.get_ptr(0)?;
    let zero = unsafe { &*zero };
    let made = match H2.insert(&sk, zero, BPF_NOEXIST as u64) {
        Ok(()) => true,
        Err(e) if e == -EEXIST => false,
        Err(_) => {
            count(counter::H2_TRACK_FAIL);
            return None;
        }
    };
    let mut c = H2.get_ptr_mut(&sk)?;
    let owner = unsafe { (*c).life_start };
    if !made && owner != 0 && owner != life.meta.start_ns {
        // Left by an earlier life at this address whose end went unseen (its life record
        // was evicted): start afresh.
        if H2.insert(&sk, zero, 0).is_err() {
            count(counter::H2_TRACK_FAIL);
            return None;
        }
        c = H2.get_ptr_mut(&sk)?;
    }
    unsafe { (*c).life_start = life.meta.start_ns };
    life.h2_side = side;
    Some(())
}

/// A MAYBE side whose preface has gone the way it had to (sent by a client, received by a
/// server) is confirmed. Returns whether the side is confirmed.
///
/// The preface is looked for in `h2_preface`, not only in the side: a client's first send
/// (the preface) and first receive (the server's SETTINGS) can run at once on two CPUs, and
/// the receive's MAYBE_CLIENT can overwrite the CLIENT the send set. Each direction writes
/// only its own `h2_preface` byte, so that one survives.
#[inline(always)]
fn settle(life: &mut SockLife) -> bool {
    match life.h2_side {
        h2_side::MAYBE_CLIENT if life.h2_preface[0] != 0 => life.h2_side = h2_side::CLIENT,
        h2_side::MAYBE_SERVER if life.h2_preface[1] != 0 => life.h2_side = h2_side::SERVER,
        h2_side::CLIENT | h2_side::SERVER => {}
        _ => return false,
    }
    true
}

/// Deliver the frame held while the side was a MAYBE, once it is confirmed. A client held
/// a frame it received, a server one it sent.
///
/// Called wherever a confirmed side may first meet the held frame: at each walk (the call
/// whose preface confirms the side walks on from it), at a frame's end, and at the life's
/// end. The call that confirmed the side may have run on another CPU before this frame was
/// held.
#[inline(always)]
fn flush_held(ctx: *mut c_void, life: &mut SockLife, c: *mut Conn) {
    let c = unsafe { &mut *c };
    if c.has_held != 0 && settle(life) {
        c.has_held = 0;
        let key = [life.meta.skaddr, life.meta.start_ns];
        // An existing key: another call delivered it. Any other failure loses the frame.
        if let Err(e) = HELD_SENT.insert(&key, &0, BPF_NOEXIST as u64) {
            if e != -EEXIST {
                count(counter::H2_TRACK_FAIL);
            }
            return;
        }
        let received = (life.h2_side == h2_side::CLIENT) as u8;
        emit_frame(ctx, life, &c.held, received);
    }
}

/// Where a walk is; shared with [`walk_step`] through `bpf_loop`.
#[repr(C)]
struct Walk {
    /// The program's context (for perf output).
    ctx: *mut c_void,
    life: *mut SockLife,
    conn: *mut Conn,
    seg: u64,
    iov: u64,
    iov_n: u64,
    next_iov: u64,
    d: u64,
    seg_left: u32,
    /// Bytes of this call not yet walked.
    left: u32,
}

/// Walk `ret` bytes of one call through the direction's frame parser.
/// A `bpf_loop` (5.17+) whose callback the verifier checks once, not once per iteration.
#[inline(always)]
fn walk<C: EbpfContext>(ctx: &C, life: &mut SockLife, sk: u64, b: &UserBuf, ret: u32, d: usize) {
    let Some(c) = H2.get_ptr_mut(&sk) else {
        return;
    };
    flush_held(ctx.as_ptr(), life, c);
    if unsafe { (*c).dirs[d & 1].phase } == LOST {
        return;
    }
    let mut w = Walk {
        ctx: ctx.as_ptr(),
        life,
        conn: c,
        seg: 0,
        iov: 0,
        iov_n: 0,
        next_iov: 1,
        d: d as u64,
        seg_left: 0,
        left: ret,
    };
    if let Some((seg, seg_len, iov, iov_n)) = first_segment(b) {
        w.seg = seg;
        w.seg_left = seg_len.min(ret as u64) as u32;
        w.iov = iov;
        w.iov_n = iov_n;
        unsafe {
            generated::bpf_loop(
                STEPS,
                walk_step as *mut c_void,
                &mut w as *mut Walk as *mut c_void,
                0,
            )
        };
        if w.left == 0 {
            return;
        }
    }
    // Out of steps, out of iovecs or unreadable: the rest of this call went by unwalked.
    unsafe { (*c).dirs[d & 1].phase = LOST };
    let life = unsafe { &mut *w.life };
    life.h2_desync |= 1 << d;
    count(counter::H2_DESYNC);
}

/// One step of a walk: the next iovec, or the next bytes of the current phase. Returns 1 to
/// stop (done, or stuck: `left` says which).
#[inline(never)]
extern "C" fn walk_step(_i: u64, w: *mut c_void) -> i64 {
    let w = unsafe { &mut *(w as *mut Walk) };
    if w.left == 0 {
        return 1;
    }
    if w.seg_left == 0 {
        // No constant bound here: one would make the verifier track the index exactly and
        // check every iteration apart. The kernel caps iovecs at UIO_MAXIOV, and STEPS caps
        // the walk.
        if w.next_iov >= w.iov_n {
            return 1;
        }
        let Ok(v) = (unsafe { bpf_probe_read_user((w.iov + 16 * w.next_iov) as *const [u64; 2]) })
        else {
            return 1;
        };
        w.next_iov += 1;
        w.seg = v[0];
        w.seg_left = v[1].min(w.left as u64) as u32;
        return 0;
    }
    let d = (w.d & 1) as usize;
    let (life, c) = unsafe { (&mut *w.life, w.conn) };
    let st = unsafe { &mut (*c).dirs[d] };
    let Some(n) = step(w.ctx, life, c, st, d, w.seg, w.seg_left) else {
        return 1;
    };
    w.seg += n as u64;
    w.seg_left -= n;
    w.left -= n;
    0
}

/// Consume up to `avail` bytes at `seg` in the direction's current phase; returns how many.
#[inline(always)]
fn step(
    ctx: *mut c_void,
    life: &mut SockLife,
    c: *mut Conn,
    st: &mut Dir,
    d: usize,
    seg: u64,
    avail: u32,
) -> Option<u32> {
    let have = st.have as u32;
    match st.phase {
        HEADER => {
            if have >= 9 {
                return None;
            }
            let n = (9 - have).min(avail);
            let dst = unsafe { st.hdr.as_mut_ptr().add((have & 15) as usize) };
            read_user(dst, masked(n, 15), seg)?;
            st.have = (have + n) as u8;
            if have + n == 9 {
                frame_start(ctx, life, c, st, d);
            }
            Some(n)
        }
        CAPTURE => {
            let n = st.need.min(avail);
            let dst = unsafe { st.payload.as_mut_ptr().add((have & 63) as usize) };
            read_user(dst, masked(n, 63), seg)?;
            st.have = (have + n) as u8;
            st.need -= n;
            if st.need == 0 {
                frame_end(ctx, life, c, st, d);
            }
            Some(n)
        }
        _ => {
            let n = st.need.min(avail);
            st.need -= n;
            if st.need == 0 {
                st.phase = HEADER;
                st.have = 0;
            }
            Some(n)
        }
    }
}

/// `n & mask`, with the mask kept: LLVM drops a mask it can prove redundant (n came from a
/// `min`), and verifiers before 6.x cannot bound a size from a register-register comparison.
/// A volatile round trip hides what LLVM knows.
#[inline(always)]
fn masked(n: u32, mask: u32) -> u32 {
    let n = n;
    unsafe { core::ptr::read_volatile(&n) & mask }
}

#[inline(always)]
fn read_user(dst: *mut u8, n: u32, src: u64) -> Option<()> {
    let r = unsafe { generated::bpf_probe_read_user(dst as *mut c_void, n, src as *const c_void) };
    (r >= 0).then_some(())
}

/// A frame header is complete: count a new stream, decide what to do with the payload.
#[inline(always)]
fn frame_start(ctx: *mut c_void, life: &mut SockLife, c: *mut Conn, st: &mut Dir, d: usize) {
    let h = st.hdr;
    let len = ((h[0] as u32) << 16) | ((h[1] as u32) << 8) | h[2] as u32;
    let ty = h[3];
    let sid = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    if ty == HEADERS && sid > st.max_stream {
        st.max_stream = sid;
        // Streams the sender opened have its parity: odd for the client, even for the server.
        let local_client = life.h2_side == h2_side::CLIENT;
        let sender_client = if d == 0 { local_client } else { !local_client };
        if (sid & 1 == 1) == sender_client {
            life.h2_streams[d & 1] += 1;
        }
    }
    st.len = len;
    st.have = 0;
    // RST_STREAM, SETTINGS, PING, GOAWAY: captured and reported. The rest is skipped.
    if matches!(ty, 3 | 4 | 6 | 7) {
        st.phase = CAPTURE;
        st.need = len.min(FRAME_CAPTURE as u32);
        if st.need == 0 {
            frame_end(ctx, life, c, st, d);
        }
    } else {
        st.phase = if len == 0 { HEADER } else { SKIP };
        st.need = len;
    }
}

/// A captured frame's payload is in: report it, then skip what was not captured.
#[inline(always)]
fn frame_end(ctx: *mut c_void, life: &mut SockLife, c: *mut Conn, st: &mut Dir, d: usize) {
    if settle(life) {
        flush_held(ctx, life, c);
        emit_frame(ctx, life, st, d as u8);
    } else {
        // Not confirmed yet: keep the first frame (the SETTINGS) for when it is.
        unsafe {
            if (*c).has_held == 0 {
                (*c).held = *st;
                (*c).has_held = 1;
            }
        }
    }
    st.need = st.len - st.have as u32;
    st.phase = if st.need > 0 { SKIP } else { HEADER };
    st.have = 0;
}

#[inline(always)]
fn emit_frame(ctx: *mut c_void, life: &SockLife, st: &Dir, received: u8) {
    let Some(rec) = FRAME_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let rec = unsafe { &mut *rec };
    let h = &st.hdr;
    rec.hdr = header(kind::H2_FRAME, unsafe { bpf_ktime_get_ns() });
    rec.meta = life.meta;
    rec.stream_id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    rec.length = st.len;
    rec.frame_type = h[3];
    rec.frame_flags = h[4];
    rec.received = received;
    rec.side = life.h2_side;
    rec.captured = st.len.min(FRAME_CAPTURE as u32) as u8;
    // Byte counts and activity are updated after the walk: these are the previous call's.
    rec.prev_activity_ns = life
        .last_send_ns
        .max(life.last_recv_ns)
        .max(life.meta.start_ns);
    rec.payload.copy_from_slice(&st.payload[..FRAME_CAPTURE]);
    emit_raw(ctx, rec as *const FrameRecord);
}

/// The socket's life ended: deliver a frame still held, drop its parse state.
#[inline(always)]
pub fn end<C: EbpfContext>(ctx: &C, life: &mut SockLife) {
    if life.h2_side != h2_side::NONE {
        let sk = life.meta.skaddr;
        if let Some(c) = H2.get_ptr_mut(&sk) {
            flush_held(ctx.as_ptr(), life, c);
        }
        let _ = H2.remove(&sk);
    }
}
