//! Whose anomaly a burst of refused frees is. README ("Anomalies"): "An `invalid_free` or
//! `size_mismatch` burst is a caller bug in that tenant's code path": the detector counts the
//! refused frees of one caller together, and its record names the tenant whose request made
//! the calls.

mod common;

use std::sync::Arc;

use common::manual_config;
use kvhygiene::alloc::{Allocator, FreeError};
use kvhygiene::anomaly::{AnomalySink, ManualClock, Params};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::StreamHandle;
use kvhygiene::config::AnomalyConfig;
use kvhygiene::context::Context;
use kvhygiene::events::{AnomalySignal, EventKind, EventSink, InvalidFreeReason, MemorySink};

const S: StreamHandle = StreamHandle(0);

/// Sixteen blocks, block `i` allocated by tenant `owner(i)` and freed correctly; then one
/// request of tenant `caller` frees all sixteen again: sixteen refused frees from one caller
/// at one instant, the `invalid_free` burst threshold. Returns the tenants named by the
/// `invalid_free` anomaly records, and those of the `invalid_free` events.
fn double_frees_by_caller(
    owner: impl Fn(usize) -> String,
) -> (Vec<Option<String>>, Vec<Option<String>>) {
    let mem = MemorySink::new();
    let clock = ManualClock::new();
    let detector = AnomalySink::new(
        Params::from_config(&AnomalyConfig::default()),
        Some(mem.clone() as Arc<dyn EventSink>),
        clock.clone(),
    );
    let alloc = Allocator::new(
        HostBackend::new(),
        manual_config(),
        Some(detector.clone() as Arc<dyn EventSink>),
    );

    let mut ptrs = Vec::new();
    for t in 0..16 {
        let ctx = Context::new(Some(&owner(t)), Some("req"), None).unwrap();
        let previous = Context::set_current(ctx);
        ptrs.push(alloc.malloc(4096, 0, S).unwrap());
        Context::set_current(previous);
    }
    for &p in &ptrs {
        alloc.free(p, 4096, 0, S).unwrap();
    }
    alloc.synchronize().unwrap();

    // A request of tenant `caller` frees all sixteen again.
    let caller = Context::new(Some("caller"), Some("req-bad"), None).unwrap();
    let previous = Context::set_current(caller);
    for &p in &ptrs {
        let r = alloc.free(p, 4096, 0, S);
        assert!(
            matches!(
                r,
                Err(FreeError::Invalid {
                    reason: InvalidFreeReason::DoubleFree,
                    ..
                })
            ),
            "{r:?}"
        );
    }
    Context::set_current(previous);

    let events = mem.snapshot();
    let tenants = |name: &str| -> Vec<Option<String>> {
        events
            .iter()
            .filter(|e| e.kind.name() == name)
            .filter(|e| {
                name != "anomaly"
                    || matches!(
                        e.kind,
                        EventKind::Anomaly {
                            signal: AnomalySignal::InvalidFree,
                            ..
                        }
                    )
            })
            .map(|e| e.context.tenant_id().map(str::to_string))
            .collect()
    };
    let frees = tenants("invalid_free");
    assert_eq!(frees.len(), 16);
    (tenants("anomaly"), frees)
}

/// The stale pointers were sixteen different tenants' blocks: the burst is still the
/// caller's, one `anomaly` record naming `caller`.
#[test]
fn a_caller_s_double_frees_of_many_tenants_blocks_are_the_caller_s_burst() {
    let (anomalies, frees) = double_frees_by_caller(|t| format!("owner-{t}"));
    assert_eq!(
        anomalies,
        [Some("caller".to_string())],
        "sixteen refused frees by one caller's request: one invalid_free anomaly naming that \
         caller (tenants of the invalid_free events: {frees:?})"
    );
}

/// The stale pointers were all one other tenant's blocks: the anomaly names the caller whose
/// code path made the calls, not the tenant whose freed blocks they aimed at.
#[test]
fn a_caller_s_double_frees_of_one_tenant_s_blocks_name_the_caller() {
    let (anomalies, frees) = double_frees_by_caller(|_| "victim".to_string());
    assert_eq!(
        anomalies,
        [Some("caller".to_string())],
        "tenants of the invalid_free events: {frees:?}"
    );
}
