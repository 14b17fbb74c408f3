//! The kernel-side conntrack hooks: which exists on this kernel, chosen at run time.
//!
//! There is no conntrack tracepoint. On kernels with kprobes or fentry the programs hook
//! `__nf_ct_refresh_acct()`, which the TCP tracker calls for each packet after updating the
//! entry's state; elsewhere a BTF tracepoint on `net_dev_start_xmit` reads the entry attached
//! to each transmitted packet. ctnetlink (userspace) adds creation and expiry either way.

use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, FEntry},
};

use super::{ProbeError, attach_kprobe, prog, program_error};

/// The function the TCP conntrack tracker calls for every packet, state already updated.
const REFRESH_FN: &str = "__nf_ct_refresh_acct";
/// BTF tracepoints that carry a packet with its conntrack entry, and their programs.
const PACKET_TPS: [(&str, &str); 2] = [("net_dev_start_xmit", "ct_xmit"), ("kfree_skb", "ct_drop")];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CtHookChoice {
    /// The first that works: fentry, then kprobe, then the BTF tracepoint.
    Auto,
    Fentry,
    Kprobe,
    TpBtf,
    /// No kernel-side hook: state changes come from ctnetlink UPDATE events.
    Netlink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtHook {
    Fentry,
    Kprobe,
    BtfTracepoint,
}

impl CtHook {
    pub const ALL: [CtHook; 3] = [Self::Fentry, Self::Kprobe, Self::BtfTracepoint];

    pub fn name(self) -> &'static str {
        match self {
            Self::Fentry => "fentry __nf_ct_refresh_acct",
            Self::Kprobe => "kprobe __nf_ct_refresh_acct",
            Self::BtfTracepoint => "tp_btf net_dev_start_xmit+kfree_skb",
        }
    }

    pub fn program(self) -> &'static str {
        match self {
            Self::Fentry => "ct_refresh_fentry",
            Self::Kprobe => "ct_refresh_kprobe",
            Self::BtfTracepoint => "ct_xmit",
        }
    }

    pub fn chain(choice: CtHookChoice) -> Vec<CtHook> {
        match choice {
            CtHookChoice::Auto => Self::ALL.to_vec(),
            CtHookChoice::Fentry => vec![Self::Fentry],
            CtHookChoice::Kprobe => vec![Self::Kprobe],
            CtHookChoice::TpBtf => vec![Self::BtfTracepoint],
            CtHookChoice::Netlink => Vec::new(),
        }
    }

    /// Load (the verifier runs) and attach.
    /// `btf`: the kernel's BTF, which the fentry and BTF tracepoint programs need (parsed
    /// only when one of them is attached).
    pub fn attach<'b>(
        self,
        ebpf: &mut Ebpf,
        btf: impl FnOnce() -> Result<&'b Btf, ProbeError>,
    ) -> Result<(), ProbeError> {
        let err = |e| program_error(self.name(), e);
        match self {
            Self::Fentry => {
                let btf = btf()?;
                let p: &mut FEntry = prog(ebpf, self.program())?.try_into().map_err(err)?;
                p.load(REFRESH_FN, btf).map_err(err)?;
                p.attach().map_err(err)?;
            }
            Self::Kprobe => attach_kprobe(ebpf, self.program(), REFRESH_FN, self.name())?,
            Self::BtfTracepoint => {
                let btf = btf()?;
                for (tp, program) in PACKET_TPS {
                    let p: &mut BtfTracePoint = prog(ebpf, program)?.try_into().map_err(err)?;
                    p.load(tp, btf).map_err(err)?;
                    p.attach().map_err(err)?;
                }
            }
        }
        Ok(())
    }
}
