//! The plaintext of TLS connections, from OpenSSL's `SSL_write(ssl, buf, num)`,
//! `SSL_read(ssl, buf, num)` and their `_ex` forms (libssl, uprobes at entry and return), for
//! `--http2 all`.
//!
//! The entry remembers the call per thread. The TLS records it writes or reads go through the
//! socket inside the call, where `sock:sock_send_length`/`sock_recv_length` (or their kprobe
//! stand-ins) name the socket: [`note_socket`] puts it on the call and remembers it for the
//! `SSL *`, because a read served from OpenSSL's buffer makes no syscall. At return the
//! plaintext (`ret` bytes of `buf`) goes through the same frame walk as cleartext sockets.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use h2trace_common::h2_tls;

use crate::{SOCKS, UserBuf, h2};

#[repr(C)]
#[derive(Clone, Copy)]
struct Call {
    ssl: u64,
    buf: u64,
    /// The socket the call's TLS records went through (0 until seen).
    sk: u64,
    send: u64,
    /// `_ex` forms: where the byte count goes (`size_t *`); 0 for the plain forms, which
    /// return it.
    count_at: u64,
}

/// The `SSL_write`/`SSL_read` call each thread is in.
#[map]
static TLS_CALLS: LruHashMap<u64, Call> = LruHashMap::with_max_entries(16384, 0);

/// The socket of each `SSL *` seen, keyed by (tgid, `SSL *`).
#[map]
static TLS_SOCKS: LruHashMap<[u64; 2], u64> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn enter(ctx: &ProbeContext, send: u64, ex: bool) -> u32 {
    if let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        let call = Call {
            ssl,
            buf,
            sk: 0,
            send,
            count_at: if ex {
                ctx.arg::<u64>(3).unwrap_or(0)
            } else {
                0
            },
        };
        let _ = TLS_CALLS.insert(&bpf_get_current_pid_tgid(), &call, 0);
    }
    0
}

/// A send or receive on socket `sk` in this thread: if it is inside an OpenSSL call, that
/// call's records go through `sk`. Returns whether it was (its bytes are ciphertext).
#[inline(always)]
pub fn note_socket(sk: u64) -> bool {
    match TLS_CALLS.get_ptr_mut(&bpf_get_current_pid_tgid()) {
        Some(call) => {
            unsafe { (*call).sk = sk };
            true
        }
        None => false,
    }
}

#[inline(always)]
fn leave(ctx: &RetProbeContext) -> Option<()> {
    let key = bpf_get_current_pid_tgid();
    let call = unsafe { TLS_CALLS.get(&key) }.copied()?;
    let _ = TLS_CALLS.remove(&key);
    let mut ret = ctx.ret::<i32>();
    if ret <= 0 {
        return None;
    }
    if call.count_at != 0 {
        // `_ex`: 1 on success, the count in `*written` / `*readbytes`.
        let n = unsafe { bpf_probe_read_user(call.count_at as *const u64).ok()? };
        ret = n.min(i32::MAX as u64) as i32;
        if ret == 0 {
            return None;
        }
    }
    let ssl_key = [key >> 32, call.ssl];
    let sk = if call.sk != 0 {
        let _ = TLS_SOCKS.insert(&ssl_key, &call.sk, 0);
        call.sk
    } else {
        unsafe { TLS_SOCKS.get(&ssl_key) }.copied()?
    };
    let life = unsafe { &mut *SOCKS.get_ptr_mut(&sk)? };
    let send = call.send != 0;
    let (bit, d) = if send {
        (h2_tls::SENT, 0)
    } else {
        (h2_tls::RECEIVED, 1)
    };
    let first = life.h2_tls & bit == 0;
    let quiet = life.h2_tls & h2_tls::RECEIVED == 0;
    life.h2_tls |= h2_tls::TLS | bit;
    let b = UserBuf {
        ptr: call.buf,
        count: ret as u64,
        kind: h2::BUF,
        send: send as u32,
    };
    h2::on_io(ctx, life, sk, &b, ret as u32, d, first, quiet);
    Some(())
}

/// `SSL_write(ssl, buf, num)` in libssl.
#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, 1, false)
}

/// `SSL_write_ex(ssl, buf, num, &written)` (Python's ssl module, for one).
#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, 1, true)
}

/// `SSL_read(ssl, buf, num)` in libssl.
#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, 0, false)
}

/// `SSL_read_ex(ssl, buf, num, &readbytes)`.
#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, 0, true)
}

/// Every form returns here: the plaintext is in `buf`.
#[uretprobe]
pub fn ssl_return(ctx: RetProbeContext) -> u32 {
    let _ = leave(&ctx);
    0
}
