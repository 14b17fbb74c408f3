//! `h2trace check`: what this kernel and these privileges allow, truthfully.
use std::{fmt::Write as _, path::Path};

use crate::probe::{self, ProbeOptions, btf, caps, tracefs::Tracefs};

pub struct Report {
    pub text: String,
    /// Tracing can run: a state hook attaches, a transport works, privileges suffice.
    pub can_trace: bool,
}

pub fn check(opts: &ProbeOptions) -> Report {
    let mut t = String::new();
    let uname = nix::sys::utsname::uname().ok();
    let release = uname
        .as_ref()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let _ = writeln!(t, "kernel        {release}");
    let vmlinux = btf::vmlinux().map_err(|e| e.to_string());
    let btf_line = match vmlinux
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|b| btf::sock_offsets(b).map_err(|e| e.to_string()))
    {
        Ok(_) => format!(
            "yes ({}; struct sock_common offsets resolved)",
            btf::VMLINUX_BTF
        ),
        Err(e) => format!("no: {e}"),
    };
    let _ = writeln!(t, "BTF           {btf_line}");
    let tracefs_line = match Tracefs::find() {
        Some(p) => format!("mounted at {}", p.display()),
        None => "not mounted (h2trace mounts it at /sys/kernel/tracing when run as root)".into(),
    };
    let _ = writeln!(t, "tracefs       {tracefs_line}");

    let _ = writeln!(t, "\ncapabilities (effective)");
    for (cap, why) in caps::USED {
        let mark = if caps::has(cap) { "yes" } else { "NO " };
        let _ = writeln!(t, "  {mark} {:<20} {why}", cap.to_string());
    }
    let privileged = caps::require_tracing_caps();

    let _ = writeln!(t, "\ntransports");
    let ring = probe::ringbuf_supported();
    let _ = writeln!(
        t,
        "  {} ring buffer (BPF_MAP_TYPE_RINGBUF)",
        if ring { "ok " } else { "NO " }
    );
    let perf = aya::sys::is_map_supported(aya::maps::MapType::PerfEventArray).unwrap_or(false);
    let _ = writeln!(
        t,
        "  {} perf buffers (BPF_MAP_TYPE_PERF_EVENT_ARRAY)",
        if perf { "ok " } else { "NO " }
    );

    let _ = writeln!(t, "\nhooks");
    let mut state_ok = false;
    match &privileged {
        Err(e) => {
            let _ = writeln!(t, "  not tested: {e}");
        }
        Ok(()) => match probe::survey(opts) {
            Ok(hooks) => {
                for h in &hooks {
                    let _ = writeln!(
                        t,
                        "  {} {:<38} {}",
                        if h.ok { "ok " } else { "NO " },
                        h.hook,
                        h.detail
                    );
                }
                state_ok = hooks
                    .iter()
                    .any(|h| h.ok && probe::StateHook::ALL.iter().any(|s| s.name() == h.hook));
            }
            Err(e) => {
                let _ = writeln!(t, "  cannot load the programs: {}", probe::error_chain(&e));
            }
        },
    }
    let _ = writeln!(t, "\nHTTP/2");
    let _ = writeln!(
        t,
        "  {}",
        if opts.h2c {
            "h2c  frames of cleartext connections that begin with the client preface, read from the buffers of their read and write syscalls by the length hooks above (bpf_task_pt_regs, bpf_loop: Linux ≥ 5.17); --http2 off skips it"
        } else {
            "off  (--http2 off): no frames"
        }
    );
    let _ = writeln!(
        t,
        "  {}",
        match &opts.tls_lib {
            Some(lib) => format!(
                "TLS  plaintext of programs using {} (SSL_write/SSL_read uprobes above){}; Java and statically linked TLS are not read",
                lib.display(),
                if opts.go_binaries.is_empty() {
                    "; Go programs with --go-binary"
                } else {
                    " and of the --go-binary programs (crypto/tls)"
                }
            ),
            None => "TLS  not read (--http2 all reads OpenSSL's): encrypted connections show their TCP facts only".into(),
        }
    );
    let _ = writeln!(t, "\nconntrack");
    let _ = writeln!(
        t,
        "  {}",
        match crate::conntrack::netlink::available() {
            Ok(()) => "ok  ctnetlink events (NEW, UPDATE, DESTROY) can be followed".to_string(),
            Err(e) => format!(
                "NO  ctnetlink events: {e} (needs CAP_NET_ADMIN and nf_conntrack_netlink); --conntrack off"
            ),
        }
    );
    let _ = writeln!(
        t,
        "  {}",
        match vmlinux.as_ref().map_err(Clone::clone).and_then(|b| {
            btf::ct_offsets(b, Path::new(btf::NF_CONNTRACK_BTF)).map_err(|e| e.to_string())
        }) {
            Ok(_) => "ok  struct nf_conn offsets from BTF (kernel-side state changes, hooks above)"
                .to_string(),
            Err(e) => format!("NO  struct nf_conn offsets from BTF: {e}"),
        }
    );
    let can_trace = privileged.is_ok() && state_ok && (ring || perf);
    let _ = writeln!(
        t,
        "\n{}",
        if can_trace {
            "tracing can run"
        } else {
            "tracing cannot run here (see above)"
        }
    );
    Report { text: t, can_trace }
}
