//! Offsets of kernel structure members from the kernel's BTF.
//!
//! Rust eBPF programs get no CO-RE relocations, so the programs that read `struct sock`
//! themselves (the BTF tracepoints, fentry and kprobes) and the netns lookup take their
//! offsets from here.
use std::path::Path;

use btf_rs::{Btf, Type};
use h2trace_common::{ABSENT, CtOffsets, FdOffsets, SockOffsets};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// The module's own (split) BTF, when conntrack is a module rather than built in.
pub const NF_CONNTRACK_BTF: &str = "/sys/kernel/btf/nf_conntrack";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {msg}")]
    Read { path: String, msg: String },
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("BTF: struct {0} has no member {1}")]
    NoMember(String, String),
}

/// Byte offset of `path` (dotted member names) inside struct `name`. Members of anonymous
/// structs and unions are found as if they were direct members, as in C.
fn offset_of(btf: &Btf, name: &str, path: &str) -> Result<u16, BtfError> {
    let mut ty = find_struct(btf, name)?;
    let mut total = 0u32;
    for member in path.split('.') {
        let (bits, next) = find_member(btf, &ty, member)
            .ok_or_else(|| BtfError::NoMember(name.to_string(), path.to_string()))?;
        total += bits;
        ty = next;
    }
    u16::try_from(total / 8).map_err(|_| BtfError::NoMember(name.to_string(), path.to_string()))
}

fn find_struct(btf: &Btf, name: &str) -> Result<Type, BtfError> {
    btf.resolve_types_by_name(name)
        .unwrap_or_default()
        .into_iter()
        .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
        .ok_or_else(|| BtfError::NoStruct(name.to_string()))
}

/// Returns the member's bit offset and its (typedef/qualifier-stripped) type.
fn find_member(btf: &Btf, ty: &Type, name: &str) -> Option<(u32, Type)> {
    let (Type::Struct(s) | Type::Union(s)) = ty else {
        return None;
    };
    for m in &s.members {
        let mty = strip(btf, btf.resolve_chained_type(m).ok()?);
        let mname = btf.resolve_name(m).unwrap_or_default();
        if mname == name {
            return Some((m.bit_offset(), mty));
        }
        if mname.is_empty()
            && let Some((inner, t)) = find_member(btf, &mty, name)
        {
            return Some((m.bit_offset() + inner, t));
        }
    }
    None
}

fn strip(btf: &Btf, mut ty: Type) -> Type {
    loop {
        let next = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t),
            Type::Const(t) => btf.resolve_chained_type(t),
            Type::Volatile(t) => btf.resolve_chained_type(t),
            _ => return ty,
        };
        match next {
            Ok(n) => ty = n,
            Err(_) => return ty,
        }
    }
}

/// The kernel's BTF (`VMLINUX_BTF`), parsed once for all the offsets below.
pub fn vmlinux() -> Result<Btf, BtfError> {
    read_btf(Path::new(VMLINUX_BTF), None)
}

fn read_btf(path: &Path, base: Option<&Btf>) -> Result<Btf, BtfError> {
    match base {
        None => Btf::from_file(path),
        Some(b) => Btf::from_split_file(path, b),
    }
    .map_err(|e| BtfError::Read {
        path: path.display().to_string(),
        msg: e.to_string(),
    })
}

/// The `struct sk_buff` and `struct nf_conn` offsets the conntrack hooks need. `module`:
/// the nf_conntrack module's split BTF when it exists (else nf_conn is in vmlinux).
pub fn ct_offsets(base: &Btf, module: &Path) -> Result<CtOffsets, BtfError> {
    let split = module
        .exists()
        .then(|| read_btf(module, Some(base)))
        .transpose()?;
    let btf = split.as_ref().unwrap_or(base);
    let tuple_hash = match find_struct(btf, "nf_conntrack_tuple_hash")? {
        Type::Struct(s) => s.size() as u16,
        _ => unreachable!("find_struct returns structs"),
    };
    let first = offset_of(btf, "nf_conn", "tuplehash")?
        + offset_of(btf, "nf_conntrack_tuple_hash", "tuple")?;
    let t = |m: &str| offset_of(btf, "nf_conntrack_tuple", m);
    let ct = |m: &str| offset_of(btf, "nf_conn", m);
    Ok(CtOffsets {
        skb_nfct: offset_of(base, "sk_buff", "_nfct")?,
        tuple_orig: first,
        tuple_reply: first + tuple_hash,
        src_u3: t("src.u3")?,
        src_port: t("src.u.all")?,
        l3num: t("src.l3num")?,
        dst_u3: t("dst.u3")?,
        dst_port: t("dst.u.all")?,
        protonum: t("dst.protonum")?,
        tcp_state: ct("proto.tcp.state")?,
        status: ct("status")?,
        // Optional in the kernel's configuration: absent is not an error.
        mark: ct("mark").unwrap_or(ABSENT),
        ct_net: ct("ct_net")?,
        zone: ct("zone.id").unwrap_or(ABSENT),
        _pad: [0; 2],
    })
}

/// The `struct sock_common` and `struct net` offsets the programs need.
pub fn sock_offsets(btf: &Btf) -> Result<SockOffsets, BtfError> {
    let sc = |m: &str| offset_of(btf, "sock_common", m);
    Ok(SockOffsets {
        skc_daddr: sc("skc_daddr")?,
        skc_rcv_saddr: sc("skc_rcv_saddr")?,
        skc_dport: sc("skc_dport")?,
        skc_num: sc("skc_num")?,
        skc_family: sc("skc_family")?,
        skc_state: sc("skc_state")?,
        skc_v6_daddr: sc("skc_v6_daddr")?,
        skc_v6_rcv_saddr: sc("skc_v6_rcv_saddr")?,
        skc_net: sc("skc_net")?,
        net_ns_inum: offset_of(btf, "net", "ns.inum")?,
        sk_protocol: offset_of(btf, "sock", "sk_protocol")?,
        _pad: 0,
    })
}

/// Offsets from a task to the socket behind a file descriptor (Go's crypto/tls).
pub fn fd_offsets(btf: &Btf) -> Result<FdOffsets, BtfError> {
    Ok(FdOffsets {
        task_files: offset_of(btf, "task_struct", "files")?,
        files_fdt: offset_of(btf, "files_struct", "fdt")?,
        fdt_max_fds: offset_of(btf, "fdtable", "max_fds")?,
        fdt_fd: offset_of(btf, "fdtable", "fd")?,
        file_private_data: offset_of(btf, "file", "private_data")?,
        socket_sk: offset_of(btf, "socket", "sk")?,
        _pad: [0; 2],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this machine's BTF when it has one; the offsets of these long-stable members are
    /// fixed by the kernel's layout of `struct sock_common`.
    #[test]
    fn resolves_sock_common_members_through_anonymous_unions() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: no {VMLINUX_BTF}");
            return;
        }
        let o = sock_offsets(&vmlinux().unwrap()).expect("sock offsets");
        // skc_daddr opens sock_common (inside two anonymous aggregates); skc_rcv_saddr follows.
        assert_eq!(o.skc_daddr, 0);
        assert_eq!(o.skc_rcv_saddr, 4);
        // skc_dport and skc_num share the 32-bit skc_portpair after the hash.
        assert_eq!(o.skc_dport, 12);
        assert_eq!(o.skc_num, 14);
        assert_eq!(o.skc_family, 16);
        assert_eq!(o.skc_state, 18);
        assert!(o.skc_v6_daddr > o.skc_net && o.skc_v6_rcv_saddr == o.skc_v6_daddr + 16);
        assert!(o.net_ns_inum > 0);
    }

    #[test]
    fn resolves_nf_conn_members() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: no {VMLINUX_BTF}");
            return;
        }
        let o = match ct_offsets(&vmlinux().unwrap(), Path::new(NF_CONNTRACK_BTF)) {
            Ok(o) => o,
            Err(BtfError::NoStruct(s)) => {
                eprintln!("skipped: this kernel has no conntrack ({s})");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        // A tuple: src (address, then port union, then family) and dst (address, port,
        // protocol); the reply tuple follows the original one.
        assert_eq!(o.src_u3, 0);
        assert_eq!(o.src_port, 16);
        assert_eq!(o.l3num, 18);
        assert_eq!(o.dst_u3, 20);
        assert_eq!(o.dst_port, 36);
        assert_eq!(o.protonum, 38);
        assert!(o.tuple_reply > o.tuple_orig);
        assert!(o.tcp_state > o.tuple_reply && o.skb_nfct > 0);
    }
}
