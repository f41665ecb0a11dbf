//! Policy keys against the allocator's behaviour on the host backend: what each key of the
//! README's configuration table says, checked through `kvhygiene::alloc::Allocator`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::manual_config;
use kvhygiene::alloc::{Allocator, BlockState};
use kvhygiene::backend::host::HostBackend;
use kvhygiene::backend::verify::SegmentResult;
use kvhygiene::backend::{
    Backend, BackendError, BackendKind, DevicePtr, ScrubBatch, ScrubTicket, StreamHandle,
};
use kvhygiene::config::{Config, FailureMode};

const S: StreamHandle = StreamHandle(0);

/// A host backend whose next scrubbed segments read back one non-zero word: what a write
/// landing in a freed block after its zeroing (a use-after-free) looks like to the pool.
struct OneDirtyWord {
    host: Arc<HostBackend>,
    dirty_segments: Arc<AtomicU64>,
}

struct DirtyTicket {
    inner: Box<dyn ScrubTicket>,
    dirty: Vec<bool>,
}

impl DirtyTicket {
    fn mark(&self, mut results: Vec<SegmentResult>) -> Vec<SegmentResult> {
        for (r, &d) in results.iter_mut().zip(&self.dirty) {
            if d && r.checked > 0 {
                r.nonzero = r.nonzero.max(1);
            }
        }
        results
    }
}

impl ScrubTicket for DirtyTicket {
    fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError> {
        Ok(self.inner.poll()?.map(|r| self.mark(r)))
    }
    fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
        let r = self.inner.wait()?;
        Ok(self.mark(r))
    }
}

impl Backend for OneDirtyWord {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }
    fn device_count(&self) -> u32 {
        self.host.device_count()
    }
    fn allocate(&self, device: u32, len: u64) -> Result<DevicePtr, BackendError> {
        self.host.allocate(device, len)
    }
    fn release(&self, device: u32, addr: DevicePtr, len: u64) -> Result<(), BackendError> {
        self.host.release(device, addr, len)
    }
    fn zero_fresh(
        &self,
        d: u32,
        a: DevicePtr,
        l: u64,
        s: StreamHandle,
    ) -> Result<(), BackendError> {
        self.host.zero_fresh(d, a, l, s)
    }
    unsafe fn submit_scrub(&self, batch: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError> {
        let dirty = batch
            .segments
            .iter()
            .map(|_| {
                self.dirty_segments
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            })
            .collect();
        // SAFETY: this method's own contract, passed on unchanged.
        let inner = unsafe { self.host.submit_scrub(batch) }?;
        Ok(Box::new(DirtyTicket { inner, dirty }))
    }
    fn write(&self, d: u32, a: DevicePtr, src: &[u8]) -> Result<(), BackendError> {
        self.host.write(d, a, src)
    }
    fn read(&self, d: u32, a: DevicePtr, dst: &mut [u8]) -> Result<(), BackendError> {
        self.host.read(d, a, dst)
    }
    fn shutdown(&self) {
        self.host.shutdown()
    }
}

/// `KVH_FAILURE_MODE=abort` is "fail closed: log the failure, then abort the process". With
/// `KVH_FULL_VERIFY=true` and the default threshold, a 1 MiB block whose scrub read one
/// non-zero word passes the coverage threshold (1 of 131072 words) but is quarantined for
/// residue, and `kvh_free_checked` reports it as a failed verification (`VerifyFailed`); the
/// same reading on a KV block (`kvh_scrub_blocks`) aborts the process. A freed block's
/// residue must abort the process too.
#[test]
fn failure_mode_abort_aborts_on_residue_that_passes_the_coverage_threshold() {
    if std::env::var_os("KVH_TEST_RESIDUE_ABORT_CHILD").is_some() {
        let backend = Arc::new(OneDirtyWord {
            host: HostBackend::new(),
            dirty_segments: Arc::new(AtomicU64::new(0)),
        });
        let alloc = Allocator::new(
            backend.clone(),
            Config {
                failure_mode: FailureMode::Abort,
                full_verify: true,
                ..manual_config()
            },
            None,
        );
        let a = alloc.malloc(1 << 20, 0, S).unwrap();
        backend.dirty_segments.store(1, Ordering::SeqCst);
        let freed = alloc.free_checked(a, 1 << 20, 0, S);
        let state = alloc.block_info(a).map(|b| b.state);
        println!("KVH-CHILD-SURVIVED free_checked={freed:?} state={state:?}");
        assert_eq!(
            state,
            Some(BlockState::Quarantined),
            "the residue was not seen"
        );
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "failure_mode_abort_aborts_on_residue_that_passes_the_coverage_threshold",
            "--nocapture",
        ])
        .env("KVH_TEST_RESIDUE_ABORT_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains("KVH-CHILD-SURVIVED"),
        "a freed block read residue under failure_mode=abort and the process carried on: \
         {stdout}"
    );
    assert!(!out.status.success(), "child must abort: {stdout}{stderr}");
    assert!(stderr.contains("failure_mode=abort"), "{stderr}");
}
