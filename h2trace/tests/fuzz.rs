//! Hostile input, generated: the kernel record decoder, the ctnetlink decoder and the replay
//! parser must answer every input with a value or an error, never a panic. No privileges.
//!
//! The corpus is what the project records for real: every line of tests/fixtures/*.ndjson,
//! and kernel and netlink records built from the wire types, each mutated (truncated, bytes
//! flipped, values swapped). A short run is part of the suite; for a long one:
//! `H2TRACE_FUZZ_CASES=1000000 cargo test --release --test fuzz`.
use std::path::Path;

use h2trace::{
    conntrack::netlink,
    detect::DetectConfig,
    event::decode,
    filter::Filter,
    output::{Clock, Ndjson, Sink, Text},
    pipeline::Pipeline,
    replay::{parse_line, replay},
};
use h2trace_common::{CtRecord, ForkRecord, Header, LifeRecord, LiveRecord, SockLife, kind};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("H2TRACE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

fn bytes_of<T>(v: &T) -> Vec<u8> {
    // SAFETY: the wire types are integer-only repr(C) values.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

/// One well-formed record of each kind the kernel writes.
fn kernel_seeds() -> Vec<Vec<u8>> {
    let hdr = |k| Header {
        kind: k,
        _pad: 0,
        cpu: 1,
        ts_ns: 1_000,
    };
    let mut life = SockLife::zeroed();
    life.meta.family = 2;
    life.n_trans = 3;
    vec![
        bytes_of(&LifeRecord {
            hdr: hdr(kind::LIFE),
            life,
        }),
        bytes_of(&LiveRecord {
            hdr: hdr(kind::STATE),
            meta: life.meta,
            old_state: 1,
            new_state: 8,
            _pad: 0,
            reason: 0,
        }),
        bytes_of(&CtRecord {
            hdr: hdr(kind::CT_STATE),
            family: 2,
            ..CtRecord::default()
        }),
        bytes_of(&ForkRecord {
            hdr: hdr(kind::FORK),
            parent: 1,
            child: 2,
        }),
    ]
}

/// The recorded fixtures, a stream each (read once).
fn fixture_streams() -> &'static [Vec<String>] {
    static STREAMS: std::sync::OnceLock<Vec<Vec<String>>> = std::sync::OnceLock::new();
    STREAMS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .map(str::to_string)
                    .collect()
            })
            .collect()
    })
}

/// Every recorded line of the fixtures (read once).
fn fixture_lines() -> &'static [String] {
    static LINES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    LINES.get_or_init(|| {
        let lines: Vec<String> = fixture_streams().concat();
        assert!(lines.len() > 100, "the corpus is the recorded fixtures");
        lines
    })
}

/// A value of another type, or an edge of the same one, for a recorded field.
fn swapped_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        Just(serde_json::Value::from(0)),
        Just(serde_json::Value::from(u64::MAX)),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
        Just(serde_json::json!([1, "x", null])),
        Just(serde_json::json!({"a": {"b": -1}})),
    ]
}

/// The agent's pipeline with the default thresholds, writing text or NDJSON to nowhere.
fn pipeline(text: bool) -> Pipeline {
    let clock = Clock { offset_ns: 0 };
    let out: Box<dyn Sink> = if text {
        Box::new(Text::new(std::io::sink(), clock, Default::default()))
    } else {
        Box::new(Ndjson::new(std::io::sink(), clock, Default::default()))
    };
    Pipeline::new(Filter::default(), DetectConfig::default(), out)
}

/// A whole recorded stream through `replay` and the diagnosis, to either output.
fn replay_stream(lines: &[String], text: bool) {
    let mut pipeline = pipeline(text);
    let input = lines.join("\n");
    replay(input.as_bytes(), &mut pipeline, true, &mut std::io::sink()).unwrap();
}

/// Mutations: cut at a point, overwrite some bytes, duplicate a slice.
fn mutate(mut b: Vec<u8>, cut: usize, flips: &[(usize, u8)], dup: (usize, usize)) -> Vec<u8> {
    for &(i, v) in flips {
        if !b.is_empty() {
            let n = b.len();
            b[i % n] = v;
        }
    }
    if !b.is_empty() {
        let (a, len) = (dup.0 % b.len(), dup.1 % 32);
        let slice: Vec<u8> = b[a..(a + len).min(b.len())].to_vec();
        b.splice(a..a, slice);
    }
    b.truncate(cut.max(1));
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn kernel_records_never_panic(
        seed in 0..4usize,
        cut in 0..400usize,
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        dup in (any::<usize>(), any::<usize>()),
        noise in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let _ = decode(&noise);
        let b = mutate(kernel_seeds()[seed].clone(), cut, &flips, dup);
        let _ = decode(&b);
    }

    /// Records that decode (values flipped, not cut) go on through the agent's pipeline, in
    /// sequences: the kernel is trusted, but a record of a kernel layout h2trace misreads
    /// must not stop it.
    #[test]
    fn kernel_record_sequences_through_the_pipeline_never_panic(
        recs in prop::collection::vec(
            (0..4usize, prop::collection::vec((any::<usize>(), any::<u8>()), 0..8)),
            1..16,
        ),
        text in any::<bool>(),
        hold in prop_oneof![Just(0u64), Just(250_000_000), any::<u64>()],
    ) {
        let mut pipeline = pipeline(text);
        pipeline.set_live_hold(hold);
        let mut last = 0;
        for (seed, flips) in recs {
            let b = mutate(kernel_seeds()[seed].clone(), usize::MAX, &flips, (0, 0));
            if let Ok(input) = decode(&b) {
                last = b[8..16].try_into().map(u64::from_le_bytes).unwrap_or(0).max(last);
                pipeline.deliver_input(input);
            }
        }
        pipeline.finish(last);
        pipeline.flush();
    }

    #[test]
    fn netlink_messages_never_panic(
        noise in prop::collection::vec(any::<u8>(), 0..600),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
    ) {
        let _ = netlink::parse(&noise, 0, 0, &mut |_| {});
        // A plausible header (length, type CT_NEW, flags) in front of noise.
        let mut m = noise.clone();
        if m.len() >= 16 {
            let len = (m.len() as u32).to_le_bytes();
            m[..4].copy_from_slice(&len);
            m[4..6].copy_from_slice(&0x0100u16.to_le_bytes());
        }
        let m = mutate(m, usize::MAX, &flips, (0, 0));
        let _ = netlink::parse(&m, 0, 0, &mut |_| {});
    }

    #[test]
    fn recorded_lines_mutated_never_panic(
        pick in any::<usize>(),
        cut in any::<usize>(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        dup in (any::<usize>(), any::<usize>()),
    ) {
        let lines = fixture_lines();
        let line = &lines[pick % lines.len()];
        let n = line.len();
        let b = mutate(line.clone().into_bytes(), cut % (n + 1), &flips, dup);
        if let Ok(s) = std::str::from_utf8(&b) {
            let _ = parse_line(s);
        }
    }

    #[test]
    fn recorded_values_swapped_never_panic(
        pick in any::<usize>(),
        path_pick in any::<usize>(),
        value in swapped_value(),
    ) {
        let lines = fixture_lines();
        let mut v: serde_json::Value = serde_json::from_str(&lines[pick % lines.len()]).unwrap();
        // Replace one leaf (or subtree) somewhere in the record with a value of another type.
        let mut paths = Vec::new();
        collect_paths(&v, &mut Vec::new(), &mut paths);
        swap(&mut v, &paths[path_pick % paths.len()], value);
        let _ = parse_line(&v.to_string());
    }

    /// A line that parses can still upset the diagnosis (a zero window in a `started`
    /// record once divided by zero): whole streams, one value swapped, through `replay`.
    #[test]
    fn recorded_streams_with_a_value_swapped_replay_without_panic(
        pick in any::<usize>(),
        line_pick in any::<usize>(),
        path_pick in any::<usize>(),
        thresholds in any::<bool>(),
        text in any::<bool>(),
        value in swapped_value(),
    ) {
        let streams = fixture_streams();
        let mut lines = streams[pick % streams.len()].clone();
        // Half the time one of the recorded thresholds, in the first line (`started`).
        let (i, under) = if thresholds {
            (0, &["h2trace", "detect"][..])
        } else {
            (line_pick % lines.len(), &[][..])
        };
        let mut v: serde_json::Value = serde_json::from_str(&lines[i]).unwrap();
        let mut paths = Vec::new();
        let root = under.iter().fold(&v, |cur, k| &cur[*k]);
        collect_paths(root, &mut under.iter().map(|k| k.to_string()).collect(), &mut paths);
        if !paths.is_empty() {
            swap(&mut v, &paths[path_pick % paths.len()], value);
        }
        lines[i] = v.to_string();
        replay_stream(&lines, text);
    }
}

fn collect_paths(v: &serde_json::Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if let Some(m) = v.as_object() {
        for (k, child) in m {
            prefix.push(k.clone());
            out.push(prefix.clone());
            collect_paths(child, prefix, out);
            prefix.pop();
        }
    }
}

/// Replace what is at `path` in a record (a leaf or a subtree) with `value`.
fn swap(v: &mut serde_json::Value, path: &[String], value: serde_json::Value) {
    if let Some(slot) = path.iter().try_fold(v, |cur, k| cur.get_mut(k.as_str())) {
        *slot = value;
    }
}
