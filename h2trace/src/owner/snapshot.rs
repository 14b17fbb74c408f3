//! Sockets that existed before h2trace started: listed with sock_diag in each traced network
//! namespace and tied to their processes through the socket inodes in /proc/PID/fd (as `ss -p`
//! does), so their records get owners like any other (bcc's tcplife drops them).
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_SOCK_DIAG};

use super::cgroup::{self, Cgroups};
use crate::{
    event::{Owner, OwnerSource},
    netns::{NetnsError, NetnsSpec, in_netns, netns_inode},
};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("listing the TCP sockets of {0} (sock_diag)")]
    Diag(String, #[source] std::io::Error),
}

/// One socket as found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapSocket {
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// TCP state (`tcp_state`).
    pub state: u8,
    pub inode: u32,
    pub uid: u32,
    /// The process holding it, when one does (`source` is `Snapshot`).
    pub owner: Option<Owner>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Kernel times of the last data sent / received, from the kernel's "ms ago".
    pub last_send_ns: Option<u64>,
    pub last_recv_ns: Option<u64>,
}

/// Every network namespace some process is in (the host-wide case), one spec per inode.
pub fn all_namespaces() -> Vec<NetnsSpec> {
    let mut by_inode = BTreeMap::new();
    for p in procfs::process::all_processes()
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = format!("/proc/{}/ns/net", p.pid);
        if let Ok(m) = std::fs::metadata(&path) {
            by_inode.entry(m.ino()).or_insert(NetnsSpec::Named(path));
        }
    }
    by_inode.into_values().collect()
}

/// Socket inode → the process holding it, for every process h2trace may read.
fn socket_owners(cgroups: &mut Cgroups) -> HashMap<u64, Owner> {
    let mut owners = HashMap::new();
    for p in procfs::process::all_processes()
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(fds) = p.fd() else { continue };
        // By id, not by the path /proc shows: that path is relative to h2trace's own cgroup
        // namespace (inside a pod it starts with `/..`).
        let cgroup_id = cgroup::id_of_pid(p.pid).unwrap_or(0);
        let owner = Owner {
            tgid: p.pid as u32,
            pid: p.pid as u32,
            comm: p.stat().map(|s| s.comm.into()).unwrap_or_default(),
            cgroup_id,
            cgroup_path: cgroups.path(cgroup_id),
            source: OwnerSource::Snapshot,
        };
        for fd in fds.flatten() {
            if let procfs::process::FDTarget::Socket(inode) = fd.target {
                owners.entry(inode).or_insert_with(|| owner.clone());
            }
        }
    }
    owners
}

/// The TCP sockets of `specs` (listeners and TIME_WAIT excepted: they have no connection or
/// no owner), stamped against kernel time `now_ns`.
pub fn take(
    specs: &[NetnsSpec],
    now_ns: u64,
    cgroups: &mut Cgroups,
) -> Result<Vec<SnapSocket>, SnapshotError> {
    let owners = socket_owners(cgroups);
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for spec in specs {
        let netns = netns_inode(spec)?;
        if !seen.insert(netns) {
            continue;
        }
        let responses = in_netns(spec, dump)?.map_err(|e| SnapshotError::Diag(spec.name(), e))?;
        for r in responses {
            let h = &r.header;
            let mut s = SnapSocket {
                netns,
                local: SocketAddr::new(h.socket_id.source_address, h.socket_id.source_port),
                remote: SocketAddr::new(
                    h.socket_id.destination_address,
                    h.socket_id.destination_port,
                ),
                state: h.state,
                inode: h.inode,
                uid: h.uid,
                owner: owners.get(&u64::from(h.inode)).cloned(),
                bytes_sent: 0,
                bytes_received: 0,
                last_send_ns: None,
                last_recv_ns: None,
            };
            for nla in &r.nlas {
                if let Nla::TcpInfo(i) = nla {
                    let ago = |ms: u32| now_ns.checked_sub(u64::from(ms) * 1_000_000);
                    s.bytes_sent = i.bytes_acked;
                    s.bytes_received = i.bytes_received;
                    s.last_send_ns = ago(i.last_data_sent);
                    s.last_recv_ns = ago(i.last_data_recv);
                }
            }
            out.push(s);
        }
    }
    Ok(out)
}

/// One sock_diag dump per address family, inside the current namespace.
fn dump() -> std::io::Result<Vec<InetResponse>> {
    use h2trace_common::tcp_state::{LISTEN, NEW_SYN_RECV, TIME_WAIT};
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    let states = StateFlags::from_bits_truncate(
        (1u32..=12)
            .filter(|s| ![LISTEN, TIME_WAIT, NEW_SYN_RECV].contains(&(*s as u8)))
            .fold(0, |m, s| m | 1 << s),
    );
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let socket_id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        let mut req = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::INFO,
                states: states.clone(),
                socket_id,
            })
            .into(),
        );
        req.finalize();
        let mut buf = vec![0; req.buffer_len()];
        req.serialize(&mut buf);
        socket.send(&buf, 0)?;
        let mut rx = vec![0u8; 64 * 1024];
        'recv: loop {
            let n = socket.recv(&mut &mut rx[..], 0)?;
            let mut off = 0;
            while off < n {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&rx[off..n])
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => out.push(*r),
                    NetlinkPayload::Done(_) => break 'recv,
                    NetlinkPayload::Error(e) => {
                        return Err(std::io::Error::other(format!("{e:?}")));
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }
    Ok(out)
}
