//! Blocks exported for another process (`cudaIpcGetMemHandle`): an importer may keep its
//! mapping past the free, so an exported block is never pooled for the next owner. Its free
//! scrubs and verifies it, then returns it to the backend; memory the pool holds for no one
//! is never marked (an export of it would hand the next owner's bytes out).

mod common;

use common::{manual_config, secret, Fixture};
use kvhygiene::alloc::IpcExportError;
use kvhygiene::backend::StreamHandle;
use kvhygiene::context::Context;
use kvhygiene::events::{EventKind, ReleaseReason};

const S: StreamHandle = StreamHandle(0);
const N: usize = 4096;

#[test]
fn an_unexported_block_goes_back_to_the_pool_for_the_next_owner() {
    // The behaviour an export must change: the next allocation of the size gets the block.
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(N as i64, 0, 0);
    f.alloc.free(a, N as i64, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    assert_eq!(f.malloc_zeroed(N as i64, 0, 0), a);
    assert_eq!(f.alloc.stats().counters.released, 0);
}

#[test]
fn an_exported_block_is_verified_then_returned_to_the_backend_never_pooled() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(N as i64, 0, 0);
    let id = f.alloc.block_info(a).unwrap().id;
    f.write(0, a, &secret(N, 7));
    let owner = Context::new(Some("alice"), Some("r1"), None).unwrap();
    let prev = Context::set_current(owner);
    // An interior pointer marks its block: the driver exports the whole allocation.
    let span = f.alloc.mark_ipc_exported(a + 100).unwrap();
    Context::set_current(prev);
    assert_eq!((span.addr, span.live), (a, true));
    // A second export of the same allocation changes nothing and records nothing more.
    f.alloc.mark_ipc_exported(a).unwrap();
    assert_eq!(f.sink.count("ipc_export"), 1);
    assert_eq!(f.alloc.stats().counters.ipc_exported_blocks, 1);
    let export = f
        .sink
        .snapshot()
        .into_iter()
        .find(|e| matches!(e.kind, EventKind::IpcExport { .. }))
        .unwrap();
    assert_eq!(export.block.unwrap().id, id);
    match &export.kind {
        EventKind::IpcExport { caller } => assert_eq!(caller.tenant_id(), Some("alice")),
        other => panic!("{other:?}"),
    }

    let verified_before = f.alloc.stats().counters.verifications_passed;
    f.alloc.free(a, N as i64, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    let counters = f.alloc.stats().counters;
    assert_eq!(
        counters.verifications_passed,
        verified_before + 1,
        "not verified first"
    );
    assert_eq!(counters.released, 1);
    assert!(f.alloc.block_info(a).is_none(), "still in the pool");
    assert!(f.sink.snapshot().iter().any(|e| e.kind
        == EventKind::Released {
            reason: ReleaseReason::IpcExported,
            leaked: false,
        }
        && e.block.map(|b| b.id) == Some(id)));
    // The next allocation of the size is new memory, not the exported block.
    let hits = counters.pool_hits;
    let b = f.malloc_zeroed(N as i64, 0, 0);
    assert_ne!(f.alloc.block_info(b).unwrap().id, id);
    assert_eq!(f.alloc.stats().counters.pool_hits, hits);
    f.assert_balanced();
}

#[test]
fn memory_the_pool_holds_for_no_one_is_never_marked() {
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(N as i64, 0, 0);
    f.alloc.free(a, N as i64, 0, S).unwrap();
    // Freed, its scrub not yet run: PENDING.
    assert_eq!(
        f.alloc.mark_ipc_exported(a),
        Err(IpcExportError::NotLive {
            addr: a,
            state: "pending"
        })
    );
    f.alloc.synchronize().unwrap();
    let refused = f.alloc.mark_ipc_exported(a + 8).unwrap_err();
    assert_eq!(
        refused,
        IpcExportError::NotLive {
            addr: a + 8,
            state: "clean"
        }
    );
    assert!(
        refused.to_string().contains("must not be exported"),
        "{refused}"
    );
    assert_eq!(
        f.alloc.mark_ipc_exported(0x10),
        Err(IpcExportError::UnknownPointer { addr: 0x10 })
    );
    // Nothing was marked: the block is handed out again, and nothing was recorded.
    assert_eq!(f.malloc_zeroed(N as i64, 0, 0), a);
    assert_eq!(f.sink.count("ipc_export"), 0);
    assert_eq!(f.alloc.stats().counters.ipc_exported_blocks, 0);
}

#[test]
fn an_exported_block_whose_scrub_fails_is_quarantined_never_retired_unverified() {
    // Retirement waits for a verified scrub, as the pool does: a block whose scrub failed
    // takes the quarantine's way out (re-scrubbed before any release), and is never pooled.
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(N as i64, 0, 0);
    let id = f.alloc.block_info(a).unwrap().id;
    f.write(0, a, &secret(N, 9));
    f.alloc.mark_ipc_exported(a).unwrap();
    f.backend.inject_fault_next();
    f.alloc.free(a, N as i64, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    let events = f.sink.snapshot();
    assert!(events
        .iter()
        .any(|e| matches!(e.kind, EventKind::Quarantined { .. })
            && e.block.map(|b| b.id) == Some(id)));
    assert!(
        !events.iter().any(|e| e.kind
            == EventKind::Released {
                reason: ReleaseReason::IpcExported,
                leaked: false,
            }),
        "released unverified"
    );
    let b = f.malloc_zeroed(N as i64, 0, 0);
    assert_ne!(f.alloc.block_info(b).unwrap().id, id, "handed out again");
}

#[test]
fn a_checked_free_of_an_exported_block_reports_its_verified_scrub() {
    // kvh_free_checked waits for the scrub: that it retires the block instead of pooling it
    // changes nothing of what the caller is told.
    let f = Fixture::new(manual_config());
    let a = f.malloc_zeroed(N as i64, 0, 0);
    f.write(0, a, &secret(N, 3));
    f.alloc.mark_ipc_exported(a).unwrap();
    assert!(f.alloc.free_checked(a, N as i64, 0, S).is_ok());
    assert_eq!(f.alloc.stats().counters.released, 1);
    assert!(f.alloc.block_info(a).is_none(), "still in the pool");
    // A second free of it is refused as a free of memory kvhygiene no longer holds.
    assert!(f.alloc.free(a, N as i64, 0, S).is_err());
}
