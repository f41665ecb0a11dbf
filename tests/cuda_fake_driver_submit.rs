//! The CUDA backend on the fake driver (tests/fake_cuda/fake_libcuda.cpp): what a submission
//! may call while the allocator's free path waits for it. Skips with a message when there is
//! no C++ compiler, as tests/cuda_fake_driver.rs does.

#[path = "fake_cuda/mod.rs"]
mod fake_cuda;
#[path = "skip/mod.rs"]
mod skip;

use fake_cuda::{query, start, switch};
use kvhygiene::alloc::Allocator;
use kvhygiene::backend::cuda::CudaBackend;
use kvhygiene::backend::StreamHandle;

/// A private copy of the stand-in (its own dlopen instance, so its switches are its own).
fn instance(name: &str) -> Option<(String, libloading::Library)> {
    fake_cuda::instance("kvh-fake-cuda-submit", name)
}

/// An allocator on the stand-in at `path` whose open batches are submitted after
/// `batch_max_delay_us` (0: at once, from the free itself).
fn allocator(path: &str, batch_max_delay_us: u64) -> Allocator {
    allocator_over(start(path), batch_max_delay_us)
}

fn allocator_over(backend: CudaBackend, batch_max_delay_us: u64) -> Allocator {
    let config = kvhygiene::config::Config {
        batch_max_delay_us,
        ..Default::default()
    };
    Allocator::new(std::sync::Arc::new(backend), config, None)
}

/// [`allocator`] (batches at once) over a backend whose device 0 made no batch slot as it
/// opened: its first batch makes one.
fn allocator_without_first_slot(path: &str, lib: &libloading::Library) -> Allocator {
    allocator_over(fake_cuda::start_without_first_slot(path, lib), 0)
}

macro_rules! fake_or_skip {
    ($name:expr) => {
        match instance($name) {
            Some(x) => x,
            None => return,
        }
    };
}

/// The free path never waits on the device (ARCHITECTURE.md, invariant 3: "Returning memory to
/// the backend (`cuMemFree` synchronises the device) happens after the pool lock is dropped"),
/// and `Backend::submit_scrub` "never blocks on the device". A free whose batch is submitted
/// at once (no batching delay) and whose new batch slot cannot get its page-locked result
/// area must not call `cuMemFree` (here: on the slot's device sums) inside `free`, under the
/// pool lock: the batch is refused for lack of memory and submitted again later either way.
#[test]
fn a_free_whose_batch_slot_cannot_be_pinned_calls_no_cu_mem_free() {
    let (path, lib) = fake_or_skip!("free_no_mem_free");
    let alloc = allocator(&path, 0);
    let s = StreamHandle(0);
    let p = alloc.malloc(4096, 0, s).expect("malloc");
    // The free submits its batch, which makes the backend's first batch slot: device sums
    // (cuMemAlloc), then page-locked results, which fail.
    switch(&lib, "fail_host_allocs", 1);
    let before = query(&lib, "mem_frees", 0);
    alloc.free(p, 4096, 0, s).expect("free");
    let during = query(&lib, "mem_frees", 0) - before;
    alloc.shutdown();
    assert_eq!(
        during, 0,
        "free() called cuMemFree {during} time(s) (a device synchronisation) inside the free \
         path, with the pool lock held"
    );
}

/// Device 0's block, recorded with a stream of device 1 (handle 0xD1001, of device 1's
/// context), is freed with `kvh_free_checked`. The event the backend creates in device 1's
/// context for that wait cannot be created for lack of memory: the backend refuses the batch
/// with out of memory on device 1 (tests/cuda_fake_driver_foreign_oom.rs), and the caller,
/// told that its scrub waits for memory, is told which device ran out: device 1, not the
/// block's device 0, whose memory is not what is short.
#[test]
fn a_checked_free_refused_for_another_device_s_memory_names_that_device() {
    use kvhygiene::alloc::FreeError;
    use kvhygiene::backend::BackendError;
    let (path, lib) = fake_or_skip!("foreign_oom_checked_free");
    // Only the calls below submit batches.
    let alloc = allocator(&path, 10_000_000);
    let s = StreamHandle(7);
    // A first checked free makes the batch slot (and its event) the second one reuses: the
    // next event the backend creates is then the one for device 1's stream.
    let p = alloc.malloc(4096, 0, s).expect("malloc");
    alloc.free_checked(p, 4096, 0, s).expect("first free");
    let q = alloc.malloc(4096, 0, s).expect("malloc");
    assert!(alloc.record_stream(q, StreamHandle(0xD1001)));
    switch(&lib, "fail_event_creates", 1);
    let freed = alloc.free_checked(q, 4096, 0, s);
    alloc.shutdown();
    match freed {
        Err(FreeError::Backend(BackendError::OutOfMemory { device, .. })) => assert_eq!(
            device, 1,
            "the event for device 1's stream could not be created, but the caller is told \
             device {device} is out of memory"
        ),
        other => panic!("expected out of memory on device 1, got {other:?}"),
    }
}

/// A block recorded with a stream that is capturing a CUDA graph (the stand-in's handle
/// 0xC0DE) is freed with `kvh_free_checked` on a stream that is not: the backend refuses the
/// scrub's ordering after the recorded stream (`StreamCapturing` naming 0xC0DE), and the
/// caller is told which stream is capturing: 0xC0DE, not the freeing stream, which is not.
#[test]
fn a_checked_free_deferred_by_a_capturing_recorded_stream_names_that_stream() {
    let (path, _lib) = fake_or_skip!("capturing_recorded_stream");
    assert_checked_free_names_the_capture(&path, 0xC0DE, || {});
}

/// A block allocated and freed (checked) on stream 7, recorded with stream `recorded`, whose
/// scrub is deferred by a capture of `recorded` (`arm` sets the fake driver up after the
/// record): the error names `recorded`.
fn assert_checked_free_names_the_capture(path: &str, recorded: u64, arm: impl FnOnce()) {
    use kvhygiene::alloc::FreeError;
    use kvhygiene::backend::BackendError;
    let alloc = allocator(path, 10_000_000);
    let s = StreamHandle(7);
    let p = alloc.malloc(4096, 0, s).expect("malloc");
    assert!(alloc.record_stream(p, StreamHandle(recorded)));
    arm();
    let freed = alloc.free_checked(p, 4096, 0, s);
    alloc.shutdown();
    match freed {
        Err(FreeError::Backend(BackendError::StreamCapturing { stream, what })) => assert_eq!(
            stream, recorded,
            "the recorded stream {recorded:#x} is capturing, but the caller is told stream \
             {stream:#x} is ({what})"
        ),
        other => panic!("expected the capture of stream {recorded:#x}, got {other:?}"),
    }
}

/// The same when the capture of the recorded stream is found only by the driver's refusal of
/// the ordering after it: stream 9 was not capturing when asked, then its event record was
/// captured (CUDA_ERROR_CAPTURED_EVENT on the scrub stream's wait for it). The batch is
/// deferred, and the caller is told that stream 9 is capturing, not the freeing stream 7,
/// which is not.
#[test]
fn a_checked_free_deferred_by_a_capture_refusing_the_wait_for_a_recorded_stream_names_that_stream()
{
    let (path, lib) = fake_or_skip!("refused_wait_names_recorded_stream");
    assert_checked_free_names_the_capture(&path, 9, || switch(&lib, "fail_next_wait", 907));
}

/// While page-locked memory runs out, every try to build a batch slot fails after its device
/// sums were allocated: the sums are kept for the next try, not freed (a device
/// synchronisation on the free path) and not allocated again (memory growing with each try).
/// Once memory is back, the slot is built around them, and the blocks are scrubbed.
#[test]
fn slots_that_cannot_be_pinned_keep_their_device_sums_for_the_next_try() {
    let (path, lib) = fake_or_skip!("spare_sums");
    let alloc = allocator_without_first_slot(&path, &lib);
    let s = StreamHandle(0);
    let blocks: Vec<u64> = (0..3)
        .map(|_| alloc.malloc(4096, 0, s).expect("malloc"))
        .collect();
    switch(&lib, "fail_host_allocs", 1000);
    let (allocs, frees) = (query(&lib, "mem_allocs", 0), query(&lib, "mem_frees", 0));
    for &p in &blocks {
        alloc.free(p, 4096, 0, s).expect("free");
    }
    assert!(
        alloc.synchronize().is_err(),
        "the batch cannot be queued yet"
    );
    let tries = query(&lib, "host_allocs", 0);
    assert_eq!(
        (
            query(&lib, "mem_allocs", 0) - allocs,
            query(&lib, "mem_frees", 0) - frees
        ),
        (1, 0),
        "device sums allocated and freed over {tries} tries to build a slot"
    );
    switch(&lib, "fail_host_allocs", 0);
    alloc
        .synchronize()
        .expect("synchronize once memory is back");
    let c = alloc.stats().counters;
    alloc.shutdown();
    assert_eq!(c.verifications_passed, 3, "{c:?}");
    assert_eq!(
        query(&lib, "mem_allocs", 0) - allocs,
        1,
        "the slot built once memory was back took the kept sums"
    );
}

/// `count` segments of 64 bytes in a new allocation of device 0, each in a chunk of its own.
fn small_segments(
    b: &CudaBackend,
    count: usize,
    seed: u64,
) -> (u64, Vec<kvhygiene::backend::ScrubSegment>) {
    use kvhygiene::backend::Backend;
    let base = b.allocate(0, count as u64 * 64).expect("allocate");
    let segments = (0..count as u64)
        .map(|i| kvhygiene::backend::ScrubSegment {
            addr: base + i * 64,
            len: 64,
            seed: seed + i,
        })
        .collect();
    (base, segments)
}

fn scrub_batch(segments: Vec<kvhygiene::backend::ScrubSegment>) -> kvhygiene::backend::ScrubBatch {
    kvhygiene::backend::ScrubBatch {
        device: 0,
        stream: StreamHandle(0),
        wait_streams: Vec::new(),
        segments,
        options: kvhygiene::backend::ScrubOptions {
            samples: 8,
            full_verify: false,
            double_pass: false,
        },
    }
}

/// A slot built around spare buffers larger than its own batch needs holds what those buffers
/// hold (`Slot::segments`: "Segments the sums and results hold"; `item_capacity`: the work
/// items its area holds). A batch of 300 segments (a slot of 512 segments and 512 work items)
/// fails at its completion event and leaves its sums, results and work item area as spare
/// buffers; a batch of 121 segments then builds its slot from all three. Once that slot is
/// idle, the 300-segment batch fits its buffers and is submitted again on it: no new device
/// sums, no new page-locked memory, while memory is short.
#[test]
fn a_slot_built_from_larger_spare_buffers_serves_the_batch_they_were_made_for() {
    use kvhygiene::backend::Backend;
    let (path, lib) = fake_or_skip!("spare_capacity");
    let b = start(&path);
    let (big_base, big) = small_segments(&b, 300, 1000);
    let (mid_base, mid) = small_segments(&b, 121, 5000);
    switch(&lib, "fail_event_creates", 1);
    // SAFETY: the segments lie in allocations made above, released only at the end.
    let refused = unsafe { b.submit_scrub(scrub_batch(big.clone())) };
    assert!(
        matches!(
            refused,
            Err(kvhygiene::backend::BackendError::OutOfMemory { .. })
        ),
        "the first try fails at its event: {:?}",
        refused.err()
    );
    // SAFETY: as above.
    let mut ticket = unsafe { b.submit_scrub(scrub_batch(mid)) }.expect("121 segments");
    assert_eq!(ticket.wait().expect("wait").len(), 121);
    drop(ticket);
    let (allocs, pinned) = (query(&lib, "mem_allocs", 0), query(&lib, "host_allocs", 0));
    // SAFETY: as above.
    let mut ticket = unsafe { b.submit_scrub(scrub_batch(big)) }.expect("300 segments");
    assert_eq!(ticket.wait().expect("wait").len(), 300);
    drop(ticket);
    let grown = (
        query(&lib, "mem_allocs", 0) - allocs,
        query(&lib, "host_allocs", 0) - pinned,
    );
    b.release(0, big_base, 300 * 64).expect("release");
    b.release(0, mid_base, 121 * 64).expect("release");
    b.shutdown();
    assert_eq!(
        grown,
        (0, 0),
        "the 300-segment batch made a new slot ({} cuMemAlloc, {} cuMemHostAlloc) though the \
         idle slot's buffers, made for it, hold 512 segments and 512 work items",
        grown.0,
        grown.1
    );
}

/// Page-locked memory whose mapping into the device fails is not freed inside the free path
/// (`cuMemFreeHost` synchronises the device too): it is freed at the device's next release,
/// which the pool makes with its lock dropped.
#[test]
fn pages_whose_mapping_fails_are_freed_at_the_next_release_not_in_the_free_path() {
    let (path, lib) = fake_or_skip!("host_map_fails");
    let alloc = allocator_without_first_slot(&path, &lib);
    let s = StreamHandle(0);
    let p = alloc.malloc(4096, 0, s).expect("malloc");
    switch(&lib, "fail_host_maps", 1);
    let before = query(&lib, "mem_free_hosts", 0);
    alloc.free(p, 4096, 0, s).expect("free");
    assert_eq!(
        query(&lib, "mem_free_hosts", 0) - before,
        0,
        "cuMemFreeHost called inside free()"
    );
    // That batch failed (a driver error: its block is kept out of use); another block is
    // freed, and empty_cache scrubs it and releases it.
    let q = alloc.malloc(4096, 0, s).expect("malloc");
    alloc.free(q, 4096, 0, s).expect("free");
    alloc.empty_cache();
    assert!(alloc.stats().counters.released >= 1);
    let freed = query(&lib, "mem_free_hosts", 0) - before;
    alloc.shutdown();
    assert_eq!(
        freed, 1,
        "the unmapped pages were freed once, at the release"
    );
}

/// One segment of `len` bytes spanning chunks (its batch needs the publish launch).
fn spanning_segment(
    b: &CudaBackend,
    len: u64,
    seed: u64,
) -> (u64, Vec<kvhygiene::backend::ScrubSegment>) {
    use kvhygiene::backend::Backend;
    let base = b.allocate(0, len).expect("allocate");
    (
        base,
        vec![kvhygiene::backend::ScrubSegment {
            addr: base,
            len,
            seed,
        }],
    )
}

/// A submission that fails after it queued work (its publish launch fails after the scrub
/// launch) gives its slot back marked busy until that work completes: while the work is not
/// complete, the next batch gets a slot of its own rather than the one whose kernels may still
/// write its results.
#[test]
fn a_failed_submission_s_slot_is_reused_only_after_its_queued_work_completes() {
    use kvhygiene::backend::Backend;
    let (path, lib) = fake_or_skip!("failed_slot_busy");
    let b = start(&path);
    let (base, seg) = spanning_segment(&b, 100_000, 40);
    switch(&lib, "set_pending_queries", 1000);
    switch(&lib, "fail_launch", 2);
    // SAFETY: the segment lies in an allocation made above, released only at the end.
    let refused = unsafe { b.submit_scrub(scrub_batch(seg.clone())) };
    assert!(refused.is_err(), "the publish launch failed");
    let slots = query(&lib, "host_allocs", 0);
    // SAFETY: as above.
    let mut ticket = unsafe { b.submit_scrub(scrub_batch(seg.clone())) }.expect("submit");
    assert!(
        query(&lib, "host_allocs", 0) > slots,
        "the slot of the failed submission was reused before its queued work completed"
    );
    switch(&lib, "set_pending_queries", 0);
    let results = ticket.wait().expect("wait");
    assert!(
        results[0].checked > 0 && results[0].nonzero == 0,
        "{results:?}"
    );
    drop(ticket);
    b.release(0, base, 100_000).expect("release");
}

/// A submission that fails part way gives its slot back: once its queued work completed, the
/// next batch runs on it, with no new device sums or page-locked memory.
#[test]
fn a_failed_submission_s_slot_serves_the_next_batch() {
    use kvhygiene::backend::Backend;
    let (path, lib) = fake_or_skip!("failed_slot_reused");
    let b = start(&path);
    let (base, seg) = spanning_segment(&b, 100_000, 41);
    switch(&lib, "fail_launch", 2);
    // SAFETY: the segment lies in an allocation made above, released only at the end.
    let refused = unsafe { b.submit_scrub(scrub_batch(seg.clone())) };
    assert!(refused.is_err(), "the publish launch failed");
    let (allocs, pinned) = (query(&lib, "mem_allocs", 0), query(&lib, "host_allocs", 0));
    // SAFETY: as above.
    let mut ticket = unsafe { b.submit_scrub(scrub_batch(seg)) }.expect("submit");
    let results = ticket.wait().expect("wait");
    drop(ticket);
    assert!(
        results[0].checked > 0 && results[0].nonzero == 0,
        "{results:?}"
    );
    assert_eq!(
        (
            query(&lib, "mem_allocs", 0) - allocs,
            query(&lib, "host_allocs", 0) - pinned
        ),
        (0, 0),
        "the failed submission's slot was not given back: the next batch made a new one"
    );
    b.release(0, base, 100_000).expect("release");
}

/// An idle slot whose completion event cannot be queried (the driver reports an error) may
/// still be in use: it is never reused; the next batch gets a new slot and runs.
#[test]
fn a_slot_whose_completion_event_errs_is_not_reused() {
    use kvhygiene::backend::Backend;
    let (path, lib) = fake_or_skip!("event_query_fails");
    let b = start(&path);
    let (base, segs) = small_segments(&b, 4, 50);
    // SAFETY: the segments lie in an allocation made above, released only at the end.
    let mut ticket = unsafe { b.submit_scrub(scrub_batch(segs.clone())) }.expect("submit");
    ticket.wait().expect("wait");
    drop(ticket);
    let slots = query(&lib, "host_allocs", 0);
    switch(&lib, "fail_event_queries", 1);
    // SAFETY: as above.
    let mut ticket = unsafe { b.submit_scrub(scrub_batch(segs)) }.expect("submit");
    let results = ticket.wait().expect("wait");
    drop(ticket);
    assert!(
        results.iter().all(|r| r.checked > 0 && r.nonzero == 0),
        "{results:?}"
    );
    assert!(
        query(&lib, "host_allocs", 0) > slots,
        "a slot whose completion event reported an error was reused"
    );
    b.release(0, base, 4 * 64).expect("release");
}

/// A slot holds as many segments as the smaller of its device sums and its result area. Here
/// a slot is built around spare device sums of 1024 segments (left by a slot whose result area
/// could not be pinned) with a new result area of 256 segments and spare work items for 1024
/// chunks; a later batch of 257 segments does not fit its result area and gets a slot of its
/// own (new page-locked memory), and verifies.
#[test]
fn a_slot_holds_no_more_segments_than_its_result_area() {
    use kvhygiene::backend::Backend;
    let (path, lib) = fake_or_skip!("slot_capacity");
    let b = fake_cuda::start_without_first_slot(&path, &lib);
    let (big_base, big) = small_segments(&b, 600, 100);
    let (small_base, small) = small_segments(&b, 10, 2000);
    let (mid_base, mid) = small_segments(&b, 130, 3000);
    let (c_base, c) = small_segments(&b, 257, 4000);
    let submit = |segs: &[kvhygiene::backend::ScrubSegment]| {
        // SAFETY: the segments lie in allocations made above, released only at the end.
        unsafe { b.submit_scrub(scrub_batch(segs.to_vec())) }
    };
    // Spare sums, results and work items of 1024 (a slot's event could not be created).
    switch(&lib, "fail_event_creates", 1);
    assert!(submit(&big).is_err());
    // An inline batch takes the spare sums and results (not the work items).
    submit(&small).expect("10 segments").wait().expect("wait");
    // Spare sums of 1024 again: the result area could not be pinned (nor a larger work item
    // area for the idle slot of the batch of 10, which holds 1024 results).
    switch(&lib, "fail_host_allocs", 2);
    assert!(submit(&big).is_err());
    // 130 segments: the spare sums (1024) and work items (1024), a new result area of 256.
    submit(&mid).expect("130 segments").wait().expect("wait");
    let pinned = query(&lib, "host_allocs", 0);
    let results = submit(&c).expect("257 segments").wait().expect("wait");
    assert!(
        query(&lib, "host_allocs", 0) > pinned,
        "257 segments were submitted on a slot whose result area holds 256"
    );
    assert_eq!(results.len(), 257);
    assert!(
        results.iter().all(|r| r.checked > 0 && r.nonzero == 0),
        "{results:?}"
    );
    for (base, n) in [
        (big_base, 600),
        (small_base, 10),
        (mid_base, 130),
        (c_base, 257),
    ] {
        b.release(0, base, n * 64).expect("release");
    }
}

/// `kvh_scrub_blocks` on a stream other than the cache's (stream 7; the cache was allocated on
/// stream 5), whose batch the driver refuses part way with a capture error (the completion
/// event's record fails with 906, CUDA_ERROR_STREAM_CAPTURE_IMPLICIT, after the scrub kernel
/// was launched): the kernel was queued on stream 7 and writes the cache, so the call fails
/// as a failed scrub (the driver's error), not as a capture refused before any launch
/// (`StreamCapturing`). As after any other failure that may have launched work, stream 7 is
/// recorded on the cache's allocation, so the scrub of its later free waits for stream 7's
/// work (invariant 2) and cannot be verified, and the memory handed to another tenant, before
/// the kernel queued there has run.
#[test]
fn a_kv_scrub_refused_by_a_capture_after_its_launch_orders_the_later_free_after_it() {
    use kvhygiene::alloc::{KvLayout, KvScrubError};
    use kvhygiene::backend::BackendError;
    let (path, lib) = fake_or_skip!("kv_capture_after_launch");
    let alloc = allocator(&path, 0);
    let cache_stream = StreamHandle(5);
    let kv_stream = StreamHandle(7);
    let block = 256u64;
    let blocks = 8u64;
    let len = 2 * blocks * block;
    let a = alloc.malloc(len as i64, 0, cache_stream).expect("malloc");
    // SAFETY: the stand-in's device memory is host memory; `a` holds `len` bytes.
    unsafe { std::ptr::write_bytes(a as *mut u8, 0x5A, len as usize) };
    let layout = KvLayout {
        regions: vec![a, a + blocks * block],
        block_bytes: block,
        block_stride: block,
        blocks_per_region: blocks,
    };
    switch(&lib, "fail_record_after_scrub", 906);
    let scrubbed = alloc.scrub_kv_blocks(&layout, &[0, 1], 0, kv_stream);
    assert!(
        matches!(
            scrubbed,
            Err(KvScrubError::Backend {
                error: BackendError::Driver { code: 906, .. },
                ..
            })
        ),
        "{scrubbed:?}"
    );
    assert_ne!(
        query(&lib, "last_scrub_grid", 0),
        0,
        "the scrub kernel of the refused batch was launched on stream 7"
    );
    alloc.free(a, len as i64, 0, cache_stream).expect("free");
    let _ = alloc.synchronize();
    let waited = query(&lib, "scrub_waited_for", 7);
    alloc.shutdown();
    assert!(
        waited >= 1,
        "the free's scrub on stream 5 did not wait for stream 7, where the refused KV scrub's \
         kernel was queued (waits for it: {waited})"
    );
}

/// A stream recorded on an allocation must stay valid until the block's scrub was
/// submitted, or until the application said it is about to destroy it (`kvh_forget_stream`,
/// include/kvhygiene.h): an application that forgets it after the free, then destroys it,
/// never has the driver called on that handle again, also when the free's scrub is batched
/// and submitted later.
#[test]
fn a_recorded_stream_forgotten_and_destroyed_after_the_free_is_never_used_again() {
    let (path, lib) = fake_or_skip!("recorded_stream_destroyed");
    // The free's batch stays open until `synchronize` submits it.
    let alloc = allocator(&path, 10_000_000);
    let s = StreamHandle(7);
    let p = alloc.malloc(4096, 0, s).expect("malloc");
    assert!(alloc.record_stream(p, StreamHandle(9)));
    alloc.free(p, 4096, 0, s).expect("free");
    // The application forgets the recorded stream after the free, then destroys it.
    alloc.forget_stream(StreamHandle(9));
    switch(&lib, "destroy_stream", 9);
    let synced = alloc.synchronize();
    let uses = query(&lib, "destroyed_stream_uses", 0);
    alloc.shutdown();
    assert_eq!(
        uses, 0,
        "{uses} driver call(s) on a recorded stream forgotten and destroyed after the free \
         returned (synchronize returned {synced:?})"
    );
}

/// ARCHITECTURE.md: "during CUDA graph capture nothing is launched into a capturing stream and
/// the driver allocator is not called". A pool miss whose capture query said "not capturing"
/// gets fresh memory, and the zeroing of that memory is then refused by a capture that began
/// since (CUDA_ERROR_STREAM_CAPTURE_IMPLICIT: a global-mode capture on another stream). The
/// allocation fails as during a capture; the memory it got is not handed back with
/// `cuMemFree` (a device synchronisation, which a capture under way forbids) while that
/// capture is known to be active. It is kept, never handed out unzeroed: its scrub runs once
/// the capture has ended, and the next allocation of its size gets it without a new
/// `cuMemAlloc`.
#[test]
fn a_fresh_allocation_whose_zeroing_a_capture_refuses_calls_no_cu_mem_free() {
    let (path, lib) = fake_or_skip!("zeroing_refused_no_mem_free");
    let alloc = allocator(&path, 0);
    let s = StreamHandle(0);
    switch(&lib, "fail_next_memset", 906);
    let before = query(&lib, "mem_frees", 0);
    let got = alloc.malloc(4096, 0, s);
    let during = query(&lib, "mem_frees", 0) - before;
    assert!(got.is_err(), "the allocation succeeded: {got:?}");
    assert_eq!(
        during, 0,
        "malloc called cuMemFree {during} time(s) after the backend said a capture is active \
         ({got:?})"
    );
    alloc.check_consistency().unwrap();

    alloc.synchronize().unwrap();
    let allocs = query(&lib, "mem_allocs", 0);
    let again = alloc.malloc(4096, 0, s).unwrap();
    assert_eq!(
        query(&lib, "mem_allocs", 0),
        allocs,
        "the kept memory was not handed out once its scrub ran"
    );
    let stats = alloc.stats().counters;
    assert_eq!((stats.allocations, stats.pool_hits), (1, 1), "{stats:?}");
    alloc.free(again, 4096, 0, s).unwrap();
    alloc.synchronize().unwrap();
    alloc.check_consistency().unwrap();
    alloc.shutdown();
}

/// A batch whose first call on its stream (clearing the new slot's device sums) is refused by
/// a capture that began after the capture query is deferred, and nothing of it was queued: the
/// slot's buffers are untouched and its last batch (none) is complete. The slot stays the
/// device's: the next batch runs on it, with no new device sums or page-locked memory, rather
/// than every such refusal costing a slot for the life of the process.
#[test]
fn a_slot_whose_batch_a_capture_refused_before_any_work_serves_the_next_batch() {
    use kvhygiene::backend::{Backend, BackendError};
    let (path, lib) = fake_or_skip!("capture_refused_slot_kept");
    let b = start(&path);
    let (base, segs) = small_segments(&b, 4, 60);
    let (allocs, pinned) = (query(&lib, "mem_allocs", 0), query(&lib, "host_allocs", 0));
    switch(&lib, "fail_next_memset", 906);
    // SAFETY: the segments lie in an allocation made above, released only at the end.
    let refused = unsafe { b.submit_scrub(scrub_batch(segs.clone())) };
    assert!(
        matches!(refused, Err(BackendError::StreamCapturing { .. })),
        "the refused clear defers the batch: {:?}",
        refused.err()
    );
    // SAFETY: as above.
    let mut ticket = unsafe { b.submit_scrub(scrub_batch(segs)) }.expect("submit");
    let results = ticket.wait().expect("wait");
    drop(ticket);
    let grown = (
        query(&lib, "mem_allocs", 0) - allocs,
        query(&lib, "host_allocs", 0) - pinned,
    );
    b.release(0, base, 4 * 64).expect("release");
    b.shutdown();
    assert!(
        results.iter().all(|r| r.checked > 0 && r.nonzero == 0),
        "{results:?}"
    );
    assert_eq!(
        grown,
        (0, 0),
        "the slot of the batch the capture refused was lost: the next batch made a new one \
         ({} cuMemAlloc, {} cuMemHostAlloc)",
        grown.0,
        grown.1
    );
}
