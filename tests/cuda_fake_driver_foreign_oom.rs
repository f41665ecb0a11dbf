//! The CUDA backend on the fake driver (tests/fake_cuda/fake_libcuda.cpp): a wait stream of
//! another device orders the scrub through an event created in that stream's context; when
//! that event cannot be created for lack of memory, the `OutOfMemory` error names the device
//! that was short (the wait stream's), whether or not the backend has opened that device.
//! Skips with a message when there is no C++ compiler, as tests/cuda_fake_driver.rs does.

#[path = "backend_common/mod.rs"]
mod common;
#[path = "fake_cuda/mod.rs"]
mod fake_cuda;
#[path = "skip/mod.rs"]
mod skip;

use common::{batch, submit, SAMPLED};
use fake_cuda::{start, switch};
use kvhygiene::backend::{Backend, BackendError, ScrubSegment, StreamHandle};

/// Device 0's block, recorded with a stream of device 1 (handle 0xD1001, of device 1's
/// primary context), while the backend has used device 0 only. The event for that stream is
/// created in device 1's context; it fails for lack of memory: the error names device 1, the
/// device whose memory ran out, not device 0 (docs/cuda.md, "Out of memory"; the commit that
/// orders such waits: "its out-of-memory names that device").
#[test]
fn out_of_memory_for_a_foreign_wait_event_names_the_wait_stream_s_device() {
    let Some((path, lib)) = fake_cuda::instance("kvh-fake-cuda-foreign-oom", "foreign_oom") else {
        return;
    };
    let b = start(&path);
    let base = b.allocate(0, 4096).expect("allocate");
    let seg = ScrubSegment {
        addr: base,
        len: 4096,
        seed: 35,
    };
    // A first batch makes the slot the second one reuses: the next event the backend creates
    // is then the one for the other device's stream.
    let mut first = submit(&b, batch(vec![seg], SAMPLED)).expect("submit");
    first.wait().expect("wait");
    drop(first);
    let mut scrub = batch(vec![seg], SAMPLED);
    scrub.stream = StreamHandle(7);
    scrub.wait_streams = vec![StreamHandle(0xD1001)];
    switch(&lib, "fail_event_creates", 1);
    match submit(&b, scrub) {
        Err(BackendError::OutOfMemory { device, .. }) => assert_eq!(
            device, 1,
            "the event of device 1's stream could not be created, but the error names device \
             {device}"
        ),
        Err(e) => panic!("expected OutOfMemory on device 1, got {e:?}"),
        Ok(_) => panic!("the batch was submitted without the other device's event"),
    }
    b.release(0, base, 4096).expect("release");
}
