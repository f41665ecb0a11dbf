//! PyTorch's memory statistics of a device (`Allocator::memory_stats`), as
//! `torch.cuda.memory_stats` reads them: LIVE blocks are allocated, LIVE and PENDING ones
//! active, every block held from the backend reserved; peaks and cumulative figures reset on
//! request.

mod common;

use common::{manual_config, Fixture};
use kvhygiene::alloc::memory_stats::{Stat, SMALL_POOL_MAX};
use kvhygiene::alloc::AllocError;
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::{Backend, StreamHandle};
use kvhygiene::config::Config;

const S: StreamHandle = StreamHandle(0);

/// A block's way through the pool, as each statistic sees it.
#[test]
fn a_block_counts_as_allocated_then_active_then_only_reserved() {
    let f = Fixture::new(manual_config());
    let a = f.alloc.malloc(4000, 0, S).unwrap();
    let m = f.alloc.memory_stats(0).unwrap();
    let capacity = m.allocated_bytes.all.current;
    assert!(
        capacity >= 4000,
        "allocated {capacity} bytes for 4000 asked"
    );
    assert_eq!(m.requested_bytes.all.current, 4000);
    assert_eq!(m.active_bytes.all.current, capacity);
    assert_eq!(m.reserved_bytes.all.current, capacity);
    assert_eq!((m.allocation.all.current, m.segment.all.current), (1, 1));
    assert_eq!(m.num_device_alloc, 1);
    assert_eq!(m.max_split_size, -1);

    f.alloc.free(a, 4000, 0, S).unwrap();
    let m = f.alloc.memory_stats(0).unwrap();
    assert_eq!(
        m.allocated_bytes.all.current, 0,
        "a freed block is not allocated"
    );
    assert_eq!(
        m.active_bytes.all.current, capacity,
        "a block whose scrub is not verified yet stays active"
    );
    assert_eq!(m.allocated_bytes.all.peak, capacity);
    assert_eq!(
        (m.allocated_bytes.all.allocated, m.allocated_bytes.all.freed),
        (capacity, capacity)
    );

    f.alloc.synchronize().unwrap();
    let m = f.alloc.memory_stats(0).unwrap();
    assert_eq!(m.active_bytes.all.current, 0);
    assert_eq!(
        m.reserved_bytes.all.current, capacity,
        "a clean block stays cached"
    );

    f.alloc.empty_cache();
    let m = f.alloc.memory_stats(0).unwrap();
    assert_eq!(m.reserved_bytes.all.current, 0);
    assert_eq!(m.segment.all.current, 0);
    assert_eq!(m.num_device_free, 1);
    assert_eq!(m.reserved_bytes.all.peak, capacity);
    f.alloc.check_consistency().unwrap();
}

/// The small pool holds blocks up to 1 MiB, the large one the rest; `all` is their sum.
#[test]
fn small_and_large_blocks_are_counted_in_their_pools() {
    let f = Fixture::new(manual_config());
    let small = f.alloc.malloc(512, 0, S).unwrap();
    let large = f.alloc.malloc(2 << 20, 0, S).unwrap();
    let m = f.alloc.memory_stats(0).unwrap();
    let (s, l) = (m.allocated_bytes.small_pool, m.allocated_bytes.large_pool);
    assert!(
        s.current > 0 && s.current <= SMALL_POOL_MAX,
        "small pool: {s:?}"
    );
    assert!(l.current >= 2 << 20, "large pool: {l:?}");
    assert_eq!(m.allocated_bytes.all.current, s.current + l.current);
    assert_eq!(
        (
            m.allocation.small_pool.current,
            m.allocation.large_pool.current
        ),
        (1, 1)
    );
    f.alloc.free(small, 512, 0, S).unwrap();
    f.alloc.free(large, 2 << 20, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    f.alloc.check_consistency().unwrap();
}

/// The peak follows the largest value since the last reset of peaks: what a profiling run
/// (vLLM's) reads after resetting them before the run.
#[test]
fn a_reset_of_peaks_starts_them_from_the_current_values() {
    let f = Fixture::new(manual_config());
    let big = f.alloc.malloc(8 << 20, 0, S).unwrap();
    f.alloc.free(big, 8 << 20, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    let before = f.alloc.memory_stats(0).unwrap();
    assert!(before.allocated_bytes.all.peak >= 8 << 20);

    f.alloc.reset_peak_memory_stats(0).unwrap();
    let after = f.alloc.memory_stats(0).unwrap();
    assert_eq!(
        after.allocated_bytes.all.peak, 0,
        "nothing is allocated now"
    );
    assert_eq!(
        after.reserved_bytes.all.peak, after.reserved_bytes.all.current,
        "the cached block is still reserved"
    );

    let small = f.alloc.malloc(1 << 20, 0, S).unwrap();
    let m = f.alloc.memory_stats(0).unwrap();
    assert_eq!(m.allocated_bytes.all.peak, m.allocated_bytes.all.current);
    assert!(
        m.allocated_bytes.all.peak < 8 << 20,
        "the old peak came back: {m:?}"
    );
    f.alloc.free(small, 1 << 20, 0, S).unwrap();
}

/// A reset of the accumulated statistics zeroes what was added and taken, and the counters,
/// not the current values.
#[test]
fn a_reset_of_accumulated_statistics_keeps_the_current_values() {
    let f = Fixture::new(manual_config());
    let held = f.alloc.malloc(4096, 0, S).unwrap();
    let gone = f.alloc.malloc(4096, 0, S).unwrap();
    f.alloc.free(gone, 4096, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    f.alloc.empty_cache();
    let before = f.alloc.memory_stats(0).unwrap();
    assert_eq!(before.num_device_alloc, 2);
    assert_eq!(before.num_device_free, 1);

    f.alloc.reset_accumulated_memory_stats(0).unwrap();
    let m = f.alloc.memory_stats(0).unwrap();
    assert_eq!(
        m.allocated_bytes.all,
        Stat {
            current: before.allocated_bytes.all.current,
            peak: before.allocated_bytes.all.peak,
            allocated: 0,
            freed: 0,
        }
    );
    assert_eq!((m.num_device_alloc, m.num_device_free), (0, 0));

    f.alloc.free(held, 4096, 0, S).unwrap();
    let m = f.alloc.memory_stats(0).unwrap();
    assert_eq!(
        m.allocated_bytes.all.freed,
        before.allocated_bytes.all.current
    );
}

/// Every allocation the backend refused is retried after a flush of the cache (PyTorch's
/// `num_alloc_retries`), the one that failed again too, which also counts as an
/// out-of-memory error.
#[test]
fn allocations_out_of_memory_and_retried_are_counted() {
    let host = HostBackend::with_capacity(8 << 20);
    let f = Fixture::with_host(Config::default(), host);
    let a = f.alloc.malloc(6 << 20, 0, S).unwrap();
    assert!(matches!(
        f.alloc.malloc(6 << 20, 0, S),
        Err(AllocError::OutOfMemory { .. })
    ));
    let m = f.alloc.memory_stats(0).unwrap();
    assert_eq!(
        (m.num_ooms, m.num_alloc_retries),
        (1, 1),
        "the refused allocation was retried after a flush of the cache, then failed"
    );
    f.alloc.free(a, 6 << 20, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    // Another class: the cached block does not serve it, but releasing it makes room.
    let b = f.alloc.malloc(7 << 20, 0, S).unwrap();
    let m = f.alloc.memory_stats(0).unwrap();
    assert_eq!(m.num_ooms, 1, "{m:?}");
    assert_eq!(m.num_alloc_retries, 2, "{m:?}");
    f.alloc.free(b, 7 << 20, 0, S).unwrap();
    f.alloc.check_consistency().unwrap();
}

/// A device the backend does not have is an error naming it, for each call.
#[test]
fn a_device_the_backend_lacks_is_refused() {
    let f = Fixture::new(manual_config());
    let count = f.alloc.backend().device_count() as i32;
    for device in [-1, count, i32::MAX] {
        assert!(matches!(
            f.alloc.memory_stats(device),
            Err(AllocError::InvalidDevice { .. })
        ));
        assert!(f.alloc.reset_peak_memory_stats(device).is_err());
        assert!(f.alloc.reset_accumulated_memory_stats(device).is_err());
    }
}

/// The JSON is PyTorch's nested layout: each statistic a set of pools, each pool a stat.
#[test]
fn the_statistics_serialise_in_pytorch_s_nested_layout() {
    let f = Fixture::new(manual_config());
    let a = f.alloc.malloc(4096, 0, S).unwrap();
    let json = serde_json::to_value(f.alloc.memory_stats(0).unwrap()).unwrap();
    for name in [
        "allocated_bytes",
        "requested_bytes",
        "active_bytes",
        "reserved_bytes",
        "inactive_split_bytes",
        "allocation",
        "active",
        "segment",
        "inactive_split",
    ] {
        for pool in ["all", "small_pool", "large_pool"] {
            for field in ["current", "peak", "allocated", "freed"] {
                assert!(
                    json[name][pool][field].is_u64(),
                    "{name}.{pool}.{field} missing in {json}"
                );
            }
        }
    }
    for field in ["current", "peak", "allocated", "freed"] {
        assert!(json["oversize_allocations"][field].is_u64());
    }
    assert_eq!(json["allocated_bytes"]["all"]["current"], 4096);
    assert_eq!(json["max_split_size"], -1);
    f.alloc.free(a, 4096, 0, S).unwrap();
}

/// A block whose return to the backend was refused (the backend shut down) stays held: it
/// was neither freed nor obtained again, so the cumulative segment figures match the
/// backend calls that succeeded (`num_device_alloc`, `num_device_free`).
#[test]
fn a_release_the_backend_refused_counts_as_neither_freed_nor_allocated() {
    let f = Fixture::new(manual_config());
    let a = f.alloc.malloc(4096, 0, S).unwrap();
    f.alloc.free(a, 4096, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    f.backend.host.shutdown();
    f.alloc.empty_cache();
    let m = f.alloc.memory_stats(0).unwrap();
    assert_eq!(m.segment.all.current, 1, "{m:?}");
    assert_eq!(m.num_device_free, 0, "{m:?}");
    assert_eq!(
        (m.segment.all.allocated, m.segment.all.freed),
        (m.num_device_alloc, m.num_device_free),
        "segments counted as obtained and returned differ from the backend calls made: \
         reserved_bytes {:?}",
        m.reserved_bytes.all
    );
    f.alloc.check_consistency().unwrap();
}

/// `num_ooms` counts allocations that failed out of memory (PyTorch's meaning: a `malloc`
/// that ran out of memory after its retry). A KV scrub whose batch found no memory on the
/// device is no allocation: it leaves `num_ooms` at zero.
#[test]
fn a_kv_scrub_out_of_memory_is_not_an_allocation_out_of_memory() {
    use kvhygiene::alloc::{KvLayout, KvScrubError};
    use kvhygiene::backend::BackendError;
    let f = Fixture::new(manual_config());
    let (block, blocks) = (256u64, 8u64);
    let len = 2 * block * blocks;
    let a = f.alloc.malloc(len as i64, 0, StreamHandle(1)).unwrap();
    let layout = KvLayout {
        regions: vec![a, a + blocks * block],
        block_bytes: block,
        block_stride: block,
        blocks_per_region: blocks,
    };
    *f.backend.refuse.lock().unwrap() = Some(Box::new(|b| {
        (b.stream == StreamHandle(6)).then_some(BackendError::OutOfMemory {
            device: 0,
            requested: 0,
        })
    }));
    let got = f.alloc.scrub_kv_blocks(&layout, &[0], 0, StreamHandle(6));
    *f.backend.refuse.lock().unwrap() = None;
    assert!(
        matches!(
            got,
            Err(KvScrubError::Backend {
                error: BackendError::OutOfMemory { .. },
                ..
            })
        ),
        "precondition: {got:?}"
    );
    let m = f.alloc.memory_stats(0).unwrap();
    assert_eq!(
        (m.num_ooms, m.num_alloc_retries),
        (0, 0),
        "no allocation failed, yet torch.cuda.memory_stats would report {} out-of-memory \
         allocations",
        m.num_ooms
    );
    f.alloc.free(a, len as i64, 0, StreamHandle(1)).unwrap();
}

/// A block becomes active only by being allocated (PyTorch: `active` is allocated blocks and
/// freed ones still in use by a stream): every block counted in `active` was counted in
/// `allocation` first. Fresh memory kept PENDING because a capture refused its zeroing was
/// handed to nobody: it is reserved, not active.
#[test]
fn fresh_memory_nobody_was_handed_is_not_active() {
    let f = Fixture::new(manual_config());
    f.malloc_whose_zeroing_a_capture_refuses(4096);
    let m = f.alloc.memory_stats(0).unwrap();
    assert_eq!(m.allocation.all.allocated, 0, "precondition: {m:?}");
    assert_eq!(m.segment.all.current, 1, "precondition: the memory is kept");
    assert_eq!(
        (m.active_bytes.all.current, m.active.all.allocated),
        (0, 0),
        "memory no caller was handed counts as active ({} bytes) with no allocation made",
        m.active_bytes.all.current
    );
}

/// `num_device_alloc` and `num_device_free` count the blocks obtained from and returned to
/// the backend (PyTorch: every `cudaMalloc` and `cudaFree`). Fresh memory whose zeroing failed
/// was obtained and given back: one of each.
#[test]
fn fresh_memory_given_back_after_its_zeroing_failed_counts_as_obtained_and_returned() {
    use kvhygiene::backend::BackendError;
    let f = Fixture::new(manual_config());
    f.backend
        .zero_fresh_errors
        .lock()
        .unwrap()
        .push_back(BackendError::Driver {
            call: "cuMemsetD8Async",
            code: 999,
            name: "CUDA_ERROR_UNKNOWN".into(),
        });
    assert!(f.alloc.malloc(4096, 0, S).is_err(), "precondition");
    assert_eq!(
        f.backend.host.bytes_in_use(),
        0,
        "precondition: the memory went back"
    );
    let m = f.alloc.memory_stats(0).unwrap();
    assert_eq!(
        (m.num_device_alloc, m.num_device_free),
        (1, 1),
        "the backend's allocation and release of the block are not counted"
    );
}

/// `num_device_free` counts the blocks returned to the backend (docs/cuda.md: "the blocks
/// obtained from and returned to the driver"); fresh memory whose zeroing failed and whose
/// release then failed too is counted as obtained, not as returned. A cached block whose
/// release the backend failed is not returned either: the backend still holds its memory.
#[test]
fn a_cached_block_whose_release_failed_is_not_counted_as_returned() {
    use std::sync::atomic::Ordering;
    let f = Fixture::new(manual_config());
    let a = f.alloc.malloc(4096, 0, S).unwrap();
    f.alloc.free(a, 4096, 0, S).unwrap();
    f.alloc.synchronize().unwrap();
    f.backend.fail_release.store(true, Ordering::SeqCst);
    f.alloc.empty_cache();
    assert_eq!(
        f.backend.host.bytes_in_use(),
        4096,
        "precondition: the backend still holds the block's memory"
    );
    let m = f.alloc.memory_stats(0).unwrap();
    assert_eq!(
        (m.num_device_alloc, m.num_device_free),
        (1, 0),
        "a release the backend failed is counted as a block returned to it"
    );
}

/// A backend whose release of a block waits until the test lets it answer, then answers
/// that exit began (as the driver does once the process exits).
struct HeldRelease {
    host: std::sync::Arc<HostBackend>,
    entered: std::sync::atomic::AtomicBool,
    gate: (std::sync::Mutex<bool>, std::sync::Condvar),
}

impl common::hooked::Hooks for HeldRelease {
    fn host(&self) -> &HostBackend {
        &self.host
    }
    fn release(
        &self,
        _addr: kvhygiene::backend::DevicePtr,
    ) -> Option<Result<(), kvhygiene::backend::BackendError>> {
        self.entered
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let (open, cv) = &self.gate;
        let mut open = open.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
        Some(Err(kvhygiene::backend::BackendError::ShuttingDown))
    }
}

/// While a block's return to the backend is under way, the backend still holds it: it is
/// still reserved. When exit overtakes that return, the block stays held, and no cumulative
/// figure a reader saw goes back: `freed` never counted it, and the segments counted
/// obtained and returned still match the backend calls made. (When the release was counted
/// before the backend call and taken back after, a reader in between saw the bytes freed
/// and no longer reserved, then `freed` go down.)
#[test]
fn a_release_under_way_is_still_reserved_and_one_exit_overtook_takes_back_no_freed_bytes() {
    use std::sync::atomic::Ordering;
    let backend = std::sync::Arc::new(HeldRelease {
        host: HostBackend::new(),
        entered: Default::default(),
        gate: Default::default(),
    });
    let alloc =
        kvhygiene::alloc::Allocator::new(common::hooked::hooked(&backend), manual_config(), None);
    let a = alloc.malloc(4096, 0, S).unwrap();
    alloc.free(a, 4096, 0, S).unwrap();
    alloc.synchronize().unwrap();
    let held = alloc.memory_stats(0).unwrap();
    let releaser = {
        let alloc = alloc.clone();
        std::thread::spawn(move || alloc.empty_cache())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !backend.entered.load(Ordering::SeqCst) {
        assert!(std::time::Instant::now() < deadline, "no release was made");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let during = alloc.memory_stats(0).unwrap();
    *backend.gate.0.lock().unwrap() = true;
    backend.gate.1.notify_all();
    releaser.join().unwrap();
    let after = alloc.memory_stats(0).unwrap();
    assert_eq!(
        during.reserved_bytes.all, held.reserved_bytes.all,
        "read while the backend still held the block"
    );
    assert_eq!(during.segment.all, held.segment.all);
    for (then, now) in [
        (during.reserved_bytes.all, after.reserved_bytes.all),
        (during.segment.all, after.segment.all),
    ] {
        assert!(now.freed >= then.freed, "{now:?} after {then:?}");
        assert_eq!(now.current, then.current, "{now:?} after {then:?}");
    }
    assert_eq!(
        (after.segment.all.allocated, after.segment.all.freed),
        (after.num_device_alloc, after.num_device_free),
        "segments counted as obtained and returned differ from the backend calls made"
    );
    alloc.check_consistency().unwrap();
}
