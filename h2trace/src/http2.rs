//! HTTP/2 frames as the kernel programs captured them, and what they add up to per connection.
//! Pure: no I/O, no clock (times come from the events).
use std::collections::BTreeMap;

use h2trace_common::h2_side;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    pub fn of(raw: u8) -> Option<Self> {
        match raw {
            h2_side::CLIENT => Some(Self::Client),
            h2_side::SERVER => Some(Self::Server),
            _ => None,
        }
    }

    pub fn raw(self) -> u8 {
        match self {
            Self::Client => h2_side::CLIENT,
            Self::Server => h2_side::SERVER,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        [Self::Client, Self::Server]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// What the kernel counted for an HTTP/2 connection over its whole life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streams {
    pub side: Option<Side>,
    /// Streams this side opened (its HEADERS on a new id of its parity).
    pub opened_local: u32,
    /// Streams the peer opened.
    pub opened_peer: u32,
    /// The walk lost frame boundaries sending (bit 0) or receiving (bit 1): counts are lower
    /// bounds and later frames of that direction were not seen.
    pub desync: u8,
    /// The frames came from a TLS library's plaintext (`--http2 all`), not the syscalls.
    pub tls: bool,
}

impl Streams {
    /// Streams the client opened: the RPCs (requests) the connection carried.
    pub fn requests(&self) -> u32 {
        match self.side {
            Some(Side::Client) => self.opened_local,
            Some(Side::Server) => self.opened_peer,
            None => 0,
        }
    }
}

pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const RST_STREAM: u8 = 3;
pub const GOAWAY: u8 = 7;
const ACK: u8 = 1;

/// One control frame sent or received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub received: bool,
    pub side: Side,
    pub stream_id: u32,
    /// Payload length on the wire (the capture may hold less).
    pub length: u32,
    pub flags: u8,
    /// How long the connection had been silent (no send or receive) before the call that
    /// carried this frame.
    pub idle_ns: u64,
    pub body: FrameBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameBody {
    Settings {
        ack: bool,
        values: Vec<(u16, u32)>,
    },
    Ping {
        ack: bool,
        opaque: u64,
    },
    RstStream {
        code: u32,
    },
    GoAway {
        last_stream_id: u32,
        code: u32,
        debug: String,
    },
}

impl FrameBody {
    /// Decode a captured payload; `None` when it is too short for its type.
    pub fn decode(ty: u8, flags: u8, payload: &[u8]) -> Option<Self> {
        let u32_at = |i: usize| {
            payload
                .get(i..i + 4)
                .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
        };
        Some(match ty {
            SETTINGS => Self::Settings {
                ack: flags & ACK != 0,
                // By id, the last value of a repeated setting winning (RFC 9113 §6.5.3).
                values: payload
                    .chunks_exact(6)
                    .map(|c| {
                        (
                            u16::from_be_bytes([c[0], c[1]]),
                            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                        )
                    })
                    .collect::<BTreeMap<_, _>>()
                    .into_iter()
                    .collect(),
            },
            PING => Self::Ping {
                ack: flags & ACK != 0,
                opaque: u64::from_be_bytes(payload.get(..8)?.try_into().expect("8 bytes")),
            },
            RST_STREAM => Self::RstStream { code: u32_at(0)? },
            GOAWAY => Self::GoAway {
                last_stream_id: u32_at(0)? & 0x7fff_ffff,
                code: u32_at(4)?,
                debug: String::from_utf8_lossy(&payload[8..]).into_owned(),
            },
            _ => return None,
        })
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Settings { .. } => "SETTINGS",
            Self::Ping { .. } => "PING",
            Self::RstStream { .. } => "RST_STREAM",
            Self::GoAway { .. } => "GOAWAY",
        }
    }
}

/// RFC 9113 §7 error code names.
pub fn error_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "UNKNOWN",
    }
}

pub const NO_ERROR: u32 = 0;
pub const CANCEL: u32 = 8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// RFC 9113 §6.5.2 setting names; others (extensions such as gRPC's 0xfe03) by number.
pub fn setting_name(id: u16) -> String {
    match id {
        1 => "HEADER_TABLE_SIZE".into(),
        2 => "ENABLE_PUSH".into(),
        3 => "MAX_CONCURRENT_STREAMS".into(),
        4 => "INITIAL_WINDOW_SIZE".into(),
        5 => "MAX_FRAME_SIZE".into(),
        6 => "MAX_HEADER_LIST_SIZE".into(),
        8 => "ENABLE_CONNECT_PROTOCOL".into(),
        n => format!("0x{n:x}"),
    }
}

pub fn setting_id(name: &str) -> Option<u16> {
    (1..=8)
        .find(|&i| setting_name(i) == name)
        .or_else(|| u16::from_str_radix(name.strip_prefix("0x")?, 16).ok())
}

/// A GOAWAY and when it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GoAway {
    pub ktime_ns: u64,
    /// How long the connection had been silent before it (omitted when 0).
    #[serde(skip_serializing_if = "is_zero")]
    pub idle_before_ns: u64,
    pub last_stream_id: u32,
    pub code: u32,
    pub error: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub debug: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// PINGs one way: how many, and the spacing of those that were not acks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Pings {
    pub pings: u32,
    pub acks: u32,
    /// Shortest and longest gap between consecutive PINGs (not acks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_interval_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_interval_ns: Option<u64>,
    #[serde(skip)]
    last_ns: Option<u64>,
}

/// What one direction of a connection's control frames said.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Direction {
    /// The last SETTINGS (not an ack), by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, u32>,
    #[serde(flatten)]
    pub pings: Pings,
    /// RST_STREAM frames by error name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rst_stream: BTreeMap<&'static str, u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goaway: Option<GoAway>,
}

/// A connection's control frames, both ways (joined to its record by the pipeline).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Frames {
    pub sent: Direction,
    pub received: Direction,
}

impl Frames {
    pub fn add(&mut self, ts_ns: u64, f: &Frame) {
        let d = if f.received {
            &mut self.received
        } else {
            &mut self.sent
        };
        match &f.body {
            FrameBody::Settings { ack: false, values } => {
                d.settings = values.iter().map(|&(k, v)| (setting_name(k), v)).collect();
            }
            FrameBody::Settings { ack: true, .. } => {}
            FrameBody::Ping { ack: true, .. } => d.pings.acks += 1,
            FrameBody::Ping { ack: false, .. } => {
                let p = &mut d.pings;
                p.pings += 1;
                if let Some(last) = p.last_ns {
                    let gap = ts_ns.saturating_sub(last);
                    p.min_interval_ns = Some(p.min_interval_ns.map_or(gap, |m| m.min(gap)));
                    p.max_interval_ns = Some(p.max_interval_ns.map_or(gap, |m| m.max(gap)));
                }
                p.last_ns = Some(ts_ns);
            }
            FrameBody::RstStream { code } => {
                *d.rst_stream.entry(error_name(*code)).or_default() += 1
            }
            FrameBody::GoAway {
                last_stream_id,
                code,
                debug,
            } => {
                // The last GOAWAY is the one that counts (servers send a first one with the
                // highest id, then the real last stream).
                d.goaway = Some(GoAway {
                    ktime_ns: ts_ns,
                    idle_before_ns: f.idle_ns,
                    last_stream_id: *last_stream_id,
                    code: *code,
                    error: error_name(*code),
                    debug: debug.clone(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_control_frames() {
        let mut goaway = vec![0, 0, 0, 3, 0, 0, 0, 0xb];
        goaway.extend_from_slice(b"too_many_pings");
        assert_eq!(
            FrameBody::decode(GOAWAY, 0, &goaway),
            Some(FrameBody::GoAway {
                last_stream_id: 3,
                code: ENHANCE_YOUR_CALM,
                debug: "too_many_pings".into()
            })
        );
        assert_eq!(
            FrameBody::decode(SETTINGS, 0, &[0, 3, 0, 0, 0, 5, 0, 4, 0, 0x40, 0, 0]),
            Some(FrameBody::Settings {
                ack: false,
                values: vec![(3, 5), (4, 0x40_0000)]
            })
        );
        assert_eq!(FrameBody::decode(RST_STREAM, 0, &[0, 0]), None);
        assert_eq!(
            FrameBody::decode(PING, 1, &[0; 8]),
            Some(FrameBody::Ping {
                ack: true,
                opaque: 0
            })
        );
        assert_eq!(setting_id("MAX_CONCURRENT_STREAMS"), Some(3));
        assert_eq!(setting_id(&setting_name(0xfe03)), Some(0xfe03));
    }

    #[test]
    fn frames_add_up_per_direction() {
        let frame = |received, body| Frame {
            received,
            side: Side::Client,
            stream_id: 0,
            length: 8,
            flags: 0,
            idle_ns: 0,
            body,
        };
        let mut f = Frames::default();
        for (t, ack) in [
            (0, false),
            (1_000_000, true),
            (500_000_000, false),
            (1_500_000_000, false),
        ] {
            f.add(t, &frame(false, FrameBody::Ping { ack, opaque: 1 }));
        }
        f.add(2, &frame(true, FrameBody::RstStream { code: CANCEL }));
        assert_eq!(f.sent.pings.pings, 3);
        assert_eq!(f.sent.pings.acks, 1);
        assert_eq!(f.sent.pings.min_interval_ns, Some(500_000_000));
        assert_eq!(f.sent.pings.max_interval_ns, Some(1_000_000_000));
        assert_eq!(f.received.rst_stream.get("CANCEL"), Some(&1));
    }
}
