//! What the `failure_mode` policy violation, the last record of a process that fails closed,
//! says about the failure that made it abort.

mod common;

use std::sync::Arc;

use kvhygiene::alloc::{Allocator, KvLayout};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{Backend, StreamHandle};
use kvhygiene::config::{Config, FailureMode};
use kvhygiene::events::{Event, EventKind, EventSink};

const S: StreamHandle = StreamHandle(0);

/// Prints each event (the process aborts right after the last one).
struct Print;

impl EventSink for Print {
    fn emit(&self, e: Event) {
        if let EventKind::PolicyViolation { policy, detail } = &e.kind {
            println!("KVH-VIOLATION {policy}: {detail}");
        } else {
            println!("KVH-EVENT {}", e.kind.name());
        }
    }
}

/// Under `failure_mode = abort`, a `kvh_scrub_blocks` call whose KV block fails verification
/// aborts the process (README: "of a freed block or a KV block"). The `policy_violation`
/// record written before the abort describes that failure: a KV block of a live allocation,
/// not a freed block (no block was freed, and the records of the pool say none failed). An
/// auditor reading the record must not be sent to look for a freed block.
#[test]
fn the_fail_closed_record_of_a_kv_block_failure_does_not_describe_a_freed_block() {
    if std::env::var_os("KVH_TEST_KV_ABORT_CHILD").is_some() {
        let backend = HostBackend::new();
        let config = Config {
            failure_mode: FailureMode::Abort,
            ..Config::default()
        };
        let alloc = Allocator::new(backend.clone(), config, Some(Arc::new(Print)));
        // What the C ABI does there: its last metrics snapshot. Set once.
        assert!(alloc.on_fail_closed(|| println!("KVH-HOOK ran")));
        assert!(!alloc.on_fail_closed(|| println!("KVH-HOOK second")));
        let a = alloc.malloc(4096, 0, S).unwrap();
        backend.write(0, a, &[0x5a; 4096]).unwrap();
        let layout = KvLayout {
            regions: vec![a],
            block_bytes: 256,
            block_stride: 256,
            blocks_per_region: 16,
        };
        backend.inject_fault(1).unwrap();
        let r = alloc.scrub_kv_blocks(&layout, &[3], 0, S);
        println!("KVH-CHILD-SURVIVED {r:?}");
        return;
    }
    let (status, stdout, stderr) = common::rerun_as_child(
        "the_fail_closed_record_of_a_kv_block_failure_does_not_describe_a_freed_block",
        "KVH_TEST_KV_ABORT_CHILD",
    );
    assert!(!status.success(), "the child must abort: {stdout}{stderr}");
    assert!(
        stdout.contains("KVH-EVENT kv_verify_failed"),
        "the KV block did not fail: {stdout}"
    );
    let violation = stdout
        .lines()
        .find_map(|l| l.strip_prefix("KVH-VIOLATION failure_mode: "))
        .unwrap_or_else(|| panic!("no failure_mode policy_violation before the abort: {stdout}"));
    assert!(
        !violation.contains("freed block"),
        "the record of a KV block's failed verification says a freed block failed: \
         {violation:?}"
    );
    // The fail-closed hook ran, after the record and before the abort, and only the first.
    let (record, hook) = (
        stdout.find("KVH-VIOLATION failure_mode"),
        stdout.find("KVH-HOOK ran"),
    );
    assert!(
        matches!((record, hook), (Some(r), Some(h)) if r < h),
        "{stdout}"
    );
    assert!(!stdout.contains("KVH-HOOK second"), "{stdout}");
}

/// Panics at every event (a faulty sink).
struct Panicking;

impl EventSink for Panicking {
    fn emit(&self, _: Event) {
        panic!("the sink panicked");
    }
}

/// Under `failure_mode = abort`, a freed block that fails verification stops the process even
/// when the event sink panics on the failure's record (a faulty sink; the C boundary would
/// catch the panic and the process would go on serving).
#[test]
fn a_panicking_sink_does_not_keep_a_failure_from_aborting_the_process() {
    if std::env::var_os("KVH_TEST_SINK_PANIC_CHILD").is_some() {
        let backend = HostBackend::new();
        let config = Config {
            failure_mode: FailureMode::Abort,
            batch_size: 1,
            ..Config::default()
        };
        let alloc = Allocator::new(backend.clone(), config, Some(Arc::new(Panicking)));
        let a = alloc.malloc(4096, 0, S).unwrap();
        backend.write(0, a, &[0x5a; 4096]).unwrap();
        backend.inject_fault(1).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = alloc.free(a, 4096, 0, S);
            alloc.synchronize()
        }));
        // The failure may be collected by the flusher thread while this thread's own call
        // returns (here through the sink's panic on another record): the process stops once
        // that thread has recorded it, which takes well under this wait.
        std::thread::sleep(std::time::Duration::from_secs(3));
        println!("KVH-CHILD-SURVIVED {:?}", r.is_ok());
        return;
    }
    let (_, stdout, stderr) = common::rerun_as_child(
        "a_panicking_sink_does_not_keep_a_failure_from_aborting_the_process",
        "KVH_TEST_SINK_PANIC_CHILD",
    );
    assert!(
        !stdout.contains("KVH-CHILD-SURVIVED"),
        "the process went on after a failed verification under failure_mode=abort: \
         {stdout}{stderr}"
    );
    assert!(stderr.contains("aborting the process"), "{stderr}");
}
