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
    bindings::pt_regs,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use h2trace_common::{flags, h2_tls};

use crate::{CONFIG, SOCKS, UserBuf, h2};

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
    plaintext(ctx, sk, call.buf, ret as u32, call.send != 0)
}

/// `n` bytes of plaintext at `buf` that a TLS library sent or received on socket `sk`: the
/// frame walk, and the socket's syscalls left alone from now on.
#[inline(always)]
fn plaintext<C: EbpfContext>(ctx: &C, sk: u64, buf: u64, n: u32, send: bool) -> Option<()> {
    let life = unsafe { &mut *SOCKS.get_ptr_mut(&sk)? };
    let (bit, d) = if send {
        (h2_tls::SENT, 0)
    } else {
        (h2_tls::RECEIVED, 1)
    };
    let first = life.h2_tls & bit == 0;
    // Nothing the other way yet: where a server's SETTINGS may precede the preface.
    let other = if send { h2_tls::RECEIVED } else { h2_tls::SENT };
    let quiet = life.h2_tls & other == 0;
    life.h2_tls |= h2_tls::TLS | bit;
    let b = UserBuf {
        ptr: buf,
        count: n as u64,
        kind: h2::BUF,
    };
    h2::on_io(ctx, life, sk, &b, n, d, first, quiet);
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

// ---- Go's crypto/tls (`--go-binary`) ----------------------------------------------------
//
// Go functions take their arguments in registers (ABIInternal on amd64: RAX, RBX, RCX, …) and
// must not get return probes (the runtime moves goroutine stacks). `(*Conn).Write` has its
// plaintext at entry; `(*Conn).Read` is remembered per goroutine (R14 holds the current g: a
// goroutine that parks in Read resumes on another thread) and read at each of its RET
// instructions, where RAX holds the count. The socket comes from the connection itself:
// `tls.Conn.conn` is a `net.Conn` interface (itab, data) whose data is a `*net.TCPConn`, whose
// first word is its `*netFD`, whose `pfd.Sysfd` follows a 16-byte fdMutex; then the task's
// file table gives the `struct socket`.

#[repr(C)]
#[derive(Clone, Copy)]
struct GoRead {
    conn: u64,
    buf: u64,
}

/// `(*Conn).Read` calls in progress, keyed by (tgid, g).
#[map]
static GO_READS: LruHashMap<[u64; 2], GoRead> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn regs(ctx: &ProbeContext) -> &pt_regs {
    unsafe { &*ctx.regs }
}

/// The kernel socket behind a Go `*tls.Conn` over TCP.
#[inline(always)]
fn go_socket(conn: u64) -> Option<u64> {
    if config!(flags) & flags::HAVE_FD_OFFSETS == 0 {
        return None;
    }
    let data: u64 = unsafe { bpf_probe_read_user((conn + 8) as *const u64).ok()? };
    let netfd: u64 = unsafe { bpf_probe_read_user(data as *const u64).ok()? };
    let fd: i64 = unsafe { bpf_probe_read_user((netfd + 16) as *const i64).ok()? };
    let o = config!(fd);
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let files: u64 = unsafe { crate::read(task, o.task_files)? };
    let fdt: u64 = unsafe { crate::read(files as *const u8, o.files_fdt)? };
    let max: u32 = unsafe { crate::read(fdt as *const u8, o.fdt_max_fds)? };
    if fd < 0 || fd as u64 >= max as u64 {
        return None;
    }
    let fds: u64 = unsafe { crate::read(fdt as *const u8, o.fdt_fd)? };
    let file: u64 = unsafe { bpf_probe_read_kernel((fds + 8 * fd as u64) as *const u64).ok()? };
    let sock: u64 = unsafe { crate::read(file as *const u8, o.file_private_data)? };
    unsafe { crate::read(sock as *const u8, o.socket_sk) }
}

/// `crypto/tls.(*Conn).Write(c, b)`: RAX = c, RBX = b's data, RCX = its length.
#[uprobe]
pub fn go_tls_write(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    let (conn, buf, len) = (r.rax, r.rbx, r.rcx);
    if len > 0
        && let Some(sk) = go_socket(conn)
    {
        let _ = plaintext(&ctx, sk, buf, len.min(i32::MAX as u64) as u32, true);
    }
    0
}

/// `crypto/tls.(*Conn).Read(c, b)` at entry: RAX = c, RBX = b's data.
#[uprobe]
pub fn go_tls_read(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    let key = [bpf_get_current_pid_tgid() >> 32, r.r14];
    let _ = GO_READS.insert(
        &key,
        &GoRead {
            conn: r.rax,
            buf: r.rbx,
        },
        0,
    );
    0
}

/// A RET of `crypto/tls.(*Conn).Read`: RAX = bytes read.
#[uprobe]
pub fn go_tls_read_ret(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    let key = [bpf_get_current_pid_tgid() >> 32, r.r14];
    let n = r.rax as i64;
    if let Some(call) = unsafe { GO_READS.get(&key) }.copied() {
        let _ = GO_READS.remove(&key);
        if n > 0
            && let Some(sk) = go_socket(call.conn)
        {
            let _ = plaintext(&ctx, sk, call.buf, n.min(i32::MAX as i64) as u32, false);
        }
    }
    0
}
