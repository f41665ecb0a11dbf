//! The CUDA backend's host side through the `Backend` trait, without a GPU: the driver is
//! tests/fake_cuda/fake_libcuda.cpp, a host stand-in for libcuda.so.1 compiled here with the
//! system C++ compiler (these tests skip with a message when there is none). It runs host ports
//! of the two kernels, so what is checked is everything around them: loading, contexts made
//! current on every thread, descriptor layout, kernel parameters, result slots, events, slot
//! reuse, capture refusal, error mapping, shutdown. The kernels themselves are checked on a GPU
//! by tests/gpu_kernel.rs, with the same helpers.

#[path = "backend_common/mod.rs"]
mod common;
#[path = "fake_cuda/mod.rs"]
mod fake_cuda;
#[path = "skip/mod.rs"]
mod skip;

use std::sync::OnceLock;

use common::{batch, place, random_layout, run, scrub_and_check, submit, MIB, SAMPLED};
use fake_cuda::{query, start, switch};
use kvhygiene::backend::cuda::{kernel, probe_library, CudaBackend, ItemGrid, Probe};
use kvhygiene::backend::{
    Backend, BackendError, BackendKind, ScrubOptions, ScrubSegment, StreamHandle,
};

/// A private copy of the stand-in (its own dlopen instance, so its switches are its own).
fn instance(name: &str) -> Option<(String, libloading::Library)> {
    fake_cuda::instance("kvh-fake-cuda", name)
}

fn calls(lib: &libloading::Library) -> i32 {
    // SAFETY: `int fake_cuda_calls(void)`.
    unsafe {
        let f = lib
            .get::<unsafe extern "C" fn() -> i32>(b"fake_cuda_calls\0")
            .expect("calls");
        f()
    }
}

macro_rules! fake_or_skip {
    ($name:expr) => {
        match instance($name) {
            Some(x) => x,
            None => return,
        }
    };
}

#[test]
fn starts_and_picks_the_sass_for_the_device() {
    let (path, _lib) = fake_or_skip!("start");
    let b = start(&path);
    assert_eq!(b.kind(), BackendKind::Cuda);
    assert_eq!(b.device_count(), 2);
    assert_eq!(b.driver_version().expect("version"), 12040);
    let image = b.image_in_use(0).expect("device 0");
    // The stand-in reports compute capability 9.0.
    if kernel::KERNEL_ORIGIN.starts_with("nvrtc") {
        assert!(image.starts_with("sm_90 cubin"), "{image}");
    } else if kernel::KERNEL_ORIGIN.starts_with("nvcc") {
        assert!(image.starts_with("fatbin"), "{image}");
    } else {
        assert!(image.starts_with("compute_80 PTX"), "{image}");
    }
}

/// At start-up the backend opens one device, to report a kernel image that does not load
/// before the first allocation: the device of the calling thread's current context (a worker
/// of a multi-GPU job has made its own current), and device 0 only without one. A worker of
/// device 1 creates no context on device 0.
#[test]
fn the_start_up_opens_the_device_the_thread_works_on() {
    let (path, lib) = fake_or_skip!("start-device");
    switch(&lib, "make_current", 1);
    let _b = start(&path);
    assert_eq!(
        (query(&lib, "retains", 0), query(&lib, "retains", 1)),
        (0, 1),
        "retains of device 0's and device 1's primary contexts"
    );
    let (path, lib) = fake_or_skip!("start-no-device");
    let _b = start(&path);
    assert_eq!(
        (query(&lib, "retains", 0), query(&lib, "retains", 1)),
        (1, 0)
    );
}

#[test]
fn scrubs_through_the_trait_at_every_size_and_offset() {
    let (path, _lib) = fake_or_skip!("sizes");
    let b = start(&path);
    for len in [
        1u64,
        7,
        8,
        9,
        17,
        4099,
        65_535,
        65_536,
        65_537,
        3 * 65_536 + 11,
        MIB + 5,
    ] {
        for off in [0u64, 1, 3, 13] {
            scrub_and_check(&b, len + off + 64, &[(off, len)], SAMPLED);
        }
    }
}

#[test]
fn batches_full_verification_and_double_pass() {
    let (path, _lib) = fake_or_skip!("batches");
    let b = start(&path);
    for count in [1usize, 17, 1000, 3000] {
        let (segments, total) = random_layout(count, 5000, count as u64);
        scrub_and_check(&b, total, &segments, SAMPLED);
    }
    // Work items (more segments than travel inline) with segments that span chunks, so that
    // the publish launch runs too; then the same slots again, inline.
    for (count, max_len) in [(200usize, 200_000u64), (121, 70_000), (120, 70_000)] {
        let (segments, total) = random_layout(count, max_len, count as u64 + 1);
        scrub_and_check(&b, total, &segments, SAMPLED);
    }
    let (segments, total) = random_layout(40, 70_000, 9);
    for (full, double) in [(true, false), (false, true), (true, true)] {
        let opts = ScrubOptions {
            samples: 16,
            full_verify: full,
            double_pass: double,
        };
        scrub_and_check(&b, total, &segments, opts);
    }
}

#[test]
fn a_skipped_segment_is_caught() {
    let (path, _lib) = fake_or_skip!("skip");
    let b = start(&path);
    common::skipped_segment_is_caught(&b, &|i| b.inject_skip_zero(i));
    common::sampled_words_are_the_host_rules(&b, &|i| b.inject_skip_zero(i));
}

/// Under `ItemGrid::Resident`, batches with work items run on `kvh_scrub_strided` with a grid
/// of at most the device's resident blocks of that kernel (the stand-in: 4 SMs x 2), each block
/// taking many chunks, in groups of eight as the kernel does; everything `scrub_and_check` and
/// the fault injection check still holds. Inline batches keep one block per chunk.
#[test]
fn the_resident_grid_scrubs_what_the_per_chunk_grid_does() {
    let (path, lib) = fake_or_skip!("resident");
    let b = start(&path);
    let last_grid = || query(&lib, "last_scrub_grid", 0);
    assert_eq!(b.strided_blocks(0).expect("device 0"), 8);
    let (segments, total) = random_layout(4096, 3000, 5);
    scrub_and_check(&b, total, &segments, SAMPLED);
    assert_eq!(
        last_grid(),
        4096,
        "the default: one kvh_scrub block per chunk"
    );

    b.set_item_grid(ItemGrid::Resident);
    scrub_and_check(&b, total, &segments, SAMPLED);
    assert_eq!(
        last_grid(),
        -8,
        "kvh_scrub_strided, 512 chunks per block in 64 groups"
    );
    common::item_batches_are_scrubbed(&b);
    common::skipped_segment_is_caught(&b, &|i| b.inject_skip_zero(i));
    common::sampled_words_are_the_host_rules(&b, &|i| b.inject_skip_zero(i));
    scrub_and_check(&b, 80_000, &[(1, 70_000)], SAMPLED);
    assert_eq!(
        last_grid(),
        3,
        "an inline batch: one kvh_scrub block per 32 KiB chunk"
    );
    let (segments, total) = random_layout(121, 100, 6);
    scrub_and_check(&b, total, &segments, SAMPLED);
    assert_eq!(
        last_grid(),
        -8,
        "121 one-chunk segments: 8 blocks of 16 or 15"
    );

    b.set_item_grid(ItemGrid::PerChunk);
    let (segments, total) = random_layout(121, 100, 7);
    scrub_and_check(&b, total, &segments, SAMPLED);
    assert_eq!(last_grid(), 121);
}

/// A device whose occupancy the driver cannot report runs batches with work items on
/// `kvh_scrub` even under `ItemGrid::Resident`: the shape is a preference, never a failure.
#[test]
fn without_an_occupancy_figure_the_resident_grid_falls_back_to_one_block_per_chunk() {
    let (path, lib) = fake_or_skip!("no-occupancy");
    switch(&lib, "fail_occupancy", 1);
    let b = start(&path);
    assert_eq!(b.strided_blocks(0).expect("device 0"), 0);
    b.set_item_grid(ItemGrid::Resident);
    let (segments, total) = random_layout(500, 3000, 8);
    scrub_and_check(&b, total, &segments, SAMPLED);
    assert_eq!(query(&lib, "last_scrub_grid", 0), 500);
}

#[test]
fn kv_cache_blocks_are_scrubbed_through_the_allocator() {
    let (path, _lib) = fake_or_skip!("kv_blocks");
    common::kv_blocks_are_scrubbed(std::sync::Arc::new(start(&path)));
}

#[test]
fn every_entry_point_makes_the_context_current_on_its_thread() {
    // The stand-in fails every call made without the primary context current on the calling
    // thread, as PyTorch's freeing threads would leave it.
    let (path, _lib) = fake_or_skip!("threads");
    let b = start(&path);
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let b = b.clone();
            std::thread::spawn(move || {
                let (segments, total) = random_layout(50, 3000, t);
                scrub_and_check(&b, total, &segments, SAMPLED);
                let p = b.allocate(0, 64).expect("allocate");
                b.zero_fresh(0, p, 64, StreamHandle(0)).expect("zero_fresh");
                b.release(0, p, 64).expect("release");
                assert!(!b.is_capturing(1, StreamHandle(0)).expect("device 1"));
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
}

fn current_context(lib: &libloading::Library, make_foreign: i32) -> i32 {
    query(lib, "use_foreign_context", make_foreign)
}

#[test]
fn the_callers_current_context_is_restored() {
    let (path, lib) = fake_or_skip!("restore");
    let b = start(&path);
    std::thread::spawn(move || {
        // A thread with no current context keeps none.
        assert_eq!(current_context(&lib, 0), 0);
        let p = b.allocate(0, 4096).expect("allocate");
        assert_eq!(
            current_context(&lib, 0),
            0,
            "kvhygiene's context was left current"
        );
        // A thread working on another context (PyTorch's current device) keeps it.
        assert_eq!(current_context(&lib, 1), 1);
        let results = run(
            &b,
            batch(
                vec![ScrubSegment {
                    addr: p,
                    len: 4096,
                    seed: 5,
                }],
                SAMPLED,
            ),
        );
        assert_eq!(results[0].checked, 64);
        b.release(0, p, 4096).expect("release");
        assert_eq!(
            current_context(&lib, 0),
            1,
            "the caller's context was not restored"
        );
    })
    .join()
    .expect("thread");
}

#[test]
fn poll_reports_pending_until_the_event_completes() {
    let (path, lib) = fake_or_skip!("poll");
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    switch(&lib, "set_pending_queries", 3);
    let seg = ScrubSegment {
        addr: base,
        len: 4096,
        seed: 1,
    };
    let mut ticket = submit(&b, batch(vec![seg], SAMPLED)).expect("submit");
    for _ in 0..3 {
        assert_eq!(ticket.poll().expect("poll"), None);
    }
    let results = ticket.poll().expect("poll").expect("complete");
    assert_eq!(results[0].checked, 64);
    assert_eq!(
        ticket.wait().expect("wait"),
        results,
        "results stay readable"
    );
    // Abandoned tickets: their slots are reused only after their events complete. With every
    // new event pending, the first batch reuses the completed slot above and each of the
    // other four needs a slot of its own.
    switch(&lib, "set_pending_queries", 1000);
    let slots_before = query(&lib, "host_allocs", 0);
    for _ in 0..5 {
        drop(submit(&b, batch(vec![seg], SAMPLED)).expect("submit"));
    }
    assert!(
        query(&lib, "host_allocs", 0) - slots_before >= 4,
        "a slot was reused before its batch completed"
    );
    switch(&lib, "set_pending_queries", 0);
    assert_eq!(run(&b, batch(vec![seg], SAMPLED))[0].nonzero, 0);
    b.release(0, base, 4096).expect("release");
}

/// A slot that cannot be allocated fails the submission, and the next one succeeds.
#[test]
fn a_failed_slot_allocation_is_reported_and_recovered() {
    let (path, lib) = fake_or_skip!("slot_oom");
    let b = fake_cuda::start_without_first_slot(&path, &lib);
    let (segments, total) = random_layout(8, 5000, 3);
    let base = b.allocate(0, total).expect("allocate");
    switch(&lib, "fail_host_allocs", 1);
    match submit(&b, batch(place(base, &segments), SAMPLED)) {
        // Out of memory: the pool keeps the blocks and submits them again later.
        Err(e) => assert!(e.to_string().starts_with("out of memory"), "{e}"),
        Ok(_) => panic!("a batch was submitted without its slot"),
    }
    b.release(0, base, total).expect("release");
    scrub_and_check(&b, total, &segments, SAMPLED);
}

/// The publish launch fails after the scrub launch added to the slot's sums: the submission
/// fails, and the next batch on that slot starts from cleared sums (its counts are not
/// doubled).
#[test]
fn sums_left_by_a_failed_batch_are_cleared_before_the_next() {
    let (path, lib) = fake_or_skip!("dirty_sums");
    let b = start(&path);
    // Segments spanning chunks, so the batch needs the publish launch.
    let segments = [(1u64, 100_000u64), (200_003, 70_001)];
    let total = 300_000;
    let base = b.allocate(0, total).expect("allocate");
    switch(&lib, "fail_launch", 2);
    match submit(&b, batch(place(base, &segments), SAMPLED)) {
        Err(e) => assert!(e.to_string().contains("cuLaunchKernel"), "{e}"),
        Ok(_) => panic!("the failed publish launch was not reported"),
    }
    b.release(0, base, total).expect("release");
    let results = scrub_and_check(&b, total, &segments, SAMPLED);
    assert!(results.iter().all(|r| r.checked == 64), "{results:?}");
}

#[test]
fn capturing_streams_are_refused_not_captured() {
    let (path, _lib) = fake_or_skip!("capture");
    let b = start(&path);
    let capturing = StreamHandle(0xC0DE);
    assert!(b.is_capturing(0, capturing).expect("status"));
    let base = b.allocate(0, 256).expect("allocate");
    let mut scrub = batch(
        vec![ScrubSegment {
            addr: base,
            len: 256,
            seed: 0,
        }],
        SAMPLED,
    );
    scrub.stream = capturing;
    match submit(&b, scrub) {
        Err(BackendError::StreamCapturing { stream, .. }) => assert_eq!(stream, 0xC0DE),
        Err(e) => panic!("expected StreamCapturing, got {e}"),
        Ok(_) => panic!("a scrub was enqueued on a capturing stream"),
    }
    assert!(matches!(
        b.zero_fresh(0, base, 256, capturing),
        Err(BackendError::StreamCapturing { .. })
    ));
    // A recorded (wait) stream under capture is refused too, and the slot stays usable.
    let mut scrub = batch(
        vec![ScrubSegment {
            addr: base,
            len: 256,
            seed: 0,
        }],
        SAMPLED,
    );
    scrub.wait_streams = vec![StreamHandle(7), capturing];
    assert!(matches!(
        submit(&b, scrub.clone()),
        Err(BackendError::StreamCapturing { stream: 0xC0DE, .. })
    ));
    scrub.wait_streams = vec![StreamHandle(7)];
    assert_eq!(run(&b, scrub)[0].checked, 32);
}

#[test]
fn errors_keep_their_meaning() {
    let (path, _lib) = fake_or_skip!("errors");
    let b = start(&path);
    assert_eq!(
        b.allocate(0, 1 << 41),
        Err(BackendError::OutOfMemory {
            device: 0,
            requested: 1 << 41
        })
    );
    assert_eq!(
        b.allocate(2, 16),
        Err(BackendError::InvalidDevice {
            device: 2,
            count: 2
        })
    );
    assert!(run(&b, batch(Vec::new(), SAMPLED)).is_empty());
}

#[test]
fn a_driver_that_fails_is_broken_never_absent() {
    let (path, lib) = fake_or_skip!("noinit");
    switch(&lib, "set_init_result", 100);
    // SAFETY: 1. the test suite's stand-in of the driver (tests/fake_cuda).
    match unsafe { probe_library(&path) } {
        Probe::Broken(BackendError::Driver { call, code, name }) => {
            assert_eq!(
                (call, code, name.as_str()),
                ("cuInit", 100, "CUDA_ERROR_NO_DEVICE")
            );
        }
        other => panic!("expected Broken(cuInit), got {other:?}"),
    }
    let (path, lib) = fake_or_skip!("noimage");
    switch(&lib, "reject_images", 1);
    // SAFETY: 1. the test suite's stand-in of the driver (tests/fake_cuda).
    match unsafe { probe_library(&path) } {
        Probe::Broken(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("cuModuleLoadData") && msg.contains("INVALID_IMAGE"),
                "{msg}"
            );
        }
        other => panic!("expected Broken(cuModuleLoadData), got {other:?}"),
    }
}

/// Whether the library at `path` is loaded in this process (`dlopen` with `RTLD_NOLOAD`).
fn loaded(path: &str) -> bool {
    let c = std::ffi::CString::new(path).unwrap();
    // SAFETY: `c` is a NUL-terminated path; RTLD_NOLOAD loads nothing, and the handle it
    // returns (a reference taken) is closed at once.
    unsafe {
        let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if h.is_null() {
            return false;
        }
        libc::dlclose(h);
        true
    }
}

/// A start-up that fails after `cuInit` keeps the driver library loaded (its threads and a
/// retained context may live on), and so does a backend that started and was dropped (as
/// `kvh preflight` drops the one it tried); one whose `cuInit` failed leaves nothing of its
/// own there.
#[test]
fn a_start_up_failed_after_cu_init_keeps_the_driver_loaded() {
    // (instance, switch and its value, whether the driver stays loaded once the probe's
    // backend and the test's own handle are dropped)
    let cases = [
        ("keep_started", None, true),
        ("keep_noimage", Some(("reject_images", 1)), true),
        ("keep_noinit", Some(("set_init_result", 100)), false),
    ];
    for (name, set, stays) in cases {
        let (path, lib) = fake_or_skip!(name);
        if let Some((switch_name, value)) = set {
            switch(&lib, switch_name, value);
        }
        // SAFETY: 1. the test suite's stand-in of the driver (tests/fake_cuda).
        let probe = unsafe { probe_library(&path) };
        match (&probe, set) {
            (Probe::Available(backend), None) => backend.shutdown(),
            (Probe::Broken(_), Some(_)) => {}
            _ => panic!("{name}: {probe:?}"),
        }
        drop(probe);
        drop(lib);
        assert_eq!(loaded(&path), stays, "{name}: loaded after the probe");
    }
}

/// A driver that loads none of the embedded kernel images because it is older than the
/// toolkit that built them (CUDA_ERROR_UNSUPPORTED_PTX_VERSION, 222, as an R470-R535 driver
/// answers the CUDA 12.4 PTX) makes the backend `Broken`. The error names the driver's
/// version (`cuDriverGetVersion`, 12.4 here) and the GPU's compute capability (9.0 here), so
/// that an operator can tell a driver too old for the kernels from a corrupt image or an
/// unsupported GPU without another tool.
#[test]
fn a_driver_that_loads_no_kernel_image_is_reported_with_its_version() {
    let (path, lib) = fake_or_skip!("old_driver");
    switch(&lib, "set_module_load_result", 222);
    // SAFETY: 1. the test suite's stand-in of the driver (tests/fake_cuda).
    match unsafe { probe_library(&path) } {
        Probe::Broken(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("12.4") && msg.contains("9.0"),
                "the error names neither the driver version (12.4) nor the compute \
                 capability (9.0): {msg}"
            );
            assert!(
                msg.contains("cuModuleLoadData") && msg.contains("R550"),
                "the error names neither the failed call nor the driver the PTX needs: {msg}"
            );
        }
        other => panic!("expected Broken(cuModuleLoadData), got {other:?}"),
    }
}

#[test]
fn no_driver_call_after_shutdown() {
    let (path, lib) = fake_or_skip!("shutdown");
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    let mut pending = submit(
        &b,
        batch(
            vec![ScrubSegment {
                addr: base,
                len: 4096,
                seed: 3,
            }],
            SAMPLED,
        ),
    )
    .expect("submit");
    b.shutdown();
    let before = calls(&lib);
    assert_eq!(b.allocate(0, 1), Err(BackendError::ShuttingDown));
    assert_eq!(b.release(0, base, 4096), Err(BackendError::ShuttingDown));
    assert_eq!(pending.poll(), Err(BackendError::ShuttingDown));
    assert_eq!(pending.wait(), Err(BackendError::ShuttingDown));
    drop(pending);
    assert_eq!(calls(&lib), before, "a driver call was made after shutdown");
}

fn capture_mode(lib: &libloading::Library, set: i32) -> i32 {
    query(lib, "capture_mode", set)
}

/// Driver calls run in RELAXED capture mode (so a global-mode capture on another thread is
/// not invalidated by them) and the caller's own mode is handed back afterwards.
#[test]
fn driver_calls_run_relaxed_and_restore_the_callers_capture_mode() {
    let (path, lib) = fake_or_skip!("capmode");
    let b = start(&path);
    std::thread::spawn(move || {
        assert_eq!(
            capture_mode(&lib, 0),
            0,
            "global mode, as a capturing thread has"
        );
        let p = b.allocate(0, 4096).expect("allocate");
        let during = query(&lib, "mode_at_alloc", 0);
        assert_eq!(during, 2, "cuMemAlloc ran outside relaxed mode");
        assert_eq!(
            capture_mode(&lib, -1),
            0,
            "the caller's mode was not restored"
        );
        capture_mode(&lib, 1);
        b.release(0, p, 4096).expect("release");
        assert_eq!(
            capture_mode(&lib, -1),
            1,
            "thread-local mode was not restored"
        );
    })
    .join()
    .expect("thread");
}

/// A batch slot that cannot be allocated is a transient resource failure, not a verification
/// failure (docs/cuda.md, "Out of memory"): the blocks stay PENDING and are submitted again,
/// never quarantined as failed (their re-scrub would meet the same shortage and condemn them
/// for good, although nothing was ever read back dirty).
#[test]
fn a_transient_slot_allocation_failure_does_not_condemn_the_blocks() {
    use kvhygiene::alloc::Allocator;
    let (path, lib) = fake_or_skip!("slot_oom_alloc");
    let backend = std::sync::Arc::new(fake_cuda::start_without_first_slot(&path, &lib));
    let alloc = Allocator::new(backend, kvhygiene::config::Config::default(), None);
    let s = StreamHandle(0);
    // The next two slot allocations fail (the batch's, then the re-scrub's), then memory is
    // available again.
    switch(&lib, "fail_host_allocs", 2);
    let p = alloc.malloc(4096, 0, s).expect("malloc");
    alloc.free(p, 4096, 0, s).expect("free");
    let _ = alloc.synchronize();
    let _ = alloc.synchronize();
    let stats = alloc.stats();
    assert!(
        stats.counters.scrubs_deferred >= 1,
        "no batch met the slot allocation failure"
    );
    eprintln!(
        "verifications_failed {}, rescrub_failed {}, quarantined bytes {}",
        stats.counters.verifications_failed,
        stats.counters.rescrub_failed,
        stats.accounting.quarantined.bytes
    );
    assert_eq!(
        stats.counters.verifications_failed, 0,
        "a slot allocation failure was logged as a failed verification"
    );
    assert_eq!(
        stats.counters.rescrub_failed, 0,
        "a block was condemned (leaked for good) after a transient slot allocation failure"
    );
    alloc.shutdown();
}

/// Once `Backend::shutdown` returns no further driver call is made (invariant 6: none after
/// process exit begins), also by a call already past its first check (the flusher thread
/// submitting a batch while an atexit handler runs `begin_exit`): it stops at its next step.
/// Here the shutdown happens during the submission's capture query.
#[test]
fn no_driver_call_once_shutdown_has_returned_even_mid_submission() {
    static BACKEND: OnceLock<CudaBackend> = OnceLock::new();
    extern "C" fn exit_begins() {
        BACKEND.get().expect("backend").shutdown();
    }
    let (path, lib) = fake_or_skip!("shutdown_race");
    let b = BACKEND.get_or_init(|| start(&path));
    let base = b.allocate(0, 4096).expect("allocate");
    let seg = ScrubSegment {
        addr: base,
        len: 4096,
        seed: 9,
    };
    // SAFETY: `void fake_cuda_on_capture_query(void (*)(void))`.
    unsafe {
        let f = lib
            .get::<unsafe extern "C" fn(extern "C" fn())>(b"fake_cuda_on_capture_query\0")
            .expect("hook");
        f(exit_begins);
    }
    let submitted = submit(b, batch(vec![seg], SAMPLED));
    let at_shutdown = query(&lib, "calls_at_hook", 0);
    assert!(at_shutdown >= 0, "the hook did not run");
    let after = calls(&lib) - at_shutdown;
    assert_eq!(
        after,
        0,
        "{after} driver calls after shutdown() returned; submission returned {}",
        match &submitted {
            Ok(_) => "Ok(ticket)".to_string(),
            Err(e) => format!("Err({e})"),
        }
    );
}

/// Devices other than 0 are opened on first use; a failure to open one (here
/// cuModuleLoadData; on a GPU, e.g. out of memory while loading the module on a device another
/// library has filled) is not kept: the next call opens it once the driver works again.
#[test]
fn a_transient_failure_opening_a_device_is_not_cached_for_good() {
    let (path, lib) = fake_or_skip!("lazy_open");
    let b = start(&path);
    switch(&lib, "reject_images", 1);
    assert!(
        b.allocate(1, 4096).is_err(),
        "device 1 opened without an image"
    );
    switch(&lib, "reject_images", 0);
    match b.allocate(1, 4096) {
        Ok(p) => b.release(1, p, 4096).expect("release"),
        Err(e) => panic!("device 1 stays unusable after the driver recovered: {e}"),
    }
}

/// The safe entry points that take a raw address (`write`, `read`, `zero_fresh`, `release`)
/// work only inside memory this backend allocated: under unified addressing a page-locked
/// host buffer (the backend's own result slots, a framework's pinned staging buffers) is a
/// valid device address, which the driver would copy into or zero. (`submit_scrub` is an
/// `unsafe fn` with that contract, since its segments are not looked up on the hot path.) The
/// stand-in's "device memory" is host memory, which plays the page-locked buffer here.
#[test]
fn safe_entry_points_refuse_addresses_the_backend_never_allocated() {
    let (path, _lib) = fake_or_skip!("foreign_addr");
    let b = start(&path);
    let not_ours = [0x5au8; 64];
    let addr = not_ours.as_ptr() as u64;
    assert!(
        b.write(0, addr, &[0u8; 64]).is_err(),
        "write into memory this backend never allocated was accepted"
    );
    assert!(
        b.zero_fresh(0, addr, 64, StreamHandle(0)).is_err(),
        "zero_fresh of memory this backend never allocated was accepted"
    );
    let mut back = [0u8; 64];
    assert!(b.read(0, addr, &mut back).is_err());
    assert!(
        b.release(0, addr, 64).is_err(),
        "a foreign address was freed"
    );
    assert!(
        not_ours.iter().all(|&x| x == 0x5a),
        "the buffer was written"
    );
    // Inside an allocation, and a range running past its end.
    let p = b.allocate(0, 4096).expect("allocate");
    b.write(0, p + 4000, &[1u8; 96]).expect("the last 96 bytes");
    assert!(
        b.write(0, p + 4000, &[1u8; 97]).is_err(),
        "one byte past the end"
    );
    assert!(b.zero_fresh(0, p + 1, 4096, StreamHandle(0)).is_err());
    b.release(0, p, 4096).expect("release");
    assert!(b.release(0, p, 4096).is_err(), "a second release");
    assert!(b.write(0, p, &[1u8; 1]).is_err(), "a write after release");
}

/// `zero_fresh` makes no driver call once `Backend::shutdown` has returned: a shutdown that
/// begins during its capture query (an exit handler running while a pool miss zeroes fresh
/// memory) stops it before the memset, as `submit_scrub` stops at its next step.
#[test]
fn zero_fresh_makes_no_driver_call_once_shutdown_has_returned() {
    static BACKEND: OnceLock<CudaBackend> = OnceLock::new();
    extern "C" fn exit_begins() {
        BACKEND.get().expect("backend").shutdown();
    }
    let (path, lib) = fake_or_skip!("shutdown_zero_fresh");
    let b = BACKEND.get_or_init(|| start(&path));
    let base = b.allocate(0, 4096).expect("allocate");
    // SAFETY: `void fake_cuda_on_capture_query(void (*)(void))`.
    unsafe {
        let f = lib
            .get::<unsafe extern "C" fn(extern "C" fn())>(b"fake_cuda_on_capture_query\0")
            .expect("hook");
        f(exit_begins);
    }
    let zeroed = b.zero_fresh(0, base, 4096, StreamHandle(0));
    let at_shutdown = query(&lib, "calls_at_hook", 0);
    assert!(at_shutdown >= 0, "the hook did not run");
    let after = calls(&lib) - at_shutdown;
    assert_eq!(
        after, 0,
        "{after} driver calls after shutdown() returned; zero_fresh returned {zeroed:?}"
    );
}

/// A submission whose shutdown begins while it asks whether a recorded (wait) stream is
/// capturing makes no further driver call: no event is recorded on the wait streams and
/// nothing is launched once `Backend::shutdown` has returned.
#[test]
fn no_driver_call_after_shutdown_begun_during_the_wait_stream_queries() {
    static BACKEND: OnceLock<CudaBackend> = OnceLock::new();
    static REARM: OnceLock<usize> = OnceLock::new();
    extern "C" fn exit_begins() {
        BACKEND.get().expect("backend").shutdown();
    }
    // Runs at the batch stream's capture query and arms the hook for the next query, the
    // first wait stream's.
    extern "C" fn at_first_query() {
        let arm = *REARM.get().expect("hook setter");
        // SAFETY: the address of `void fake_cuda_on_capture_query(void (*)(void))`.
        let arm: unsafe extern "C" fn(extern "C" fn()) = unsafe { std::mem::transmute(arm) };
        // SAFETY: as above.
        unsafe { arm(exit_begins) };
    }
    let (path, lib) = fake_or_skip!("shutdown_wait_streams");
    let b = BACKEND.get_or_init(|| start(&path));
    let base = b.allocate(0, 4096).expect("allocate");
    let mut scrub = batch(
        vec![ScrubSegment {
            addr: base,
            len: 4096,
            seed: 11,
        }],
        SAMPLED,
    );
    scrub.wait_streams = vec![StreamHandle(7), StreamHandle(9)];
    // SAFETY: `void fake_cuda_on_capture_query(void (*)(void))`.
    unsafe {
        let f = lib
            .get::<unsafe extern "C" fn(extern "C" fn())>(b"fake_cuda_on_capture_query\0")
            .expect("hook");
        REARM.get_or_init(|| *f as usize);
        f(at_first_query);
    }
    let submitted = submit(b, scrub);
    let at_shutdown = query(&lib, "calls_at_hook", 0);
    assert!(at_shutdown >= 0, "the hook did not run");
    let after = calls(&lib) - at_shutdown;
    assert_eq!(
        after,
        0,
        "{after} driver calls after shutdown() returned; submission returned {}",
        match &submitted {
            Ok(_) => "Ok(ticket)".to_string(),
            Err(e) => format!("Err({e})"),
        }
    );
}

/// `cudaStreamPerThread` (handle 2) names the calling thread's default stream. A block freed
/// on it must be scrubbed in order after the work the freeing thread queued there, so the
/// scrub (and the ordering event of a recorded stream) is never queued on handle 2 from
/// another thread, such as the flusher's, where the handle names a different stream.
#[test]
fn a_free_on_the_per_thread_stream_is_never_scrubbed_on_another_threads_stream() {
    use kvhygiene::alloc::Allocator;
    let (path, lib) = fake_or_skip!("per_thread_stream");
    let backend = std::sync::Arc::new(start(&path));
    let alloc = Allocator::new(backend, kvhygiene::config::Config::default(), None);
    query(&lib, "own_per_thread_stream", 0);
    let per_thread = StreamHandle(2);
    let p = alloc.malloc(4096, 0, per_thread).expect("malloc");
    let q = alloc.malloc(4096, 0, StreamHandle(0)).expect("malloc");
    assert!(alloc.record_stream(q, per_thread));
    alloc.free(p, 4096, 0, per_thread).expect("free");
    alloc.free(q, 4096, 0, StreamHandle(0)).expect("free");
    // The flusher submits the frees once their batch's delay (1 ms by default) has passed,
    // and applies the results.
    let pending = || {
        [p, q].iter().any(|&a| {
            alloc
                .block_info(a)
                .is_some_and(|b| b.state == kvhygiene::alloc::BlockState::Pending)
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while pending() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(!pending(), "the frees were not scrubbed");
    let foreign = query(&lib, "foreign_per_thread_uses", 0);
    alloc.shutdown();
    assert_eq!(
        foreign, 0,
        "{foreign} launches or event records on cudaStreamPerThread from a thread other than \
         the one whose stream it named"
    );
}

/// A stream of another device than the batch's (here device 1's, handle 0xD1001) among the
/// wait streams: an event can be recorded only on a stream of its own context, so the scrub
/// is ordered after it through an event of that stream's context, which the batch's stream
/// waits for and which is destroyed afterwards. The batch runs and verifies; no event is left
/// behind.
#[test]
fn a_wait_stream_of_another_device_orders_the_scrub_through_its_own_context() {
    let (path, lib) = fake_or_skip!("foreign_wait_stream");
    let b = start(&path);
    let (segments, total) = random_layout(6, 3000, 11);
    let base = b.allocate(0, total).expect("allocate");
    // A first batch makes the batch slot (and its completion event) the second one reuses.
    run(&b, batch(place(base, &segments), SAMPLED));
    let events_before = query(&lib, "live_events", 0);
    let mut scrub = batch(place(base, &segments), SAMPLED);
    scrub.stream = StreamHandle(7);
    scrub.wait_streams = vec![StreamHandle(0xD1001), StreamHandle(9)];
    let results = run(&b, scrub);
    assert!(
        results.iter().all(|r| r.nonzero == 0 && r.checked > 0),
        "{results:?}"
    );
    assert_eq!(
        query(&lib, "cross_device_waits", 0),
        1,
        "the batch's stream did not wait for the other device's stream through an event of \
         that stream's context"
    );
    assert_eq!(
        query(&lib, "live_events", 0),
        events_before,
        "the event made for the other device's stream was not destroyed"
    );
    b.release(0, base, total).expect("release");
}

/// Through the allocator, as PyTorch's record-stream hook would after a peer copy: a block
/// of device 0 recorded with a stream of device 1 is scrubbed, verified and reusable, with
/// no backend error.
#[test]
fn a_block_recorded_with_a_stream_of_another_device_is_scrubbed() {
    use kvhygiene::alloc::{Allocator, BlockState};
    let (path, _lib) = fake_or_skip!("foreign_record_stream");
    let backend = std::sync::Arc::new(start(&path));
    let alloc = Allocator::new(backend, kvhygiene::config::Config::default(), None);
    let s = StreamHandle(7);
    let p = alloc.malloc(1 << 16, 0, s).expect("malloc");
    assert!(alloc.record_stream(p, StreamHandle(0xD1001)));
    alloc.free(p, 1 << 16, 0, s).expect("free");
    alloc.synchronize().expect("synchronize");
    let state = alloc.block_info(p).map(|b| b.state);
    let stats = alloc.stats();
    alloc.shutdown();
    assert_eq!(state, Some(BlockState::Clean), "{stats:?}");
    assert_eq!(stats.counters.backend_errors, 0, "{stats:?}");
    assert_eq!(stats.counters.verifications_failed, 0, "{stats:?}");
}

/// Arms `fake_cuda_<hook>(cb)` (`void(void (*)(void))`) in an instance.
fn arm(lib: &libloading::Library, hook: &str, cb: extern "C" fn()) {
    let symbol = format!("fake_cuda_{hook}\0");
    // SAFETY: every fake_cuda_on_* hook setter is `void(void (*)(void))`.
    unsafe {
        let f = lib
            .get::<unsafe extern "C" fn(extern "C" fn())>(symbol.as_bytes())
            .expect("hook");
        f(cb);
    }
}

/// A submission whose shutdown begins while its scrub kernel is being launched (a launch
/// blocks while the stream's launch queue is full) makes no further driver call once
/// `Backend::shutdown` has returned: neither the publish launch of a segment spanning chunks
/// nor the completion event's record.
#[test]
fn no_driver_call_after_shutdown_begun_during_the_scrub_launch() {
    static BACKEND: OnceLock<CudaBackend> = OnceLock::new();
    extern "C" fn exit_begins() {
        BACKEND.get().expect("backend").shutdown();
    }
    let (path, lib) = fake_or_skip!("shutdown_launch");
    let b = BACKEND.get_or_init(|| start(&path));
    let len = 100_000;
    let base = b.allocate(0, len).expect("allocate");
    // Warm a slot up first, so that the submission below goes straight to its launches.
    let seg = ScrubSegment {
        addr: base,
        len,
        seed: 21,
    };
    assert_eq!(run(b, batch(vec![seg], SAMPLED))[0].checked, 64);
    arm(&lib, "on_launch", exit_begins);
    let submitted = submit(b, batch(vec![seg], SAMPLED));
    let at_shutdown = query(&lib, "calls_at_hook", 0);
    assert!(at_shutdown >= 0, "the hook did not run");
    let after = calls(&lib) - at_shutdown;
    assert_eq!(
        after,
        0,
        "{after} driver calls after shutdown() returned; submission returned {}",
        match &submitted {
            Ok(_) => "Ok(ticket)".to_string(),
            Err(e) => format!("Err({e})"),
        }
    );
}

/// The same while the batch's slot is being created (its device sums allocated, then its
/// page-locked result area mapped and its completion event created): once `Backend::shutdown`
/// has returned, the slot's remaining allocations are not made.
#[test]
fn no_driver_call_after_shutdown_begun_while_a_batch_slot_is_created() {
    static BACKEND: OnceLock<CudaBackend> = OnceLock::new();
    extern "C" fn exit_begins() {
        BACKEND.get().expect("backend").shutdown();
    }
    let (path, lib) = fake_or_skip!("shutdown_new_slot");
    let b = BACKEND.get_or_init(|| fake_cuda::start_without_first_slot(&path, &lib));
    let base = b.allocate(0, 4096).expect("allocate");
    let seg = ScrubSegment {
        addr: base,
        len: 4096,
        seed: 22,
    };
    // The first submission of the backend creates its first slot: cuMemAlloc of the sums.
    arm(&lib, "on_mem_alloc", exit_begins);
    let submitted = submit(b, batch(vec![seg], SAMPLED));
    let at_shutdown = query(&lib, "calls_at_hook", 0);
    assert!(at_shutdown >= 0, "the hook did not run");
    let after = calls(&lib) - at_shutdown;
    assert_eq!(
        after,
        0,
        "{after} driver calls after shutdown() returned; submission returned {}",
        match &submitted {
            Ok(_) => "Ok(ticket)".to_string(),
            Err(e) => format!("Err({e})"),
        }
    );
}

/// A batch slot whose completion event cannot be created for lack of memory is a slot that
/// cannot be allocated (docs/cuda.md, "Out of memory": `submit_scrub` returns `OutOfMemory`),
/// like one whose buffers cannot be: the submission fails with `OutOfMemory`, and the next one
/// succeeds.
#[test]
fn a_slot_event_that_cannot_be_created_for_lack_of_memory_is_out_of_memory() {
    let (path, lib) = fake_or_skip!("slot_event_oom");
    let b = fake_cuda::start_without_first_slot(&path, &lib);
    let (segments, total) = random_layout(8, 5000, 4);
    let base = b.allocate(0, total).expect("allocate");
    switch(&lib, "fail_event_creates", 1);
    match submit(&b, batch(place(base, &segments), SAMPLED)) {
        Err(BackendError::OutOfMemory { device, .. }) => assert_eq!(device, 0),
        Err(e) => panic!("expected OutOfMemory for the batch slot, got {e:?}"),
        Ok(_) => panic!("a batch was submitted without its slot's event"),
    }
    b.release(0, base, total).expect("release");
    scrub_and_check(&b, total, &segments, SAMPLED);
}

/// Through the allocator: blocks whose batch slot lacked memory for its completion event
/// stay PENDING and are scrubbed later, never counted as failed verifications or condemned.
#[test]
fn a_slot_event_out_of_memory_does_not_condemn_the_blocks() {
    use kvhygiene::alloc::Allocator;
    let (path, lib) = fake_or_skip!("slot_event_oom_alloc");
    let backend = std::sync::Arc::new(fake_cuda::start_without_first_slot(&path, &lib));
    let alloc = Allocator::new(backend, kvhygiene::config::Config::default(), None);
    let s = StreamHandle(0);
    // The next two slot creations fail at their event (the batch's, then a re-scrub's).
    switch(&lib, "fail_event_creates", 2);
    let p = alloc.malloc(4096, 0, s).expect("malloc");
    alloc.free(p, 4096, 0, s).expect("free");
    let _ = alloc.synchronize();
    let _ = alloc.synchronize();
    let _ = alloc.synchronize();
    let stats = alloc.stats();
    assert!(
        stats.counters.scrubs_deferred >= 1,
        "no batch met the slot event failure"
    );
    assert_eq!(
        stats.counters.verifications_failed, 0,
        "a slot event allocation failure was logged as a failed verification"
    );
    assert_eq!(
        stats.counters.rescrub_failed, 0,
        "a block was condemned after a transient slot event allocation failure"
    );
    alloc.shutdown();
}

/// The error a batch whose slot event could not be created is refused with names what was
/// short: `BackendError::OutOfMemory` reads "out of memory: {requested} bytes requested on
/// device {device}", which `kvh_synchronize` passes on ("... are not scrubbed yet: ..."). It
/// must not say that zero bytes were requested.
#[test]
fn a_slot_event_out_of_memory_does_not_say_zero_bytes_were_requested() {
    let (path, lib) = fake_or_skip!("slot_event_oom_message");
    let b = fake_cuda::start_without_first_slot(&path, &lib);
    let base = b.allocate(0, 4096).expect("allocate");
    let seg = ScrubSegment {
        addr: base,
        len: 4096,
        seed: 23,
    };
    switch(&lib, "fail_event_creates", 1);
    match submit(&b, batch(vec![seg], SAMPLED)) {
        Err(e @ BackendError::OutOfMemory { .. }) => {
            let text = e.to_string();
            assert!(
                !text.contains(" 0 bytes requested"),
                "the refusal says no memory was requested: {text}"
            );
        }
        Err(e) => panic!("expected OutOfMemory for the batch slot, got {e:?}"),
        Ok(_) => panic!("a batch was submitted without its slot's event"),
    }
}

/// Each device's primary context is retained once (docs/cuda.md, "Contexts": "retained on
/// first use"); kvhygiene never releases it, so every further `cuDevicePrimaryCtxRetain` is a
/// reference that is never given back. Opening device 1 fails three times (no kernel image
/// loads), then succeeds: the device's primary context holds one reference of kvhygiene's,
/// not one per try.
#[test]
fn failed_device_opens_do_not_retain_the_primary_context_again() {
    let (path, lib) = fake_or_skip!("retain_balance");
    let b = start(&path);
    switch(&lib, "reject_images", 1);
    for _ in 0..3 {
        assert!(
            b.allocate(1, 4096).is_err(),
            "device 1 opened without an image"
        );
    }
    switch(&lib, "reject_images", 0);
    let p = b.allocate(1, 4096).expect("device 1 opens");
    b.release(1, p, 4096).expect("release");
    assert_eq!(
        query(&lib, "retains", 1),
        1,
        "device 1's primary context was retained once per opening attempt and never released"
    );
}

/// A backend over host memory whose verification reads, for one sample, a word other than
/// the host rule's (`misread`), and leaves the segment `skip` names unzeroed: a kernel with an
/// off-by-one at one edge of a sampled segment, for `common::sampled_words_are_the_host_rules`.
struct MisreadingBackend {
    skip: std::sync::Mutex<Option<u32>>,
    misread: fn(&kvhygiene::backend::verify::Rule, u64, u64) -> u64,
}

struct Ready(Option<Vec<kvhygiene::backend::verify::SegmentResult>>);

impl kvhygiene::backend::ScrubTicket for Ready {
    fn poll(
        &mut self,
    ) -> Result<Option<Vec<kvhygiene::backend::verify::SegmentResult>>, BackendError> {
        Ok(self.0.take())
    }
    fn wait(&mut self) -> Result<Vec<kvhygiene::backend::verify::SegmentResult>, BackendError> {
        Ok(self.0.take().expect("results"))
    }
}

impl Backend for MisreadingBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }
    fn device_count(&self) -> u32 {
        1
    }
    fn allocate(&self, _device: u32, len: u64) -> Result<u64, BackendError> {
        let buf = vec![0u8; len as usize].into_boxed_slice();
        Ok(Box::into_raw(buf) as *mut u8 as u64)
    }
    fn release(&self, _device: u32, addr: u64, len: u64) -> Result<(), BackendError> {
        // SAFETY: `addr` and `len` are those of a buffer `allocate` leaked.
        drop(unsafe {
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                addr as *mut u8,
                len as usize,
            ))
        });
        Ok(())
    }
    fn zero_fresh(
        &self,
        _device: u32,
        addr: u64,
        len: u64,
        _stream: StreamHandle,
    ) -> Result<(), BackendError> {
        // SAFETY: inside a buffer `allocate` returned.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0, len as usize) };
        Ok(())
    }
    unsafe fn submit_scrub(
        &self,
        batch: kvhygiene::backend::ScrubBatch,
    ) -> Result<Box<dyn kvhygiene::backend::ScrubTicket>, BackendError> {
        use kvhygiene::backend::verify::{Rule, SegmentResult, WORD_BYTES};
        let skip = *self.skip.lock().unwrap();
        let o = batch.options;
        let mut out = Vec::new();
        for (n, s) in batch.segments.iter().enumerate() {
            // SAFETY: the tests' segments lie inside buffers `allocate` returned.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(s.addr as *mut u8, s.len as usize) };
            if skip != Some(n as u32) {
                bytes.fill(0);
            }
            let rule = Rule::new(s.len, o.samples, o.full_verify);
            let mut r = SegmentResult::default();
            for i in 0..rule.samples() {
                let w = (self.misread)(&rule, s.seed, i);
                let start = (w * WORD_BYTES) as usize;
                let end = (start + WORD_BYTES as usize).min(bytes.len());
                r.checked += 1;
                r.nonzero += u64::from(bytes[start..end].iter().any(|&b| b != 0));
            }
            out.push(r);
        }
        Ok(Box::new(Ready(Some(out))))
    }
    fn write(&self, _device: u32, addr: u64, src: &[u8]) -> Result<(), BackendError> {
        // SAFETY: inside a buffer `allocate` returned.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), addr as *mut u8, src.len()) };
        Ok(())
    }
    fn read(&self, _device: u32, addr: u64, dst: &mut [u8]) -> Result<(), BackendError> {
        // SAFETY: inside a buffer `allocate` returned.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

/// Whether `common::sampled_words_are_the_host_rules` fails on a kernel reading `misread`.
fn host_rule_check_fails_for(
    misread: fn(&kvhygiene::backend::verify::Rule, u64, u64) -> u64,
) -> bool {
    let b = MisreadingBackend {
        skip: std::sync::Mutex::new(None),
        misread,
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        common::sampled_words_are_the_host_rules(&b, &|i| *b.skip.lock().unwrap() = i)
    }))
    .is_err()
}

#[test]
fn the_host_rule_check_fails_for_a_kernel_that_misreads_the_first_or_last_sampled_word() {
    // The rule always reads word 0 and word words - 1 of a sampled segment (the last one
    // partial for the 4095-byte shape). A kernel whose sampled path reads word 1 for sample 0,
    // or word words - 2 for the last sample, reads other words than the host rule's: the check
    // documented as "the kernel reads exactly the words the host rule names" must fail on it.
    let first: fn(&kvhygiene::backend::verify::Rule, u64, u64) -> u64 = |r, seed, i| {
        if i == 0 && !r.is_full() {
            1
        } else {
            r.word(seed, i)
        }
    };
    let last: fn(&kvhygiene::backend::verify::Rule, u64, u64) -> u64 = |r, seed, i| {
        if i + 1 == r.samples() && !r.is_full() {
            r.word(seed, i) - 1
        } else {
            r.word(seed, i)
        }
    };
    // A kernel reading the rule's words exactly passes (the stand-in itself is sound).
    assert!(!host_rule_check_fails_for(|r, seed, i| r.word(seed, i)));
    let missed: Vec<&str> = [
        ("sample 0 reads word 1", first),
        ("the last sample reads word words - 2", last),
    ]
    .into_iter()
    .filter(|(_, f)| !host_rule_check_fails_for(*f))
    .map(|(name, _)| name)
    .collect();
    assert!(
        missed.is_empty(),
        "sampled_words_are_the_host_rules passes kernels whose {missed:?}"
    );
}
