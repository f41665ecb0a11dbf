//! The CUDA backend on the fake driver (tests/fake_cuda/fake_libcuda.cpp): what a batch is
//! ordered after (the streams recorded for its blocks), when its results are read (only once
//! its completion event is observed, with the result slots cleared before its launch), and
//! which streams count as capturing. Skips with a message when there is no C++ compiler, as
//! tests/cuda_fake_driver.rs does.

#[path = "backend_common/mod.rs"]
mod common;
#[path = "fake_cuda/mod.rs"]
mod fake_cuda;
#[path = "skip/mod.rs"]
mod skip;

use common::{batch, run, submit, SAMPLED};
use fake_cuda::{query, start, switch};
use kvhygiene::backend::{Backend, BackendError, ScrubSegment, StreamHandle};

/// A private copy of the stand-in (its own dlopen instance, so its switches are its own).
fn instance(name: &str) -> Option<(String, libloading::Library)> {
    fake_cuda::instance("kvh-fake-cuda-order", name)
}

macro_rules! fake_or_skip {
    ($name:expr) => {
        match instance($name) {
            Some(x) => x,
            None => return,
        }
    };
}

fn one_segment(addr: u64, seed: u64) -> Vec<ScrubSegment> {
    vec![ScrubSegment {
        addr,
        len: 4096,
        seed,
    }]
}

/// A block recorded with other streams is scrubbed after the work queued on each of them:
/// the scrub's stream waits, before the scrub launch, for an event recorded on every recorded
/// stream (of its own device, and through that stream's own context for another device's),
/// not on the scrub's own stream instead.
#[test]
fn the_scrub_waits_for_an_event_recorded_on_every_recorded_stream() {
    let (path, lib) = fake_or_skip!("wait_streams");
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    let mut scrub = batch(one_segment(base, 1), SAMPLED);
    scrub.stream = StreamHandle(7);
    scrub.wait_streams = vec![
        StreamHandle(9),
        StreamHandle(7),
        StreamHandle(11),
        StreamHandle(0xD1001),
    ];
    let results = run(&b, scrub);
    assert_eq!(results[0].checked, 64);
    let waited: Vec<i32> = [9, 11, 0xD1001, 7]
        .iter()
        .map(|&w| query(&lib, "scrub_waited_for", w))
        .collect();
    assert_eq!(
        waited,
        vec![1, 1, 1, 0],
        "times the scrub's stream 7 waited for the work of streams 9, 11, 0xd1001 and its own \
         before the scrub launch"
    );
    b.release(0, base, 4096).expect("release");
}

/// A block freed on a stream of another device (`cudaFreeAsync` takes any stream; the stand-in's
/// 0xD1001 is a stream of device 1) is scrubbed on its own device: a kernel cannot be launched
/// into another context's stream, so the batch runs on the device's legacy stream, after the
/// work queued on the freeing stream, and passes.
#[test]
fn a_block_freed_on_a_stream_of_another_device_is_scrubbed_after_it() {
    let (path, lib) = fake_or_skip!("foreign_free_stream");
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    b.write(0, base, &[0xA5; 4096]).expect("write");
    let mut scrub = batch(one_segment(base, 8), SAMPLED);
    scrub.stream = StreamHandle(0xD1001);
    let results = run(&b, scrub);
    assert_eq!((results[0].checked, results[0].nonzero), (64, 0));
    assert_eq!(
        query(&lib, "scrub_waited_for", 0xD1001),
        1,
        "the scrub was not ordered after the work queued on the freeing stream"
    );
    let mut back = [1u8; 4096];
    b.read(0, base, &mut back).expect("read");
    assert!(back.iter().all(|&x| x == 0), "the block was not zeroed");
    b.release(0, base, 4096).expect("release");
}

/// The result slots a batch is read from are cleared before its launch: a segment the kernel
/// does not reach reads "0 checked" (a failed verification), never the result the slot held
/// from its previous batch.
#[test]
fn result_slots_are_cleared_before_each_launch() {
    let (path, lib) = fake_or_skip!("results_cleared");
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    assert_eq!(run(&b, batch(one_segment(base, 2), SAMPLED))[0].checked, 64);
    let slots = query(&lib, "host_allocs", 0);
    switch(&lib, "idle_launches", 1);
    let results = run(&b, batch(one_segment(base, 2), SAMPLED));
    assert_eq!(
        query(&lib, "host_allocs", 0),
        slots,
        "the second batch reuses the first one's slot"
    );
    assert_eq!(
        (results[0].checked, results[0].nonzero),
        (0, 0),
        "a batch whose kernel reached nothing read back the previous batch's result"
    );
    b.release(0, base, 4096).expect("release");
}

/// Results are read only once the batch's completion event has been observed: the kernels
/// run after their launch returns (here: when the completion is observed), and `wait` and
/// `poll` read the results they wrote, not the cleared slots.
#[test]
fn results_are_read_only_after_the_completion_event_is_observed() {
    let (path, lib) = fake_or_skip!("deferred");
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    b.write(0, base, &[0xA5; 4096]).expect("write");
    switch(&lib, "defer_launches", 1);
    let waited = run(&b, batch(one_segment(base, 3), SAMPLED));
    assert_eq!(
        (waited[0].checked, waited[0].nonzero),
        (64, 0),
        "wait returned before the scrub ran"
    );
    b.write(0, base, &[0xA5; 4096]).expect("write");
    switch(&lib, "set_pending_queries", 2);
    let mut ticket = submit(&b, batch(one_segment(base, 4), SAMPLED)).expect("submit");
    assert_eq!(ticket.poll().expect("poll"), None);
    assert_eq!(ticket.poll().expect("poll"), None);
    let polled = ticket.poll().expect("poll").expect("complete");
    assert_eq!((polled[0].checked, polled[0].nonzero), (64, 0));
    drop(ticket);
    switch(&lib, "defer_launches", 0);
    let mut back = [1u8; 4096];
    b.read(0, base, &mut back).expect("read");
    assert!(back.iter().all(|&x| x == 0), "the block was not zeroed");
    b.release(0, base, 4096).expect("release");
}

/// A recorded stream of another device that is capturing a graph (the stand-in's 0xD1C0D, a
/// stream of device 1) is refused like one of the batch's device: nothing is recorded on it
/// or launched, and the refusal names it.
#[test]
fn a_capturing_recorded_stream_of_another_device_is_refused() {
    let (path, lib) = fake_or_skip!("foreign_capturing");
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    let mut scrub = batch(one_segment(base, 5), SAMPLED);
    scrub.stream = StreamHandle(7);
    scrub.wait_streams = vec![StreamHandle(0xD1C0D)];
    match submit(&b, scrub) {
        Err(BackendError::StreamCapturing { stream, .. }) => assert_eq!(stream, 0xD1C0D),
        Err(e) => panic!("expected StreamCapturing for 0xd1c0d, got {e}"),
        Ok(_) => panic!("a scrub was ordered after a capturing stream of another device"),
    }
    assert_eq!(
        query(&lib, "capturing_stream_uses", 0),
        0,
        "work was enqueued on a capturing stream"
    );
    b.release(0, base, 4096).expect("release");
}

/// A stream whose capture was invalidated is still in capture mode until the capture ends
/// (CU_STREAM_CAPTURE_STATUS_INVALIDATED): nothing is enqueued on it either.
#[test]
fn a_stream_whose_capture_was_invalidated_still_counts_as_capturing() {
    let (path, lib) = fake_or_skip!("invalidated_capture");
    let b = start(&path);
    let invalidated = StreamHandle(0xC0DF);
    assert!(b.is_capturing(0, invalidated).expect("status"));
    let base = b.allocate(0, 4096).expect("allocate");
    assert!(matches!(
        b.zero_fresh(0, base, 4096, invalidated),
        Err(BackendError::StreamCapturing { .. })
    ));
    let mut scrub = batch(one_segment(base, 6), SAMPLED);
    scrub.stream = invalidated;
    assert!(matches!(
        submit(&b, scrub),
        Err(BackendError::StreamCapturing { stream: 0xC0DF, .. })
    ));
    let mut scrub = batch(one_segment(base, 6), SAMPLED);
    scrub.wait_streams = vec![invalidated];
    assert!(matches!(
        submit(&b, scrub),
        Err(BackendError::StreamCapturing { stream: 0xC0DF, .. })
    ));
    assert_eq!(
        query(&lib, "capturing_stream_uses", 0),
        0,
        "work was enqueued on a stream in capture mode"
    );
    b.release(0, base, 4096).expect("release");
}

/// While a blocking stream of its context captures, the legacy default stream cannot be used
/// (CUDA_ERROR_STREAM_CAPTURE_IMPLICIT): it reads as capturing, so fresh memory is not zeroed
/// and no scrub is queued or ordered on it, and the work is deferred; once the capture ends
/// the same batch runs.
#[test]
fn the_legacy_stream_during_a_global_capture_elsewhere_reads_as_capturing() {
    let (path, lib) = fake_or_skip!("implicit_capture");
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    switch(&lib, "implicit_capture", 1);
    assert!(b.is_capturing(0, StreamHandle(0)).expect("status"));
    assert!(matches!(
        b.zero_fresh(0, base, 4096, StreamHandle(0)),
        Err(BackendError::StreamCapturing { .. })
    ));
    assert!(matches!(
        submit(&b, batch(one_segment(base, 7), SAMPLED)),
        Err(BackendError::StreamCapturing { stream: 0, .. })
    ));
    let mut scrub = batch(one_segment(base, 7), SAMPLED);
    scrub.stream = StreamHandle(7);
    scrub.wait_streams = vec![StreamHandle(1)];
    assert!(matches!(
        submit(&b, scrub.clone()),
        Err(BackendError::StreamCapturing { stream: 1, .. })
    ));
    switch(&lib, "implicit_capture", 0);
    assert_eq!(run(&b, scrub)[0].checked, 64);
    b.release(0, base, 4096).expect("release");
}

/// `read` and `write` are ordered after the work already queued on the device: a read made
/// while a scrub is queued sees the zeros, and bytes written while one is queued are not
/// zeroed by it afterwards.
#[test]
fn host_copies_are_ordered_after_queued_scrubs() {
    let (path, lib) = fake_or_skip!("copies_ordered");
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    switch(&lib, "defer_launches", 1);
    b.write(0, base, &[0xA5; 4096]).expect("write");
    let mut ticket = submit(&b, batch(one_segment(base, 8), SAMPLED)).expect("submit");
    let mut back = [1u8; 4096];
    b.read(0, base, &mut back).expect("read");
    assert!(
        back.iter().all(|&x| x == 0),
        "read before the queued scrub ran"
    );
    ticket.wait().expect("wait");
    drop(ticket);
    let mut ticket = submit(&b, batch(one_segment(base, 9), SAMPLED)).expect("submit");
    b.write(0, base, &[0x5A; 4096]).expect("write");
    b.read(0, base, &mut back).expect("read");
    assert!(
        back.iter().all(|&x| x == 0x5A),
        "a scrub queued before the write zeroed what was written"
    );
    ticket.wait().expect("wait");
    drop(ticket);
    switch(&lib, "defer_launches", 0);
    b.release(0, base, 4096).expect("release");
}

/// A stream whose capture status the driver cannot report (the query fails) is not taken for
/// one that is not capturing: the work that would be enqueued on it is refused with the
/// driver's error, whether it is the batch's stream, a recorded stream or the stream fresh
/// memory is zeroed on.
#[test]
fn a_failed_capture_query_refuses_the_work() {
    let (path, lib) = fake_or_skip!("capture_query_fails");
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    let driver_error = |r: Result<(), BackendError>| match r {
        Err(BackendError::Driver { call, .. }) => call == "cuStreamIsCapturing",
        _ => false,
    };
    switch(&lib, "fail_capture_queries", 1);
    assert!(driver_error(b.is_capturing(0, StreamHandle(7)).map(|_| ())));
    switch(&lib, "fail_capture_queries", 1);
    assert!(
        driver_error(b.zero_fresh(0, base, 4096, StreamHandle(7))),
        "fresh memory was zeroed on a stream of unknown capture status"
    );
    switch(&lib, "fail_capture_queries", 1);
    assert!(
        driver_error(submit(&b, batch(one_segment(base, 10), SAMPLED)).map(|_| ())),
        "a scrub was queued on a stream of unknown capture status"
    );
    // The batch stream's query succeeds and fails the next one, the recorded stream's.
    static FAIL_NEXT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    extern "C" fn fail_the_next_query() {
        let set = *FAIL_NEXT.get().expect("switch");
        // SAFETY: the address of `void fake_cuda_fail_capture_queries(int)`.
        let set: unsafe extern "C" fn(i32) = unsafe { std::mem::transmute(set) };
        // SAFETY: as above.
        unsafe { set(1) };
    }
    // SAFETY: the switch and the hook setter have these signatures.
    unsafe {
        let set = lib
            .get::<unsafe extern "C" fn(i32)>(b"fake_cuda_fail_capture_queries\0")
            .expect("switch");
        FAIL_NEXT.get_or_init(|| *set as usize);
        let arm = lib
            .get::<unsafe extern "C" fn(extern "C" fn())>(b"fake_cuda_on_capture_query\0")
            .expect("hook");
        arm(fail_the_next_query);
    }
    let mut scrub = batch(one_segment(base, 10), SAMPLED);
    scrub.stream = StreamHandle(7);
    scrub.wait_streams = vec![StreamHandle(9)];
    assert!(
        driver_error(submit(&b, scrub.clone()).map(|_| ())),
        "a scrub was ordered after a recorded stream of unknown capture status"
    );
    assert_eq!(run(&b, scrub)[0].checked, 64);
    b.release(0, base, 4096).expect("release");
}

/// A graph capture that another thread begins in global mode while a submission makes its
/// batch slot (page-locking the result area is the slow step of a submission) makes the
/// legacy default stream unusable from then on. The submission must see it before it queues
/// anything on that stream: the batch is refused with `StreamCapturing` (the pool defers it)
/// and no scrub is launched, as when the capture was already running at the submission's
/// start.
#[test]
fn a_capture_that_begins_while_the_batch_slot_is_made_refuses_the_launch() {
    static IMPLICIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    extern "C" fn capture_begins() {
        let set = *IMPLICIT.get().expect("switch");
        // SAFETY: the address of `void fake_cuda_implicit_capture(int)`.
        let set: unsafe extern "C" fn(i32) = unsafe { std::mem::transmute(set) };
        // SAFETY: as above.
        unsafe { set(1) };
    }
    let (path, lib) = fake_or_skip!("capture_during_slot");
    let b = fake_cuda::start_without_first_slot(&path, &lib);
    let base = b.allocate(0, 4096).expect("allocate");
    // SAFETY: the switch and the hook setter have these signatures.
    unsafe {
        let set = lib
            .get::<unsafe extern "C" fn(i32)>(b"fake_cuda_implicit_capture\0")
            .expect("switch");
        IMPLICIT.get_or_init(|| *set as usize);
        let arm = lib
            .get::<unsafe extern "C" fn(extern "C" fn())>(b"fake_cuda_on_host_alloc\0")
            .expect("hook");
        arm(capture_begins);
    }
    // The backend's first batch makes its first slot (cuMemHostAlloc of its result area).
    let launches = query(&lib, "scrub_launches", 0);
    let submitted = submit(&b, batch(one_segment(base, 11), SAMPLED)).map(|_| ());
    assert!(query(&lib, "calls_at_hook", 0) >= 0, "the hook did not run");
    let launched = query(&lib, "scrub_launches", 0) - launches;
    switch(&lib, "implicit_capture", 0);
    assert!(
        matches!(
            submitted,
            Err(BackendError::StreamCapturing { stream: 0, .. })
        ),
        "submission during a capture that began while its slot was made: {submitted:?}"
    );
    assert_eq!(
        launched, 0,
        "a scrub was launched on the legacy stream while another stream captured"
    );
    b.release(0, base, 4096).expect("release");
}

/// A batch refused because one of its recorded streams is capturing a graph enqueues nothing
/// on any stream, so the batch slot it took stays usable: submitting the same batch again
/// while the capture lasts (the flusher retries deferred batches every pass) reuses that slot
/// rather than pinning host memory and allocating device memory for a new one each time.
#[test]
fn a_batch_deferred_by_a_capturing_recorded_stream_does_not_use_up_a_new_slot_each_try() {
    let (path, lib) = fake_or_skip!("capturing_wait_slot");
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    let mut scrub = batch(one_segment(base, 8), SAMPLED);
    scrub.stream = StreamHandle(7);
    scrub.wait_streams = vec![StreamHandle(0xC0DE)];
    let before = query(&lib, "host_allocs", 0);
    for _ in 0..5 {
        assert!(matches!(
            submit(&b, scrub.clone()),
            Err(BackendError::StreamCapturing { stream: 0xC0DE, .. })
        ));
    }
    let pinned = query(&lib, "host_allocs", 0) - before;
    assert!(
        pinned <= 1,
        "5 tries of a batch refused by a capturing recorded stream pinned {pinned} new batch \
         slots' host memory (at most one slot is needed)"
    );
    b.release(0, base, 4096).expect("release");
}

/// A capture begun on a recorded stream after its capture query captures the event recorded
/// there, and the driver does not refuse a wait for a captured event: the waiting stream joins
/// the capture, whose end then fails unjoined while the scrub stream's work goes into the
/// application's graph. The stream is asked again after the record, and the batch is deferred
/// without the wait, for a stream of the batch's device and for one of another device (whose
/// event is recorded in that device's context); it runs once the capture ended.
#[test]
fn a_capture_begun_on_a_recorded_stream_after_its_query_defers_the_batch_without_joining_it() {
    let (path, lib) = fake_or_skip!("capture_after_query");
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    for w in [9, 0xD1001] {
        let mut scrub = batch(one_segment(base, 9), SAMPLED);
        scrub.stream = StreamHandle(7);
        scrub.wait_streams = vec![StreamHandle(w)];
        switch(&lib, "capture_after_query", w as i32);
        match submit(&b, scrub.clone()) {
            Err(BackendError::StreamCapturing { stream, .. }) => assert_eq!(stream, w),
            Err(e) => panic!("{w:#x}: expected the batch deferred as StreamCapturing, got {e}"),
            Ok(_) => panic!("{w:#x}: the batch was queued after a wait for a captured event"),
        }
        assert_eq!(
            query(&lib, "joined_captures", 0),
            0,
            "{w:#x}: the scrub stream waited for an event recorded in a capture"
        );
        switch(&lib, "end_capture", 0);
        assert_eq!(
            run(&b, scrub)[0].checked,
            64,
            "{w:#x}: the deferred batch runs later"
        );
    }
    b.release(0, base, 4096).expect("release");
}

/// A capture's refusal of a call that orders the batch after a recorded stream (the scrub
/// stream's wait for the event recorded there, refused with CUDA_ERROR_CAPTURED_EVENT when
/// a capture began on that stream after its capture query) comes before the scrub kernel is
/// launched: the batch is deferred as for a capture found before it (docs/cuda.md, "CUDA
/// graph capture"), not failed, which would quarantine blocks that were never read back.
#[test]
fn a_capture_refusing_the_wait_for_a_recorded_stream_defers_the_batch() {
    let (path, lib) = fake_or_skip!("wait_refused_by_capture");
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    let mut scrub = batch(one_segment(base, 9), SAMPLED);
    scrub.stream = StreamHandle(7);
    scrub.wait_streams = vec![StreamHandle(9)];
    switch(&lib, "fail_next_wait", 907);
    match submit(&b, scrub.clone()) {
        Err(BackendError::StreamCapturing { .. }) => {}
        Err(e) => panic!("expected the batch deferred as StreamCapturing, got {e}"),
        Ok(_) => panic!("the batch was queued although its wait was refused"),
    }
    assert_eq!(
        run(&b, scrub)[0].checked,
        64,
        "the deferred batch runs later"
    );
    b.release(0, base, 4096).expect("release");
}

/// Fresh memory is zeroed on the caller's stream once its capture query said it is not
/// capturing. A capture's refusal of the memset itself (here CUDA_ERROR_STREAM_CAPTURE_IMPLICIT:
/// a blocking stream began a capture after the query) is a capture found late, as
/// for a batch's calls before its launch (docs/cuda.md, "CUDA graph capture"): the zeroing is
/// refused with `StreamCapturing` (the allocation then fails as during a capture), not
/// reported as a driver fault.
#[test]
fn a_capture_refusing_the_zeroing_of_fresh_memory_is_a_capture() {
    let (path, lib) = fake_or_skip!("zero_fresh_refused_by_capture");
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    switch(&lib, "fail_next_memset", 906);
    let zeroed = b.zero_fresh(0, base, 4096, StreamHandle(0));
    b.release(0, base, 4096).expect("release");
    assert!(
        matches!(zeroed, Err(BackendError::StreamCapturing { stream: 0, .. })),
        "zeroing refused by a capture: {zeroed:?}"
    );
}
