//! Tracepoint record layouts from tracefs `format` files.
//!
//! Layouts differ between kernels (fields are added, `protocol` changed width), so the
//! programs never assume offsets: the agent reads them here and hands them over at load.
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use h2trace_common::{ABSENT, LengthLayout, SetStateLayout, SkEventLayout};

/// Where tracefs is usually mounted; the first that holds `events/` wins.
pub const TRACEFS_CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("tracepoint {0} does not exist on this kernel ({1})")]
    Missing(String, #[source] std::io::Error),
    #[error("tracepoint {event}: field `{field}` is missing from its format")]
    MissingField { event: String, field: String },
    #[error(
        "tracepoint {event}: field `{field}` has offset {offset}, beyond what the programs can read"
    )]
    OffsetTooLarge {
        event: String,
        field: String,
        offset: usize,
    },
}

/// One field of a trace record: byte offset and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: usize,
    pub size: usize,
}

/// The fields of one tracepoint, by name, plus its `print fmt` line (which holds the
/// symbolic names of enum values such as reset reasons).
#[derive(Debug, Clone, Default)]
pub struct Format {
    pub event: String,
    pub fields: HashMap<String, Field>,
    pub print_fmt: String,
}

/// Parse a tracefs `format` file. Lines look like
/// `\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;`; the field name is the last
/// word of the declaration, without any `[N]` array suffix.
pub fn parse_format(event: &str, text: &str) -> Format {
    let mut fields = HashMap::new();
    let mut print_fmt = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("print fmt:") {
            print_fmt = rest.trim().to_string();
            continue;
        }
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut parts = rest.split(';').map(str::trim);
        let decl = parts.next().unwrap_or_default();
        let mut offset = None;
        let mut size = None;
        for p in parts {
            if let Some(v) = p.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = p.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        let name = decl.rsplit([' ', '*']).next().unwrap_or_default();
        let name = name.split('[').next().unwrap_or_default();
        if let (Some(offset), Some(size), false) = (offset, size, name.is_empty()) {
            fields.insert(name.to_string(), Field { offset, size });
        }
    }
    Format {
        event: event.to_string(),
        fields,
        print_fmt,
    }
}

impl Format {
    pub fn offset(&self, field: &str) -> Result<u16, FormatError> {
        let f = self
            .fields
            .get(field)
            .ok_or_else(|| FormatError::MissingField {
                event: self.event.clone(),
                field: field.to_string(),
            })?;
        u16::try_from(f.offset)
            .ok()
            .filter(|o| *o < ABSENT)
            .ok_or_else(|| FormatError::OffsetTooLarge {
                event: self.event.clone(),
                field: field.to_string(),
                offset: f.offset,
            })
    }

    fn optional(&self, field: &str) -> u16 {
        self.offset(field).unwrap_or(ABSENT)
    }

    /// Symbolic names of `field`'s values from `__print_symbolic(REC->field, { 0, "NAME" }, …)`.
    pub fn symbols(&self, field: &str) -> BTreeMap<u32, String> {
        let mut out = BTreeMap::new();
        let marker = format!("__print_symbolic(REC->{field},");
        let Some(start) = self.print_fmt.find(&marker) else {
            return out;
        };
        let mut rest = &self.print_fmt[start + marker.len()..];
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else {
                break;
            };
            let entry = &rest[open + 1..open + close];
            rest = &rest[open + close + 1..];
            let mut kv = entry.splitn(2, ',');
            let (Some(k), Some(v)) = (kv.next(), kv.next()) else {
                continue;
            };
            if let Ok(k) = k.trim().parse::<u32>() {
                out.insert(k, v.trim().trim_matches('"').to_string());
            }
            if rest.trim_start().starts_with(')') {
                break;
            }
        }
        out
    }

    pub fn set_state_layout(&self) -> Result<SetStateLayout, FormatError> {
        Ok(SetStateLayout {
            skaddr: self.offset("skaddr")?,
            oldstate: self.offset("oldstate")?,
            newstate: self.offset("newstate")?,
            sport: self.offset("sport")?,
            dport: self.offset("dport")?,
            family: self.offset("family")?,
            protocol: self.offset("protocol")?,
            saddr: self.offset("saddr")?,
            daddr: self.offset("daddr")?,
            saddr_v6: self.offset("saddr_v6")?,
            daddr_v6: self.offset("daddr_v6")?,
            _pad: 0,
        })
    }

    /// `reason_field` is `reason` for resets and `err` for retransmissions.
    pub fn sk_event_layout(&self, reason_field: &str) -> Result<SkEventLayout, FormatError> {
        Ok(SkEventLayout {
            skaddr: self.offset("skaddr")?,
            state: self.optional("state"),
            reason: self.optional(reason_field),
            _pad: 0,
        })
    }

    pub fn length_layout(&self) -> Result<LengthLayout, FormatError> {
        Ok(LengthLayout {
            sk: self.offset("sk")?,
            family: self.offset("family")?,
            protocol: self.offset("protocol")?,
            ret: self.offset("ret")?,
        })
    }
}

/// The mounted tracefs.
#[derive(Debug, Clone)]
pub struct Tracefs {
    pub root: PathBuf,
}

impl Tracefs {
    /// Find tracefs, mounting it at /sys/kernel/tracing if no mount holds it.
    pub fn find_or_mount() -> Result<Self, std::io::Error> {
        if let Some(root) = Self::find() {
            return Ok(Self { root });
        }
        let target = Path::new(TRACEFS_CANDIDATES[0]);
        nix::mount::mount(
            Some("nodev"),
            target,
            Some("tracefs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| {
            std::io::Error::other(format!("mounting tracefs on {}: {e}", target.display()))
        })?;
        Self::find()
            .map(|root| Self { root })
            .ok_or_else(|| std::io::Error::other("tracefs mounted but has no events/"))
    }

    pub fn find() -> Option<PathBuf> {
        TRACEFS_CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("events").is_dir())
    }

    /// `category:name`, e.g. `sock:inet_sock_set_state`.
    pub fn format(&self, category: &str, name: &str) -> Result<Format, FormatError> {
        let event = format!("{category}:{name}");
        let path = self
            .root
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let text =
            std::fs::read_to_string(&path).map_err(|e| FormatError::Missing(event.clone(), e))?;
        Ok(parse_format(&event, &text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Trimmed from /sys/kernel/tracing/events/tcp/tcp_send_reset/format on Linux 6.18.
    const SEND_RESET: &str = "name: tcp_send_reset\nID: 1556\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;\n\
\tfield:enum sk_rst_reason reason;\toffset:28;\tsize:4;\tsigned:0;\n\
\tfield:__u8 saddr[28];\toffset:32;\tsize:28;\tsigned:0;\n\
\nprint fmt: \"skbaddr=%p reason=%s\", REC->skbaddr, __print_symbolic(REC->reason, { 0, \"NOT_SPECIFIED\" }, { 1, \"NO_SOCKET\" }, { 12, \"TCP_ABORT_ON_LINGER\" })\n";

    // Linux 6.1's inet_sock_set_state, where `protocol` is still a u16 but other fields moved.
    const SET_STATE_61: &str = "\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;\n\
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;\n\
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;\n\
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;\n\
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;\n\
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;\n\
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;\n\
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;\n\
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n\
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;\n";

    #[test]
    fn parses_fields_with_pointer_and_array_declarations() {
        let f = parse_format("tcp:tcp_send_reset", SEND_RESET);
        assert_eq!(
            f.fields["skaddr"],
            Field {
                offset: 16,
                size: 8
            }
        );
        assert_eq!(
            f.fields["saddr"],
            Field {
                offset: 32,
                size: 28
            }
        );
        assert_eq!(
            f.fields["reason"],
            Field {
                offset: 28,
                size: 4
            }
        );
        let l = f.sk_event_layout("reason").unwrap();
        assert_eq!((l.skaddr, l.state, l.reason), (16, 24, 28));
    }

    #[test]
    fn optional_fields_are_absent_not_errors() {
        let f = parse_format(
            "tcp:tcp_receive_reset",
            "\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n",
        );
        let l = f.sk_event_layout("reason").unwrap();
        assert_eq!((l.skaddr, l.state, l.reason), (8, ABSENT, ABSENT));
    }

    #[test]
    fn set_state_layout_and_missing_field_error() {
        let f = parse_format("sock:inet_sock_set_state", SET_STATE_61);
        let l = f.set_state_layout().unwrap();
        assert_eq!(
            (l.skaddr, l.newstate, l.protocol, l.daddr_v6),
            (8, 20, 30, 56)
        );
        // 6.1's layout is the one the kernel program reads with plain loads.
        assert_eq!(l, SetStateLayout::USUAL);
        let broken = parse_format(
            "sock:inet_sock_set_state",
            &SET_STATE_61.replace("newstate", "next"),
        );
        let err = broken.set_state_layout().unwrap_err().to_string();
        assert!(err.contains("`newstate`"), "{err}");
    }

    #[test]
    fn reads_symbolic_reset_reasons() {
        let f = parse_format("tcp:tcp_send_reset", SEND_RESET);
        let s = f.symbols("reason");
        assert_eq!(s.get(&12).map(String::as_str), Some("TCP_ABORT_ON_LINGER"));
        assert_eq!(s.get(&0).map(String::as_str), Some("NOT_SPECIFIED"));
        assert_eq!(s.len(), 3);
        assert!(f.symbols("state").is_empty());
    }
}
