//! Wire types shared by the h2trace eBPF programs and the agent.
//!
//! Every type is `#[repr(C)]`, `Copy`, has explicit padding and no `bool` or Rust enum, so
//! both sides agree on the bytes. Each has a `const` size assertion: changing a layout is a
//! wire change and must change both sides at once. Numeric ids (`kind`, states, owner sources)
//! are stable: the agent's NDJSON output and recorded fixtures depend on them.
#![no_std]

/// Record kinds, the first field of every record's [`Header`].
pub mod kind {
    /// A socket's whole life, emitted once when the kernel destroys the socket.
    pub const LIFE: u16 = 1;
    /// One state transition (only with `--events all`, or entering CLOSE_WAIT).
    pub const STATE: u16 = 2;
    /// The socket sent a RST (`tcp:tcp_send_reset`).
    pub const RESET_SENT: u16 = 3;
    /// The socket processed a RST (`tcp:tcp_receive_reset`; also fires on local aborts).
    pub const RESET_RECEIVED: u16 = 4;
    /// A retransmission on an established socket (`tcp:tcp_retransmit_skb`).
    pub const RETRANSMIT: u16 = 5;
    /// A conntrack entry's TCP state changed, seen from the kernel side ([`CtRecord`]).
    pub const CT_STATE: u16 = 6;
    /// A followed process forked (`--follow-forks`, [`ForkRecord`]).
    pub const FORK: u16 = 7;
    /// An HTTP/2 control frame sent or received on a socket that spoke the preface.
    pub const H2_FRAME: u16 = 8;
}

/// Which kernel-side conntrack hook produced a [`CtRecord`].
pub mod ct_hook {
    pub const FENTRY: u8 = 1;
    pub const KPROBE: u8 = 2;
    pub const BTF_TRACEPOINT: u8 = 3;
}

/// [`CtRecord::old_state`] of an entry seen for the first time.
pub const CT_STATE_UNKNOWN: u8 = u8::MAX;

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

/// Where the owner of a socket was learned. Higher is more trustworthy: a later, stronger
/// source replaces a weaker one, never the other way round.
pub mod owner_src {
    /// Not known yet (the socket was only seen in softirq context).
    pub const NONE: u8 = 0;
    /// Inherited from the process that listens on the socket's local port.
    pub const LISTENER: u8 = 1;
    /// The process that closed the socket (`close()`/`shutdown()`, process context).
    pub const CLOSE: u8 = 2;
    /// The first process to send or receive on the socket.
    pub const IO: u8 = 3;
    /// The process that called `connect()`.
    pub const CONNECT: u8 = 4;
}

/// How the agent first saw a socket's life.
pub mod origin {
    /// `connect()`: CLOSE → SYN_SENT.
    pub const ACTIVE: u8 = 1;
    /// Created by a listener: LISTEN → SYN_RECV (or SYN_RECV → ESTABLISHED).
    pub const PASSIVE: u8 = 2;
    /// First seen mid-life: the socket predates the tracer, or its entry was evicted.
    pub const MID_LIFE: u8 = 3;
}

/// Indexes into the kernel's per-CPU `COUNTERS` array.
pub mod counter {
    /// `bpf_ringbuf_output` failed: the ring was full. Every such record is lost.
    pub const RINGBUF_FULL: u32 = 0;
    /// `bpf_perf_event_output` failed. Every such record is lost.
    pub const PERF_OUTPUT_FAIL: u32 = 1;
    /// A socket life started being tracked.
    pub const SOCK_TRACKED: u32 = 2;
    /// A socket could not be tracked (map update failed).
    pub const SOCK_TRACK_FAIL: u32 = 3;
    /// A tracked socket life ended and its record was emitted (or its emission failed).
    pub const SOCK_ENDED: u32 = 4;
    /// More transitions than a record holds; the extra ones are only counted.
    pub const TRANSITIONS_TRUNCATED: u32 = 5;
    /// A listener's owner could not be stored.
    pub const LISTENER_TRACK_FAIL: u32 = 6;
    /// A conntrack entry's last state could not be stored (its next change may repeat).
    pub const CT_TRACK_FAIL: u32 = 7;
    /// An HTTP/2 socket's parse state, or the claim on its held first frame, could not be
    /// stored: those frames go unseen.
    pub const H2_TRACK_FAIL: u32 = 8;
    /// A direction of an HTTP/2 socket lost track of frame boundaries (see `h2_desync`).
    pub const H2_DESYNC: u32 = 9;
    /// Of the records lost to a full ring or a failed perf output, those that were socket
    /// lives: the agent can then account for every life exactly (ended = written + lost).
    pub const LIFE_LOST: u32 = 10;
    /// `--events all` state changes not written because the ring buffer was more than half
    /// full (the rest of it is kept for socket lives).
    pub const STATES_SHED: u32 = 11;
    pub const COUNT: u32 = 12;
}

/// Flags in [`ProgConfig::flags`].
pub mod flags {
    /// Emit every state transition live (`--events all`).
    pub const EMIT_ALL_TRANSITIONS: u32 = 1;
    /// Send records through the perf event array instead of the ring buffer.
    pub const USE_PERF: u32 = 2;
    /// No destroy hook: end a life at the transition to CLOSE.
    pub const END_AT_CLOSE: u32 = 4;
    /// [`SockOffsets`] hold valid offsets (BTF was readable).
    pub const HAVE_SOCK_OFFSETS: u32 = 8;
    /// Capture the first bytes each socket sends (`--peek`).
    pub const PEEK: u32 = 16;
    /// [`CtOffsets`] hold valid offsets: the conntrack hooks may read `struct nf_conn`.
    pub const CONNTRACK: u32 = 32;
    /// Report conntrack entries only of the namespaces in the `CT_NETNS` map.
    pub const CT_NETNS_FILTER: u32 = 64;
    /// `sock:sock_{send,recv}_length` have [`LengthLayout::USUAL`]: the programs read the
    /// record with plain loads at constant offsets instead of three helper calls.
    pub const LENGTH_USUAL: u32 = 128;
    /// `--http2 h2c`: parse the HTTP/2 frames of sockets that spoke the preface in cleartext.
    pub const H2C: u32 = 256;
    /// `--http2 all`: also the plaintext of TLS connections, from OpenSSL's `SSL_write` and
    /// `SSL_read` (uprobes).
    pub const H2_TLS: u32 = 512;
    /// `ProgConfig::fd` holds the offsets from a task to a socket through its file table
    /// (Go's crypto/tls, `--go-binary`).
    pub const HAVE_FD_OFFSETS: u32 = 1024;
    /// `sock:inet_sock_set_state` has [`SetStateLayout::USUAL`]: read with plain loads at
    /// constant offsets instead of ten helper calls (it runs ten times per connection).
    pub const SET_STATE_USUAL: u32 = 2048;
    /// A RST the socket sends once it is in CLOSE is counted in its life record
    /// (`rst_sent_folded`), not emitted live. Such a RST is the abortive close itself
    /// (`tcp_close` with SO_LINGER 0 or unread data: `tcp_disconnect` moves the socket to CLOSE,
    /// then sends it), and the life ends in the same call, so the agent's live hold
    /// (`--live-hold` > 0) would fold the live event into the record anyway.
    pub const FOLD_CLOSED_RESETS: u32 = 4096;
}

/// An offset that a tracepoint or structure does not have on this kernel.
pub const ABSENT: u16 = u16::MAX;

/// Common start of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// One of [`kind`].
    pub kind: u16,
    pub _pad: u16,
    /// The CPU the record was produced on.
    pub cpu: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the record was produced.
    pub ts_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Header>() == 16);

/// Identity, endpoints and owner of a socket. Addresses are in network byte order; IPv4
/// addresses use the first four bytes. Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockMeta {
    /// Kernel address of `struct sock`; reused after free, so a life is `(skaddr, start_ns)`.
    pub skaddr: u64,
    /// When the life was first seen.
    pub start_ns: u64,
    pub cgroup_id: u64,
    /// Inode of the socket's network namespace (0 when BTF offsets were not available).
    pub netns: u32,
    /// Owner process (thread group id) and thread; 0 when not known yet.
    pub tgid: u32,
    pub pid: u32,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    /// One of [`owner_src`].
    pub owner_src: u8,
    /// One of [`origin`].
    pub origin: u8,
    pub _pad: u32,
    pub comm: [u8; 16],
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SockMeta>() == 96);

/// Transitions a life record holds; a TCP life rarely has more than seven.
pub const MAX_TRANSITIONS: usize = 12;

/// Everything the kernel keeps about one socket life.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockLife {
    pub meta: SockMeta,
    /// Kernel time of each transition.
    pub trans_ns: [u64; MAX_TRANSITIONS],
    /// New state of each transition.
    pub trans_state: [u8; MAX_TRANSITIONS],
    /// Old state of the first transition seen.
    pub first_state: u8,
    /// Transitions seen (saturating); only the first [`MAX_TRANSITIONS`] are stored.
    pub n_trans: u8,
    pub _pad: [u8; 2],
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub last_send_ns: u64,
    pub last_recv_ns: u64,
    pub rst_sent: u16,
    pub rst_recv: u16,
    pub retrans: u32,
    /// Kernel time of the first RST sent / processed (0: none).
    pub first_rst_sent_ns: u64,
    pub first_rst_recv_ns: u64,
    /// `enum sk_rst_reason` of the first RST sent (`u32::MAX` when the kernel has none).
    pub rst_sent_reason: u32,
    /// Socket state when the first RST was processed.
    pub rst_recv_state: u8,
    /// How many of `first_bytes` are valid (0: not captured; only with `--peek`).
    pub first_bytes_len: u8,
    /// RSTs sent by the socket once in CLOSE, counted here instead of emitted live
    /// ([`flags::FOLD_CLOSED_RESETS`]).
    pub rst_sent_folded: u16,
    pub last_retrans_ns: u64,
    /// The last send or receive before the connection left ESTABLISHED (0: none), so that
    /// the idle time before the close survives later I/O (e.g. a write after the peer's FIN).
    pub active_before_close_ns: u64,
    /// The longest silence before a send that opened a new exchange (a send after the last
    /// one had been answered), and when that send happened: the idle gap a middlebox saw.
    pub longest_request_gap_ns: u64,
    pub longest_request_gap_end_ns: u64,
    /// The first bytes the socket sent (`--peek`): enough to tell HTTP/1.x, HTTP/2 and TLS.
    pub first_bytes: [u8; 8],
    /// HTTP/2 streams whose first HEADERS this side sent (`h2_streams[0]`) and received
    /// (`[1]`), counting only ids of the sender's parity (client odd, server even): the
    /// streams each side opened.
    pub h2_streams: [u32; 2],
    /// What this socket is in HTTP/2 ([`h2_side`], `--http2`).
    pub h2_side: u8,
    /// Bit 0: the send direction's frames were lost track of (the walk ran out of steps or
    /// could not read the buffer); bit 1: the receive direction's. Counts are lower bounds.
    pub h2_desync: u8,
    /// [`h2_tls`] bits: the socket's plaintext comes from a TLS library's calls.
    pub h2_tls: u8,
    /// The client preface was seen sent (`[0]`) or received (`[1]`). Each byte is written
    /// only by its own direction's calls: a client's first send and first receive can run at
    /// once on two CPUs, and the side one of them sets can be overwritten by the other's.
    pub h2_preface: [u8; 2],
    pub _pad3: [u8; 3],
}

/// `SockLife::h2_tls` bits (`--http2 all`).
pub mod h2_tls {
    /// A TLS library (OpenSSL) read or wrote this socket's plaintext: its syscalls carry
    /// ciphertext and are not walked.
    pub const TLS: u8 = 1;
    /// Plaintext was sent (the first send is where the preface is looked for).
    pub const SENT: u8 = 2;
    /// Plaintext was received.
    pub const RECEIVED: u8 = 4;
}
const _: () = assert!(core::mem::size_of::<SockLife>() == 328);

/// What a socket is in HTTP/2 (`SockLife::h2_side`).
pub mod h2_side {
    pub const NONE: u8 = 0;
    /// It sent the client preface.
    pub const CLIENT: u8 = 1;
    /// It received the client preface.
    pub const SERVER: u8 = 2;
    /// Its first send looked like a server's SETTINGS; waiting for the preface to confirm.
    pub const MAYBE_SERVER: u8 = 3;
    /// Before it sent anything, it received what looked like a server's SETTINGS (a client
    /// whose reader ran before its preface was written, as grpc-go's may); waiting for its
    /// own preface to confirm.
    pub const MAYBE_CLIENT: u8 = 4;
}

/// Payload bytes kept of a captured frame: GOAWAY's 8 bytes plus its debug text, PING's 8,
/// RST_STREAM's 4, up to 10 SETTINGS.
pub const FRAME_CAPTURE: usize = 64;

/// One HTTP/2 control frame (SETTINGS, PING, RST_STREAM, GOAWAY), as the socket's owner
/// wrote or read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRecord {
    pub hdr: Header,
    pub meta: SockMeta,
    pub stream_id: u32,
    /// The frame's payload length (of which `captured` bytes are in `payload`).
    pub length: u32,
    pub frame_type: u8,
    pub frame_flags: u8,
    /// 0: sent, 1: received.
    pub received: u8,
    pub side: u8,
    pub captured: u8,
    pub _pad: [u8; 3],
    /// The socket's last send or receive before the call that carried this frame (or its
    /// start): how long the connection had been idle when, say, a GOAWAY came.
    pub prev_activity_ns: u64,
    pub payload: [u8; FRAME_CAPTURE],
}
const _: () = assert!(core::mem::size_of::<FrameRecord>() == 200);

/// All-zero values for the kernel's statics and scratch buffers.
macro_rules! zeroed {
    ($($t:ty),*) => {$(
        impl $t {
            pub const fn zeroed() -> Self {
                // SAFETY: integers and arrays of integers only: all-zero is a valid value.
                unsafe { core::mem::zeroed() }
            }
        }
    )*};
}
zeroed!(SockLife, LifeRecord, LiveRecord, ProgConfig, FrameRecord);

/// [`kind::LIFE`]: a socket's life, emitted when it ends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LifeRecord {
    pub hdr: Header,
    pub life: SockLife,
}
const _: () = assert!(core::mem::size_of::<LifeRecord>() == 344);

/// [`kind::STATE`], [`kind::RESET_SENT`], [`kind::RESET_RECEIVED`], [`kind::RETRANSMIT`]:
/// something that must be seen while it happens.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveRecord {
    pub hdr: Header,
    /// The socket as known when the event happened (owner may still be unknown).
    pub meta: SockMeta,
    /// STATE: old → new. Resets and retransmissions: the socket's state in `new_state`.
    pub old_state: u8,
    pub new_state: u8,
    pub _pad: u16,
    /// RESET_SENT: `enum sk_rst_reason` (`u32::MAX` if the kernel has none).
    /// RETRANSMIT: the transmit error (`err`), as an `i32`'s bits.
    pub reason: u32,
}
const _: () = assert!(core::mem::size_of::<LiveRecord>() == 120);

/// Offsets of the fields of `sock:inet_sock_set_state` in this kernel's trace record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetStateLayout {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SetStateLayout>() == 24);

impl SetStateLayout {
    /// The layout of every kernel with the tracepoint seen so far (6.1, 6.12, 6.18; `protocol`
    /// grew from `__u8` to `__u16` in place): `void *skaddr`, `int oldstate`, `int newstate`,
    /// `__u16 sport, dport, family, protocol`, `__u8 saddr[4], daddr[4], saddr_v6[16],
    /// daddr_v6[16]`.
    pub const USUAL: Self = Self {
        skaddr: 8,
        oldstate: 16,
        newstate: 20,
        sport: 24,
        dport: 26,
        family: 28,
        protocol: 30,
        saddr: 32,
        daddr: 36,
        saddr_v6: 40,
        daddr_v6: 56,
        _pad: 0,
    };
}

/// Offsets in the trace records of the `tcp:*` events that name a socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkEventLayout {
    pub skaddr: u16,
    /// `state` ([`ABSENT`] where the event has none).
    pub state: u16,
    /// `reason` of `tcp_send_reset`, `err` of `tcp_retransmit_skb` ([`ABSENT`] if none).
    pub reason: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SkEventLayout>() == 8);

/// Offsets in `sock:sock_send_length` / `sock:sock_recv_length`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LengthLayout {
    pub sk: u16,
    pub family: u16,
    pub protocol: u16,
    pub ret: u16,
}
const _: () = assert!(core::mem::size_of::<LengthLayout>() == 8);

impl LengthLayout {
    /// The layout of every kernel that has these tracepoints so far (6.3 to 6.18): after the
    /// 8-byte common header, `void *sk`, `__u16 family`, `__u16 protocol`, `int ret`.
    pub const USUAL: Self = Self {
        sk: 8,
        family: 16,
        protocol: 18,
        ret: 20,
    };
}

/// Offsets in kernel structures, from the kernel's BTF, for the kprobe path and the netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    /// `struct sock_common` members (a `struct sock` starts with one).
    pub skc_daddr: u16,
    pub skc_rcv_saddr: u16,
    pub skc_dport: u16,
    pub skc_num: u16,
    pub skc_family: u16,
    pub skc_state: u16,
    pub skc_v6_daddr: u16,
    pub skc_v6_rcv_saddr: u16,
    /// `skc_net` (a `possible_net_t`, whose first member is the `struct net *`).
    pub skc_net: u16,
    /// `struct net` → `ns` → `inum`.
    pub net_ns_inum: u16,
    /// `struct sock` → `sk_protocol` (the BTF tracepoint keeps TCP's state changes).
    pub sk_protocol: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockOffsets>() == 24);

/// Offsets in `struct sk_buff` and `struct nf_conn` (from BTF) for the conntrack hooks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtOffsets {
    /// `sk_buff._nfct`: the `nf_conn *` with the conntrack info in its low 3 bits.
    pub skb_nfct: u16,
    /// `nf_conn.tuplehash[IP_CT_DIR_ORIGINAL].tuple` and `[IP_CT_DIR_REPLY].tuple`.
    pub tuple_orig: u16,
    pub tuple_reply: u16,
    /// Inside `struct nf_conntrack_tuple`.
    pub src_u3: u16,
    pub src_port: u16,
    pub l3num: u16,
    pub dst_u3: u16,
    pub dst_port: u16,
    pub protonum: u16,
    /// `nf_conn.proto.tcp.state`, `.status`, `.mark` ([`ABSENT`] without
    /// CONFIG_NF_CONNTRACK_MARK), `.ct_net`, `.zone.id` ([`ABSENT`] without zones).
    pub tcp_state: u16,
    pub status: u16,
    pub mark: u16,
    pub ct_net: u16,
    pub zone: u16,
    pub _pad: [u16; 2],
}
const _: () = assert!(core::mem::size_of::<CtOffsets>() == 32);

/// [`kind::CT_STATE`]: a conntrack entry changed TCP state. Addresses in network byte
/// order (IPv4 in the first four bytes), ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtRecord {
    pub hdr: Header,
    /// Kernel address of the `struct nf_conn`.
    pub ct: u64,
    pub netns: u32,
    pub family: u16,
    /// Conntrack TCP states (`enum tcp_conntrack`); old is [`CT_STATE_UNKNOWN`] when first seen.
    pub old_state: u8,
    pub new_state: u8,
    pub orig_src: [u8; 16],
    pub orig_dst: [u8; 16],
    pub reply_src: [u8; 16],
    pub reply_dst: [u8; 16],
    pub orig_sport: u16,
    pub orig_dport: u16,
    pub reply_sport: u16,
    pub reply_dport: u16,
    pub status: u32,
    pub mark: u32,
    pub zone: u16,
    /// One of [`ct_hook`].
    pub hook: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<CtRecord>() == 120);

/// [`kind::FORK`]: a followed process (or one of its threads) created a task.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkRecord {
    pub hdr: Header,
    /// Thread group id of the forking process.
    pub parent: u32,
    /// The new task's id (a process id, or a thread id when a thread was created).
    pub child: u32,
}
const _: () = assert!(core::mem::size_of::<ForkRecord>() == 24);

/// Everything the agent hands the programs at load time (the `CONFIG` global).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgConfig {
    /// [`flags`].
    pub flags: u32,
    /// Ring buffer: wake the agent only once this many bytes wait (batched wake-ups).
    pub wake_bytes: u32,
    pub set_state: SetStateLayout,
    pub send_reset: SkEventLayout,
    pub receive_reset: SkEventLayout,
    pub retransmit: SkEventLayout,
    pub destroy: SkEventLayout,
    pub length: LengthLayout,
    pub sock: SockOffsets,
    pub ct: CtOffsets,
    pub fd: FdOffsets,
    /// Offset of `child_pid` in `sched:sched_process_fork`.
    pub fork_child_pid: u16,
    pub _pad: u16,
    /// `--events all`: state changes are shed while more than this many bytes wait in the
    /// ring buffer (half its size).
    pub shed_bytes: u32,
}

/// From the current task to the socket behind one of its file descriptors:
/// `task->files->fdt->fd[n]->private_data` (a `struct socket`) `->sk`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdOffsets {
    pub task_files: u16,
    pub files_fdt: u16,
    pub fdt_max_fds: u16,
    pub fdt_fd: u16,
    pub file_private_data: u16,
    pub socket_sk: u16,
    pub _pad: [u16; 2],
}
const _: () = assert!(core::mem::size_of::<FdOffsets>() == 16);
const _: () = assert!(core::mem::size_of::<ProgConfig>() == 152);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, with explicit padding and only integer fields,
    // so every bit pattern is valid and none has implicit padding.
    unsafe impl aya::Pod for super::ProgConfig {}
    unsafe impl aya::Pod for super::SockLife {}
}
