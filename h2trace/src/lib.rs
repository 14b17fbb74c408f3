//! h2trace: explains, from the kernel, why HTTP/2 and gRPC clients fail to reuse connections.
//!
//! Data flow: `probe` (load and attach the kernel programs) → `source` (ring or perf
//! buffers, loss counters) → `event` (decode) → `order` (merge by kernel time) → `filter`
//! (`--pid`, ports, family) → `conntrack` (what middleboxes' tables
//! thought, joined to the sockets) → `http2` (control frames, joined to their connections) → `correlate` (what each connection means) → `detect` (per-peer
//! windows, findings) → `output` (NDJSON or text). `pipeline` is the part live runs and
//! `replay` share; `run` wires the live run together; `check` reports what the kernel allows.
pub mod check;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod correlate;
pub mod detect;
pub mod event;
pub mod filter;
pub mod http2;
pub mod netns;
pub mod order;
pub mod output;
pub mod owner;
pub mod pipeline;
pub mod probe;
pub mod replay;
pub mod run;
pub mod source;
