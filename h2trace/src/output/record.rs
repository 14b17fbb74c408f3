//! The NDJSON line of a socket event (`connection-closed`, `connection-open`, the live events,
//! `http2-frame`), written straight into a byte buffer. It is the agent's hottest path (two
//! records per connection under churn): serde's generic serializer escaped every key and went
//! through a call per field, about half the agent's CPU. Keys and the fixed values here are
//! literals that need no escaping; text that comes from outside (process names, cgroup paths,
//! reason names) is escaped by serde_json. The layout is the documented one (docs/ndjson.md),
//! field for field and in the same order as before: the recorded fixtures replay to
//! themselves byte for byte, and the replay round-trip property test reads these lines back.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use super::{
    Clock, FrameOut, SCHEMA, closed_ns, container, ct_join, http2_out, push_community_id,
    reason_name, role,
};
use crate::{
    correlate,
    event::{Body, Event, Life, Socket, state_name},
};

/// Appends JSON pieces to a line.
struct Line<'a>(&'a mut Vec<u8>);

impl Line<'_> {
    /// A fragment that is already JSON (keys, punctuation, fixed values). Inlined, so that a
    /// literal's length is known and the copy is a few moves rather than a call to memmove.
    #[inline(always)]
    fn raw(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    fn num(&mut self, v: impl itoa::Integer) {
        self.raw(itoa::Buffer::new().format(v));
    }

    /// `,"key":v` for a value that is present.
    #[inline(always)]
    fn opt(&mut self, key: &str, v: Option<u64>) {
        if let Some(v) = v {
            self.raw(key);
            self.num(v);
        }
    }

    /// A string known to need no escaping (names of states, ids, base64, timestamps).
    fn plain(&mut self, s: &str) {
        debug_assert!(!s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20));
        self.0.push(b'"');
        self.raw(s);
        self.0.push(b'"');
    }

    /// A string from outside, escaped.
    fn text(&mut self, s: &str) {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.0, s);
    }

    fn ip(&mut self, ip: IpAddr) {
        match ip {
            // The common case, without the formatting machinery.
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                self.0.push(b'"');
                self.num(a);
                for o in [b, c, d] {
                    self.0.push(b'.');
                    self.num(o);
                }
                self.0.push(b'"');
            }
            IpAddr::V6(_) => {
                use std::io::Write as _;
                let _ = write!(self.0, "\"{ip}\"");
            }
        }
    }

    /// Anything else (rare, nested parts), through serde.
    fn serde(&mut self, v: &impl serde::Serialize) {
        let _ = serde_json::to_writer(&mut *self.0, v);
    }
}

/// One socket event as a line of NDJSON (with its newline), appended to `out`.
pub(super) fn write(
    out: &mut Vec<u8>,
    clock: &Clock,
    reasons: &BTreeMap<u32, String>,
    ev: &Event,
    facts: Option<&correlate::Facts>,
) {
    let mut j = Line(out);
    let s = &ev.socket;
    let life = match &ev.body {
        Body::Life(l) | Body::Open(l) => Some(&**l),
        _ => None,
    };
    let (action, ty, dataset) = match &ev.body {
        Body::Life(_) => ("connection-closed", "end", "h2trace.connection"),
        Body::Open(_) => ("connection-open", "info", "h2trace.connection"),
        Body::State { .. } => ("state-change", "change", "h2trace.tcp"),
        Body::ResetSent { .. } => ("reset-sent", "info", "h2trace.tcp"),
        Body::ResetReceived { .. } => ("reset-received", "info", "h2trace.tcp"),
        Body::Retransmit { .. } => ("retransmit", "info", "h2trace.tcp"),
        Body::Frame(_) => ("http2-frame", "info", "h2trace.http2"),
    };
    j.raw("{\"@timestamp\":\"");
    clock.write_rfc3339(ev.ts_ns, j.0);
    j.raw("\"");
    j.raw(",\"schema\":");
    j.plain(SCHEMA);
    j.raw(",\"event\":{\"kind\":\"event\",\"category\":[\"network\"],\"type\":[");
    j.plain(ty);
    j.raw("],\"action\":");
    j.plain(action);
    j.raw(",\"dataset\":");
    j.plain(dataset);
    j.opt(",\"duration\":", facts.map(|f| f.lifetime_ns));
    j.raw("}");
    if let Some(o) = &s.owner {
        j.raw(",\"process\":{\"pid\":");
        j.num(o.tgid);
        j.raw(",\"name\":");
        j.text(&o.comm);
        j.raw(",\"thread\":{\"id\":");
        j.num(o.pid);
        j.raw("}}");
    }
    for (key, addr, bytes) in [
        (",\"source\":{\"ip\":", s.local, life.map(|l| l.bytes_sent)),
        (
            ",\"destination\":{\"ip\":",
            s.remote,
            life.map(|l| l.bytes_received),
        ),
    ] {
        j.raw(key);
        j.ip(addr.ip());
        j.raw(",\"port\":");
        j.num(addr.port());
        j.opt(",\"bytes\":", bytes);
        j.raw("}");
    }
    j.raw(",\"network\":{\"transport\":\"tcp\",\"type\":");
    j.plain(if s.is_ipv6() { "ipv6" } else { "ipv4" });
    j.raw(",\"iana_number\":\"6\"");
    // A tuple not complete yet (connect()'s SYN_SENT before the local port is picked, a
    // listener's unspecified peer) is no flow: its ID would match no other record.
    let complete = |a: SocketAddr| a.port() != 0 && !a.ip().is_unspecified();
    if complete(s.local) && complete(s.remote) {
        j.raw(",\"community_id\":\"");
        push_community_id(s.local, s.remote, j.0);
        j.0.push(b'"');
    }
    j.raw("}");
    if let Some(c) = s.owner.as_ref().and_then(container) {
        j.raw(",\"container\":");
        j.serde(&c);
    }
    j.raw(",\"h2trace\":{\"ktime_ns\":");
    j.num(ev.ts_ns);
    j.raw(",\"cpu\":");
    j.num(ev.cpu);
    j.raw(",\"socket\":{\"id\":");
    j.0.push(b'"');
    s.id.write_to(j.0);
    j.0.push(b'"');
    j.raw(",\"seen_from\":");
    j.plain(s.origin.as_str());
    j.raw(",\"role\":");
    j.plain(role(s));
    j.raw("},\"netns\":");
    j.num(s.netns);
    if let Some(o) = &s.owner {
        j.raw(",\"cgroup_id\":");
        j.num(o.cgroup_id);
        if let Some(p) = &o.cgroup_path {
            j.raw(",\"cgroup_path\":");
            j.text(p);
        }
        j.raw(",\"owner_source\":");
        j.plain(o.source.as_str());
    }
    match &ev.body {
        Body::Life(l) | Body::Open(l) => {
            j.raw(",\"connection\":");
            connection(&mut j, reasons, s, l, facts.expect("a life has facts"));
        }
        Body::State { old, new } => {
            j.raw(",\"state\":{\"old\":");
            j.plain(state_name(*old));
            j.raw(",\"new\":");
            j.plain(state_name(*new));
            j.raw("}");
        }
        Body::ResetSent { state, reason } => {
            j.raw(",\"reset\":{\"direction\":\"sent\",\"state\":");
            j.plain(state_name(*state));
            if let Some(r) = reason {
                j.raw(",\"reason\":");
                j.text(reason_name(reasons, *r));
                j.raw(",\"reason_code\":");
                j.num(*r);
            }
            j.raw("}");
        }
        Body::ResetReceived { state } => {
            j.raw(",\"reset\":{\"direction\":\"received\",\"state\":");
            j.plain(state_name(*state));
            j.raw("}");
        }
        Body::Retransmit { state, err } => {
            j.raw(",\"retransmit\":{\"state\":");
            j.plain(state_name(*state));
            j.raw(",\"err\":");
            j.num(*err);
            j.raw("}");
        }
        Body::Frame(f) => {
            j.raw(",\"http2_frame\":");
            j.serde(&FrameOut::from(&**f));
        }
    }
    j.raw("}}\n");
}

/// `h2trace.connection`.
fn connection(
    j: &mut Line<'_>,
    reasons: &BTreeMap<u32, String>,
    s: &Socket,
    l: &Life,
    f: &correlate::Facts,
) {
    let start = s.id.start_ns;
    j.raw("{\"start_ns\":");
    j.num(start);
    j.opt(",\"closed_ns\":", closed_ns(l));
    j.raw(",\"first_state\":");
    j.plain(state_name(l.first_state));
    j.raw(",\"states\":[");
    for (i, t) in l.transitions.iter().enumerate() {
        j.raw(if i == 0 {
            "{\"state\":"
        } else {
            ",{\"state\":"
        });
        j.plain(state_name(t.state));
        j.raw(",\"offset_ns\":");
        j.num(t.ts_ns.saturating_sub(start));
        j.raw("}");
    }
    j.raw("],\"fin_first\":");
    j.plain(l.fin_first().as_str());
    if l.transitions_dropped != 0 {
        j.raw(",\"transitions_dropped\":");
        j.num(l.transitions_dropped);
    }
    j.raw(",\"bytes_sent\":");
    j.num(l.bytes_sent);
    j.raw(",\"bytes_received\":");
    j.num(l.bytes_received);
    j.opt(",\"last_send_ns\":", l.last_send_ns);
    j.opt(",\"last_recv_ns\":", l.last_recv_ns);
    j.raw(",\"resets_sent\":");
    j.num(l.resets_sent);
    j.raw(",\"resets_received\":");
    j.num(l.resets_received);
    if let Some(r) = l.reset_sent_reason {
        j.raw(",\"reset_sent_reason\":");
        j.text(reason_name(reasons, r));
        j.raw(",\"reset_sent_reason_code\":");
        j.num(r);
    }
    j.opt(",\"first_reset_sent_ns\":", l.first_reset_sent_ns);
    j.opt(",\"first_reset_received_ns\":", l.first_reset_received_ns);
    if let Some(st) = l.reset_received_state {
        j.raw(",\"reset_received_state\":");
        j.plain(state_name(st));
    }
    j.raw(",\"retransmits\":");
    j.num(l.retransmits);
    j.opt(",\"last_retransmit_ns\":", l.last_retransmit_ns);
    j.opt(",\"active_before_close_ns\":", l.active_before_close_ns);
    if let Some((gap, end)) = l.longest_request_gap {
        j.raw(",\"longest_request_gap_ns\":");
        j.num(gap);
        j.raw(",\"longest_request_gap_end_ns\":");
        j.num(end);
    }
    if !l.first_bytes.is_empty() {
        j.raw(",\"first_bytes\":\"");
        for b in &l.first_bytes {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            j.0.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        }
        j.raw("\"");
    }
    if let Some(c) = l.conntrack.as_deref() {
        j.raw(",\"conntrack\":");
        j.serde(&ct_join(c));
    }
    if let Some(h) = http2_out(l) {
        j.raw(",\"http2\":");
        j.serde(&h);
    }
    let folded = &l.folded;
    if folded.total() > 0 {
        j.raw(",\"folded\":{");
        let mut sep = "";
        for (key, n) in [
            ("\"close_wait\":", folded.close_wait),
            ("\"resets_sent\":", folded.resets_sent),
            ("\"resets_received\":", folded.resets_received),
            ("\"retransmits\":", folded.retransmits),
        ] {
            if n > 0 {
                j.raw(sep);
                j.raw(key);
                j.num(n);
                sep = ",";
            }
        }
        j.raw("}");
    }
    j.raw(",\"analysis\":{");
    let mut sep = "";
    if let Some(v) = f.established_ns {
        j.raw("\"established_ns\":");
        j.num(v);
        sep = ",";
    }
    j.raw(sep);
    j.raw("\"lifetime_ns\":");
    j.num(f.lifetime_ns);
    j.opt(",\"idle_before_close_ns\":", f.idle_before_close_ns);
    j.raw(",\"end\":");
    j.plain(f.end.as_str());
    j.opt(",\"close_wait_ns\":", f.close_wait_ns);
    j.raw(if f.time_wait {
        ",\"time_wait\":true"
    } else {
        ",\"time_wait\":false"
    });
    j.opt(",\"silent_gap_ns\":", f.silent_gap_ns);
    if f.handshake_reset {
        j.raw(",\"handshake_reset\":true");
    }
    if let Some(p) = f.protocol {
        j.raw(",\"protocol\":");
        j.plain(p.as_str());
    }
    j.raw("}}");
}
