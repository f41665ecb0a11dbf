//! Host backend: CPU memory standing in for device memory.
//!
//! It exists so that machines without a GPU run the real state machine: scrubs are queued to
//! a worker thread and complete asynchronously, exactly like a kernel launch on a stream, so
//! the pool's PENDING → CLEAN path (submit, poll, harvest) is the one the CUDA backend uses.
//! Streams have no meaning here and are ignored; the worker runs batches in submission order.
//!
//! It also offers a fault injector ([`HostBackend::inject_skip_tail`]) that makes a scrub leave
//! part of a segment unzeroed, so tests and `kvh demo --inject-fault` can show verification
//! catching it.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::host_memory;
use super::verify::{verify_raw, SegmentResult};
use super::{
    Backend, BackendError, BackendKind, DevicePtr, ScrubBatch, ScrubOptions, ScrubSegment,
    ScrubTicket, StreamHandle,
};

/// Alignment of every host allocation (matches cudaMalloc's 256-byte guarantee).
pub const HOST_ALIGN: usize = 256;

/// Virtual devices the host backend exposes (so multi-device paths are testable).
pub const HOST_DEVICES: u32 = 8;

/// Address → (device, layout) of every live allocation.
type AllocationTable = BTreeMap<DevicePtr, (u32, Layout)>;
type Allocations = Arc<Mutex<AllocationTable>>;

/// A batch's completion: the worker fills `results` and notifies.
#[derive(Default)]
struct Completion {
    results: Mutex<Option<Vec<SegmentResult>>>,
    done: Condvar,
}

struct Job {
    batch: ScrubBatch,
    /// Per segment, whether the fault injector sabotages its scrub (the seed is the caller's,
    /// any `u64`, and is left alone).
    sabotaged: Vec<bool>,
    completion: Arc<Completion>,
}

/// CPU-memory backend with an asynchronous scrub worker.
pub struct HostBackend {
    /// Live allocations: address → (device, layout). The truth for `release`, `read`,
    /// `write` and the worker's scrubs, each of which holds the lock while it touches the
    /// memory, so that a concurrent `release` can never free memory under them.
    allocations: Allocations,
    queue: Mutex<Option<Sender<Job>>>,
    /// Segments still to be sabotaged by the fault injector.
    faults_pending: AtomicU64,
    shut_down: AtomicBool,
    /// Bytes the backend may hand out in total (simulated device capacity); `u64::MAX` = none.
    capacity: AtomicU64,
    /// The capacity follows the memory the process may still commit: looked at again when
    /// an allocation would pass it ([`HostBackend::within_available_memory`]).
    follows_available: bool,
    in_use: AtomicU64,
}

impl HostBackend {
    /// A backend with no capacity limit.
    pub fn new() -> Arc<Self> {
        Self::with_capacity(u64::MAX)
    }

    /// A backend that reports out-of-memory once it would hold more than three quarters of
    /// the memory this process may still commit ([`host_memory::available`]: the machine's,
    /// and its memory cgroup's, as a container's limit): blocks are zeroed as they are handed
    /// out, and committed memory past a cgroup's limit is met by the kernel's out-of-memory
    /// kill, not by an error. The quarter left is for the rest of the process.
    /// The figure is looked at again whenever an allocation would pass it: memory short when
    /// the backend was built may be given back later.
    pub fn within_available_memory() -> Arc<Self> {
        Self::build(available_capacity(0), true)
    }

    /// A backend that reports out-of-memory past `capacity` bytes in use (tests of the pool's
    /// out-of-memory recovery).
    pub fn with_capacity(capacity: u64) -> Arc<Self> {
        Self::build(capacity, false)
    }

    fn build(capacity: u64, follows_available: bool) -> Arc<Self> {
        let (tx, rx) = mpsc::channel();
        let allocations: Allocations = Arc::default();
        let worker_allocations = allocations.clone();
        let spawned = std::thread::Builder::new()
            .name("kvh-host-scrub".into())
            .spawn(move || scrub_worker(rx, worker_allocations));
        // Without a worker no scrub could ever complete: refuse scrubs rather than hang.
        let queue = match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                crate::say(format_args!(
                    "kvhygiene: cannot start the host scrub worker: {e}"
                ));
                None
            }
        };
        Arc::new(HostBackend {
            allocations,
            queue: Mutex::new(queue),
            faults_pending: AtomicU64::new(0),
            shut_down: AtomicBool::new(false),
            capacity: AtomicU64::new(capacity),
            follows_available,
            in_use: AtomicU64::new(0),
        })
    }

    /// Counts `len` more bytes in use, when the capacity allows them; a capacity that follows
    /// the memory available is looked at again before a refusal.
    fn reserve(&self, len: u64) -> bool {
        let mut looked_again = !self.follows_available;
        loop {
            let capacity = self.capacity.load(Ordering::SeqCst);
            let reserved = self
                .in_use
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                    used.checked_add(len).filter(|&u| u <= capacity)
                });
            if reserved.is_ok() {
                return true;
            }
            if looked_again {
                return false;
            }
            looked_again = true;
            let in_use = self.in_use.load(Ordering::SeqCst);
            self.capacity
                .store(available_capacity(in_use), Ordering::SeqCst);
        }
    }

    /// The next `segments` scrubbed segments skip zeroing their second half (the verification
    /// must then catch them). Host backend only: a deliberate fault for tests and the demo.
    pub fn inject_skip_tail(&self, segments: u64) {
        self.faults_pending.fetch_add(segments, Ordering::SeqCst);
    }

    /// Bytes currently allocated from this backend.
    pub fn bytes_in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    fn check_device(&self, device: u32) -> Result<(), BackendError> {
        if device >= HOST_DEVICES {
            return Err(BackendError::InvalidDevice {
                device,
                count: HOST_DEVICES,
            });
        }
        if self.shut_down.load(Ordering::Acquire) {
            return Err(BackendError::ShuttingDown);
        }
        Ok(())
    }

    /// Locks the allocation table after checking that `[addr, addr + len)` lies inside one
    /// allocation of `device`; the memory stays allocated while the guard lives.
    fn lock_range(
        &self,
        device: u32,
        addr: DevicePtr,
        len: u64,
    ) -> Result<MutexGuard<'_, AllocationTable>, BackendError> {
        let allocations = self.allocations.lock().unwrap_or_else(|p| p.into_inner());
        if range_is_allocated(&allocations, device, addr, len) {
            Ok(allocations)
        } else {
            Err(BackendError::Other(format!(
                "host range {addr:#x}+{len} is not inside an allocation of device {device}"
            )))
        }
    }

    fn take_fault(&self) -> bool {
        self.faults_pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// The capacity of a backend holding `in_use` bytes: three quarters of what it holds and what
/// the process may still commit ([`host_memory::available`], which counts `in_use` as
/// committed already), so that a quarter stays for the rest of the process however often it
/// is looked at again; no limit when that cannot be read.
fn available_capacity(in_use: u64) -> u64 {
    host_memory::available().map_or(u64::MAX, |room| in_use.saturating_add(room) / 4 * 3)
}

impl Backend for HostBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }

    fn device_count(&self) -> u32 {
        HOST_DEVICES
    }

    /// Every device's allocations count toward one capacity (and one process's memory).
    fn devices_share_memory(&self) -> bool {
        true
    }

    fn allocate(&self, device: u32, len: u64) -> Result<DevicePtr, BackendError> {
        self.check_device(device)?;
        let oom = BackendError::OutOfMemory {
            device,
            requested: len,
        };
        let size = usize::try_from(len).map_err(|_| oom.clone())?;
        let layout = Layout::from_size_align(size.max(1), HOST_ALIGN).map_err(|_| oom.clone())?;
        if !self.reserve(len) {
            return Err(oom);
        }
        // SAFETY: `layout` has a non-zero size (`size.max(1)`) and a power-of-two alignment.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            self.in_use.fetch_sub(len, Ordering::SeqCst);
            return Err(oom);
        }
        let addr = ptr as DevicePtr;
        self.allocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, (device, layout));
        Ok(addr)
    }

    fn release(&self, device: u32, addr: DevicePtr, len: u64) -> Result<(), BackendError> {
        if self.shut_down.load(Ordering::Acquire) {
            return Err(BackendError::ShuttingDown);
        }
        let entry = self
            .allocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
        match entry {
            Some((dev, layout)) if dev == device => {
                // SAFETY: `addr` came from `std::alloc::alloc(layout)` in `allocate` and was
                // just removed from the table, so it is deallocated exactly once.
                unsafe { std::alloc::dealloc(addr as *mut u8, layout) };
                self.in_use.fetch_sub(len, Ordering::SeqCst);
                Ok(())
            }
            Some(other) => {
                // Put it back: a wrong-device release must not lose the allocation.
                self.allocations
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(addr, other);
                Err(BackendError::Other(format!(
                    "release of {addr:#x} on device {device}, allocated on device {}",
                    other.0
                )))
            }
            None => Err(BackendError::Other(format!(
                "release of {addr:#x}: not a host backend allocation"
            ))),
        }
    }

    fn zero_fresh(
        &self,
        device: u32,
        addr: DevicePtr,
        len: u64,
        _stream: StreamHandle,
    ) -> Result<(), BackendError> {
        self.check_device(device)?;
        let _held = self.lock_range(device, addr, len)?;
        // SAFETY: the range lies inside one live allocation, kept allocated by `_held`, that
        // the pool has not handed out yet, so nothing else accesses it.
        unsafe { zero_volatile(addr as *mut u8, len as usize) };
        Ok(())
    }

    unsafe fn submit_scrub(&self, batch: ScrubBatch) -> Result<Box<dyn ScrubTicket>, BackendError> {
        self.check_device(batch.device)?;
        // Segments are checked by the worker, under the allocation lock, when it scrubs them:
        // checking here too would make a free wait for a scrub in progress.
        // Mark sabotaged segments now, at submission, so the fault lands on a known batch.
        let sabotaged = batch.segments.iter().map(|_| self.take_fault()).collect();
        let completion = Arc::new(Completion::default());
        let job = Job {
            batch,
            sabotaged,
            completion: completion.clone(),
        };
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        // Not `ShuttingDown`, which the pool reads as process exit and answers by leaving the
        // blocks pending, silently: without a worker the batch fails, and its blocks with it.
        let sender = queue.as_ref().ok_or_else(|| {
            BackendError::Other("the host scrub worker could not be started".into())
        })?;
        sender
            .send(job)
            .map_err(|_| BackendError::Other("host scrub worker has stopped".into()))?;
        Ok(Box::new(HostTicket { completion }))
    }

    fn write(&self, device: u32, addr: DevicePtr, src: &[u8]) -> Result<(), BackendError> {
        self.check_device(device)?;
        let _held = self.lock_range(device, addr, src.len() as u64)?;
        // SAFETY: destination range lies in a live allocation, kept allocated by `_held`;
        // `src` is a valid slice and cannot overlap backend memory handed out through this API.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), addr as *mut u8, src.len()) };
        Ok(())
    }

    fn read(&self, device: u32, addr: DevicePtr, dst: &mut [u8]) -> Result<(), BackendError> {
        self.check_device(device)?;
        let _held = self.lock_range(device, addr, dst.len() as u64)?;
        // SAFETY: source range lies in a live allocation, kept allocated by `_held`; `dst` is a
        // valid slice.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn inject_fault(&self, segments: u64) -> Result<(), BackendError> {
        self.inject_skip_tail(segments);
        Ok(())
    }

    fn shutdown(&self) {
        self.shut_down.store(true, Ordering::Release);
    }
}

struct HostTicket {
    completion: Arc<Completion>,
}

impl ScrubTicket for HostTicket {
    fn poll(&mut self) -> Result<Option<Vec<SegmentResult>>, BackendError> {
        let results = self
            .completion
            .results
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Ok(results.clone())
    }

    fn wait(&mut self) -> Result<Vec<SegmentResult>, BackendError> {
        let mut results = self
            .completion
            .results
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = results.as_ref() {
                return Ok(r.clone());
            }
            results = self
                .completion
                .done
                .wait(results)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The worker: zero then verify each segment of each batch, in submission order. It ends when
/// the backend (the only sender) is dropped.
fn scrub_worker(rx: Receiver<Job>, allocations: Allocations) {
    while let Ok(job) = rx.recv() {
        let device = job.batch.device;
        let results = job
            .batch
            .segments
            .iter()
            .zip(&job.sabotaged)
            .map(|(seg, &sabotaged)| {
                let table = allocations.lock().unwrap_or_else(|p| p.into_inner());
                if !range_is_allocated(&table, device, seg.addr, seg.len) {
                    // Released under a pending scrub (a pool bug): report it unverified.
                    return SegmentResult::default();
                }
                // The table stays locked while the memory is scrubbed: no release meanwhile.
                scrub_segment(seg, sabotaged, &job.batch.options)
            })
            .collect();
        *job.completion
            .results
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(results);
        job.completion.done.notify_all();
    }
}

/// The byte a sabotaged scrub leaves where it did not zero: residue the verification must
/// find.
const RESIDUE: u8 = 0xA5;

fn scrub_segment(seg: &ScrubSegment, sabotaged: bool, options: &ScrubOptions) -> SegmentResult {
    let (addr, seed) = (seg.addr, seg.seed);
    let len = seg.len as usize;
    // The fault injector leaves the second half unzeroed, as residue: written with a non-zero
    // pattern, so that the drill fails whatever the block held (a block that read zero there
    // would otherwise verify). The last word is always sampled, so the verification below
    // must see it.
    let zero_len = if sabotaged { len / 2 } else { len };
    let passes = if options.double_pass { 2 } else { 1 };
    for _ in 0..passes {
        // SAFETY: the worker checked, with the table locked, that the segment lies in a live
        // allocation; the pool guarantees nobody but this scrub accesses it: a PENDING block,
        // or KV-cache blocks inside a LIVE one whose caller handed them in (`kvh_scrub_blocks`).
        unsafe { zero_volatile(addr as *mut u8, zero_len) };
    }
    if sabotaged {
        // SAFETY: as above; the bytes written are those of the segment past `zero_len`.
        unsafe { std::ptr::write_bytes((addr as *mut u8).add(zero_len), RESIDUE, len - zero_len) };
    }
    // SAFETY: as above; raw volatile reads, no reference to memory a misbehaving caller may
    // still be writing.
    unsafe {
        verify_raw(
            addr as *const u8,
            len,
            seed,
            options.samples,
            options.full_verify,
        )
    }
}

/// Whether `[addr, addr + len)` lies inside one allocation of `device`.
fn range_is_allocated(table: &AllocationTable, device: u32, addr: DevicePtr, len: u64) -> bool {
    table
        .range(..=addr)
        .next_back()
        .is_some_and(|(&base, &(dev, layout))| {
            dev == device
                && addr
                    .checked_add(len)
                    .is_some_and(|end| end <= base + layout.size() as u64)
        })
}

/// Zeroes `len` bytes at `ptr` with writes the compiler may not elide.
///
/// # Safety
/// 1. `ptr..ptr + len` must be valid for writes and not accessed concurrently.
unsafe fn zero_volatile(ptr: *mut u8, len: usize) {
    // SAFETY: guaranteed by the caller (1). `write_bytes` is a memset the optimiser could
    // remove only if the memory were never read again; the compiler fence plus the volatile
    // reads of the verification that always follows keep it observable.
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ScrubSegment;

    fn batch(device: u32, addr: DevicePtr, len: u64, seed: u64) -> ScrubBatch {
        ScrubBatch {
            device,
            stream: StreamHandle(0),
            wait_streams: vec![],
            segments: vec![ScrubSegment { addr, len, seed }],
            options: ScrubOptions {
                samples: 64,
                full_verify: true,
                double_pass: false,
            },
        }
    }

    /// Submits a batch of the tests, whose segments lie in an allocation of `b` made before
    /// and released after the ticket is waited for.
    fn submit(b: &HostBackend, batch: ScrubBatch) -> Box<dyn ScrubTicket> {
        // SAFETY: 1-2. as above; the host backend also checks 1 itself.
        unsafe { b.submit_scrub(batch) }.unwrap()
    }

    #[test]
    fn scrub_zeroes_and_verifies() {
        let b = HostBackend::new();
        let a = b.allocate(0, 4099).unwrap();
        assert_eq!(a % HOST_ALIGN as u64, 0);
        b.write(0, a, &vec![0xAB; 4099]).unwrap();
        let r = submit(&b, batch(0, a, 4099, 1)).wait().unwrap();
        assert_eq!(
            r,
            vec![SegmentResult {
                checked: 513,
                nonzero: 0
            }]
        );
        let mut back = vec![1u8; 4099];
        b.read(0, a, &mut back).unwrap();
        assert!(back.iter().all(|&x| x == 0));
        b.release(0, a, 4099).unwrap();
        assert_eq!(b.bytes_in_use(), 0);
    }

    #[test]
    fn injected_fault_is_visible_to_verification() {
        let b = HostBackend::new();
        let a = b.allocate(0, 1024).unwrap();
        b.write(0, a, &[0x5A; 1024]).unwrap();
        b.inject_skip_tail(1);
        let r = submit(&b, batch(0, a, 1024, 9)).wait().unwrap();
        assert_eq!(r[0].checked, 128);
        assert_eq!(r[0].nonzero, 64, "the unzeroed half must be reported");
        // The injector is one-shot.
        let r = submit(&b, batch(0, a, 1024, 10)).wait().unwrap();
        assert_eq!(r[0].nonzero, 0);
    }

    #[test]
    fn capacity_limit_reports_out_of_memory() {
        let b = HostBackend::with_capacity(1000);
        let a = b.allocate(1, 600).unwrap();
        assert!(matches!(
            b.allocate(1, 600),
            Err(BackendError::OutOfMemory {
                device: 1,
                requested: 600
            })
        ));
        b.release(1, a, 600).unwrap();
        assert!(b.allocate(1, 600).is_ok());
    }

    #[test]
    fn bad_ranges_and_devices_are_refused() {
        let b = HostBackend::new();
        let a = b.allocate(0, 64).unwrap();
        assert!(b.write(0, a + 32, &[0; 64]).is_err());
        assert!(b.write(1, a, &[0; 8]).is_err(), "wrong device");
        assert!(matches!(
            b.allocate(HOST_DEVICES, 8),
            Err(BackendError::InvalidDevice { .. })
        ));
        assert!(b.release(1, a, 64).is_err());
        assert!(
            b.release(0, a, 64).is_ok(),
            "a refused release keeps the allocation"
        );
        assert!(b.release(0, a, 64).is_err(), "double release");
    }

    #[test]
    fn without_a_scrub_worker_a_scrub_fails_and_is_not_taken_for_process_exit() {
        let b = HostBackend::new();
        *b.queue.lock().unwrap() = None;
        let batch = ScrubBatch {
            device: 0,
            stream: StreamHandle(0),
            wait_streams: Vec::new(),
            segments: Vec::new(),
            options: ScrubOptions {
                samples: 8,
                full_verify: false,
                double_pass: false,
            },
        };
        // SAFETY: 1-2. no segment: nothing is written.
        let refused = unsafe { b.submit_scrub(batch) }.err();
        assert!(
            matches!(&refused, Some(BackendError::Other(m)) if m.contains("worker")),
            "{refused:?}"
        );
    }

    #[test]
    fn shutdown_stops_further_work() {
        let b = HostBackend::new();
        b.shutdown();
        assert_eq!(b.allocate(0, 8), Err(BackendError::ShuttingDown));
    }

    /// A backend that already holds three quarters of what it could once commit (the rest
    /// being the quarter kept for the rest of the process) is given no more when its capacity
    /// is looked at again.
    #[test]
    fn a_capacity_looked_at_again_keeps_the_quarter_for_the_rest_of_the_process() {
        let Some(room) = host_memory::available() else {
            crate::say(format_args!("no memory figure can be read here; skipping"));
            return;
        };
        let in_use = room.saturating_mul(3);
        let capacity = available_capacity(in_use);
        assert!(
            capacity <= in_use + room / 4,
            "holding {in_use} bytes with {room} bytes left, the capacity becomes {capacity}: \
             the backend may take {} more bytes of the {room} left",
            capacity - in_use
        );
    }

    /// A segment's seed is any `u64` (the kernel takes every value alike): a seed with its
    /// high bit set is zeroed and verified like any other, at the positions of that seed.
    #[test]
    fn a_seed_with_the_high_bit_set_is_scrubbed_like_any_other() {
        use crate::backend::verify::verify_bytes;
        const LEN: usize = 8192;
        const HIGH: u64 = 1 << 63;
        let b = HostBackend::new();
        let a = b.allocate(0, LEN as u64).unwrap();
        b.write(0, a, &[0x5A; LEN]).unwrap();
        let mut back = vec![1u8; LEN];
        let mut sampled = batch(0, a, LEN as u64, HIGH | 9);
        sampled.options.full_verify = false;
        let r = submit(&b, sampled).wait().unwrap();
        b.read(0, a, &mut back).unwrap();
        let dirty = back.iter().filter(|&&x| x != 0).count();
        assert_eq!(
            dirty, 0,
            "{dirty} bytes left non-zero by a scrub no fault was injected into"
        );
        assert_eq!(r[0], verify_bytes(&back, HIGH | 9, 64, false));
        assert_eq!(r[0].nonzero, 0);
        // At the positions of that seed: with its second half left dirty by the fault
        // injector, a seed whose high bit moves the sample of the stratum the half splits
        // counts another number of dirty samples than the same seed without it.
        let mut model = vec![0u8; LEN];
        model[LEN / 2..].fill(RESIDUE);
        let seed = (0..1000u64)
            .map(|low| HIGH | low)
            .find(|&s| {
                verify_bytes(&model, s, 64, false) != verify_bytes(&model, s & !HIGH, 64, false)
            })
            .expect("some seed's high bit moves a sample across the middle");
        b.write(0, a, &[0x5A; LEN]).unwrap();
        b.inject_skip_tail(1);
        let mut sampled = batch(0, a, LEN as u64, seed);
        sampled.options.full_verify = false;
        let r = submit(&b, sampled).wait().unwrap();
        b.read(0, a, &mut back).unwrap();
        assert_eq!(back, model, "the injector leaves the second half dirty");
        assert_eq!(r[0], verify_bytes(&back, seed, 64, false));
        b.release(0, a, LEN as u64).unwrap();
    }
}
