//! The event the forensic benchmarks and `examples/forensic_fill.rs` log: a quarantine with
//! three context ids and the block's fields, a record of about 550 bytes with its MAC.

use std::time::SystemTime;

use kvhygiene::context::Context;
use kvhygiene::events::{BlockRef, Event, EventKind, QuarantineReason};

/// The context every event carries.
pub fn context() -> Context {
    Context::new(Some("tenant-0042"), Some("req-0000001"), Some("llama-3-8b"))
        .expect("valid context ids")
}

/// The `i`th event: block `i`, at an address and a scrub number of its own.
pub fn event(i: u64, ctx: &Context) -> Event {
    Event {
        at: SystemTime::now(),
        kind: EventKind::Quarantined {
            reason: QuarantineReason::VerifyFailed,
            retired_before: false,
        },
        context: ctx.clone(),
        block: Some(BlockRef {
            id: i,
            device: 0,
            addr: 0x7f00_0000_0000 + i * 4096,
            requested: 1 << 20,
            capacity: 1 << 20,
            scrub_seq: i,
        }),
        addr: None,
    }
}
