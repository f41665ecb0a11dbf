//! Why `synchronize` leaves quarantined blocks unscrubbed when their re-scrubs are refused for
//! now, for re-scrubs on two freeing streams refused for two different reasons.

mod common;

use common::{manual_config, secret, TestBackend};
use kvhygiene::alloc::{Allocator, FreeError};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{Backend, BackendError, ScrubBatch, StreamHandle};

const CAPTURING: StreamHandle = StreamHandle(5);
const SHORT: StreamHandle = StreamHandle(6);

/// Refuses every re-scrub (a fully verified submission): on stream 5 as a CUDA graph capture
/// of that stream, on any other stream for lack of memory.
fn refuse_rescrubs(b: &ScrubBatch) -> Option<BackendError> {
    if !b.options.full_verify {
        return None;
    }
    Some(if b.stream == CAPTURING {
        BackendError::StreamCapturing {
            stream: b.stream.0,
            what: "scrub launch",
        }
    } else {
        BackendError::OutOfMemory {
            device: b.device,
            requested: 4096,
        }
    })
}

/// `DevicePool::deferred` gives "why the first of them waits". Block a (freed on stream 5) is
/// quarantined first, then block b (freed on stream 6); a's re-scrub is refused because stream
/// 5 is capturing, b's for lack of memory. `synchronize` names the reason of a, the first
/// block waiting, as it names the first refused open batch's: the capture of stream 5, not
/// the memory shortage of b's batch (which a does not wait for).
#[test]
fn synchronize_names_why_the_first_waiting_rescrub_was_refused() {
    let host = HostBackend::new();
    let backend = TestBackend::new(host.clone());
    *backend.refuse.lock().unwrap() = Some(Box::new(refuse_rescrubs));
    let alloc = Allocator::new(backend.clone(), manual_config(), None);
    let a = alloc.malloc(4096, 0, CAPTURING).unwrap();
    let b = alloc.malloc(4096, 0, SHORT).unwrap();
    backend.write(0, a, &secret(4096, 0x21)).unwrap();
    backend.write(0, b, &secret(4096, 0x22)).unwrap();
    // Each first scrub leaves half its block: both blocks are quarantined, a first.
    host.inject_skip_tail(1);
    let first = alloc.free_checked(a, 4096, 0, CAPTURING);
    assert_eq!(first, Err(FreeError::VerifyFailed { addr: a }));
    host.inject_skip_tail(1);
    let second = alloc.free_checked(b, 4096, 0, SHORT);
    assert_eq!(second, Err(FreeError::VerifyFailed { addr: b }));
    let r = alloc.synchronize();
    alloc.shutdown();
    let message = r.expect_err("two re-scrubs were refused");
    assert!(
        message.contains("stream 0x5 is capturing"),
        "the first quarantined block (freed on stream 5, capturing) waits for the capture, \
         but synchronize says: {message}"
    );
}

/// Re-scrubs waiting on one freeing stream are submitted in batches no larger than the batch
/// size, as freed blocks are (b4336e2: "the pool never lets a waiting batch grow past the
/// batch size"). The CUDA backend on a full device has only the slot each device makes as it
/// opens (256 segments, docs/cuda.md): a batch of more segments is refused for lack of memory
/// at every try. Here 300 blocks are freed under the never-reuse policy (each is verified,
/// quarantined, re-scrubbed and released) while re-scrubs are refused; once batches of up to
/// 256 segments can be had again, every one of them must be re-scrubbed.
#[test]
fn rescrubs_waiting_on_one_stream_are_submitted_in_batches_of_at_most_the_batch_size() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let host = HostBackend::new();
    let backend = TestBackend::new(host);
    let refuse_rescrubs = Arc::new(AtomicBool::new(true));
    let refusing = refuse_rescrubs.clone();
    *backend.refuse.lock().unwrap() = Some(Box::new(move |b: &ScrubBatch| {
        let rescrub = b.options.full_verify && refusing.load(Ordering::SeqCst);
        (rescrub || b.segments.len() > 256).then_some(BackendError::OutOfMemory {
            device: b.device,
            requested: 4096,
        })
    }));
    let config = kvhygiene::config::Config {
        idle_ttl_ms: 0,
        ..manual_config()
    };
    let batch_size = config.batch_size;
    let alloc = Allocator::new(backend.clone(), config, None);
    let s = StreamHandle(3);
    let blocks: Vec<u64> = (0..300)
        .map(|_| alloc.malloc(4096, 0, s).expect("malloc"))
        .collect();
    for &p in &blocks {
        alloc.free(p, 4096, 0, s).expect("free");
    }
    assert!(alloc.synchronize().is_err(), "the re-scrubs were refused");
    refuse_rescrubs.store(false, Ordering::SeqCst);
    let r = alloc.synchronize();
    let largest = backend
        .batches
        .lock()
        .unwrap()
        .iter()
        .map(|b| b.segments.len())
        .max();
    let quarantined = alloc.stats().accounting.quarantined.blocks;
    alloc.shutdown();
    assert!(
        r.is_ok(),
        "synchronize returned {r:?}: {quarantined} quarantined blocks wait for a re-scrub \
         submitted as one batch of all of them (batch size {batch_size}; largest batch run: \
         {largest:?})"
    );
}
