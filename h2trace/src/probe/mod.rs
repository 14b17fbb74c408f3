//! Load the kernel programs, pick a mechanism for each hook at run time, attach them.
//!
//! State changes come from the first of these that works (unless `--probe` names one):
//! the `sock:inet_sock_set_state` tracepoint as a BTF tracepoint (Linux ≥ 5.5 with BTF), the
//! same as a classic tracepoint (stable, Linux ≥ 4.16), an fentry on `tcp_set_state`, a
//! kprobe on `tcp_set_state`. Everything else is tracepoints, BTF ones where they exist when
//! the state hook is one; a missing optional hook degrades a fact (bytes, resets, ...) and is
//! reported, never silently.
pub mod btf;
pub mod caps;
pub mod conntrack;
pub mod gobin;
pub mod tracefs;

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::MapType,
    programs::{
        BtfTracePoint, FEntry, KProbe, ProgramError, TracePoint, UProbe, uprobe::UProbeScope,
    },
};
use h2trace_common::{LengthLayout, ProgConfig, SetStateLayout, SockOffsets, flags};

use self::{
    conntrack::{CtHook, CtHookChoice},
    tracefs::{FormatError, Tracefs},
};

/// The kernel programs, built by `cargo xtask build-ebpf`. Empty when the agent was built
/// without them (unit tests do not need them).
pub static EBPF_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/h2trace.bpf.o"));

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeChoice {
    /// The first that works: tp-btf, then tracepoint, then fentry, then kprobe.
    Auto,
    /// `inet_sock_set_state` as a BTF tracepoint (Linux ≥ 5.5 with BTF), and the other hot
    /// tracepoints too: the cheapest (the kernel fills no trace record).
    #[serde(rename = "tp-btf")]
    TpBtf,
    /// The classic `sock:inet_sock_set_state` tracepoint, and every other tracepoint classic.
    Tracepoint,
    /// An fentry on `tcp_set_state` (where the kernel allows fentry).
    Fentry,
    /// A kprobe on `tcp_set_state` (needs CONFIG_KPROBES).
    Kprobe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// Ring buffer when the kernel has it (Linux ≥ 5.8), else perf buffers.
    Auto,
    Ringbuf,
    Perf,
}

/// The state-change mechanisms, in the order `auto` tries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateHook {
    BtfTracepoint,
    Tracepoint,
    Fentry,
    Kprobe,
}

impl StateHook {
    pub const ALL: [StateHook; 4] = [
        Self::BtfTracepoint,
        Self::Tracepoint,
        Self::Fentry,
        Self::Kprobe,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::BtfTracepoint => "tp_btf inet_sock_set_state",
            Self::Tracepoint => "tracepoint sock:inet_sock_set_state",
            Self::Fentry => "fentry tcp_set_state",
            Self::Kprobe => "kprobe tcp_set_state",
        }
    }

    /// The program in the eBPF object that implements this hook.
    fn program(self) -> &'static str {
        match self {
            Self::BtfTracepoint => "inet_sock_set_state_btf",
            Self::Tracepoint => "inet_sock_set_state",
            Self::Fentry => "tcp_set_state_fentry",
            Self::Kprobe => "tcp_set_state_kprobe",
        }
    }

    /// The tracepoint fires where a socket starts listening (`inet_sk_state_store`), which
    /// `tcp_set_state` does not see.
    fn sees_listen(self) -> bool {
        matches!(self, Self::BtfTracepoint | Self::Tracepoint)
    }

    fn from_choice(c: ProbeChoice) -> Option<Self> {
        match c {
            ProbeChoice::Auto => None,
            ProbeChoice::TpBtf => Some(Self::BtfTracepoint),
            ProbeChoice::Tracepoint => Some(Self::Tracepoint),
            ProbeChoice::Fentry => Some(Self::Fentry),
            ProbeChoice::Kprobe => Some(Self::Kprobe),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ringbuf,
    Perf,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ringbuf => "ringbuf",
            Self::Perf => "perf",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "this h2trace was built without its eBPF programs: run `cargo xtask build-ebpf`, then build h2trace again"
    )]
    NoObject,
    #[error(
        "missing capabilities: {}. h2trace loads eBPF programs and reads tracefs: run it as root \
         (sudo h2trace ...) or grant them (setcap cap_bpf,cap_perfmon,cap_sys_admin,cap_net_admin+ep)",
        .0.join(", ")
    )]
    Privileges(Vec<&'static str>),
    #[error("tracefs is not available")]
    Tracefs(#[source] std::io::Error),
    #[error("reading tracepoint layouts")]
    Format(#[from] FormatError),
    #[error("loading the eBPF programs")]
    Load(#[from] aya::EbpfError),
    #[error("the ring buffer is not supported by this kernel (Linux ≥ 5.8): use --transport perf")]
    NoRingbuf,
    #[error(
        "this kernel cannot attach kprobes (no kprobe PMU at {KPROBE_PMU}: CONFIG_KPROBES is off)"
    )]
    NoKprobes,
    #[error("no way to observe TCP state changes on this kernel:\n  {}", .0.join("\n  "))]
    NoStateHook(Vec<String>),
    #[error("{0} is missing from the eBPF object (was it built from another version?)")]
    NoProgram(String),
    #[error("updating map {0}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("{0} is not available: {1}")]
    Unavailable(&'static str, String),
    #[error("{hook}: {source}")]
    Program {
        hook: String,
        #[source]
        source: ProgramError,
    },
}

/// Present when the kernel can attach kprobes through perf_event_open.
pub(crate) const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe/type";

/// What the agent asks of the probes.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub probe: ProbeChoice,
    pub transport: TransportChoice,
    pub emit_all_transitions: bool,
    /// The agent holds live events for their life record (`--live-hold` > 0): the kernel may
    /// count a RST sent from CLOSE in the record instead (`flags::FOLD_CLOSED_RESETS`).
    pub fold_closed_resets: bool,
    /// Capture the first bytes each socket sends (from its first send's syscall buffer).
    pub peek: bool,
    /// `--http2 h2c`: walk the HTTP/2 frames of cleartext sockets that spoke the preface
    /// (from the syscall buffers of their sends and receives).
    pub h2c: bool,
    /// `--http2 all`: also TLS plaintext, from this OpenSSL library's `SSL_write`/`SSL_read`.
    pub tls_lib: Option<std::path::PathBuf>,
    /// `--go-binary`: Go programs whose crypto/tls plaintext is read.
    pub go_binaries: Vec<std::path::PathBuf>,
    /// Ring buffer size in bytes (a power of two, at least a page).
    pub ring_bytes: u32,
    /// Socket lives tracked at once in the kernel.
    pub max_sockets: u32,
    /// Wake the agent once this many bytes wait in the ring buffer.
    pub wake_bytes: u32,
    /// Kernel-side conntrack hooks to try; `None` when conntrack is not followed.
    pub conntrack: Option<CtHookChoice>,
    /// `--follow-forks`: the processes whose new children join the trace (empty: off).
    pub follow_forks: Vec<u32>,
}

/// One hook and how it fared, for `check` and the `started` record.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HookStatus {
    pub hook: String,
    pub ok: bool,
    pub detail: String,
}

/// The loaded and attached programs. Dropping this detaches everything.
pub struct Probes {
    pub ebpf: Ebpf,
    pub state_hook: StateHook,
    pub transport: Transport,
    /// `enum sk_rst_reason` names from this kernel's `tcp:tcp_send_reset` format.
    pub reset_reasons: BTreeMap<u32, String>,
    pub hooks: Vec<HookStatus>,
    /// The kernel-side conntrack hook in use, if any.
    pub ct_hook: Option<CtHook>,
}

impl Probes {
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "state_hook": self.state_hook.name(),
            "transport": self.transport.name(),
            "conntrack_hook": self.ct_hook.map(CtHook::name),
            "hooks": self.hooks,
        })
    }

    /// Report kernel-side conntrack changes of these namespaces (inodes) only.
    pub fn follow_ct_netns(&mut self, inodes: &[u32]) -> Result<(), ProbeError> {
        let map = self
            .ebpf
            .map_mut("CT_NETNS")
            .ok_or_else(|| ProbeError::NoProgram("map CT_NETNS".into()))?;
        let mut m = aya::maps::HashMap::<_, u32, u8>::try_from(map)
            .map_err(|e| ProbeError::Map("CT_NETNS", e))?;
        for &ino in inodes {
            m.insert(ino, 1, 0)
                .map_err(|e| ProbeError::Map("CT_NETNS", e))?;
        }
        Ok(())
    }
}

/// The optional tracepoints: (program, category, name, what is lost without it).
const OPTIONAL_TRACEPOINTS: [(&str, &str, &str, &str); 6] = [
    (
        "tcp_send_reset",
        "tcp",
        "tcp_send_reset",
        "RSTs sent are not seen",
    ),
    (
        "tcp_receive_reset",
        "tcp",
        "tcp_receive_reset",
        "RSTs received are not seen",
    ),
    (
        "tcp_retransmit_skb",
        "tcp",
        "tcp_retransmit_skb",
        "retransmissions are not seen",
    ),
    (
        "tcp_destroy_sock",
        "tcp",
        "tcp_destroy_sock",
        "lives end at CLOSE; RSTs sent after it are missed",
    ),
    (
        "sock_send_length",
        "sock",
        "sock_send_length",
        "bytes sent and send-time owners are not seen",
    ),
    (
        "sock_recv_length",
        "sock",
        "sock_recv_length",
        "bytes received and receive-time owners are not seen",
    ),
];

/// The optional tracepoints that also have a BTF tracepoint program (`NAME_btf`), used with
/// the BTF state hook: those a connection hits every time (its end, its reads and writes), and
/// the received reset, which aborted connections hit once each.
const BTF_TRACEPOINTS: [&str; 4] = [
    "tcp_receive_reset",
    "tcp_destroy_sock",
    "sock_send_length",
    "sock_recv_length",
];

/// Layouts and offsets gathered before loading.
struct KernelFacts {
    config: ProgConfig,
    set_state_error: Option<String>,
    sock_offsets_error: Option<String>,
    ct_offsets_error: Option<String>,
    fork_error: Option<String>,
    /// Why Go's crypto/tls cannot be followed from a file descriptor to its socket.
    fd_offsets_error: Option<String>,
    missing_tracepoints: HashMap<&'static str, String>,
    reset_reasons: BTreeMap<u32, String>,
    /// The kernel's BTF as aya reads it, parsed once, at the first BTF-typed attach (each parse
    /// costs tens of milliseconds and MiB). Not given to the loader: `EbpfLoader::new` parses
    /// its own, and both alive at once would raise the start-up peak of memory.
    btf: std::cell::OnceCell<Result<Btf, String>>,
}

impl KernelFacts {
    fn btf(&self) -> Option<&Btf> {
        self.parsed_btf().as_ref().ok()
    }

    fn parsed_btf(&self) -> &Result<Btf, String> {
        self.btf
            .get_or_init(|| Btf::from_sys_fs().map_err(|e| error_chain(&e)))
    }

    /// The kernel's BTF for a hook that needs it.
    fn kernel_btf(&self, hook: &'static str) -> Result<&Btf, ProbeError> {
        self.parsed_btf().as_ref().map_err(|e| {
            ProbeError::Unavailable(hook, format!("cannot read the kernel's BTF: {e}"))
        })
    }
}

fn kernel_facts(tracefs: &Tracefs) -> KernelFacts {
    let mut config = ProgConfig::zeroed();
    let mut missing = HashMap::new();
    let set_state_error = match tracefs
        .format("sock", "inet_sock_set_state")
        .and_then(|f| f.set_state_layout())
    {
        Ok(l) => {
            config.set_state = l;
            if l == SetStateLayout::USUAL {
                config.flags |= flags::SET_STATE_USUAL;
            }
            None
        }
        Err(e) => Some(e.to_string()),
    };
    let mut reset_reasons = BTreeMap::new();
    for (prog, cat, name, _) in OPTIONAL_TRACEPOINTS {
        let layout = tracefs.format(cat, name).and_then(|f| {
            match prog {
                "tcp_send_reset" => {
                    reset_reasons = f.symbols("reason");
                    config.send_reset = f.sk_event_layout("reason")?;
                }
                "tcp_receive_reset" => config.receive_reset = f.sk_event_layout("reason")?,
                "tcp_retransmit_skb" => config.retransmit = f.sk_event_layout("err")?,
                "tcp_destroy_sock" => config.destroy = f.sk_event_layout("reason")?,
                _ => {
                    config.length = f.length_layout()?;
                    if config.length == LengthLayout::USUAL {
                        config.flags |= flags::LENGTH_USUAL;
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = layout {
            missing.insert(prog, e.to_string());
        }
    }
    if missing.contains_key("tcp_destroy_sock") {
        config.flags |= flags::END_AT_CLOSE;
    }
    // Parsed once: it takes tens of MiB and milliseconds.
    let vmlinux = btf::vmlinux().map_err(|e| e.to_string());
    fn from_btf<T>(
        btf: &Result<btf_rs::Btf, String>,
        f: impl FnOnce(&btf_rs::Btf) -> Result<T, btf::BtfError>,
    ) -> Result<T, String> {
        f(btf.as_ref()?).map_err(|e| e.to_string())
    }
    let sock_offsets_error = match from_btf(&vmlinux, btf::sock_offsets) {
        Ok(o) => {
            config.sock = o;
            config.flags |= flags::HAVE_SOCK_OFFSETS;
            None
        }
        Err(e) => {
            config.sock = SockOffsets::default();
            Some(e)
        }
    };
    let ct_offsets_error = match from_btf(&vmlinux, |b| {
        btf::ct_offsets(b, Path::new(btf::NF_CONNTRACK_BTF))
    }) {
        Ok(o) => {
            config.ct = o;
            config.flags |= flags::CONNTRACK;
            None
        }
        Err(e) => Some(e),
    };
    // Only the Go programs read these; set whenever the kernel describes them.
    let fd_offsets_error = match from_btf(&vmlinux, btf::fd_offsets) {
        Ok(o) => {
            config.fd = o;
            config.flags |= flags::HAVE_FD_OFFSETS;
            None
        }
        Err(e) => Some(e),
    };
    let fork_error = match tracefs
        .format("sched", "sched_process_fork")
        .and_then(|f| f.offset("child_pid"))
    {
        Ok(o) => {
            config.fork_child_pid = o;
            None
        }
        Err(e) => Some(e.to_string()),
    };
    KernelFacts {
        config,
        set_state_error,
        sock_offsets_error,
        ct_offsets_error,
        fork_error,
        fd_offsets_error,
        missing_tracepoints: missing,
        reset_reasons,
        btf: std::cell::OnceCell::new(),
    }
}

pub fn ringbuf_supported() -> bool {
    aya::sys::is_map_supported(MapType::RingBuf).unwrap_or(false)
}

fn page_size() -> u32 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u32
}

fn loader_for(
    facts: &KernelFacts,
    opts: &ProbeOptions,
    transport: Transport,
) -> Result<Ebpf, ProbeError> {
    if EBPF_OBJ.is_empty() {
        return Err(ProbeError::NoObject);
    }
    let mut config = facts.config;
    if opts.emit_all_transitions {
        config.flags |= flags::EMIT_ALL_TRANSITIONS;
    }
    if opts.fold_closed_resets {
        config.flags |= flags::FOLD_CLOSED_RESETS;
    }
    if opts.peek {
        config.flags |= flags::PEEK;
    }
    if opts.h2c {
        config.flags |= flags::H2C;
    }
    if opts.tls_lib.is_some() {
        config.flags |= flags::H2_TLS;
    }
    // Kernel-side conntrack reports only the namespaces the agent follows (`CT_NETNS`).
    match opts.conntrack {
        None => config.flags &= !flags::CONNTRACK,
        Some(_) => config.flags |= flags::CT_NETNS_FILTER,
    }
    let ring = match transport {
        Transport::Perf => {
            config.flags |= flags::USE_PERF;
            page_size() // the ring is unused; keep it tiny
        }
        Transport::Ringbuf => opts.ring_bytes,
    };
    config.wake_bytes = opts.wake_bytes;
    config.shed_bytes = ring / 2;
    Ok(EbpfLoader::new()
        .override_global("CONFIG", &config, true)
        .map_max_entries("RING", ring)
        .map_max_entries("SOCKS", opts.max_sockets)
        .load(EBPF_OBJ)?)
}

pub(crate) fn program_error(hook: &str, source: ProgramError) -> ProbeError {
    ProbeError::Program {
        hook: hook.to_string(),
        source,
    }
}

/// Why a state hook cannot be used before even trying (missing layout or offsets).
fn precondition(facts: &KernelFacts, hook: StateHook) -> Option<String> {
    match hook {
        StateHook::Tracepoint => facts.set_state_error.clone(),
        StateHook::BtfTracepoint | StateHook::Fentry | StateHook::Kprobe => facts
            .sock_offsets_error
            .as_ref()
            .map(|e| format!("needs struct sock_common offsets from BTF: {e}")),
    }
}

fn ct_precondition(facts: &KernelFacts) -> Option<String> {
    facts
        .ct_offsets_error
        .as_ref()
        .map(|e| format!("needs struct nf_conn offsets from BTF: {e}"))
}

/// The first kernel-side conntrack hook of the chain that attaches. Mechanisms passed over
/// are recorded (not warned about) when a later one works; with none, one warning says that
/// state changes come from ctnetlink alone.
fn attach_ct_hook(
    ebpf: &mut Ebpf,
    facts: &KernelFacts,
    choice: CtHookChoice,
    hooks: &mut Vec<HookStatus>,
) -> Option<CtHook> {
    let mut failed = Vec::new();
    for hook in CtHook::chain(choice) {
        let result = match ct_precondition(facts) {
            Some(why) => Err(why),
            None => hook
                .attach(ebpf, || facts.kernel_btf(hook.name()))
                .map_err(|e| why_not(&e)),
        };
        match result {
            Ok(()) => {
                hooks.push(HookStatus {
                    hook: hook.name().into(),
                    ok: true,
                    detail: "attached (conntrack state changes)".into(),
                });
                hooks.extend(failed.into_iter().map(|(h, why)| HookStatus {
                    hook: h,
                    ok: true,
                    detail: format!("not used ({why})"),
                }));
                return Some(hook);
            }
            Err(why) => failed.push((hook.name().to_string(), why)),
        }
    }
    hooks.extend(failed.into_iter().map(|(h, why)| HookStatus {
        detail: format!(
            "{h}: {why}; conntrack state changes come from ctnetlink events (no kernel time)"
        ),
        hook: h,
        ok: false,
    }));
    None
}

fn attach_state_hook(
    ebpf: &mut Ebpf,
    facts: &KernelFacts,
    hook: StateHook,
) -> Result<(), ProbeError> {
    let err = |e| program_error(hook.name(), e);
    let btf = || facts.kernel_btf(hook.name());
    match hook {
        StateHook::Tracepoint => {
            let p: &mut TracePoint = prog(ebpf, StateHook::Tracepoint.program())?
                .try_into()
                .map_err(err)?;
            p.load().map_err(err)?;
            p.attach("sock", "inet_sock_set_state").map_err(err)?;
        }
        StateHook::BtfTracepoint => {
            attach_btf_tracepoint(ebpf, hook.program(), "inet_sock_set_state", btf()?)?;
        }
        StateHook::Fentry => {
            let btf = btf()?;
            let p: &mut FEntry = prog(ebpf, StateHook::Fentry.program())?
                .try_into()
                .map_err(err)?;
            p.load("tcp_set_state", btf).map_err(err)?;
            p.attach().map_err(err)?;
        }
        StateHook::Kprobe => attach_kprobe(
            ebpf,
            StateHook::Kprobe.program(),
            "tcp_set_state",
            hook.name(),
        )?,
    }
    Ok(())
}

pub(crate) fn prog<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut aya::programs::Program, ProbeError> {
    ebpf.program_mut(name)
        .ok_or_else(|| ProbeError::NoProgram(name.to_string()))
}

/// The state hooks to try for a `--probe` choice, in order.
pub fn state_hook_chain(choice: ProbeChoice) -> Vec<StateHook> {
    match StateHook::from_choice(choice) {
        Some(h) => vec![h],
        None => StateHook::ALL.to_vec(),
    }
}

/// Try each hook of the chain until one attaches; collect why the others did not.
/// `attempt` is the real attach in production; tests pass their own.
pub fn first_working<F>(
    chain: &[StateHook],
    mut attempt: F,
) -> Result<(StateHook, Vec<String>), ProbeError>
where
    F: FnMut(StateHook) -> Result<(), String>,
{
    let mut failures = Vec::new();
    for &hook in chain {
        match attempt(hook) {
            Ok(()) => return Ok((hook, failures)),
            Err(why) => failures.push(format!("{}: {why}", hook.name())),
        }
    }
    Err(ProbeError::NoStateHook(failures))
}

/// Check privileges, read the kernel's layouts, load the programs and attach them.
pub fn load(opts: &ProbeOptions) -> Result<Probes, ProbeError> {
    caps::require_tracing_caps()?;
    let tracefs = Tracefs::find_or_mount().map_err(ProbeError::Tracefs)?;
    let facts = kernel_facts(&tracefs);
    let transport = match opts.transport {
        TransportChoice::Perf => Transport::Perf,
        TransportChoice::Ringbuf if !ringbuf_supported() => return Err(ProbeError::NoRingbuf),
        TransportChoice::Ringbuf => Transport::Ringbuf,
        TransportChoice::Auto if ringbuf_supported() => Transport::Ringbuf,
        TransportChoice::Auto => Transport::Perf,
    };
    let mut ebpf = loader_for(&facts, opts, transport)?;
    let chain = state_hook_chain(opts.probe);
    let (state_hook, fallbacks) = first_working(&chain, |hook| {
        if let Some(why) = precondition(&facts, hook) {
            return Err(why);
        }
        attach_state_hook(&mut ebpf, &facts, hook).map_err(|e| why_not(&e))
    })?;
    let mut hooks = vec![HookStatus {
        hook: state_hook.name().into(),
        ok: true,
        detail: "attached".into(),
    }];
    hooks.extend(fallbacks.into_iter().map(|f| HookStatus {
        hook: f.split(':').next().unwrap_or_default().into(),
        ok: false,
        detail: f,
    }));
    if !state_hook.sees_listen() {
        hooks.push(attach_listen_hook(&mut ebpf));
    }
    // The other hot tracepoints as BTF ones too, unless another state hook was asked for
    // (`--probe tracepoint` keeps every tracepoint classic).
    let btf = (state_hook == StateHook::BtfTracepoint)
        .then(|| facts.btf())
        .flatten();
    hooks.extend(attach_optional(&mut ebpf, &facts, "attached", btf));
    let ct_hook = opts
        .conntrack
        .and_then(|choice| attach_ct_hook(&mut ebpf, &facts, choice, &mut hooks));
    if !opts.follow_forks.is_empty() {
        follow_forks(&mut ebpf, &facts, &opts.follow_forks)?;
        hooks.push(HookStatus {
            hook: "tracepoint sched:sched_process_fork".into(),
            ok: true,
            detail: "attached (--follow-forks)".into(),
        });
    }
    hooks.extend(attach_tls(&mut ebpf, opts, "attached"));
    hooks.extend(attach_go_tls(&mut ebpf, &facts, opts, "attached"));
    Ok(Probes {
        ebpf,
        state_hook,
        transport,
        reset_reasons: facts.reset_reasons,
        hooks,
        ct_hook,
    })
}

/// `--follow-forks`: seed the followed processes and attach the fork tracepoint. Asked for
/// explicitly, so failing is an error, not a degraded run.
fn follow_forks(ebpf: &mut Ebpf, facts: &KernelFacts, pids: &[u32]) -> Result<(), ProbeError> {
    const HOOK: &str = "tracepoint sched:sched_process_fork";
    if let Some(why) = &facts.fork_error {
        return Err(ProbeError::Unavailable(HOOK, why.clone()));
    }
    let map = ebpf
        .map_mut("FOLLOW")
        .ok_or_else(|| ProbeError::NoProgram("map FOLLOW".into()))?;
    let mut follow = aya::maps::HashMap::<_, u32, u8>::try_from(map)
        .map_err(|e| ProbeError::Map("FOLLOW", e))?;
    for &pid in pids {
        follow
            .insert(pid, 1, 0)
            .map_err(|e| ProbeError::Map("FOLLOW", e))?;
    }
    attach_tracepoint(ebpf, "sched_process_fork", "sched", "sched_process_fork")
}

/// Attach every optional tracepoint the kernel has; one status each, saying what is lost
/// without it. A missing length tracepoint (before Linux 6.3) is replaced by kprobes on the
/// TCP function it reports (see [`LENGTH_FALLBACKS`]) where kprobes work.
/// `btf`: the kernel's BTF when the BTF tracepoint programs are to be tried first.
fn attach_optional(
    ebpf: &mut Ebpf,
    facts: &KernelFacts,
    ok_detail: &str,
    btf: Option<&Btf>,
) -> Vec<HookStatus> {
    let mut out = Vec::new();
    for &(name, cat, tp, consequence) in &OPTIONAL_TRACEPOINTS {
        let mut btf_failed = None;
        if let Some(btf) = btf.filter(|_| BTF_TRACEPOINTS.contains(&name)) {
            match attach_btf_tracepoint(ebpf, &format!("{name}_btf"), tp, btf) {
                Ok(()) => {
                    out.push(HookStatus {
                        hook: format!("tp_btf {tp}"),
                        ok: true,
                        detail: ok_detail.to_string(),
                    });
                    continue;
                }
                Err(e) => btf_failed = Some(format!("tp_btf {tp}: {}", why_not(&e))),
            }
        }
        let result = match facts.missing_tracepoints.get(name) {
            Some(why) => Err(why.clone()),
            None => attach_tracepoint(ebpf, name, cat, tp).map_err(|e| error_chain(&e)),
        };
        let fallback = LENGTH_FALLBACKS.iter().find(|f| f.tracepoint == name);
        let (ok, detail) = match (result, fallback) {
            (Ok(()), _) => match btf_failed {
                Some(why) => (true, format!("{ok_detail} (instead of {why})")),
                None => (true, ok_detail.to_string()),
            },
            (Err(why), Some(f)) => match f.attach(ebpf) {
                Ok(()) => {
                    out.push(HookStatus {
                        hook: f.name(),
                        ok: true,
                        detail: format!("{ok_detail} (instead of tracepoint {cat}:{tp})"),
                    });
                    (true, format!("{why}; replaced by {}", f.name()))
                }
                Err(e) => (
                    false,
                    format!(
                        "{why}; {consequence} (the kprobe fallback failed too: {})",
                        why_not(&e)
                    ),
                ),
            },
            (Err(why), None) => (false, format!("{why}; {consequence}")),
        };
        out.push(HookStatus {
            hook: format!("tracepoint {cat}:{tp}"),
            ok,
            detail,
        });
    }
    out
}

/// Kprobes on the TCP functions a length tracepoint reports from (Linux < 6.3).
struct LengthFallback {
    tracepoint: &'static str,
    function: &'static str,
    /// The kprobe (and kretprobe) programs attached to `function`.
    programs: &'static [&'static str],
    kind: &'static str,
}

const LENGTH_FALLBACKS: [LengthFallback; 2] = [
    // The entry remembers the socket, the return reads the bytes queued.
    LengthFallback {
        tracepoint: "sock_send_length",
        function: "tcp_sendmsg",
        programs: &["tcp_sendmsg_kprobe", "tcp_sendmsg_kretprobe"],
        kind: "kprobe+kretprobe",
    },
    // Called with the bytes copied to the reader, at the end of each tcp_recvmsg().
    LengthFallback {
        tracepoint: "sock_recv_length",
        function: "tcp_cleanup_rbuf",
        programs: &["tcp_cleanup_rbuf_kprobe"],
        kind: "kprobe",
    },
];

impl LengthFallback {
    fn name(&self) -> String {
        format!("{} {}", self.kind, self.function)
    }

    fn attach(&self, ebpf: &mut Ebpf) -> Result<(), ProbeError> {
        let hook = self.name();
        for program in self.programs {
            attach_kprobe(ebpf, program, self.function, &hook)?;
        }
        Ok(())
    }
}

/// Load (once) and attach a kprobe or kretprobe program to a kernel function.
pub(crate) fn attach_kprobe(
    ebpf: &mut Ebpf,
    program: &str,
    function: &str,
    hook: &str,
) -> Result<(), ProbeError> {
    let err = |e| program_error(hook, e);
    let p: &mut KProbe = prog(ebpf, program)?.try_into().map_err(err)?;
    if p.fd().is_err() {
        p.load().map_err(err)?;
    }
    if !Path::new(KPROBE_PMU).exists() {
        return Err(ProbeError::NoKprobes);
    }
    p.attach(function, 0).map_err(err)?;
    Ok(())
}

/// With a state hook on `tcp_set_state`, listen() is not seen (`inet_csk_listen_start` stores
/// LISTEN directly): a kprobe there remembers who listens, so accepted sockets get their
/// owner at birth.
fn attach_listen_hook(ebpf: &mut Ebpf) -> HookStatus {
    const HOOK: &str = "kprobe inet_csk_listen_start";
    let result = attach_kprobe(ebpf, "listen_start_kprobe", "inet_csk_listen_start", HOOK);
    HookStatus {
        hook: HOOK.into(),
        ok: result.is_ok(),
        detail: match result {
            Ok(()) => "attached (listeners, for the owner of accepted sockets)".into(),
            Err(e) => format!(
                "{}; accepted sockets get their owner from their first I/O",
                why_not(&e)
            ),
        },
    }
}

fn attach_btf_tracepoint(
    ebpf: &mut Ebpf,
    prog_name: &str,
    name: &str,
    btf: &Btf,
) -> Result<(), ProbeError> {
    let hook = format!("tp_btf {name}");
    let p: &mut BtfTracePoint = prog(ebpf, prog_name)?
        .try_into()
        .map_err(|e| program_error(&hook, e))?;
    p.load(name, btf).map_err(|e| program_error(&hook, e))?;
    p.attach().map_err(|e| program_error(&hook, e))?;
    Ok(())
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    prog_name: &str,
    cat: &str,
    name: &str,
) -> Result<(), ProbeError> {
    let hook = format!("tracepoint {cat}:{name}");
    let p: &mut TracePoint = prog(ebpf, prog_name)?
        .try_into()
        .map_err(|e| program_error(&hook, e))?;
    p.load().map_err(|e| program_error(&hook, e))?;
    p.attach(cat, name).map_err(|e| program_error(&hook, e))?;
    Ok(())
}

/// Why a hook failed, without repeating the hook's name, in an operator's words where the
/// kernel's answer is terse.
fn why_not(e: &ProbeError) -> String {
    match e {
        ProbeError::Program {
            source:
                ProgramError::LoadError {
                    io_error,
                    verifier_log,
                },
            hook,
        } if io_error.raw_os_error() == Some(libc::EPERM) && hook.starts_with("fentry") => {
            let log = verifier_log.to_string();
            let mut why = String::from(
                "refused at load (EPERM): this kernel does not allow fentry programs here",
            );
            if !log.trim().is_empty() {
                why.push_str(&format!("; verifier output: {log}"));
            }
            why
        }
        ProbeError::Program { source, .. } => error_chain(source),
        ProbeError::Unavailable(_, why) => why.clone(),
        e => error_chain(e),
    }
}

/// An error and its causes on one line (verifier logs included).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // Some errors print their source themselves; say each thing once.
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// For `check`: load every program (the verifier runs) and try to attach it, without keeping
/// anything. One line per hook, truthfully.
pub fn survey(opts: &ProbeOptions) -> Result<Vec<HookStatus>, ProbeError> {
    let tracefs = Tracefs::find_or_mount().map_err(ProbeError::Tracefs)?;
    let facts = kernel_facts(&tracefs);
    let transport = if ringbuf_supported() {
        Transport::Ringbuf
    } else {
        Transport::Perf
    };
    // A fresh object per hook: a program can be loaded only once.
    let one = |name: &str,
               program: &str,
               precondition: Option<String>,
               attach: &dyn Fn(&mut Ebpf) -> Result<(), ProbeError>|
     -> Result<HookStatus, ProbeError> {
        let mut ebpf = loader_for(&facts, opts, transport)?;
        let status = match precondition {
            Some(why) => Err(why),
            None => attach(&mut ebpf).map_err(|e| why_not(&e)),
        };
        let (ok, detail) = match status {
            Ok(()) => (true, "loads and attaches".to_string()),
            Err(why) if ebpf.program(program).is_some_and(|p| p.fd().is_ok()) => {
                (false, format!("passes the verifier, cannot attach: {why}"))
            }
            Err(why) => (false, why),
        };
        Ok(HookStatus {
            hook: name.into(),
            ok,
            detail,
        })
    };
    let mut out = Vec::new();
    for hook in StateHook::ALL {
        out.push(one(
            hook.name(),
            hook.program(),
            precondition(&facts, hook),
            &|e| attach_state_hook(e, &facts, hook),
        )?);
    }
    for hook in CtHook::ALL {
        out.push(one(
            hook.name(),
            hook.program(),
            ct_precondition(&facts),
            &|e| hook.attach(e, || facts.kernel_btf(hook.name())),
        )?);
    }
    let mut ebpf = loader_for(&facts, opts, transport)?;
    let btf = facts
        .sock_offsets_error
        .is_none()
        .then(|| facts.btf())
        .flatten();
    out.extend(attach_optional(
        &mut ebpf,
        &facts,
        "loads and attaches",
        btf,
    ));
    out.extend(attach_tls(&mut ebpf, opts, "loads and attaches"));
    out.extend(attach_go_tls(&mut ebpf, &facts, opts, "loads and attaches"));
    if let Some(e) = &facts.sock_offsets_error {
        out.push(HookStatus {
            hook: "BTF struct offsets".into(),
            ok: false,
            detail: format!("{e}; netns ids are 0"),
        });
    }
    Ok(out)
}

/// OpenSSL's calls that carry plaintext, and their entry programs (all return to
/// `ssl_return`).
const TLS_CALLS: [(&str, &str); 4] = [
    ("SSL_write", "ssl_write"),
    ("SSL_write_ex", "ssl_write_ex"),
    ("SSL_read", "ssl_read"),
    ("SSL_read_ex", "ssl_read_ex"),
];

/// Where OpenSSL 3's libssl usually is (one inode, whichever path a process mapped it by).
pub const TLS_LIB_PATHS: [&str; 4] = [
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib/aarch64-linux-gnu/libssl.so.3",
    "/usr/lib64/libssl.so.3",
    "/usr/lib/libssl.so.3",
];

/// `--http2 all`: uprobes at entry and return of `SSL_write` and `SSL_read` in every process
/// that maps the library.
fn attach_tls(ebpf: &mut Ebpf, opts: &ProbeOptions, ok: &str) -> Vec<HookStatus> {
    let Some(lib) = &opts.tls_lib else {
        return Vec::new();
    };
    TLS_CALLS
        .iter()
        .map(|(symbol, entry)| {
            let hook = format!("uprobe {}:{symbol}", lib.display());
            let result = [*entry, "ssl_return"]
                .iter()
                .try_for_each(|program| {
                    let err = |e| program_error(&hook, e);
                    let p: &mut UProbe = prog(ebpf, program)?.try_into().map_err(err)?;
                    if p.fd().is_err() {
                        p.load().map_err(err)?;
                    }
                    p.attach(*symbol, lib, UProbeScope::AllProcesses)
                        .map_err(err)?;
                    Ok::<_, ProbeError>(())
                })
                .map_err(|e| why_not(&e));
            HookStatus {
                hook,
                ok: result.is_ok(),
                detail: result.map_or_else(
                    |why| format!("{why}; --http2 all misses TLS plaintext through {symbol}"),
                    |()| format!("{ok} (--http2 all)"),
                ),
            }
        })
        .collect()
}

/// `--go-binary`: uprobes on crypto/tls in each Go program: `(*Conn).Write` at entry,
/// `(*Conn).Read` at entry and at each of its RET instructions.
fn attach_go_tls(
    ebpf: &mut Ebpf,
    facts: &KernelFacts,
    opts: &ProbeOptions,
    ok: &str,
) -> Vec<HookStatus> {
    const WRITE: &str = "crypto/tls.(*Conn).Write";
    const READ: &str = "crypto/tls.(*Conn).Read";
    opts.go_binaries
        .iter()
        .map(|bin| {
            let hook = format!("uprobe {}:crypto/tls", bin.display());
            let result = (|| -> Result<usize, String> {
                if let Some(e) = &facts.fd_offsets_error {
                    return Err(format!("no way from a file descriptor to its socket: {e}"));
                }
                let rets = gobin::ret_offsets(bin, READ).map_err(|e| e.to_string())?;
                let mut attach = |program: &str, symbol: &str, offset: u64| {
                    let err = |e| program_error(&hook, e);
                    let p: &mut UProbe = prog(ebpf, program)?.try_into().map_err(err)?;
                    if p.fd().is_err() {
                        p.load().map_err(err)?;
                    }
                    let at =
                        aya::programs::uprobe::UProbeAttachLocation::SymbolOffset(symbol, offset);
                    p.attach(at, bin, UProbeScope::AllProcesses).map_err(err)?;
                    Ok::<_, ProbeError>(())
                };
                attach("go_tls_write", WRITE, 0).map_err(|e| why_not(&e))?;
                attach("go_tls_read", READ, 0).map_err(|e| why_not(&e))?;
                for off in &rets {
                    attach("go_tls_read_ret", READ, *off).map_err(|e| why_not(&e))?;
                }
                Ok(rets.len())
            })();
            HookStatus {
                hook,
                ok: result.is_ok(),
                detail: match result {
                    Ok(n) => format!("{ok} (Write at entry, Read at entry and its {n} returns)"),
                    Err(why) => format!("{why}; its TLS connections keep their TCP facts only"),
                },
            }
        })
        .collect()
}

/// Load one kprobe program (no attach): proves it passes this kernel's verifier.
pub fn verify_kprobe(opts: &ProbeOptions, program: &str) -> Result<(), ProbeError> {
    let tracefs = Tracefs::find_or_mount().map_err(ProbeError::Tracefs)?;
    let facts = kernel_facts(&tracefs);
    let mut ebpf = loader_for(&facts, opts, Transport::Ringbuf)?;
    let p: &mut KProbe = prog(&mut ebpf, program)?
        .try_into()
        .map_err(|e| program_error(program, e))?;
    p.load().map_err(|e| program_error(program, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_in_order_and_reports_every_reason() {
        let chain = state_hook_chain(ProbeChoice::Auto);
        assert_eq!(
            chain,
            [
                StateHook::BtfTracepoint,
                StateHook::Tracepoint,
                StateHook::Fentry,
                StateHook::Kprobe
            ]
        );
        let (hook, why) = first_working(&chain, |h| match h {
            StateHook::BtfTracepoint => Err("no BTF".into()),
            StateHook::Tracepoint => {
                Err("tracepoint sock:inet_sock_set_state does not exist".into())
            }
            StateHook::Fentry => Err("refused at load: EPERM".into()),
            StateHook::Kprobe => Ok(()),
        })
        .unwrap();
        assert_eq!(hook, StateHook::Kprobe);
        assert_eq!(why.len(), 3);
        assert!(why[0].starts_with("tp_btf inet_sock_set_state: no BTF"));
        assert!(why[2].starts_with("fentry tcp_set_state: refused"));
    }

    #[test]
    fn nothing_works_is_an_error_naming_each_mechanism() {
        let err =
            first_working(&state_hook_chain(ProbeChoice::Auto), |_| Err("no".into())).unwrap_err();
        let msg = err.to_string();
        for h in StateHook::ALL {
            assert!(msg.contains(h.name()), "{msg}");
        }
    }

    #[test]
    fn an_explicit_choice_is_not_a_chain() {
        assert_eq!(state_hook_chain(ProbeChoice::Kprobe), [StateHook::Kprobe]);
        assert!(
            first_working(&state_hook_chain(ProbeChoice::Tracepoint), |_| Err(
                "x".into()
            ))
            .is_err()
        );
    }
}
