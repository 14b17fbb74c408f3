//! Command-line options, as typed. `config` validates and resolves them.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::probe::{ProbeChoice, TransportChoice, conntrack::CtHookChoice};

#[derive(Debug, Parser)]
#[command(
    name = "h2trace",
    version,
    about = "Explain, from the kernel, why HTTP/2 and gRPC clients fail to reuse connections",
    long_about = "h2trace follows every TCP connection of a process (or of the whole host) from the \
kernel: when it opened, each state it went through, who sent FIN or RST first, bytes each way, \
retransmissions. It prints one record per finished connection, plus the few events that must be \
seen live (CLOSE_WAIT, resets, retransmissions on established connections). Per process and \
peer it then names the cause when connections are not reused: dial per request, fixed-age \
rotation (MaxConnectionAge), idle close by the peer, CLOSE_WAIT stuck, handshake-failure loops, \
black holes and resets after idle, proxy upstream churn, TIME_WAIT pile-ups, RST storms — each \
finding with its numbers, the connections that show it and the usual remedies. It also follows \
the conntrack tables of the host, the traced processes and any router or NAT namespace you name, \
joins each entry to its sockets through NAT, and proves the middlebox case: an entry that timed \
out while both sockets were still ESTABLISHED.",
    after_help = "Examples:
  sudo h2trace --pid 1234                 follow one service's connections (text on a terminal)
  sudo h2trace -D 443 --duration 30s -o conns.ndjson
                                          connections to port 443 for 30 s, as NDJSON
  sudo h2trace --events all -4            every TCP state change on the host, IPv4 only
  sudo h2trace --pid 1234 --conntrack-netns router
                                          also what the `router` namespace's conntrack thought
  sudo h2trace check                      what this kernel supports, and what is missing

Output: text on a terminal, NDJSON otherwise (one JSON object per line; see docs/ndjson.md).
Exit status: 0 done (--duration over, SIGTERM, or every --pid process exited and its sockets
closed), 130 interrupted (SIGINT), 1 cannot trace (privileges, kernel), 2 bad usage (flags, a pid
that does not exist, an --output that cannot be written)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub trace: TraceArgs,
}

#[derive(Debug, Subcommand)]
// Parsed once per run: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Report what this kernel and these privileges allow: BTF, tracefs, each hook and
    /// transport (works, or why not), capabilities. Exit 0 if tracing can run.
    Check,
    /// Run a recorded NDJSON stream (a file, or - for standard input) through the same
    /// diagnosis as a live run: the same connection records and findings come out. Needs no
    /// privileges. Exit 3 if malformed lines were skipped (each is reported on stderr).
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The recorded stream (`h2trace -f ndjson -o FILE`), or - for standard input.
    pub file: PathBuf,
    /// Output format. Default: text on a terminal, NDJSON otherwise.
    #[arg(short, long, value_enum)]
    pub format: Option<Format>,
    /// Write to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub detect: DetectArgs,
}

/// Diagnosis thresholds; the defaults keep a healthy, reused connection free of findings.
/// `replay` uses the thresholds recorded in the stream unless given here.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Diagnosis")]
pub struct DetectArgs {
    /// Sliding window for per-peer rates and counts [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub window: Option<String>,
    /// Dial per request: connections to one peer within the window [default: 10].
    #[arg(long, value_name = "N")]
    pub min_conns: Option<usize>,
    /// Dial per request: a median lifetime at most this long is short [default: 1s].
    #[arg(long, value_name = "DURATION")]
    pub short_lifetime: Option<String>,
    /// A socket in CLOSE_WAIT longer than this is stuck [default: 5s].
    #[arg(long, value_name = "DURATION")]
    pub close_wait_stuck: Option<String>,
    /// Black hole / reset after idle: silence before the retransmissions or the reset
    /// [default: 1s].
    #[arg(long, value_name = "DURATION")]
    pub idle_gap: Option<String>,
    /// TIME_WAIT pile-up: TIME_WAIT sockets one process leaves within the window [default: 500].
    #[arg(long, value_name = "N")]
    pub time_wait_pileup: Option<usize>,
    /// RST storm: resets one process sees within the window [default: 100].
    #[arg(long, value_name = "N")]
    pub rst_storm: Option<usize>,
    /// Stream cancellation storm: HTTP/2 streams one process cancels or sees cancelled
    /// (RST_STREAM CANCEL) within the window [default: 50].
    #[arg(long, value_name = "N")]
    pub cancel_storm: Option<usize>,
    /// Peers (a process and the address it dials, or a process and the port it serves) the
    /// diagnosis keeps at once. Past it, the least recently active are dropped: one with
    /// findings or --min-conns connections is written out with its numbers (a peer-summary
    /// marked forgotten), the rest are summed in the process's "other peers". Memory stays
    /// flat on a node that talks to ever new addresses [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_peers: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people, and a summary at exit.
    Text,
    /// One JSON object per line (ECS field names), for log pipelines.
    Ndjson,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Events {
    /// One record per finished connection, plus CLOSE_WAIT, resets and retransmissions live.
    Default,
    /// Also every state transition as it happens (like tcpstates), for debugging. When they
    /// come faster than h2trace reads them, the kernel sheds them past half the ring buffer
    /// (counted as states_shed) to keep room for the connection records.
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Http2Choice {
    /// No HTTP/2 frames: TCP only.
    Off,
    /// Cleartext HTTP/2 (gRPC without TLS, h2c with prior knowledge), read from the
    /// buffers of the read/write/send/recv syscalls.
    H2c,
    /// h2c, and HTTP/2 over TLS where the program uses the system's OpenSSL (nginx, curl,
    /// most C/C++ servers): uprobes on SSL_write/SSL_read, which cost every TLS read and
    /// write on the host a trap into the kernel. Not Go, Java or statically linked TLS.
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConntrackChoice {
    Auto,
    On,
    Off,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Only sockets owned by these processes (all their threads), comma-separated. When one
    /// exits, its sockets are followed to their end; once all have exited and their sockets
    /// have closed, the run ends (exit 0).
    #[arg(short, long, value_delimiter = ',', value_name = "PID")]
    pub pid: Vec<u32>,
    /// Stop after this long (e.g. 30s, 5m, 1h). Default: until Ctrl-C or SIGTERM.
    #[arg(short, long, value_name = "DURATION")]
    pub duration: Option<String>,
    /// Output format. Default: text on a terminal, NDJSON otherwise.
    #[arg(short, long, value_enum)]
    pub format: Option<Format>,
    /// Write records to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Only sockets with these local ports, comma-separated.
    #[arg(
        short = 'L',
        long = "local-port",
        value_delimiter = ',',
        value_name = "PORT"
    )]
    pub local_port: Vec<u16>,
    /// Only sockets with these remote ports, comma-separated.
    #[arg(
        short = 'D',
        long = "remote-port",
        value_delimiter = ',',
        value_name = "PORT"
    )]
    pub remote_port: Vec<u16>,
    /// With --pid: also follow the processes these fork from now on (and theirs), such as a
    /// pre-forking server's workers.
    #[arg(long, requires = "pid")]
    pub follow_forks: bool,
    /// Only sockets of processes in this cgroup (v2) or below it: a path under the cgroup
    /// mount or relative to it, e.g. /system.slice/nginx.service or a pod's cgroup.
    /// Repeatable.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Vec<String>,
    /// Only sockets of this network namespace: a name from `ip netns`, or a path such as
    /// /proc/PID/ns/net. Repeatable.
    #[arg(long, value_name = "NAME|PATH")]
    pub netns: Vec<String>,
    /// IPv4 only.
    #[arg(short = '4', long, conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// IPv6 only.
    #[arg(short = '6', long)]
    pub ipv6: bool,
    /// Which events to emit live.
    #[arg(long, value_enum, default_value = "default")]
    pub events: Events,
    /// How long a live event (CLOSE_WAIT, a reset, a retransmission) waits for its
    /// connection's end. A connection that ends within it gets one record that says what
    /// happened (h2trace.connection.folded counts the events it stands for) instead of that
    /// record and the events: under churn, half the output for the same facts. 0 writes every
    /// live event at once. Must be shorter than --close-wait-stuck; nothing is held with
    /// --events all.
    #[arg(long, value_name = "DURATION", default_value = "250ms")]
    pub live_hold: String,
    /// Read the first 8 bytes each connection sends, to tell HTTP/1.x, HTTP/2 (h2c) and TLS
    /// apart (from the buffer of its first write, sendto, writev or sendmsg; Linux ≥ 5.15).
    #[arg(long)]
    pub peek: bool,
    /// See HTTP/2 control frames (SETTINGS, PING, RST_STREAM, GOAWAY) and count the streams
    /// of each connection. h2c walks the frames of connections that began with the HTTP/2
    /// client preface in cleartext (from the buffers of the read and write syscall families;
    /// Linux ≥ 5.17); every other connection costs a look at its first send and receive.
    /// all: TLS too, through OpenSSL (--tls-lib).
    #[arg(long, value_enum, default_value = "h2c", value_name = "MODE")]
    pub http2: Http2Choice,
    /// With --http2 all: the OpenSSL library (libssl.so.3) to read TLS plaintext from
    /// [default: the distribution's, e.g. /usr/lib/x86_64-linux-gnu/libssl.so.3].
    #[arg(long, value_name = "PATH")]
    pub tls_lib: Option<std::path::PathBuf>,
    /// With --http2 all: also read the TLS plaintext of this Go program (crypto/tls, x86-64,
    /// not stripped), e.g. a grpc-go server or client. Repeatable.
    #[arg(long, value_name = "PATH")]
    pub go_binary: Vec<std::path::PathBuf>,
    /// How to observe TCP state changes (auto: the tracepoint as a BTF tracepoint, else the
    /// classic tracepoint, else fentry, else kprobe).
    #[arg(long, value_enum, default_value = "auto")]
    pub probe: ProbeChoice,
    /// How records leave the kernel (auto: ring buffer when the kernel has it).
    #[arg(long, value_enum, default_value = "auto")]
    pub transport: TransportChoice,
    /// Ring buffer size (a power of two, e.g. 8MiB).
    #[arg(long, value_name = "SIZE", default_value = "8MiB")]
    pub ring_size: String,
    /// Perf buffer pages per CPU (a power of two).
    #[arg(long, value_name = "PAGES", default_value_t = 256)]
    pub perf_pages: usize,
    /// Socket lives tracked at once in the kernel (LRU; evictions are counted).
    #[arg(long, value_name = "N", default_value_t = 65536)]
    pub max_sockets: u32,
    /// Follow conntrack tables (ctnetlink): their TCP entries appear in the stream, joined to
    /// the connections they belong to, and a table that forgets a live connection becomes a
    /// finding. auto: follow the host's and each --pid's namespace when possible, warn
    /// otherwise; on: fail if a table cannot be followed. Needs CAP_NET_ADMIN.
    #[arg(long, value_enum, default_value = "auto")]
    pub conntrack: ConntrackChoice,
    /// Also follow the conntrack table of this network namespace: a name from `ip netns`
    /// (/run/netns/NAME) or a path such as /proc/PID/ns/net (a router, NAT or firewall
    /// namespace). Repeatable.
    #[arg(long, value_name = "NAME|PATH")]
    pub conntrack_netns: Vec<String>,
    /// How to see conntrack state changes from the kernel side, with exact kernel times
    /// (auto: fentry, else kprobe on __nf_ct_refresh_acct, else a BTF tracepoint on
    /// net_dev_start_xmit; netlink: ctnetlink UPDATE events only). Entry creation and expiry
    /// always come from ctnetlink.
    #[arg(long, value_enum, default_value = "auto")]
    pub conntrack_probe: CtHookChoice,
    /// Receive buffer of each ctnetlink socket. Events that do not fit while h2trace is busy
    /// are dropped by the kernel and counted (conntrack_overruns); raise it on busy NATs.
    #[arg(long, value_name = "SIZE", default_value = "8MiB")]
    pub conntrack_buffer: String,
    #[command(flatten)]
    pub detect: DetectArgs,
}
