//! What the agent spends per written record, without the kernel: reads a recording once, then
//! writes its socket events as NDJSON into a discarding sink, several times over, and prints
//! the time per record. For work on the output path (`cargo run --release --example
//! record_cost -- FILE.ndjson [ROUNDS]`); record a file with `h2trace -o FILE` under churn.
use std::{
    io::{BufRead as _, BufReader},
    time::Instant,
};

use h2trace::{
    output::{Clock, Ndjson, Sink as _},
    replay::{Record, parse_line},
};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: record_cost FILE.ndjson [ROUNDS]"))?;
    let rounds: usize = args.next().map_or(Ok(5), |r| r.parse())?;
    let events: Vec<_> = BufReader::new(std::fs::File::open(&path)?)
        .lines()
        .filter_map(|l| match parse_line(&l.ok()?) {
            Ok(Record::Event(ev)) => Some(ev),
            _ => None,
        })
        .collect();
    let mut sink = Ndjson::new(std::io::sink(), Clock { offset_ns: 0 }, Default::default());
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        for ev in &events {
            sink.event(ev, h2trace::correlate::of_event(ev).as_ref())?;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{} records: {:.0} ns per record (best of {rounds})",
        events.len(),
        best * 1e9 / events.len() as f64
    );
    Ok(())
}
