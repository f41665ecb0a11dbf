//! Whose ids a record carries: a record about a block carries its owner's ids, and a record
//! about no request carries none of another request's.

use std::sync::Arc;

use kvhygiene::alloc::Allocator;
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{Backend, StreamHandle};
use kvhygiene::config::{Config, FailureMode};
use kvhygiene::context::Context;
use kvhygiene::events::{Event, EventSink};

const S: StreamHandle = StreamHandle(0);

/// Prints each event as it arrives (the process may abort right after).
struct Print;

impl EventSink for Print {
    fn emit(&self, e: Event) {
        println!(
            "KVH-EVENT {} {}",
            e.kind.name(),
            e.context.tenant_id().unwrap_or("-")
        );
    }
}

/// Under `failure_mode = abort`, tenant A's block fails its verification, and the scrub's
/// result happens to be collected by a call of tenant B. The records written before the
/// abort (the `verify_failed` and the `policy_violation` that says the process aborts) are
/// about tenant A's block: neither names tenant B, whose request had nothing to do with it
/// and would otherwise appear in the log, and to the anomaly detector, as the tenant whose
/// scrub failed.
#[test]
fn the_fail_closed_record_is_not_attributed_to_the_tenant_that_collected_the_result() {
    if std::env::var_os("KVH_TEST_ATTRIBUTION_CHILD").is_some() {
        let backend = HostBackend::new();
        let config = Config {
            failure_mode: FailureMode::Abort,
            batch_max_delay_us: 10_000_000,
            ..Config::default()
        };
        let alloc = Allocator::new(backend.clone(), config, Some(Arc::new(Print)));
        Context::set_current(Context::new(Some("tenant-a"), Some("req-a"), None).unwrap());
        let a = alloc.malloc(4096, 0, S).unwrap();
        backend.write(0, a, &[0x5a; 4096]).unwrap();
        backend.inject_fault(1).unwrap();
        alloc.free(a, 4096, 0, S).unwrap();
        Context::set_current(Context::new(Some("tenant-b"), Some("req-b"), None).unwrap());
        let _ = alloc.synchronize();
        println!("KVH-CHILD-SURVIVED");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "the_fail_closed_record_is_not_attributed_to_the_tenant_that_collected_the_result",
            "--nocapture",
        ])
        .env("KVH_TEST_ATTRIBUTION_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the child must abort: {stdout}");
    let events: Vec<(&str, &str)> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("KVH-EVENT "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    assert!(
        events.contains(&("verify_failed", "tenant-a")),
        "no verify_failed record for tenant-a: {stdout}"
    );
    let violation = events
        .iter()
        .find(|(kind, _)| *kind == "policy_violation")
        .unwrap_or_else(|| panic!("no policy_violation record before the abort: {stdout}"));
    assert_ne!(
        violation.1, "tenant-b",
        "the abort's record names the tenant whose call collected the result: {stdout}"
    );
}
