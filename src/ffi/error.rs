//! Result codes of the C API.
//!
//! Codes live in a private range (7000..=7999) so they cannot be confused with errno or CUDA
//! error values; a code, once published, is never reused for another meaning.

/// A result code. `KVH_OK` is 0; every error is in 7000..7999.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvh_result {
    KVH_OK = 0,
    /// A Rust panic was caught at the C boundary: the call did not finish (the allocator's
    /// state stays consistent; a backend that panics answers `KVH_ERR_BACKEND` instead).
    KVH_ERR_PANIC = 7000,
    /// A required pointer argument was NULL.
    KVH_ERR_NULL_PARAMETER = 7001,
    /// The size is negative or zero where a positive size is required.
    KVH_ERR_INVALID_SIZE = 7002,
    /// No memory, even after flushing scrubs and releasing cached blocks.
    KVH_ERR_OUT_OF_MEMORY = 7003,
    /// Free of a pointer this allocator never returned (or already released); or
    /// `kvh_mark_ipc_exported` of a pointer inside no memory it holds.
    KVH_ERR_UNKNOWN_POINTER = 7004,
    /// Free of a block that is already free.
    KVH_ERR_DOUBLE_FREE = 7005,
    /// Free of a pointer inside a block rather than at its start.
    KVH_ERR_INTERIOR_POINTER = 7006,
    /// The size given to free differs from the allocation's; the block was freed anyway.
    KVH_ERR_SIZE_MISMATCH = 7007,
    /// Free of a block on another device than the one named.
    KVH_ERR_WRONG_DEVICE = 7008,
    /// A scrub did not verify (coverage below threshold, or residue, or the driver failed the
    /// scrub or its read-back, which leaves it unverified): a freed block is quarantined;
    /// `kvh_scrub_blocks` lists the KV blocks that failed.
    KVH_ERR_VERIFY_FAILED = 7009,
    /// A tenant / request / model id is too long, has control or invisible formatting
    /// characters, or is not UTF-8.
    KVH_ERR_INVALID_CONTEXT = 7010,
    /// The configuration is invalid; the allocator did not start.
    KVH_ERR_CONFIG = 7011,
    /// The memory backend (CUDA driver) reported an error.
    KVH_ERR_BACKEND = 7012,
    /// The output buffer is too small; `*out_len` holds the text's length, and the buffer
    /// needs one byte more (the NUL).
    KVH_ERR_BUFFER_TOO_SMALL = 7013,
    /// The device index is outside the backend's range.
    KVH_ERR_INVALID_DEVICE = 7014,
    /// The stream is capturing a CUDA graph: an allocation the pool cannot serve from a clean
    /// block, or a scrub (a checked free's, a KV scrub) that cannot be launched into the graph.
    KVH_ERR_CAPTURE_ACTIVE = 7015,
    /// The allocator was shut down (`kvh_shutdown`, or process exit has begun), or the
    /// allocation's device was reset (`cudaDeviceReset` or `cudaThreadExit` under the LD_PRELOAD interposers).
    KVH_ERR_SHUTTING_DOWN = 7016,
    /// `kvh_strerror` was given a code that is not a kvhygiene result.
    KVH_ERR_UNKNOWN_CODE = 7017,
    /// The forensic log could not be opened (directory, permissions, key); the allocator did
    /// not start, since it must not run without the evidence it was configured to keep.
    KVH_ERR_LOG = 7018,
    /// `kvh_scrub_blocks`: the KV layout or the block ids are invalid (overlapping blocks,
    /// an id out of range or named twice, too many segments); nothing was scrubbed.
    KVH_ERR_INVALID_LAYOUT = 7019,
    /// `kvh_scrub_blocks`: a region of the layout is not inside a live allocation of
    /// kvhygiene on that device; nothing was scrubbed. `kvh_mark_ipc_exported`: the pointer
    /// is inside a block that is not handed out (freed, pooled, quarantined); nothing was
    /// marked.
    KVH_ERR_NOT_LIVE = 7020,
    /// `kvh_claim_blocks` with `KVH_KV_GATE=enforce`: some blocks would change owner without a
    /// verified scrub since their last owner (or failed their last scrub); nothing was
    /// claimed. Scrub them with `kvh_scrub_blocks`, then claim again.
    KVH_ERR_KV_GATE = 7021,
    /// `kvh_claim_blocks`: some blocks were not handed over because another claim took them
    /// while this claim ran (two requests were given the same blocks), or because the
    /// gate lost track of them (their ledger pushed out at every try; the `policy_violation`
    /// record says so); the others were. Do not use the blocks named.
    KVH_ERR_KV_TAKEN = 7022,
    /// This process is a child forked after kvhygiene started in its parent: the allocator
    /// it inherited is the parent's (its pool locks may have been held at the fork, its
    /// threads do not exist here), so the call was refused without touching it. (A child
    /// forked after a start-up that failed gets that start-up's error instead.)
    KVH_ERR_FORKED_CHILD = 7023,
}

use kvh_result::*;

impl kvh_result {
    /// All codes, for `kvh_strerror` and tests.
    pub const ALL: &'static [kvh_result] = &[
        KVH_OK,
        KVH_ERR_PANIC,
        KVH_ERR_NULL_PARAMETER,
        KVH_ERR_INVALID_SIZE,
        KVH_ERR_OUT_OF_MEMORY,
        KVH_ERR_UNKNOWN_POINTER,
        KVH_ERR_DOUBLE_FREE,
        KVH_ERR_INTERIOR_POINTER,
        KVH_ERR_SIZE_MISMATCH,
        KVH_ERR_WRONG_DEVICE,
        KVH_ERR_VERIFY_FAILED,
        KVH_ERR_INVALID_CONTEXT,
        KVH_ERR_CONFIG,
        KVH_ERR_BACKEND,
        KVH_ERR_BUFFER_TOO_SMALL,
        KVH_ERR_INVALID_DEVICE,
        KVH_ERR_CAPTURE_ACTIVE,
        KVH_ERR_SHUTTING_DOWN,
        KVH_ERR_UNKNOWN_CODE,
        KVH_ERR_LOG,
        KVH_ERR_INVALID_LAYOUT,
        KVH_ERR_NOT_LIVE,
        KVH_ERR_KV_GATE,
        KVH_ERR_KV_TAKEN,
        KVH_ERR_FORKED_CHILD,
    ];

    pub fn from_u32(code: u32) -> Option<kvh_result> {
        Self::ALL.iter().copied().find(|c| *c as u32 == code)
    }

    /// A one-line description.
    pub fn message(self) -> &'static str {
        match self {
            KVH_OK => "success",
            KVH_ERR_PANIC => "internal error: a panic was caught at the C boundary",
            KVH_ERR_NULL_PARAMETER => "a required pointer argument was NULL",
            KVH_ERR_INVALID_SIZE => "invalid size: sizes must be positive",
            KVH_ERR_OUT_OF_MEMORY => "out of memory after flushing scrubs and releasing cached blocks",
            KVH_ERR_UNKNOWN_POINTER => "pointer was not allocated by kvhygiene (an invalid free, or an export of memory it does not hold)",
            KVH_ERR_DOUBLE_FREE => "invalid free: block is already free",
            KVH_ERR_INTERIOR_POINTER => "invalid free: pointer is inside a block, not at its start",
            KVH_ERR_SIZE_MISMATCH => "size given to free differs from the allocation (block freed with the recorded size)",
            KVH_ERR_WRONG_DEVICE => "invalid free: block belongs to another device",
            KVH_ERR_VERIFY_FAILED => "scrub verification failed (coverage below threshold, residue, or a driver failure); the memory is not reused",
            KVH_ERR_INVALID_CONTEXT => "invalid context id: at most 128 bytes of printable UTF-8",
            KVH_ERR_CONFIG => "invalid configuration; the allocator did not start",
            KVH_ERR_BACKEND => "memory backend (CUDA driver) error",
            KVH_ERR_BUFFER_TOO_SMALL => "output buffer too small",
            KVH_ERR_INVALID_DEVICE => "invalid device index",
            KVH_ERR_CAPTURE_ACTIVE => "stream is capturing a CUDA graph: no fresh memory is allocated and no scrub is launched into the graph (allocate before capture)",
            KVH_ERR_SHUTTING_DOWN => "allocator was shut down (kvh_shutdown, or process exit began), or the device was reset (cudaDeviceReset, cudaThreadExit)",
            KVH_ERR_UNKNOWN_CODE => "unknown result code",
            KVH_ERR_LOG => "the forensic log could not be opened; the allocator did not start",
            KVH_ERR_INVALID_LAYOUT => "invalid KV cache layout or block ids; nothing was scrubbed or claimed",
            KVH_ERR_NOT_LIVE => "memory is not inside a live kvhygiene allocation (a KV cache region: nothing was scrubbed or claimed; an export: the block is not handed out)",
            KVH_ERR_KV_GATE => "KV blocks would change owner without a verified scrub; nothing was claimed",
            KVH_ERR_KV_TAKEN => "KV blocks were not handed over: another claim took them while the claim ran, or the gate lost track of them",
            KVH_ERR_FORKED_CHILD => "forked child: kvhygiene started in the parent process, and a child cannot use the allocator it inherited",
        }
    }
}

impl From<&crate::alloc::AllocError> for kvh_result {
    fn from(e: &crate::alloc::AllocError) -> Self {
        use crate::alloc::AllocError as E;
        match e {
            E::InvalidSize(_) => KVH_ERR_INVALID_SIZE,
            E::InvalidDevice { .. } => KVH_ERR_INVALID_DEVICE,
            E::OutOfMemory { .. } => KVH_ERR_OUT_OF_MEMORY,
            E::CaptureActive { .. } => KVH_ERR_CAPTURE_ACTIVE,
            E::ShuttingDown | E::DeviceReset { .. } => KVH_ERR_SHUTTING_DOWN,
            E::Backend(crate::backend::BackendError::StreamCapturing { .. }) => {
                KVH_ERR_CAPTURE_ACTIVE
            }
            E::Backend(crate::backend::BackendError::ShuttingDown) => KVH_ERR_SHUTTING_DOWN,
            E::Backend(_) => KVH_ERR_BACKEND,
        }
    }
}

impl From<&crate::alloc::FreeError> for kvh_result {
    fn from(e: &crate::alloc::FreeError) -> Self {
        use crate::alloc::FreeError as E;
        use crate::events::InvalidFreeReason as R;
        match e {
            E::Invalid { reason, .. } => match reason {
                R::UnknownPointer => KVH_ERR_UNKNOWN_POINTER,
                R::DoubleFree => KVH_ERR_DOUBLE_FREE,
                R::InteriorPointer => KVH_ERR_INTERIOR_POINTER,
                R::WrongDevice => KVH_ERR_WRONG_DEVICE,
                R::InvalidDevice => KVH_ERR_INVALID_DEVICE,
            },
            E::VerifyFailed { .. } => KVH_ERR_VERIFY_FAILED,
            E::ShutDown { .. } => KVH_ERR_SHUTTING_DOWN,
            E::Backend(crate::backend::BackendError::StreamCapturing { .. }) => {
                KVH_ERR_CAPTURE_ACTIVE
            }
            E::Backend(crate::backend::BackendError::OutOfMemory { .. }) => KVH_ERR_OUT_OF_MEMORY,
            E::Backend(crate::backend::BackendError::ShuttingDown) => KVH_ERR_SHUTTING_DOWN,
            E::Backend(_) => KVH_ERR_BACKEND,
        }
    }
}

impl From<&crate::alloc::IpcExportError> for kvh_result {
    fn from(e: &crate::alloc::IpcExportError) -> Self {
        use crate::alloc::IpcExportError as E;
        match e {
            E::UnknownPointer { .. } => KVH_ERR_UNKNOWN_POINTER,
            E::NotLive { .. } => KVH_ERR_NOT_LIVE,
        }
    }
}

impl From<&crate::alloc::KvScrubError> for kvh_result {
    fn from(e: &crate::alloc::KvScrubError) -> Self {
        use crate::alloc::KvScrubError as E;
        use crate::backend::BackendError as B;
        match e {
            E::InvalidLayout(_) | E::InvalidBlocks(_) => KVH_ERR_INVALID_LAYOUT,
            E::InvalidDevice { .. } => KVH_ERR_INVALID_DEVICE,
            E::NotLive { .. } => KVH_ERR_NOT_LIVE,
            E::ShuttingDown
            | E::Backend {
                error: B::ShuttingDown,
                ..
            } => KVH_ERR_SHUTTING_DOWN,
            E::Backend {
                error: B::StreamCapturing { .. },
                ..
            } => KVH_ERR_CAPTURE_ACTIVE,
            // As for a checked free: a shortage the engine may wait out, not a device fault.
            E::Backend {
                error: B::OutOfMemory { .. },
                ..
            } => KVH_ERR_OUT_OF_MEMORY,
            E::Backend { .. } => KVH_ERR_BACKEND,
        }
    }
}

impl From<&crate::alloc::KvClaimError> for kvh_result {
    fn from(e: &crate::alloc::KvClaimError) -> Self {
        match e {
            crate::alloc::KvClaimError::Scrub(e) => e.into(),
            crate::alloc::KvClaimError::Unscrubbed { .. } => KVH_ERR_KV_GATE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_in_the_private_range() {
        let mut seen = std::collections::HashSet::new();
        for &c in kvh_result::ALL {
            assert!(seen.insert(c as u32));
            assert!(c == KVH_OK || (7000..8000).contains(&(c as u32)));
            assert_eq!(kvh_result::from_u32(c as u32), Some(c));
            assert!(!c.message().is_empty());
        }
        assert_eq!(kvh_result::from_u32(1), None);
    }

    /// A KV scrub or claim that found no device memory for its batch says so with the code a
    /// checked free gives for the same shortage, not as a device fault.
    #[test]
    fn a_kv_scrub_out_of_memory_is_out_of_memory() {
        use crate::alloc::{KvClaimError, KvScrubError};
        use crate::backend::BackendError;
        let oom = || KvScrubError::Backend {
            error: BackendError::OutOfMemory {
                device: 0,
                requested: 64,
            },
            failed: Vec::new(),
        };
        assert_eq!(kvh_result::from(&oom()), KVH_ERR_OUT_OF_MEMORY);
        assert_eq!(
            kvh_result::from(&KvClaimError::Scrub(oom())),
            KVH_ERR_OUT_OF_MEMORY
        );
        let fault = KvScrubError::Backend {
            error: BackendError::Driver {
                call: "cuLaunchKernel",
                code: 719,
                name: "CUDA_ERROR_LAUNCH_FAILED".into(),
            },
            failed: Vec::new(),
        };
        assert_eq!(kvh_result::from(&fault), KVH_ERR_BACKEND);
    }
}
