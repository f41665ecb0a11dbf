//! The CUDA backend on the fake driver (tests/fake_cuda/fake_libcuda.cpp): out of memory while a
//! device opens, and no driver call once `Backend::shutdown` has returned, at the steps of a
//! submission and of a device's opening between which the backend checks for a shutdown.
//! Skips with a message when there is no C++ compiler, as tests/cuda_fake_driver.rs does.

#[path = "backend_common/mod.rs"]
mod common;
#[path = "fake_cuda/mod.rs"]
mod fake_cuda;
#[path = "skip/mod.rs"]
mod skip;

use std::sync::OnceLock;

use common::{batch, submit, SAMPLED};
use fake_cuda::{query, start, switch};
use kvhygiene::backend::cuda::CudaBackend;
use kvhygiene::backend::{Backend, BackendError, ScrubSegment, StreamHandle};

/// A private copy of the stand-in (its own dlopen instance, so its switches are its own).
fn instance(name: &str) -> Option<(String, libloading::Library)> {
    fake_cuda::instance("kvh-fake-cuda-exit-oom", name)
}

macro_rules! fake_or_skip {
    ($name:expr) => {
        match instance($name) {
            Some(x) => x,
            None => return,
        }
    };
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

/// Driver calls counted after the armed hook (which began the shutdown) returned.
fn calls_after_hook(lib: &libloading::Library) -> i32 {
    let at_shutdown = query(lib, "calls_at_hook", 0);
    assert!(at_shutdown >= 0, "the hook did not run");
    calls(lib) - at_shutdown
}

fn outcome<T>(r: &Result<T, BackendError>) -> String {
    match r {
        Ok(_) => "Ok".to_string(),
        Err(e) => format!("Err({e})"),
    }
}

/// Declares, in a test, the backend it starts (`BACKEND`) and the hook that begins the exit
/// inside a driver call (`exit_begins`: shuts that backend down), for `arm`. A macro: the hook
/// is a C function, which cannot capture the backend.
macro_rules! exit_hook {
    () => {
        static BACKEND: OnceLock<CudaBackend> = OnceLock::new();
        extern "C" fn exit_begins() {
            BACKEND.get().expect("backend").shutdown();
        }
    };
}

/// Asserts that no driver call followed the armed hook's shutdown; `call` and `result` say
/// what ran, for the message.
fn assert_none_after_shutdown<T>(
    lib: &libloading::Library,
    call: &str,
    result: &Result<T, BackendError>,
) {
    let after = calls_after_hook(lib);
    assert_eq!(
        after,
        0,
        "{after} driver calls after shutdown() returned; {call} returned {}",
        outcome(result)
    );
}

/// A segment of `len` bytes at `addr`, with `seed`.
fn segment(addr: u64, len: u64, seed: u64) -> ScrubSegment {
    ScrubSegment { addr, len, seed }
}

/// A device that cannot be opened for lack of device memory (its kernel module does not
/// load: `CUDA_ERROR_OUT_OF_MEMORY`, a GPU another library has filled) is out of memory, as
/// `cuMemAlloc`'s and a batch slot's shortage are (docs/cuda.md, the result layer: "out of
/// memory maps to `BackendError::OutOfMemory`"): the allocator answers it as out of memory
/// (`KVH_ERR_OUT_OF_MEMORY`, `cudaErrorMemoryAllocation` under the interposers), not as a
/// driver fault.
#[test]
fn out_of_memory_while_a_device_opens_is_out_of_memory() {
    let (path, lib) = fake_or_skip!("open_oom");
    let b = start(&path);
    switch(&lib, "set_module_load_result", 2);
    match b.allocate(1, 4096) {
        Err(BackendError::OutOfMemory { device, .. }) => assert_eq!(device, 1),
        Err(e) => panic!("expected OutOfMemory on device 1, got {e:?}"),
        Ok(_) => panic!("device 1 opened without its module"),
    }
    // Through the allocator, whose first call for a device it has not used yet opens it.
    use kvhygiene::alloc::{AllocError, Allocator};
    let alloc = Allocator::new(
        std::sync::Arc::new(b.clone()),
        kvhygiene::config::Config::default(),
        None,
    );
    match alloc.malloc(4096, 1, StreamHandle(0)) {
        Err(AllocError::OutOfMemory { .. })
        | Err(AllocError::Backend(BackendError::OutOfMemory { .. })) => {}
        other => panic!("expected out of memory on device 1, got {other:?}"),
    }
    alloc.shutdown();
    switch(&lib, "set_module_load_result", 0);
}

/// A device whose opening fails after its kernel module loaded (here: no memory for its
/// ordering event) unloads the module again; the next call for the device opens it afresh,
/// and only the module of the opened device stays loaded (each failed try would otherwise
/// leave one module on the device for the life of the process).
#[test]
fn a_failed_device_open_unloads_its_module() {
    let (path, lib) = fake_or_skip!("open_unload");
    let b = start(&path);
    // Starting opens device 0 (its kernel image must load).
    let opened = query(&lib, "live_modules", 0);
    for attempt in 1..=3 {
        switch(&lib, "fail_event_creates", 1);
        match b.allocate(1, 4096) {
            Err(_) => {}
            Ok(_) => panic!("try {attempt}: device 1 opened without its ordering event"),
        }
        assert_eq!(
            query(&lib, "live_modules", 0),
            opened,
            "try {attempt}: a failed open left its module loaded"
        );
    }
    let p = b
        .allocate(1, 4096)
        .expect("device 1 opens once the event can be created");
    assert_eq!(query(&lib, "live_modules", 0), opened + 1);
    b.release(1, p, 4096).expect("release");
}

/// Once `Backend::shutdown` has returned no driver call is made (invariant 6), also by a
/// submission that is creating a batch slot: a shutdown that begins while the slot's
/// page-locked result area is allocated stops the submission before the area is mapped
/// (`cuMemHostGetDevicePointer`) or anything else is called.
#[test]
fn no_driver_call_after_shutdown_begun_while_a_slot_area_is_pinned() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_host_alloc");
    let b = BACKEND.get_or_init(|| fake_cuda::start_without_first_slot(&path, &lib));
    let base = b.allocate(0, 4096).expect("allocate");
    let seg = segment(base, 4096, 31);
    // The backend's first submission creates its first slot: device sums, then the
    // page-locked results.
    arm(&lib, "on_host_alloc", exit_begins);
    let submitted = submit(b, batch(vec![seg], SAMPLED));
    assert_none_after_shutdown(&lib, "submission", &submitted);
}

/// The same when the page-locked allocation fails for lack of memory: new_slot documents that
/// once shutdown has begun nothing more is called, "not even a free" of the device sums
/// allocated just before.
#[test]
fn no_free_after_shutdown_begun_while_a_slot_area_fails_to_pin() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_host_alloc_oom");
    let b = BACKEND.get_or_init(|| fake_cuda::start_without_first_slot(&path, &lib));
    let base = b.allocate(0, 4096).expect("allocate");
    let seg = segment(base, 4096, 32);
    switch(&lib, "fail_host_allocs", 1);
    arm(&lib, "on_host_alloc", exit_begins);
    let submitted = submit(b, batch(vec![seg], SAMPLED));
    let after = calls_after_hook(&lib);
    assert_eq!(
        after,
        0,
        "{after} driver calls (cuMemFree of the slot's sums) after shutdown() returned; \
         submission returned {}",
        outcome(&submitted)
    );
}

/// A submission looking for an idle batch slot queries each candidate's completion event; a
/// shutdown that begins during one query stops it there: no further event is queried.
#[test]
fn no_driver_call_after_shutdown_begun_while_idle_slots_are_queried() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_slot_queries");
    let b = BACKEND.get_or_init(|| start(&path));
    let base = b.allocate(0, 4096).expect("allocate");
    let seg = segment(base, 4096, 33);
    // Two abandoned batches whose events stay pending: two idle slots, neither reusable yet.
    switch(&lib, "set_pending_queries", 1000);
    drop(submit(b, batch(vec![seg], SAMPLED)).expect("submit"));
    drop(submit(b, batch(vec![seg], SAMPLED)).expect("submit"));
    arm(&lib, "on_event_query", exit_begins);
    let submitted = submit(b, batch(vec![seg], SAMPLED));
    assert_none_after_shutdown(&lib, "submission", &submitted);
}

/// A device opened on first use (here device 1, by an allocation) while the shutdown begins
/// (during the creation of its ordering event, the last object the opening creates) makes no
/// further driver call: neither the rest of the opening nor the allocation that asked for it.
#[test]
fn no_allocation_after_shutdown_begun_while_a_device_opens() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_device_open");
    let b = BACKEND.get_or_init(|| start(&path));
    arm(&lib, "on_event_create", exit_begins);
    let allocated = b.allocate(1, 4096);
    assert_none_after_shutdown(&lib, "allocate(1)", &allocated);
    assert_eq!(allocated, Err(BackendError::ShuttingDown));
}

/// A device opened on first use (here device 1, by an allocation) while the shutdown begins
/// late in the opening (during the occupancy query of its kernels, after its ordering event
/// was created) makes no further driver call: not the rest of the opening (the batch slot it
/// makes as it opens included), nor the allocation that asked for it.
#[test]
fn no_allocation_after_shutdown_begun_while_a_device_opens_its_kernels_occupancy() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_device_open_occupancy");
    let b = BACKEND.get_or_init(|| start(&path));
    let allocs = query(&lib, "mem_allocs", 0);
    arm(&lib, "on_occupancy", exit_begins);
    let allocated = b.allocate(1, 4096);
    let after = calls_after_hook(&lib);
    assert_eq!(
        after,
        0,
        "{after} driver calls ({} cuMemAlloc) after shutdown() returned; allocate(1) \
         returned {}",
        query(&lib, "mem_allocs", 0) - allocs,
        outcome(&allocated)
    );
}

/// A submission whose wait streams include a stream of another device (handle 0xD1001, of
/// device 1's context) creates an event in that context for the wait. A shutdown that begins
/// while that event is created stops the submission there: no driver call follows, not even
/// the record of the new event on the other device's stream (docs/cuda.md, "Exit"; the
/// ordering "checks for a shutdown before each driver call").
#[test]
fn no_driver_call_after_shutdown_begun_while_a_foreign_wait_event_is_created() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_foreign_wait_event");
    let b = BACKEND.get_or_init(|| start(&path));
    let base = b.allocate(0, 4096).expect("allocate");
    let seg = segment(base, 4096, 34);
    // A first batch makes the slot the second one reuses: the next event the backend creates
    // is then the one for the other device's stream.
    let mut first = submit(b, batch(vec![seg], SAMPLED)).expect("submit");
    first.wait().expect("wait");
    drop(first);
    let mut scrub = batch(vec![seg], SAMPLED);
    scrub.stream = StreamHandle(7);
    scrub.wait_streams = vec![StreamHandle(0xD1001)];
    arm(&lib, "on_event_create", exit_begins);
    let submitted = submit(b, scrub);
    assert_none_after_shutdown(&lib, "submission", &submitted);
}

/// A shutdown that begins while a submission makes the context of a recorded stream of
/// another device current (to ask whether that stream is capturing) stops the submission
/// there: the capture query is not made, nor any call after it.
#[test]
fn no_driver_call_after_shutdown_begun_while_another_device_s_context_is_made_current() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_foreign_context");
    let b = BACKEND.get_or_init(|| start(&path));
    let base = b.allocate(0, 4096).expect("allocate");
    let seg = segment(base, 4096, 36);
    let mut first = submit(b, batch(vec![seg], SAMPLED)).expect("submit");
    first.wait().expect("wait");
    drop(first);
    let mut scrub = batch(vec![seg], SAMPLED);
    scrub.stream = StreamHandle(7);
    scrub.wait_streams = vec![StreamHandle(0xD1001)];
    arm(&lib, "on_device1_current", exit_begins);
    let submitted = submit(b, scrub);
    assert_none_after_shutdown(&lib, "submission", &submitted);
}

/// Every entry point makes its device's context current before its first driver call of its
/// own. A shutdown that begins while that context is made current (here device 1's, already
/// open) stops the entry point there: a ticket poll queries no event (docs/cuda.md, "Exit":
/// "every entry point, including polls of tickets not yet seen complete, returns
/// `ShuttingDown` without calling the driver").
#[test]
fn no_event_query_after_shutdown_begun_while_a_poll_makes_its_context_current() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_poll_context");
    let b = BACKEND.get_or_init(|| start(&path));
    let base = b.allocate(1, 4096).expect("allocate on device 1");
    let mut scrub = batch(
        vec![ScrubSegment {
            addr: base,
            len: 4096,
            seed: 37,
        }],
        SAMPLED,
    );
    scrub.device = 1;
    switch(&lib, "set_pending_queries", 1000);
    let mut ticket = submit(b, scrub).expect("submit");
    arm(&lib, "on_device1_current", exit_begins);
    let polled = ticket.poll();
    let after = calls_after_hook(&lib);
    assert_eq!(
        after,
        0,
        "{after} driver calls (cuEventQuery) after shutdown() returned; poll returned {}",
        outcome(&polled)
    );
    assert_eq!(polled, Err(BackendError::ShuttingDown));
}

/// The same for `release`: a shutdown that begins while it makes device 1's context current
/// frees nothing (`cuMemFree`, which waits for the device on a GPU) once `shutdown()` has
/// returned; the memory is left to the process's exit, as all of it is.
#[test]
fn no_free_after_shutdown_begun_while_a_release_makes_its_context_current() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_release_context");
    let b = BACKEND.get_or_init(|| start(&path));
    let base = b.allocate(1, 4096).expect("allocate on device 1");
    let frees = query(&lib, "mem_frees", 0);
    arm(&lib, "on_device1_current", exit_begins);
    let released = b.release(1, base, 4096);
    assert_nothing_after_shutdown(&lib, frees, &released);
}

/// A device filled to its last byte before the first free (a server that sizes its KV cache
/// to the memory left after loading the model): the blocks freed then must still be scrubbed,
/// so that an allocation out of memory can release them and succeed. A scrub needs a batch
/// slot, whose device memory a full device cannot give; without one the freed blocks would
/// stay pending for good, and the memory lost to the process.
#[test]
fn blocks_freed_while_the_device_is_full_are_scrubbed_and_their_memory_reused() {
    use kvhygiene::alloc::Allocator;
    let (path, lib) = fake_or_skip!("full_before_first_free");
    let backend = std::sync::Arc::new(start(&path));
    let alloc = Allocator::new(backend, kvhygiene::config::Config::default(), None);
    let s = StreamHandle(0);
    switch(&lib, "set_device_memory", 1024);
    let size = 64 * 1024;
    let mut blocks = Vec::new();
    while let Ok(p) = alloc.malloc(size, 0, s) {
        blocks.push(p);
        assert!(blocks.len() <= 16, "the device holds 1 MiB");
    }
    assert!(blocks.len() >= 8, "{} blocks of 64 KiB", blocks.len());
    for p in &blocks {
        alloc.free(*p, size, 0, s).expect("free");
    }
    // Another size: only the memory of the freed blocks, given back, can serve it.
    let bigger = alloc.malloc(2 * size, 0, s);
    let stats = alloc.stats();
    assert!(
        bigger.is_ok(),
        "{} blocks freed with the device full were never scrubbed ({} scrubs deferred, {} \
         pending bytes), and a later allocation failed: {:?}",
        blocks.len(),
        stats.counters.scrubs_deferred,
        stats.accounting.pending.bytes,
        bigger.err()
    );
    alloc.shutdown();
}

/// A paged KV cache that fills the device (a server sizes it to what the model left), one
/// region per layer and K/V: `kvh_scrub_blocks` of two blocks when a request ends is one
/// batch of 2 x 64 segments. It must run on the slot the device made as it opened, as a
/// freed block's scrub does, rather than fail for lack of device memory for a slot of its own.
#[test]
fn a_kv_scrub_of_a_cache_that_fills_the_device_runs_on_the_first_slot() {
    let (path, lib) = fake_or_skip!("full_kv_scrub");
    let kv = kv_cache_on_a_full_device(&path, &lib, false, 64);
    // One block (64 segments) fits the kernel parameter; two (128) do not.
    let one = kv.alloc.scrub_kv_blocks(&kv.layout, &[0], 0, KV_STREAM);
    assert!(one.is_ok(), "one block: {one:?}");
    let two = kv.alloc.scrub_kv_blocks(&kv.layout, &[1, 2], 0, KV_STREAM);
    assert!(
        two.is_ok(),
        "a KV scrub of two blocks (128 segments) on a full device failed although the \
         device's first slot was idle: {two:?}"
    );
    kv.give_back(&lib);
}

/// Many small blocks freed on one stream while the device is full: the first batch of the
/// default size takes the slot the device made as it opened, and the blocks freed while that
/// slot is held wait (out of memory for a slot of their own). They must all be scrubbed once
/// it is idle again, so that a later allocation out of memory can release them: the batch that
/// waits must not grow into one the device's first slot cannot take (more than 120 segments
/// need work items, which that slot lacks).
#[test]
fn many_blocks_freed_while_the_device_is_full_are_all_scrubbed() {
    use kvhygiene::alloc::Allocator;
    let (path, lib) = fake_or_skip!("full_first_slot_busy");
    let backend = std::sync::Arc::new(start(&path));
    let alloc = Allocator::new(backend, kvhygiene::config::Config::default(), None);
    let s = StreamHandle(0);
    switch(&lib, "set_device_memory", 1024);
    let size = 4096;
    let mut blocks = Vec::new();
    while let Ok(p) = alloc.malloc(size, 0, s) {
        blocks.push(p);
        assert!(blocks.len() <= 256, "the device holds 1 MiB");
    }
    assert!(blocks.len() >= 200, "{} blocks of 4 KiB", blocks.len());
    for p in &blocks {
        alloc.free(*p, size, 0, s).expect("free");
    }
    for _ in 0..4 {
        let _ = alloc.synchronize();
    }
    // 960 KiB (a size class of its own, not rounded up): with the 4 KiB of the first slot's
    // sums, all but 60 KiB of the device, which only every freed block given back can give.
    let bigger = alloc.malloc(960 * 1024, 0, s);
    let stats = alloc.stats();
    assert!(
        bigger.is_ok(),
        "of {} blocks freed with the device full, {} bytes stayed pending ({} scrubs \
         deferred), and a later allocation failed: {:?}",
        blocks.len(),
        stats.accounting.pending.bytes,
        stats.counters.scrubs_deferred,
        bigger.err()
    );
    alloc.shutdown();
}

/// A batch with work items (130 segments) on a full device takes the idle slot the device
/// made as it opened and gives it a larger work item area. A shutdown that begins while that
/// slot's completion event is queried stops the submission without a further driver call,
/// and the submission answers `ShuttingDown`, as at every other step: not `OutOfMemory`,
/// which the pool counts as a backend error and defers (and a KV scrub reports to its caller
/// as a memory shortage).
#[test]
fn a_shutdown_begun_while_an_idle_slot_gets_more_work_items_is_a_shutdown() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_more_items");
    let b = BACKEND.get_or_init(|| start(&path));
    let base = b.allocate(0, 130 * 4096).expect("allocate");
    let segments = (0..130)
        .map(|i| ScrubSegment {
            addr: base + i * 4096,
            len: 4096,
            seed: i,
        })
        .collect();
    // The device is full: no new slot can be made.
    switch(&lib, "set_device_memory", 1);
    arm(&lib, "on_event_query", exit_begins);
    let submitted = submit(b, batch(segments, SAMPLED));
    let after = calls_after_hook(&lib);
    assert_eq!(after, 0, "{after} driver calls after shutdown() returned");
    assert!(
        matches!(submitted, Err(BackendError::ShuttingDown)),
        "the submission during which shutdown began returned {}",
        outcome(&submitted)
    );
}

/// A paged KV cache of `regions` regions of 4 blocks of 256 bytes on stream 5, and a 4 KiB
/// block beside it, on the stand-in at `path` under the policy's defaults with batches of
/// one (submitted at once), under the never-reuse policy (`idle_ttl_ms = 0`) when
/// `never_reuse`; then the device is made full.
struct FullDeviceKv {
    alloc: kvhygiene::alloc::Allocator,
    layout: kvhygiene::alloc::KvLayout,
    cache: u64,
    len: u64,
    other: u64,
}

impl FullDeviceKv {
    /// Makes room on the device again, frees the cache and shuts the allocator down.
    fn give_back(self, lib: &libloading::Library) {
        switch(lib, "set_device_memory", 0);
        let len = self.len as i64;
        self.alloc
            .free(self.cache, len, 0, KV_STREAM)
            .expect("free");
        self.alloc.shutdown();
    }
}

const KV_STREAM: StreamHandle = StreamHandle(5);

fn kv_cache_on_a_full_device(
    path: &str,
    lib: &libloading::Library,
    never_reuse: bool,
    regions: u64,
) -> FullDeviceKv {
    use kvhygiene::alloc::{Allocator, KvLayout};
    let backend = std::sync::Arc::new(start(path));
    let defaults = kvhygiene::config::Config::default();
    let config = kvhygiene::config::Config {
        batch_size: 1,
        batch_max_delay_us: 10_000_000,
        idle_ttl_ms: if never_reuse { 0 } else { defaults.idle_ttl_ms },
        ..defaults
    };
    let alloc = Allocator::new(backend, config, None);
    let (block, blocks) = (256u64, 4u64);
    let len = regions * blocks * block;
    let cache = alloc.malloc(len as i64, 0, KV_STREAM).expect("malloc");
    let other = alloc.malloc(4096, 0, KV_STREAM).expect("malloc");
    switch(lib, "set_device_memory", 1);
    let layout = KvLayout {
        regions: (0..regions).map(|r| cache + r * blocks * block).collect(),
        block_bytes: block,
        block_stride: block,
        blocks_per_region: blocks,
    };
    FullDeviceKv {
        alloc,
        layout,
        cache,
        len,
        other,
    }
}

/// On a full device a KV scrub (`kvh_scrub_blocks` when a request ends) must not fail for
/// lack of memory merely because the device's only slot, the one it made as it opened, is
/// held by a freed block's batch whose scrub has already completed on the device and is
/// waiting to be harvested (the flusher does so every batch delay). Frees go on all the time
/// in a server, so the slot is often held so; the KV scrub is expected to get it (by
/// harvesting completed batches, or waiting for one) rather than return `OutOfMemory`.
#[test]
fn a_kv_scrub_on_a_full_device_is_not_refused_while_a_completed_batch_holds_the_first_slot() {
    let (path, lib) = fake_or_skip!("full_kv_scrub_slot_held");
    let kv = kv_cache_on_a_full_device(&path, &lib, false, 8);
    let s = KV_STREAM;
    // A batch of one: submitted at once, on the first slot; it completes on the device at
    // once (the stand-in runs kernels as they are launched).
    kv.alloc.free(kv.other, 4096, 0, s).expect("free");
    let scrubbed = kv.alloc.scrub_kv_blocks(&kv.layout, &[0], 0, s);
    kv.give_back(&lib);
    assert!(
        scrubbed.is_ok(),
        "a KV scrub of 8 segments on a full device failed while the first slot was held by \
         a completed, unharvested batch: {scrubbed:?}"
    );
}

/// Two idle slots on device 0 of `b`, the stand-in `lib`: the one the device made as it
/// opened (no work item area) and one with room for a batch of 130 segments, which holds an
/// abandoned batch whose event answers "not ready" to its next query; then the device is made
/// full. Returns the batch's segments (130 of 4 KiB).
fn two_idle_slots_on_a_full_device(
    b: &CudaBackend,
    lib: &libloading::Library,
) -> impl Fn() -> Vec<ScrubSegment> {
    let base = b.allocate(0, 130 * 4096).expect("allocate");
    let segments = move || {
        (0..130)
            .map(|i| ScrubSegment {
                addr: base + i * 4096,
                len: 4096,
                seed: i,
            })
            .collect::<Vec<_>>()
    };
    // With memory to spare, the first batch with work items gets a slot of its own.
    let mut first = submit(b, batch(segments(), SAMPLED)).expect("first batch");
    first.wait().expect("wait");
    drop(first);
    switch(lib, "set_pending_queries", 1);
    drop(submit(b, batch(segments(), SAMPLED)).expect("second batch"));
    switch(lib, "set_pending_queries", 0);
    switch(lib, "set_device_memory", 1);
    segments
}

/// On a full device an idle slot whose work item area already holds a batch's items is used
/// as it is: a slot is given a new page-locked area only when its own is too small for the
/// batch. Here the last batch on the device's first slot (abandoned, as a dropped ticket is)
/// is seen complete by the second query of its event only: it completes between the look for
/// an idle slot with room and the look for one to give a larger area. The batch must still
/// run without allocating page-locked memory (and without parking the area the slot had).
#[test]
fn a_slot_whose_work_item_area_holds_the_batch_is_not_given_a_new_one() {
    let (path, lib) = fake_or_skip!("full_more_items_race");
    let b = start(&path);
    let base = b.allocate(0, 130 * 4096).expect("allocate");
    let segments = || {
        (0..130)
            .map(|i| ScrubSegment {
                addr: base + i * 4096,
                len: 4096,
                seed: i,
            })
            .collect::<Vec<_>>()
    };
    // The device is full: no new slot can be made.
    switch(&lib, "set_device_memory", 1);
    // The first batch with work items gives the first slot an area for 256 items.
    let mut first = submit(&b, batch(segments(), SAMPLED)).expect("first batch");
    first.wait().expect("wait");
    drop(first);
    // An abandoned batch on that slot, whose event answers "not ready" to its next query.
    switch(&lib, "set_pending_queries", 1);
    drop(submit(&b, batch(segments(), SAMPLED)).expect("second batch"));
    switch(&lib, "set_pending_queries", 0);
    let host_allocs = query(&lib, "host_allocs", 0);
    let third = submit(&b, batch(segments(), SAMPLED));
    let new_areas = query(&lib, "host_allocs", 0) - host_allocs;
    assert!(third.is_ok(), "third batch: {}", outcome(&third));
    drop(third);
    assert_eq!(
        new_areas, 0,
        "a batch of 130 segments allocated {new_areas} page-locked areas on a full device \
         although the idle slot it got already had room for its 130 work items"
    );
}

/// On a full device a KV scrub (`kvh_scrub_blocks` when a request ends) must not fail for
/// lack of memory merely because the device's only slot, the one it made as it opened, is
/// held by a freed block's batch that was submitted and has not completed yet. That batch
/// completes on its own and gives the slot back; the KV scrub, which waits for its own
/// verdict anyway, is expected to get the slot then rather than return `OutOfMemory`. Here
/// the batch's completion event answers "not ready" to its first queries (the device runs
/// behind the host, as a busy server's does).
#[test]
fn a_kv_scrub_on_a_full_device_is_not_refused_while_a_running_batch_holds_the_first_slot() {
    let (path, lib) = fake_or_skip!("full_kv_scrub_slot_running");
    let kv = kv_cache_on_a_full_device(&path, &lib, false, 8);
    let s = KV_STREAM;
    // A batch of one: submitted at once, on the first slot; its event reads "not ready" to
    // the next queries (its scrub is still running on the device).
    switch(&lib, "set_pending_queries", 1000);
    kv.alloc.free(kv.other, 4096, 0, s).expect("free");
    switch(&lib, "set_pending_queries", 0);
    let scrubbed = kv.alloc.scrub_kv_blocks(&kv.layout, &[0], 0, s);
    kv.give_back(&lib);
    assert!(
        scrubbed.is_ok(),
        "a KV scrub of 8 segments on a full device failed while the first slot was held by \
         a submitted batch that had not completed yet: {scrubbed:?}"
    );
}

/// On a full device an idle slot whose work item area already holds a batch's items is used
/// as it is, also when another idle slot (the one the device made as it opened, which has no
/// work item area) comes first in the idle list: no slot is given a new page-locked area
/// while a completed slot with room for the batch is idle. Here the slot with room is seen
/// complete only after the first look for an idle slot with room (its event answers "not
/// ready" once), as in `a_slot_whose_work_item_area_holds_the_batch_is_not_given_a_new_one`.
#[test]
fn an_idle_slot_with_room_is_used_before_another_idle_slot_is_given_a_new_area() {
    let (path, lib) = fake_or_skip!("full_more_items_two_slots");
    let b = start(&path);
    let segments = two_idle_slots_on_a_full_device(&b, &lib);
    let host_allocs = query(&lib, "host_allocs", 0);
    let third = submit(&b, batch(segments(), SAMPLED));
    let new_areas = query(&lib, "host_allocs", 0) - host_allocs;
    assert!(third.is_ok(), "third batch: {}", outcome(&third));
    drop(third);
    assert_eq!(
        new_areas, 0,
        "a batch of 130 segments allocated {new_areas} page-locked areas on a full device \
         although an idle slot with room for its 130 work items had completed"
    );
}

/// As above, with page-locked host memory short as well (the next `cuMemHostAlloc` fails):
/// the batch needs no new memory, since a completed idle slot has room for its work items,
/// so it must run rather than be refused for lack of memory.
#[test]
fn an_idle_slot_with_room_runs_a_batch_when_page_locked_memory_is_short_too() {
    let (path, lib) = fake_or_skip!("full_more_items_two_slots_no_host");
    let b = start(&path);
    let segments = two_idle_slots_on_a_full_device(&b, &lib);
    switch(&lib, "fail_host_allocs", 1);
    let third = submit(&b, batch(segments(), SAMPLED));
    switch(&lib, "fail_host_allocs", 0);
    assert!(
        third.is_ok(),
        "a batch of 130 segments on a full device was refused although an idle slot with \
         room for its 130 work items had completed: {}",
        outcome(&third)
    );
}

/// As `a_kv_scrub_on_a_full_device_is_not_refused_while_a_completed_batch_holds_the_first_slot`,
/// under the never-reuse policy (`idle_ttl_ms = 0`: every freed block is verified,
/// quarantined, re-scrubbed and released). The KV scrub must not fail for lack of memory
/// because work the allocator starts on its own behalf inside the call (the re-scrub of the
/// block whose completed batch it harvested) takes the slot that harvest gave back, before
/// the engine's scrub is submitted.
#[test]
fn a_kv_scrub_on_a_full_device_is_not_refused_for_a_rescrub_its_own_harvest_submitted() {
    let (path, lib) = fake_or_skip!("full_kv_scrub_rescrub_takes_slot");
    let kv = kv_cache_on_a_full_device(&path, &lib, true, 8);
    let s = KV_STREAM;
    // A batch of one: submitted at once, on the first slot; it completes on the device at
    // once.
    kv.alloc.free(kv.other, 4096, 0, s).expect("free");
    // Work submitted from here on runs behind the host, as on a GPU: its event reads "not
    // ready" to its first query.
    switch(&lib, "set_pending_queries", 1);
    let scrubbed = kv.alloc.scrub_kv_blocks(&kv.layout, &[0], 0, s);
    switch(&lib, "set_pending_queries", 0);
    kv.give_back(&lib);
    assert!(
        scrubbed.is_ok(),
        "a KV scrub of 8 segments on a full device failed after its harvest of a completed \
         batch (under never-reuse) submitted that block's re-scrub onto the freed slot: \
         {scrubbed:?}"
    );
}

/// Held inside the fake driver's next `cuEventSynchronize` until released: a KV scrub's
/// batch still running on the device while its caller waits for the verdict.
static HELD_SYNC: (std::sync::Mutex<u8>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

extern "C" fn hold_event_synchronize() {
    let (lock, cv) = &HELD_SYNC;
    let mut state = lock.lock().unwrap();
    *state = 1;
    cv.notify_all();
    while *state != 2 {
        state = cv.wait(state).unwrap();
    }
}

/// On a full device a KV scrub that finds no batch slot waits for the batches in flight and
/// is tried once more. A batch in flight there may be another KV scrub's (two requests
/// ending at once, or a claim through the eviction gate while the engine scrubs): it holds
/// the device's only slot until it completes, as a freed block's batch does. The second KV
/// scrub is expected to get the slot once that batch completes, rather than return
/// `OutOfMemory` while it is still running.
#[test]
fn a_kv_scrub_on_a_full_device_waits_for_another_kv_scrub_holding_the_only_slot() {
    let (path, lib) = fake_or_skip!("full_kv_scrub_behind_kv_scrub");
    let kv = kv_cache_on_a_full_device(&path, &lib, false, 8);
    let s = KV_STREAM;
    arm(&lib, "on_event_synchronize", hold_event_synchronize);
    let (first, second) = std::thread::scope(|sc| {
        // Runs on the first slot; its wait for the verdict is held (its batch still runs).
        let first = sc.spawn(|| kv.alloc.scrub_kv_blocks(&kv.layout, &[0], 0, s));
        {
            let (lock, cv) = &HELD_SYNC;
            let mut state = lock.lock().unwrap();
            while *state != 1 {
                state = cv.wait(state).unwrap();
            }
        }
        let second = sc.spawn(|| {
            kv.alloc
                .scrub_kv_blocks(&kv.layout, &[1], 0, StreamHandle(6))
        });
        // The second call has had time to find no slot (and, fixed, to wait for the first).
        std::thread::sleep(std::time::Duration::from_millis(500));
        {
            let (lock, cv) = &HELD_SYNC;
            *lock.lock().unwrap() = 2;
            cv.notify_all();
        }
        (first.join().unwrap(), second.join().unwrap())
    });
    kv.give_back(&lib);
    assert!(first.is_ok(), "the first KV scrub: {first:?}");
    assert!(
        second.is_ok(),
        "a KV scrub on a full device returned out of memory while the only slot was held by \
         another KV scrub's batch still in flight, which completed 500 ms later: {second:?}"
    );
}

/// No driver call, and no `cuMemFree` beyond the `frees` counted before, once the armed
/// hook's `shutdown()` returned, whatever the release returned.
fn assert_nothing_after_shutdown(
    lib: &libloading::Library,
    frees: i32,
    released: &Result<(), BackendError>,
) {
    let after = calls_after_hook(lib);
    assert_eq!(
        (after, query(lib, "mem_frees", 0) - frees),
        (0, 0),
        "driver calls and cuMemFree calls after shutdown() returned; release returned {}",
        outcome(released)
    );
}

/// `release` first frees the device's parked buffers (here page-locked memory whose mapping
/// failed while a batch slot was made), then the block. A shutdown that begins during one of
/// those frees (`cuMemFreeHost`) stops the release there: no `cuMemFree` of the block, nor
/// any other driver call, once `shutdown()` has returned (docs/cuda.md, "Exit": an entry point
/// begun before it checks the flag again between its driver calls).
#[test]
fn no_free_of_the_block_after_shutdown_begun_while_a_release_frees_parked_pages() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_release_parked");
    let b = BACKEND.get_or_init(|| fake_cuda::start_without_first_slot(&path, &lib));
    let base = b.allocate(0, 4096).expect("allocate");
    // The batch's new slot gets its page-locked result area, whose mapping fails: the pages
    // are parked for the device's next release.
    switch(&lib, "fail_host_maps", 1);
    let scrub = batch(
        vec![ScrubSegment {
            addr: base,
            len: 4096,
            seed: 41,
        }],
        SAMPLED,
    );
    assert!(
        submit(b, scrub).is_err(),
        "the slot's pages could not be mapped"
    );
    let block = b.allocate(0, 4096).expect("allocate");
    let frees = query(&lib, "mem_frees", 0);
    arm(&lib, "on_mem_free_host", exit_begins);
    let released = b.release(0, block, 4096);
    assert_nothing_after_shutdown(&lib, frees, &released);
}

/// A submission that finds an idle batch slot queries its completion event; a shutdown that
/// begins during that query (which then reports the slot complete) stops the submission
/// there: once `shutdown()` has returned, no further driver call is made (the capture query
/// of the scrub stream that follows included).
#[test]
fn no_driver_call_after_shutdown_begun_while_the_idle_slot_found_is_queried() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_idle_slot_complete");
    // The device makes its first slot as it opens: the submission below finds it idle.
    let b = BACKEND.get_or_init(|| start(&path));
    let base = b.allocate(0, 4096).expect("allocate");
    let seg = segment(base, 4096, 38);
    arm(&lib, "on_event_query", exit_begins);
    let submitted = submit(b, batch(vec![seg], SAMPLED));
    assert_none_after_shutdown(&lib, "submission", &submitted);
}

/// The same when the submission makes a new slot and the shutdown begins while the slot's
/// completion event, its last part, is created.
#[test]
fn no_driver_call_after_shutdown_begun_while_a_new_slot_s_event_is_created() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_new_slot_event");
    let b = BACKEND.get_or_init(|| fake_cuda::start_without_first_slot(&path, &lib));
    let base = b.allocate(0, 4096).expect("allocate");
    let seg = segment(base, 4096, 39);
    arm(&lib, "on_event_create", exit_begins);
    let submitted = submit(b, batch(vec![seg], SAMPLED));
    assert_none_after_shutdown(&lib, "submission", &submitted);
}

/// A device opened on first use (here device 1, by an allocation) while the shutdown begins
/// as the opening makes the device's context current (its first step after retaining it)
/// makes no further driver call: neither the rest of the opening (the compute capability
/// queries included) nor the allocation that asked for it.
#[test]
fn no_driver_call_after_shutdown_begun_while_an_opening_device_s_context_is_made_current() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_device_open_context");
    let b = BACKEND.get_or_init(|| start(&path));
    arm(&lib, "on_device1_current", exit_begins);
    let allocated = b.allocate(1, 4096);
    assert_none_after_shutdown(&lib, "allocate(1)", &allocated);
}

/// An entry point restores the caller's context, then the caller's capture mode, as it
/// returns. A shutdown that begins while the caller's context is made current again (here
/// device 1's, the thread's own, after an allocation on device 0) leaves the capture mode
/// as it is: no driver call once `shutdown()` has returned.
#[test]
fn no_driver_call_after_shutdown_begun_while_the_caller_s_context_is_restored() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_context_restore");
    let b = BACKEND.get_or_init(|| start(&path));
    // The thread works on device 1, as a worker of a multi-GPU job does.
    switch(&lib, "make_current", 1);
    arm(&lib, "on_device1_current", exit_begins);
    let allocated = b.allocate(0, 4096);
    assert_none_after_shutdown(&lib, "allocate(0)", &allocated);
}

/// An entry point's first driver call puts the thread in relaxed capture mode
/// (`CurrentCtx::enter`), then it reads the caller's context. A shutdown that begins inside
/// that first call (on this thread, where the shutdown does not wait for it) stops the entry
/// point there: once `shutdown()` has returned, no further driver call is made (reading the
/// current context included), as for the steps of an opening device.
#[test]
fn no_driver_call_after_shutdown_begun_while_the_entry_point_sets_the_capture_mode() {
    exit_hook!();
    let (path, lib) = fake_or_skip!("shutdown_capture_mode_exchange");
    let b = BACKEND.get_or_init(|| start(&path));
    arm(&lib, "on_capture_mode", exit_begins);
    let allocated = b.allocate(0, 4096);
    assert_none_after_shutdown(&lib, "allocate(0)", &allocated);
}
