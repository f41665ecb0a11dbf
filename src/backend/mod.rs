//! The narrow interface between the pool and the memory it manages.
//!
//! The pool ([`crate::alloc`]) owns every policy decision; a backend only allocates, releases,
//! zeroes fresh memory and runs scrub batches. Two implementations:
//!
//! - [`host::HostBackend`]: CPU memory, scrubs on a worker thread. It runs the same
//!   PENDING → CLEAN path as the GPU so that machines without a GPU exercise it.
//! - `cuda::CudaBackend`: device memory through the CUDA driver, loaded at run time.
//!
//! A backend knows nothing about blocks, tenants or policies (dependencies point downwards).

pub mod cuda;
pub mod host;
pub mod host_memory;
pub mod verify;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set when process exit has begun (the C ABI's exit watch): from then on no backend makes a
/// driver call, also one still being made by a start-up that exit overtook (invariant 6).
static PROCESS_EXITING: AtomicBool = AtomicBool::new(false);

/// Process exit has begun: every backend refuses its driver calls from now on, as after its
/// own [`Backend::shutdown`]. An atomic store: safe in an exit handler.
pub(crate) fn mark_process_exit() {
    PROCESS_EXITING.store(true, Ordering::SeqCst);
}

/// Whether [`mark_process_exit`] was called.
pub(crate) fn process_exiting() -> bool {
    PROCESS_EXITING.load(Ordering::SeqCst)
}

pub use verify::{SegmentResult, WORD_BYTES};

/// A device address (for the host backend: a process address). Opaque to the pool.
pub type DevicePtr = u64;

/// A stream handle as the caller passed it (`cudaStream_t`); 0 is the legacy default stream.
/// The host backend ignores streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamHandle(pub u64);

impl StreamHandle {
    /// The legacy default stream (`NULL` for the driver API's calls).
    pub const LEGACY: StreamHandle = StreamHandle(0);
    /// `cudaStreamPerThread` (`CU_STREAM_PER_THREAD`): the calling thread's default stream.
    pub const PER_THREAD: StreamHandle = StreamHandle(2);

    /// The handle to keep for work queued later, maybe from another thread (a batch the
    /// flusher submits, a stream a scrub waits for). The per-thread default stream is another
    /// stream on every thread, so it becomes the legacy default stream, which is one stream
    /// on every thread and is ordered with it: the legacy stream synchronises with every
    /// blocking stream of the context, the per-thread default streams included (CUDA's
    /// "stream synchronization behavior"). Other handles are kept.
    pub fn shared(self) -> StreamHandle {
        if self == StreamHandle::PER_THREAD {
            StreamHandle::LEGACY
        } else {
            self
        }
    }
}

/// One region to scrub and verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScrubSegment {
    pub addr: DevicePtr,
    pub len: u64,
    /// Seed of the verification sample positions (the block's scrub sequence number), recorded
    /// so an auditor can recompute which words were read back.
    pub seed: u64,
}

/// How a batch is scrubbed and verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScrubOptions {
    /// Samples read back per segment (ignored when `full_verify`).
    pub samples: u32,
    /// Read back every word instead of sampling.
    pub full_verify: bool,
    /// Zero every byte twice before verifying.
    pub double_pass: bool,
}

/// One launch worth of scrubs: every segment is zeroed, then verified, in stream order after
/// all prior work on `stream` and on every stream in `wait_streams`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrubBatch {
    pub device: u32,
    pub stream: StreamHandle,
    pub wait_streams: Vec<StreamHandle>,
    pub segments: Vec<ScrubSegment>,
    pub options: ScrubOptions,
}

/// An in-flight scrub batch. Results come back in the order of [`ScrubBatch::segments`].
pub trait ScrubTicket: Send {
    /// Non-blocking: `Some` once the batch is complete and its result slots are readable.
    fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError>;
    /// Blocks until the batch is complete.
    fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError>;
}

/// The text of [`BackendError::OutOfMemory`].
fn out_of_memory_text(device: u32, requested: u64) -> String {
    match requested {
        0 => format!("out of memory on device {device} (for a driver object)"),
        n => format!("out of memory: {n} bytes requested on device {device}"),
    }
}

/// Errors a backend reports. Driver errors keep the failing call's name and code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// `requested` is 0 when the memory was for a driver object of no stated size (an event, a
    /// device's context or its kernels' module).
    #[error("{}", out_of_memory_text(*device, *requested))]
    OutOfMemory { device: u32, requested: u64 },
    #[error("device {device} does not exist (the backend has {count} devices)")]
    InvalidDevice { device: u32, count: u32 },
    #[error("no CUDA driver: {0}")]
    NoDriver(String),
    #[error("{call} failed with CUDA error {code} ({name})")]
    Driver {
        call: &'static str,
        code: i32,
        name: String,
    },
    #[error("stream {stream:#x} is capturing a CUDA graph; {what} is deferred or refused")]
    StreamCapturing { stream: u64, what: &'static str },
    #[error("the process is exiting; no further device calls are made")]
    ShuttingDown,
    #[error("{0}")]
    Other(String),
}

/// Which backend implementation is in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Host,
    Cuda,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Host => "host",
            BackendKind::Cuda => "cuda",
        })
    }
}

/// What the pool needs from memory. Every method may be called from any thread.
pub trait Backend: Send + Sync + 'static {
    fn kind(&self) -> BackendKind;

    /// Number of devices; valid device indices are `0..device_count()`.
    fn device_count(&self) -> u32;

    /// Whether the devices draw on one memory, so that what one device's pool caches is room
    /// another device's allocation could have (the host backend: its devices share one
    /// capacity). A GPU's memory is its own: `false` unless a backend says otherwise.
    fn devices_share_memory(&self) -> bool {
        false
    }

    /// Allocates `len` bytes on `device`. The content is unspecified; the pool zeroes it with
    /// [`Backend::zero_fresh`] before first hand-out. Alignment is at least 256 bytes.
    fn allocate(&self, device: u32, len: u64) -> Result<DevicePtr, BackendError>;

    /// Returns memory obtained from [`Backend::allocate`]. The pool calls this only for blocks
    /// whose last scrub was verified, or at shutdown never (exit leaks rather than calls).
    fn release(&self, device: u32, addr: DevicePtr, len: u64) -> Result<(), BackendError>;

    /// Zeroes fresh memory in stream order: every later use on `stream`, and every use on
    /// another stream ordered after `stream`, sees zeros. Host reads through
    /// [`Backend::read`] see them too. (The host backend zeroes synchronously.)
    fn zero_fresh(
        &self,
        device: u32,
        addr: DevicePtr,
        len: u64,
        stream: StreamHandle,
    ) -> Result<(), BackendError>;

    /// Enqueues a batch: zero, then verify, every segment. Never blocks on the device.
    ///
    /// # Safety
    /// 1. Every segment of `batch` lies inside memory that [`Backend::allocate`] of this
    ///    backend returned on `batch.device` and that is not released before the ticket
    ///    completes. The CUDA backend cannot check it without a lookup per segment on the
    ///    hot path (under unified addressing any page-locked host buffer is a valid device
    ///    address, which the kernel would zero); the host backend checks it anyway.
    /// 2. Nothing else writes those bytes until the ticket completes (the pool's freed
    ///    blocks; KV cache blocks the engine handed back).
    /// 3. `batch.stream` and every stream of `batch.wait_streams` is a live stream (the C
    ///    API's contract: a stream named to a free or recorded on a block stays valid until
    ///    its scrub was submitted, or `kvh_forget_stream` took it out of the pool first).
    unsafe fn submit_scrub(&self, batch: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError>;

    /// Whether `stream` is capturing a CUDA graph (never for the host backend).
    fn is_capturing(&self, _device: u32, _stream: StreamHandle) -> Result<bool, BackendError> {
        Ok(false)
    }

    /// Copies host bytes into device memory (synchronous). For tests, the demo and checks.
    fn write(&self, device: u32, addr: DevicePtr, src: &[u8]) -> Result<(), BackendError>;

    /// Copies device memory into host bytes (synchronous). For tests, the demo and checks.
    fn read(&self, device: u32, addr: DevicePtr, dst: &mut [u8]) -> Result<(), BackendError>;

    /// Makes the next `segments` scrubbed segments skip zeroing part of their memory, so that
    /// verification must catch them: a fire drill for the detection path. Only backends that
    /// can do this safely implement it (the host backend); others refuse.
    fn inject_fault(&self, _segments: u64) -> Result<(), BackendError> {
        Err(BackendError::Other(format!(
            "fault injection is available on the host backend only, not on {}",
            self.kind()
        )))
    }

    /// Process exit has begun: after this returns the backend makes no further driver calls;
    /// later calls fail with [`BackendError::ShuttingDown`].
    fn shutdown(&self) {}
}

/// Builds the backend the configuration asks for.
///
/// `auto` picks CUDA when a CUDA driver is installed and falls back to the host backend only
/// when there is no driver at all; a driver that is present but fails is an error, never a
/// silent switch to host memory (a caller expecting device memory must not get host memory).
pub fn select(
    choice: crate::config::BackendChoice,
) -> Result<std::sync::Arc<dyn Backend>, BackendError> {
    use crate::config::BackendChoice;
    match choice {
        BackendChoice::Host => Ok(host::HostBackend::within_available_memory()),
        BackendChoice::Cuda => match cuda::probe() {
            cuda::Probe::Available(b) => Ok(std::sync::Arc::new(b)),
            cuda::Probe::NoDriver(why) => Err(BackendError::NoDriver(why)),
            cuda::Probe::Broken(e) => Err(e),
        },
        BackendChoice::Auto => match cuda::probe() {
            cuda::Probe::Available(b) => Ok(std::sync::Arc::new(b)),
            // The only fallback: no driver installed at all.
            cuda::Probe::NoDriver(_) => Ok(host::HostBackend::within_available_memory()),
            // A driver that is present but fails must not turn into host memory.
            cuda::Probe::Broken(e) => Err(e),
        },
    }
}
