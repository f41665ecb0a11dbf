//! kvhygiene: verified zeroization of freed GPU memory for multi-tenant LLM inference.
//!
//! Crate map (one module, one job; dependencies point downwards only):
//!
//! - [`ffi`]: every `extern "C"` export (PyTorch's pluggable-allocator ABI and the rest of the
//!   C API), the panic boundary and the error codes. Nothing else lives there.
//! - [`alloc`]: the caching pool: size classes, the block table, the block state machine
//!   (LIVE → PENDING → CLEAN / QUARANTINED → RELEASED), batching and policies.
//! - [`backend`]: the narrow [`backend::Backend`] trait the pool drives, the host (CPU memory)
//!   backend and the shared sampled-verification rule.
//! - [`events`]: the structured security events the pool emits and the [`events::EventSink`]
//!   trait that consumers (the forensic log) implement.
//! - [`anomaly`]: the anomaly detector ("activation logger"), an [`events::EventSink`] layer
//!   in front of the log that turns bursts and surges of security events per tenant into
//!   `anomaly` records.
//! - [`forensic`]: the hash-chained, HMAC-sealed forensic log, its writer thread and `verify-log`.
//! - [`context`]: per-thread tenant / request / model ids, validated at the boundary.
//! - [`config`]: the policy, read from `KVH_*` variables or a TOML file, validated once, and
//!   the `config` verb that reports it and the controls it weakens.
//! - [`stats`]: counters and latency histograms of the pool, serialised as JSON.
//! - [`metrics`]: the Prometheus exposition of the statistics, the metrics file and the HTTP
//!   exporter, and the `metrics` / `serve-metrics` verbs.
//! - [`demo`]: the multi-tenant simulation behind `kvh demo`.
//! - [`gate`]: `kvh gate`, whether a process may keep serving tenants (its metrics snapshot and
//!   forensic log judged as one exit status).
//! - [`preflight`]: `kvh preflight`, the start-up's checks (policy, log directory and keys,
//!   metrics exports, backend) made without starting, before a server loads its model.
//! - [`report_out`]: standard output for the verbs' reports, a failed write remembered
//!   rather than a panic.
//!
//! The C header `include/kvhygiene.h` is generated from [`ffi`] by cbindgen.

pub mod alloc;
pub mod anomaly;
pub mod backend;
pub mod config;
pub mod context;
pub mod demo;
pub mod events;
pub mod ffi;
pub mod forensic;
pub mod gate;
pub mod metrics;
pub mod preflight;
pub mod report_out;
pub mod stats;

/// Writes one line on stderr for the operator, ignoring a failure. The allocator runs inside
/// servers whose stderr may be closed (EPIPE): `eprintln!` would turn that into a panic in the
/// middle of an allocation, a free or an abort for a failed verification.
pub(crate) fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// `text` with its control characters (line breaks included) written as `\u{..}` escapes, for
/// a report on a terminal: text from a file anyone who can write it chose (a metrics label, a
/// policy's path) must neither send an escape sequence to the terminal nor forge a line.
pub(crate) fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
