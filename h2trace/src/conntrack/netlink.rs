//! ctnetlink: the conntrack events of one network namespace, read from a netlink socket
//! opened inside it (conntrack tables are per namespace; a socket sees its own namespace's).
//!
//! Messages are decoded by `netlink-packet-netfilter`; this file only picks the fields
//! h2trace reports. A full socket buffer makes the kernel drop events and report ENOBUFS on
//! the next read: counted as a loss, never hidden.
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{
    NLM_F_CREATE, NLM_F_EXCL, NetlinkBuffer, NetlinkMessage, NetlinkPayload, Nla as _,
};
use netlink_packet_netfilter::{
    NetfilterMessage, NetfilterMessageInner,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple,
        Protocol, Tuple as NlTuple,
    },
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_NETFILTER};
use tokio::io::unix::AsyncFd;

use super::{CtEvent, CtKind, CtNamespace, CtSource, Tuple};
use crate::netns::{NetnsError, NetnsSpec, in_netns, netns_inode};

/// `NFNLGRP_CONNTRACK_NEW`, `_UPDATE`, `_DESTROY` (include/uapi/linux/netfilter/nfnetlink.h).
const GROUP_NEW: u32 = 1;
const GROUP_UPDATE: u32 = 2;
const GROUP_DESTROY: u32 = 3;
/// `CTA_ID` and `CTA_ZONE`: attributes the crate passes through undecoded.
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;

#[derive(Debug, thiserror::Error)]
pub enum CtError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("opening a ctnetlink socket in {0} (needs CAP_NET_ADMIN and nf_conntrack_netlink)")]
    Socket(String, #[source] std::io::Error),
    #[error("registering the ctnetlink socket of {0} with the event loop")]
    Register(String, #[source] std::io::Error),
}

fn sysctl(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether ctnetlink events can be subscribed to here (for `check`).
pub fn available() -> std::io::Result<()> {
    let mut s = Socket::new(NETLINK_NETFILTER)?;
    s.bind(&NlAddr::new(0, 0))?;
    s.add_membership(GROUP_DESTROY)
}

pub struct Listener {
    fd: AsyncFd<Socket>,
    pub ns: CtNamespace,
    buf: Vec<u8>,
    /// Reads that failed with ENOBUFS: the kernel dropped events for this socket.
    pub overruns: u64,
    /// Messages that did not decode.
    pub malformed: u64,
}

impl Listener {
    /// `kernel_states`: the kernel-side hook that reports state changes, if one is attached;
    /// then UPDATE events are not subscribed (one source per fact).
    /// `rcvbuf`: the socket's receive buffer (a burst must fit between two reads).
    pub fn open(
        spec: &NetnsSpec,
        kernel_states: Option<&str>,
        rcvbuf: usize,
    ) -> Result<Self, CtError> {
        let netns = netns_inode(spec)?;
        let updates = kernel_states.is_none();
        let (socket, timeout, loose) = in_netns(spec, move || -> std::io::Result<_> {
            let mut s = Socket::new(NETLINK_NETFILTER)?;
            s.bind(&NlAddr::new(0, 0))?;
            s.add_membership(GROUP_NEW)?;
            s.add_membership(GROUP_DESTROY)?;
            if updates {
                s.add_membership(GROUP_UPDATE)?;
            }
            // As root the buffer may exceed net.core.rmem_max; otherwise take what we get.
            let _ =
                nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &rcvbuf);
            s.set_non_blocking(true)?;
            Ok((
                s,
                sysctl("nf_conntrack_tcp_timeout_established"),
                sysctl("nf_conntrack_tcp_loose").map(|v| v != 0),
            ))
        })?
        .map_err(|e| CtError::Socket(spec.name(), e))?;
        // SAFETY: the socket owns its fd and lives inside the AsyncFd until both are dropped.
        let fd = unsafe { AsyncFd::register(socket) }
            .map_err(|e| CtError::Register(spec.name(), e.into()))?;
        Ok(Self {
            fd,
            ns: CtNamespace {
                netns,
                name: spec.name(),
                source: match kernel_states {
                    None => "ctnetlink".into(),
                    Some(h) => format!("ctnetlink + {h}"),
                },
                timeout_established_s: timeout,
                tcp_loose: loose,
            },
            buf: vec![0; 64 * 1024],
            overruns: 0,
            malformed: 0,
        })
    }

    /// Ready when the kernel has queued events (readiness is consumed: `drain` next).
    pub fn poll_readable(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.fd.poll_read_ready(cx).map(|r| {
            if let Ok(mut g) = r {
                g.clear_ready();
            }
        })
    }

    /// Every waiting event, stamped `ts_ns`.
    pub fn drain(&mut self, ts_ns: u64, out: &mut impl FnMut(CtEvent)) {
        loop {
            let n = match self.fd.get_ref().recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.overruns += 1;
                    continue;
                }
                // EAGAIN: drained. Anything else is not recoverable by reading again.
                Err(_) => return,
            };
            self.malformed += parse(&self.buf[..n], ts_ns, self.ns.netns, out);
        }
    }
}

/// Decode one datagram (one or more netlink messages); returns how many did not decode.
pub fn parse(datagram: &[u8], ts_ns: u64, netns: u32, out: &mut impl FnMut(CtEvent)) -> u64 {
    let mut malformed = 0;
    let mut off = 0;
    while off < datagram.len() {
        let Ok(len) = NetlinkBuffer::new_checked(&datagram[off..]).map(|b| b.length() as usize)
        else {
            return malformed + 1;
        };
        let msg = &datagram[off..off + len];
        off += len.next_multiple_of(4).max(4);
        match NetlinkMessage::<NetfilterMessage>::deserialize(msg) {
            Ok(m) => {
                if let Some(ev) = event(m, ts_ns, netns) {
                    out(ev);
                }
            }
            Err(_) => malformed += 1,
        }
    }
    malformed
}

fn event(m: NetlinkMessage<NetfilterMessage>, ts_ns: u64, netns: u32) -> Option<CtEvent> {
    let NetlinkPayload::InnerMessage(NetfilterMessage {
        inner: NetfilterMessageInner::Conntrack(ct),
        ..
    }) = m.payload
    else {
        return None;
    };
    let (kind, attrs) = match ct {
        ConntrackMessage::New(a) if m.header.flags & (NLM_F_CREATE | NLM_F_EXCL) != 0 => {
            (CtKind::New, a)
        }
        ConntrackMessage::New(a) => (CtKind::Update, a),
        ConntrackMessage::Delete(a) => (CtKind::Destroy, a),
        _ => return None,
    };
    let mut ev = CtEvent {
        ts_ns,
        source: CtSource::Netlink,
        netns,
        kind,
        id: 0,
        orig: unspecified(),
        reply: unspecified(),
        state: None,
        timeout_s: None,
        status: 0,
        mark: 0,
        zone: 0,
    };
    let mut tcp = false;
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => (ev.orig, tcp) = tuple(&t)?,
            ConntrackAttribute::CtaTupleReply(t) => ev.reply = tuple(&t)?.0,
            ConntrackAttribute::CtaProtoInfo(p) => ev.state = tcp_state(&p),
            ConntrackAttribute::CtaStatus(s) => ev.status = s.bits(),
            ConntrackAttribute::CtaTimeout(t) => ev.timeout_s = Some(t),
            ConntrackAttribute::CtaMark(m) => ev.mark = m,
            ConntrackAttribute::Other(nla) => {
                let mut v = vec![0; nla.value_len()];
                nla.emit_value(&mut v);
                match (nla.kind(), v.as_slice()) {
                    (CTA_ID, &[a, b, c, d]) => ev.id = u32::from_be_bytes([a, b, c, d]),
                    (CTA_ZONE, &[a, b]) => ev.zone = u16::from_be_bytes([a, b]),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    tcp.then_some(ev)
}

fn unspecified() -> Tuple {
    let a = SocketAddr::new(IpAddr::from([0u8; 4]), 0);
    Tuple { src: a, dst: a }
}

/// The addresses and ports of one direction, and whether it is TCP.
fn tuple(t: &[NlTuple]) -> Option<(Tuple, bool)> {
    let (mut src, mut dst, mut sport, mut dport, mut tcp) = (None, None, 0, 0, false);
    for part in t {
        match part {
            NlTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            NlTuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(Protocol::Tcp) => tcp = true,
                        ProtoTuple::SourcePort(p) => sport = *p,
                        ProtoTuple::DestinationPort(p) => dport = *p,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        Tuple {
            src: SocketAddr::new(src?, sport),
            dst: SocketAddr::new(dst?, dport),
        },
        tcp,
    ))
}

fn tcp_state(p: &[ProtoInfo]) -> Option<u8> {
    p.iter().find_map(|i| match i {
        ProtoInfo::TCP(t) => t.iter().find_map(|x| match x {
            ProtoInfoTCP::State(s) => Some(*s),
            _ => None,
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::NetlinkMessage;
    use netlink_packet_netfilter::{NetfilterHeader, NetfilterProtoFamily, conntrack::Status};

    use super::*;

    fn nl_tuple(src: &str, dst: &str) -> Vec<NlTuple> {
        let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        vec![
            NlTuple::Ip(vec![
                IPTuple::SourceAddress(s.ip()),
                IPTuple::DestinationAddress(d.ip()),
            ]),
            NlTuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Tcp),
                ProtoTuple::SourcePort(s.port()),
                ProtoTuple::DestinationPort(d.port()),
            ]),
        ]
    }

    /// A message as the kernel would send it, built with the crate's own encoder.
    fn message(msg: ConntrackMessage, flags: u16) -> Vec<u8> {
        let mut m = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
            msg,
        ));
        m.header.flags = flags;
        m.finalize();
        let mut b = vec![0; m.buffer_len()];
        m.serialize(&mut b);
        b
    }

    #[test]
    fn decodes_new_update_and_expiry() {
        let attrs = |state: u8, timeout: Option<u32>| {
            let mut a = vec![
                ConntrackAttribute::CtaTupleOrig(nl_tuple("10.1.0.2:40000", "10.2.0.2:8080")),
                ConntrackAttribute::CtaTupleReply(nl_tuple("10.2.0.2:8080", "10.2.0.1:40000")),
                ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![ProtoInfoTCP::State(
                    state,
                )])]),
                ConntrackAttribute::CtaStatus(Status::from_bits_retain(0x8)),
                ConntrackAttribute::Other(netlink_packet_core::DefaultNla::new(
                    CTA_ID,
                    77u32.to_be_bytes().to_vec(),
                )),
            ];
            a.extend(timeout.map(ConntrackAttribute::CtaTimeout));
            a
        };
        let mut dgram = message(
            ConntrackMessage::New(attrs(1, Some(120))),
            NLM_F_CREATE | NLM_F_EXCL,
        );
        dgram.extend(message(ConntrackMessage::New(attrs(3, Some(5))), 0));
        dgram.extend(message(ConntrackMessage::Delete(attrs(3, None)), 0));
        let mut evs = Vec::new();
        assert_eq!(parse(&dgram, 9, 4, &mut |e| evs.push(e)), 0);
        let kinds: Vec<_> = evs.iter().map(|e| (e.kind, e.state, e.expired())).collect();
        assert_eq!(
            kinds,
            [
                (CtKind::New, Some(1), false),
                (CtKind::Update, Some(3), false),
                (CtKind::Destroy, Some(3), true)
            ]
        );
        let e = &evs[0];
        assert_eq!((e.id, e.netns, e.ts_ns, e.status), (77, 4, 9, 8));
        assert_eq!(e.orig.src, "10.1.0.2:40000".parse().unwrap());
        assert_eq!(e.reply.dst, "10.2.0.1:40000".parse().unwrap());
        assert!(e.nat());
    }

    #[test]
    fn garbage_is_counted_not_fatal() {
        let mut evs = Vec::new();
        assert_eq!(parse(&[1, 2, 3], 0, 0, &mut |e| evs.push(e)), 1);
        let mut junk = vec![0u8; 40];
        junk[0] = 40; // length 40, type 0: a netlink message no decoder knows
        junk[4] = 0xff;
        junk[5] = 0x01;
        parse(&junk, 0, 0, &mut |e| evs.push(e));
        assert!(evs.is_empty());
    }
}
