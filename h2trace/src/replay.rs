//! Reading a recorded NDJSON stream back into events, so that `h2trace replay` runs the very
//! same pipeline as a live run. Parsing is pure: one line in, one record (or a precise error)
//! out; `replay` reads lines and feeds the shared pipeline.
use std::{
    collections::BTreeMap,
    io::{self, BufRead, Write},
    net::{IpAddr, SocketAddr},
};

use serde_json::Value;

use crate::{
    conntrack::{CtEvent, CtKind, CtNamespace, CtSource, Tuple},
    detect::DetectConfig,
    event::{
        Body, Event, Folded, Life, Origin, Owner, OwnerSource, Socket, SocketId, Transition,
        state_from_name,
    },
    http2::{self, Frame, FrameBody},
    output::{Clock, Losses, Notice, Summary},
    owner::snapshot::SnapSocket,
    pipeline::Pipeline,
};

/// Lines longer than this are hostile or broken: reported and skipped without being kept.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayStats {
    pub lines: u64,
    pub skipped: u64,
}

/// Read one line into `buf` (without the newline), keeping at most `MAX_LINE + 1` bytes of it.
/// Returns `Ok(None)` at the end, `Ok(Some(too_long))` otherwise.
fn read_line(input: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Option<bool>> {
    buf.clear();
    let mut seen = 0usize;
    loop {
        let chunk = input.fill_buf()?;
        if chunk.is_empty() {
            return Ok((seen > 0).then_some(seen > MAX_LINE));
        }
        let (part, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        if buf.len() <= MAX_LINE {
            buf.extend_from_slice(&part[..part.len().min(MAX_LINE + 1 - buf.len())]);
        }
        seen += part.len();
        let used = done.unwrap_or(chunk.len());
        input.consume(used);
        if done.is_some() {
            return Ok(Some(seen > MAX_LINE));
        }
    }
}

/// `@timestamp` minus `h2trace.ktime_ns` of a record: the recorded run's clock offset.
fn clock_offset(line: &str) -> Option<i128> {
    let v: Value = serde_json::from_str(line).ok()?;
    let wall = chrono::DateTime::parse_from_rfc3339(v["@timestamp"].as_str()?).ok()?;
    let wall_ns = wall.timestamp() as i128 * 1_000_000_000 + wall.timestamp_subsec_nanos() as i128;
    Some(wall_ns - v["h2trace"]["ktime_ns"].as_u64()? as i128)
}

/// Feed a recorded stream through `pipeline`: events exactly as they were written, the
/// agent's own records passed on, findings and per-peer summaries recomputed. Each malformed
/// line is reported on `errors` with its number and skipped; nothing else is lost.
/// `recorded_thresholds`: decide with the thresholds of the recorded run (the default), not
/// the pipeline's own.
pub fn replay(
    mut input: impl BufRead,
    pipeline: &mut Pipeline,
    recorded_thresholds: bool,
    errors: &mut dyn Write,
) -> io::Result<ReplayStats> {
    let mut stats = ReplayStats::default();
    let mut buf = Vec::new();
    let mut clock_known = false;
    let mut last_ts = 0u64;
    let mut finished = false;
    while let Some(too_long) = read_line(&mut input, &mut buf)? {
        stats.lines += 1;
        let n = stats.lines;
        let mut skip = |what: String| -> io::Result<()> {
            stats.skipped += 1;
            writeln!(errors, "h2trace replay: line {n}: {what}; skipped")
        };
        if too_long {
            skip(format!("longer than {MAX_LINE} bytes"))?;
            continue;
        }
        let Ok(line) = std::str::from_utf8(&buf) else {
            skip("not UTF-8".into())?;
            continue;
        };
        if line.trim().is_empty() {
            continue;
        }
        let record = match parse_line(line) {
            Ok(r) => r,
            Err(e) => {
                skip(e.to_string())?;
                continue;
            }
        };
        if !clock_known {
            let offset = match &record {
                Record::Started {
                    clock_offset_ns: Some(o),
                    ..
                } => Some(*o),
                _ => clock_offset(line),
            };
            if let Some(offset_ns) = offset {
                pipeline.set_clock(Clock { offset_ns });
                clock_known = true;
            }
        }
        match record {
            Record::Started {
                ktime_ns,
                probe,
                detect,
                reset_reasons,
                live_hold_ns,
                ..
            } => {
                if let (Some(d), true) = (detect, recorded_thresholds) {
                    pipeline.set_detect(d);
                }
                pipeline.set_reset_reasons(reset_reasons);
                // Always as recorded: which events the recording holds depends on it.
                pipeline.set_live_hold(live_hold_ns);
                let detect = pipeline.detect_config().clone();
                pipeline.notice(&Notice::Started {
                    replayed: true,
                    live_hold_ns,
                    ktime_ns,
                    probe: &probe,
                    detect: &detect,
                });
            }
            Record::Event(ev) => {
                last_ts = last_ts.max(ev.ts_ns);
                pipeline.deliver(ev);
            }
            Record::Loss { ktime_ns, losses } => pipeline.notice(&Notice::Loss {
                ktime_ns,
                losses: &losses,
            }),
            Record::Summary { ktime_ns, summary } => {
                pipeline.finish(ktime_ns);
                finished = true;
                pipeline.notice(&Notice::Summary {
                    ktime_ns,
                    summary: &summary,
                });
            }
            Record::Tick { ktime_ns } => pipeline.tick_recorded(ktime_ns),
            Record::Conntrack(ct) => {
                last_ts = last_ts.max(ct.ts_ns);
                pipeline.deliver_ct(ct);
            }
            Record::ConntrackSource { ktime_ns, ns } => pipeline.conntrack_namespace(ktime_ns, ns),
            Record::Snapshot { ktime_ns, socket } => pipeline.snapshot(ktime_ns, socket),
            Record::Fork {
                ktime_ns,
                parent,
                child,
            } => pipeline.fork(ktime_ns, parent, child),
            Record::Exit {
                ktime_ns,
                pid,
                open_sockets,
            } => pipeline.exit(ktime_ns, pid, open_sockets),
            Record::Derived => {}
        }
    }
    if !finished {
        pipeline.finish(last_ts);
    }
    pipeline.flush();
    Ok(stats)
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not JSON: {0}")]
    Json(String),
    #[error("not an h2trace record (no schema \"h2trace/1\")")]
    Schema,
    #[error("missing or invalid field {0}")]
    Field(&'static str),
    #[error("h2trace.detect.{0} is 0: a threshold no run could have")]
    Threshold(&'static str),
}

/// One recorded line.
#[derive(Debug, Clone)]
pub enum Record {
    Started {
        ktime_ns: u64,
        clock_offset_ns: Option<i128>,
        probe: Value,
        /// The thresholds the recorded run decided with.
        detect: Option<DetectConfig>,
        /// How long the recorded run held live events (absent: not at all).
        live_hold_ns: u64,
        reset_reasons: BTreeMap<u32, String>,
    },
    Event(Event),
    Loss {
        ktime_ns: u64,
        losses: Losses,
    },
    Summary {
        ktime_ns: u64,
        summary: Box<Summary>,
    },
    /// Time passed with no event.
    Tick {
        ktime_ns: u64,
    },
    Conntrack(CtEvent),
    Fork {
        ktime_ns: u64,
        parent: u32,
        child: u32,
    },
    Exit {
        ktime_ns: u64,
        pid: u32,
        open_sockets: u32,
    },
    Snapshot {
        ktime_ns: u64,
        socket: SnapSocket,
    },
    ConntrackSource {
        ktime_ns: u64,
        ns: CtNamespace,
    },
    /// Something replay recomputes itself (findings, per-peer summaries): ignored on input.
    Derived,
}

fn u64_at(v: &Value, path: &[&str], name: &'static str) -> Result<u64, ParseError> {
    opt_u64(v, path).ok_or(ParseError::Field(name))
}

fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

fn opt_u64(v: &Value, path: &[&str]) -> Option<u64> {
    at(v, path).as_u64()
}

fn str_at<'a>(v: &'a Value, path: &[&str], name: &'static str) -> Result<&'a str, ParseError> {
    at(v, path).as_str().ok_or(ParseError::Field(name))
}

fn state_at(v: &Value, path: &[&str], name: &'static str) -> Result<u8, ParseError> {
    state_from_name(str_at(v, path, name)?).ok_or(ParseError::Field(name))
}

fn endpoint(v: &Value, side: &str, name: &'static str) -> Result<SocketAddr, ParseError> {
    let ip: IpAddr = str_at(v, &[side, "ip"], name)?
        .parse()
        .map_err(|_| ParseError::Field(name))?;
    let port =
        u16::try_from(u64_at(v, &[side, "port"], name)?).map_err(|_| ParseError::Field(name))?;
    Ok(SocketAddr::new(ip, port))
}

fn owner(v: &Value) -> Result<Option<Owner>, ParseError> {
    let Some(src) = at(v, &["h2trace", "owner_source"]).as_str() else {
        return Ok(None);
    };
    Ok(Some(Owner {
        tgid: u64_at(v, &["process", "pid"], "process.pid")? as u32,
        pid: u64_at(v, &["process", "thread", "id"], "process.thread.id")? as u32,
        comm: str_at(v, &["process", "name"], "process.name")?.into(),
        cgroup_id: u64_at(v, &["h2trace", "cgroup_id"], "h2trace.cgroup_id")?,
        cgroup_path: at(v, &["h2trace", "cgroup_path"]).as_str().map(Into::into),
        source: OwnerSource::from_name(src).ok_or(ParseError::Field("h2trace.owner_source"))?,
    }))
}

fn socket(v: &Value) -> Result<Socket, ParseError> {
    let id = str_at(v, &["h2trace", "socket", "id"], "h2trace.socket.id")?;
    let (a, b) = id
        .split_once('-')
        .ok_or(ParseError::Field("h2trace.socket.id"))?;
    let hex = |s| u64::from_str_radix(s, 16).map_err(|_| ParseError::Field("h2trace.socket.id"));
    let owner = owner(v)?;
    Ok(Socket {
        id: SocketId {
            skaddr: hex(a)?,
            start_ns: hex(b)?,
        },
        netns: u64_at(v, &["h2trace", "netns"], "h2trace.netns")? as u32,
        local: endpoint(v, "source", "source")?,
        remote: endpoint(v, "destination", "destination")?,
        owner,
        origin: Origin::from_name(str_at(
            v,
            &["h2trace", "socket", "seen_from"],
            "h2trace.socket.seen_from",
        )?)
        .ok_or(ParseError::Field("h2trace.socket.seen_from"))?,
    })
}

fn life(v: &Value, start: u64) -> Result<Life, ParseError> {
    let c = &v["h2trace"]["connection"];
    let transitions = c["states"]
        .as_array()
        .ok_or(ParseError::Field("h2trace.connection.states"))?
        .iter()
        .map(|t| {
            Ok(Transition {
                ts_ns: start
                    .checked_add(u64_at(
                        t,
                        &["offset_ns"],
                        "h2trace.connection.states.offset_ns",
                    )?)
                    .ok_or(ParseError::Field("h2trace.connection.states.offset_ns"))?,
                state: state_at(t, &["state"], "h2trace.connection.states.state")?,
            })
        })
        .collect::<Result<_, ParseError>>()?;
    let count = |k: &'static str| u64_at(c, &[k], k);
    Ok(Life {
        first_state: state_at(c, &["first_state"], "h2trace.connection.first_state")?,
        transitions,
        transitions_dropped: opt_u64(c, &["transitions_dropped"]).unwrap_or(0) as u32,
        bytes_sent: count("bytes_sent")?,
        bytes_received: count("bytes_received")?,
        last_send_ns: opt_u64(c, &["last_send_ns"]),
        last_recv_ns: opt_u64(c, &["last_recv_ns"]),
        resets_sent: count("resets_sent")? as u16,
        resets_received: count("resets_received")? as u16,
        first_reset_sent_ns: opt_u64(c, &["first_reset_sent_ns"]),
        first_reset_received_ns: opt_u64(c, &["first_reset_received_ns"]),
        reset_sent_reason: opt_u64(c, &["reset_sent_reason_code"]).map(|r| r as u32),
        reset_received_state: match c["reset_received_state"].as_str() {
            Some(s) => Some(state_from_name(s).ok_or(ParseError::Field("reset_received_state"))?),
            None => None,
        },
        retransmits: count("retransmits")? as u32,
        last_retransmit_ns: opt_u64(c, &["last_retransmit_ns"]),
        active_before_close_ns: opt_u64(c, &["active_before_close_ns"]),
        longest_request_gap: opt_u64(c, &["longest_request_gap_ns"])
            .zip(opt_u64(c, &["longest_request_gap_end_ns"])),
        first_bytes: match c["first_bytes"].as_str() {
            None => Default::default(),
            Some(h) => hex(h).ok_or(ParseError::Field("h2trace.connection.first_bytes"))?,
        },
        // Joined again by the pipeline from the recorded conntrack events.
        conntrack: None,
        http2: match c.get("http2") {
            None => http2::Streams::default(),
            Some(h) => http2::Streams {
                side: Some(
                    http2::Side::from_name(str_at(h, &["side"], "h2trace.connection.http2.side")?)
                        .ok_or(ParseError::Field("h2trace.connection.http2.side"))?,
                ),
                opened_local: u64_at(h, &["streams_opened_local"], "streams_opened_local")? as u32,
                opened_peer: u64_at(h, &["streams_opened_peer"], "streams_opened_peer")? as u32,
                tls: h["tls"].as_bool().unwrap_or(false),
                desync: h["desync"].as_array().map_or(0, |a| {
                    a.iter().fold(0, |acc, d| match d.as_str() {
                        Some("sent") => acc | 1,
                        Some("received") => acc | 2,
                        _ => acc,
                    })
                }),
            },
        },
        // Joined again by the pipeline from the recorded frames.
        frames: None,
        folded: {
            let n = |k| opt_u64(c, &["folded", k]).unwrap_or(0) as u16;
            Folded {
                close_wait: n("close_wait"),
                resets_sent: n("resets_sent"),
                resets_received: n("resets_received"),
                retransmits: n("retransmits"),
            }
        },
    })
}

/// An `http2-frame` record.
fn frame(v: &Value) -> Result<Frame, ParseError> {
    let f = &v["h2trace"]["http2_frame"];
    let field = |k: &'static str| u64_at(f, &[k], k);
    let ack = f["ack"].as_bool().unwrap_or(false);
    let body = match str_at(f, &["type"], "h2trace.http2_frame.type")? {
        "SETTINGS" => FrameBody::Settings {
            ack,
            values: match f["settings"].as_object() {
                None => Vec::new(),
                Some(m) => m
                    .iter()
                    .map(|(k, v)| {
                        Ok((
                            http2::setting_id(k).ok_or(ParseError::Field("settings"))?,
                            v.as_u64().ok_or(ParseError::Field("settings"))? as u32,
                        ))
                    })
                    .collect::<Result<BTreeMap<_, _>, ParseError>>()?
                    .into_iter()
                    .collect(),
            },
        },
        "PING" => FrameBody::Ping {
            ack,
            opaque: f["opaque"]
                .as_str()
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .ok_or(ParseError::Field("opaque"))?,
        },
        "RST_STREAM" => FrameBody::RstStream {
            code: field("code")? as u32,
        },
        "GOAWAY" => FrameBody::GoAway {
            last_stream_id: field("last_stream_id")? as u32,
            code: field("code")? as u32,
            debug: f["debug"].as_str().unwrap_or("").to_string(),
        },
        _ => return Err(ParseError::Field("h2trace.http2_frame.type")),
    };
    Ok(Frame {
        received: str_at(f, &["direction"], "direction")? == "received",
        side: http2::Side::from_name(str_at(f, &["side"], "side")?)
            .ok_or(ParseError::Field("h2trace.http2_frame.side"))?,
        stream_id: field("stream_id")? as u32,
        length: field("length")? as u32,
        flags: field("flags")? as u8,
        idle_ns: opt_u64(f, &["idle_ns"]).unwrap_or(0),
        body,
    })
}

fn ct_tuple(v: &Value, dir: &'static str) -> Result<Tuple, ParseError> {
    let c = &v["h2trace"]["conntrack"][dir];
    let addr = |ip: &str, port: &str| -> Option<SocketAddr> {
        Some(SocketAddr::new(
            c[ip].as_str()?.parse().ok()?,
            u16::try_from(c[port].as_u64()?).ok()?,
        ))
    };
    let field = ParseError::Field(if dir == "orig" {
        "h2trace.conntrack.orig"
    } else {
        "h2trace.conntrack.reply"
    });
    Ok(Tuple {
        src: addr("src_ip", "src_port").ok_or(field.clone())?,
        dst: addr("dst_ip", "dst_port").ok_or(field)?,
    })
}

fn conntrack(v: &Value, ts_ns: u64, kind: CtKind) -> Result<Record, ParseError> {
    let c = &v["h2trace"]["conntrack"];
    let small = |name: &str, field: &'static str| -> Result<u64, ParseError> {
        c[name].as_u64().ok_or(ParseError::Field(field))
    };
    Ok(Record::Conntrack(CtEvent {
        ts_ns,
        source: c["source"]
            .as_str()
            .and_then(CtSource::from_name)
            .ok_or(ParseError::Field("h2trace.conntrack.source"))?,
        netns: u64_at(v, &["h2trace", "netns"], "h2trace.netns")? as u32,
        kind,
        id: small("id", "h2trace.conntrack.id")? as u32,
        orig: ct_tuple(v, "orig")?,
        reply: ct_tuple(v, "reply")?,
        state: match c["state"]["new"].as_str() {
            None => None,
            Some(s) => Some(
                crate::conntrack::state_from_name(s)
                    .ok_or(ParseError::Field("h2trace.conntrack.state.new"))?,
            ),
        },
        timeout_s: c["timeout_s"].as_u64().map(|t| t as u32),
        status: small("status", "h2trace.conntrack.status")? as u32,
        mark: small("mark", "h2trace.conntrack.mark")? as u32,
        zone: small("zone", "h2trace.conntrack.zone")? as u16,
    }))
}

fn hex(s: &str) -> Option<smallvec::SmallVec<[u8; 8]>> {
    if !s.len().is_multiple_of(2) || s.len() > 16 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Parse one NDJSON line written by h2trace.
pub fn parse_line(line: &str) -> Result<Record, ParseError> {
    let v: Value = serde_json::from_str(line).map_err(|e| ParseError::Json(e.to_string()))?;
    if v["schema"] != crate::output::SCHEMA {
        return Err(ParseError::Schema);
    }
    let action = str_at(&v, &["event", "action"], "event.action")?;
    let ktime_ns = u64_at(&v, &["h2trace", "ktime_ns"], "h2trace.ktime_ns")?;
    let body = match action {
        "started" => {
            let h = &v["h2trace"];
            // Absent in recordings older than the thresholds; present, it must be whole.
            let detect = match &h["detect"] {
                Value::Null => None,
                d => {
                    let d: DetectConfig = serde_json::from_value(d.clone())
                        .map_err(|_| ParseError::Field("h2trace.detect"))?;
                    if let Some(field) = d.invalid_field() {
                        return Err(ParseError::Threshold(field));
                    }
                    Some(d)
                }
            };
            return Ok(Record::Started {
                ktime_ns,
                clock_offset_ns: h["clock_offset_ns"].as_i64().map(i128::from),
                probe: h["probe"].clone(),
                detect,
                live_hold_ns: h["live_hold_ns"].as_u64().unwrap_or(0),
                reset_reasons: h["reset_reasons"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string())))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        "loss" => {
            let losses = serde_json::from_value(v["h2trace"]["loss"].clone())
                .map_err(|_| ParseError::Field("h2trace.loss"))?;
            return Ok(Record::Loss { ktime_ns, losses });
        }
        "tick" => return Ok(Record::Tick { ktime_ns }),
        "process-fork" => {
            let pid =
                |k: &'static str, name| u64_at(&v, &["h2trace", "fork", k], name).map(|p| p as u32);
            return Ok(Record::Fork {
                ktime_ns,
                parent: pid("parent", "h2trace.fork.parent")?,
                child: pid("child", "h2trace.fork.child")?,
            });
        }
        "process-exited" => {
            let n =
                |k: &'static str, name| u64_at(&v, &["h2trace", "exit", k], name).map(|p| p as u32);
            return Ok(Record::Exit {
                ktime_ns,
                pid: n("pid", "h2trace.exit.pid")?,
                open_sockets: n("open_sockets", "h2trace.exit.open_sockets")?,
            });
        }
        "socket-snapshot" => {
            let s = &v["h2trace"]["snapshot"];
            let owner = owner(&v)?;
            let bytes = |side: &str| at(&v, &[side, "bytes"]).as_u64().unwrap_or(0);
            return Ok(Record::Snapshot {
                ktime_ns,
                socket: SnapSocket {
                    netns: u64_at(&v, &["h2trace", "netns"], "h2trace.netns")? as u32,
                    local: endpoint(&v, "source", "source")?,
                    remote: endpoint(&v, "destination", "destination")?,
                    state: state_at(
                        &v,
                        &["h2trace", "snapshot", "state"],
                        "h2trace.snapshot.state",
                    )?,
                    inode: u64_at(
                        &v,
                        &["h2trace", "snapshot", "inode"],
                        "h2trace.snapshot.inode",
                    )? as u32,
                    uid: s["uid"].as_u64().unwrap_or(0) as u32,
                    owner,
                    bytes_sent: bytes("source"),
                    bytes_received: bytes("destination"),
                    last_send_ns: s["last_send_ns"].as_u64(),
                    last_recv_ns: s["last_recv_ns"].as_u64(),
                },
            });
        }
        "conntrack-source" => {
            let ns = serde_json::from_value(v["h2trace"]["conntrack_source"].clone())
                .map_err(|_| ParseError::Field("h2trace.conntrack_source"))?;
            return Ok(Record::ConntrackSource { ktime_ns, ns });
        }
        a if CtKind::from_action(a).is_some() => {
            return conntrack(&v, ktime_ns, CtKind::from_action(a).expect("matched"));
        }
        "summary" => {
            let summary = serde_json::from_value(v["h2trace"]["summary"].clone())
                .map_err(|_| ParseError::Field("h2trace.summary"))?;
            return Ok(Record::Summary {
                ktime_ns,
                summary: Box::new(summary),
            });
        }
        "connection-closed" | "connection-open" => {
            let start = socket(&v)?.id.start_ns;
            let l = Box::new(life(&v, start)?);
            if action == "connection-closed" {
                Body::Life(l)
            } else {
                Body::Open(l)
            }
        }
        "state-change" => Body::State {
            old: state_at(&v, &["h2trace", "state", "old"], "h2trace.state.old")?,
            new: state_at(&v, &["h2trace", "state", "new"], "h2trace.state.new")?,
        },
        "reset-sent" => Body::ResetSent {
            state: state_at(&v, &["h2trace", "reset", "state"], "h2trace.reset.state")?,
            reason: opt_u64(&v, &["h2trace", "reset", "reason_code"]).map(|r| r as u32),
        },
        "reset-received" => Body::ResetReceived {
            state: state_at(&v, &["h2trace", "reset", "state"], "h2trace.reset.state")?,
        },
        "http2-frame" => Body::Frame(Box::new(frame(&v)?)),
        "retransmit" => Body::Retransmit {
            state: state_at(
                &v,
                &["h2trace", "retransmit", "state"],
                "h2trace.retransmit.state",
            )?,
            err: at(&v, &["h2trace", "retransmit", "err"])
                .as_i64()
                .ok_or(ParseError::Field("h2trace.retransmit.err"))? as i32,
        },
        _ => return Ok(Record::Derived),
    };
    Ok(Record::Event(Event {
        ts_ns: ktime_ns,
        cpu: u64_at(&v, &["h2trace", "cpu"], "h2trace.cpu")? as u32,
        socket: socket(&v)?,
        body,
    }))
}

#[cfg(test)]
mod tests {

    use proptest::prelude::*;

    use super::*;
    use crate::output::{Clock, Ndjson, Sink};

    fn write(ev: &Event) -> String {
        let mut sink = Ndjson::new(
            Vec::new(),
            Clock {
                offset_ns: 1_700_000_000_000_000_000,
            },
            Default::default(),
        );
        sink.event(ev, crate::correlate::of_event(ev).as_ref())
            .unwrap();
        String::from_utf8(sink.into_inner()).unwrap()
    }

    fn arb_owner() -> impl Strategy<Value = Option<Owner>> {
        proptest::option::of(
            (
                1u32..,
                any::<u32>(),
                "[a-z0-9_-]{0,15}",
                any::<u64>(),
                0..5u8,
            )
                .prop_map(|(tgid, pid, comm, cgroup_id, s)| Owner {
                    tgid,
                    pid,
                    comm: comm.into(),
                    cgroup_id,
                    cgroup_path: (cgroup_id % 3 == 0)
                        .then(|| format!("/system.slice/x{tgid}.service").into()),
                    source: OwnerSource::ALL[s as usize],
                }),
        )
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
        ]
    }

    fn arb_state() -> impl Strategy<Value = u8> {
        1u8..=12
    }

    fn arb_life(start: u64) -> impl Strategy<Value = Life> {
        (
            arb_state(),
            proptest::collection::vec((0u64..1 << 40, arb_state()), 0..12),
            (
                0u32..3,
                any::<u64>(),
                any::<u64>(),
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u64>()),
            ),
            (
                any::<u16>(),
                any::<u16>(),
                proptest::option::of(0u32..30),
                proptest::option::of(arb_state()),
                any::<u32>(),
            ),
            (
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u64>()),
            ),
        )
            .prop_map(
                move |(
                    first_state,
                    ts,
                    (dropped, sent, recv, ls, lr),
                    (rs, rr, reason, rstate, retr),
                    (fs, fr, lrt),
                )| {
                    Life {
                        first_state,
                        transitions: ts
                            .into_iter()
                            .map(|(o, state)| Transition {
                                ts_ns: start + o,
                                state,
                            })
                            .collect(),
                        transitions_dropped: dropped,
                        bytes_sent: sent >> 1,
                        bytes_received: recv >> 1,
                        last_send_ns: ls.map(|v| v >> 1),
                        last_recv_ns: lr.map(|v| v >> 1),
                        resets_sent: rs,
                        resets_received: rr,
                        first_reset_sent_ns: fs.map(|v| v >> 1),
                        first_reset_received_ns: fr.map(|v| v >> 1),
                        reset_sent_reason: reason,
                        reset_received_state: rstate,
                        retransmits: retr,
                        last_retransmit_ns: lrt.map(|v| v >> 1),
                        active_before_close_ns: lrt.map(|v| v >> 2),
                        longest_request_gap: ls.zip(lr).map(|(a, b)| (a >> 3, b >> 3)),
                        first_bytes: lr.map_or(Default::default(), |v| {
                            v.to_le_bytes()[..(v % 9) as usize].into()
                        }),
                        conntrack: None,
                        // The kernel's stream counts round-trip; the frames are joined again.
                        http2: http2::Streams {
                            side: match retr % 3 {
                                0 => None,
                                1 => Some(http2::Side::Client),
                                _ => Some(http2::Side::Server),
                            },
                            opened_local: retr % 3 / 2 * rs as u32,
                            opened_peer: retr % 3 / 2 * rr as u32,
                            desync: (retr % 3 / 2 * (rs as u32 % 4)) as u8,
                            tls: retr % 3 / 2 == 1 && rr % 2 == 1,
                        },
                        frames: None,
                        folded: Folded {
                            close_wait: (retr % 2) as u16,
                            resets_sent: rs % 3,
                            resets_received: rr % 3,
                            retransmits: (retr % 5) as u16,
                        },
                    }
                },
            )
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let body = prop_oneof![
            (
                any::<bool>(),
                proptest::collection::vec((1u16..9, any::<u32>()), 0..6)
            )
                .prop_map(|(ack, mut values)| {
                    // Written as a map: one value per setting, in id order.
                    values.sort();
                    values.dedup_by_key(|v| v.0);
                    FrameBody::Settings {
                        ack,
                        values: if ack { Vec::new() } else { values },
                    }
                }),
            (any::<bool>(), any::<u64>()).prop_map(|(ack, opaque)| FrameBody::Ping { ack, opaque }),
            any::<u32>().prop_map(|code| FrameBody::RstStream { code }),
            (0u32..1 << 31, any::<u32>(), "[a-z_]{0,20}").prop_map(
                |(last_stream_id, code, debug)| FrameBody::GoAway {
                    last_stream_id,
                    code,
                    debug
                }
            ),
        ];
        (
            (any::<bool>(), any::<bool>(), 0u32..1 << 31, 0u32..1 << 24),
            (any::<u8>(), any::<u64>()),
            body,
        )
            .prop_map(
                |((received, client, stream_id, length), (flags, idle_ns), body)| Frame {
                    received,
                    side: if client {
                        http2::Side::Client
                    } else {
                        http2::Side::Server
                    },
                    stream_id,
                    length,
                    flags,
                    idle_ns,
                    body,
                },
            )
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        (
            any::<u64>(),
            1u64..1 << 62,
            any::<u32>(),
            any::<u32>(),
            arb_addr(),
            any::<u16>(),
            arb_owner(),
            0..4u8,
        )
            .prop_flat_map(|(skaddr, start, cpu, netns, local, rport, owner, origin)| {
                // Both ends of a socket have the same family.
                let remote = SocketAddr::new(local.ip(), rport);
                let socket = Socket {
                    id: SocketId {
                        skaddr,
                        start_ns: start,
                    },
                    netns,
                    local,
                    remote,
                    owner,
                    origin: Origin::ALL[origin as usize],
                };
                let body = prop_oneof![
                    arb_life(start).prop_map(|l| Body::Life(Box::new(l))),
                    arb_life(start).prop_map(|l| Body::Open(Box::new(l))),
                    (arb_state(), arb_state()).prop_map(|(old, new)| Body::State { old, new }),
                    (arb_state(), proptest::option::of(0u32..30))
                        .prop_map(|(state, reason)| Body::ResetSent { state, reason }),
                    arb_state().prop_map(|state| Body::ResetReceived { state }),
                    (arb_state(), any::<i32>())
                        .prop_map(|(state, err)| Body::Retransmit { state, err }),
                    arb_frame().prop_map(|f| Body::Frame(Box::new(f))),
                ];
                (Just(socket), body, start..start + (1 << 40), Just(cpu))
            })
            .prop_map(|(socket, body, ts_ns, cpu)| Event {
                ts_ns,
                cpu,
                socket,
                body,
            })
    }

    proptest! {
        /// Whatever h2trace writes, replay reads back as the same event.
        #[test]
        fn every_event_round_trips(ev in arb_event()) {
            let line = write(&ev);
            match parse_line(line.trim_end()) {
                Ok(Record::Event(back)) => prop_assert_eq!(back, ev),
                other => prop_assert!(false, "{:?} from {}", other, line),
            }
        }

        /// Arbitrary text never panics the parser.
        #[test]
        fn garbage_is_an_error_not_a_panic(s in "\\PC{0,200}") {
            let _ = parse_line(&s);
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert!(matches!(parse_line("{"), Err(ParseError::Json(_))));
        assert_eq!(parse_line("{}").unwrap_err(), ParseError::Schema);
        let mut v: Value =
            serde_json::from_str(&write(&crate::output::tests::life_event())).unwrap();
        v["h2trace"]["socket"]["id"] = "zz".into();
        assert_eq!(
            parse_line(&v.to_string()).unwrap_err(),
            ParseError::Field("h2trace.socket.id")
        );
        v["event"]["action"] = "finding".into();
        assert!(matches!(parse_line(&v.to_string()), Ok(Record::Derived)));
    }
}
