//! Descriptors a forked child does not keep: the metrics exporter's listening socket and the
//! forensic log writer's active file.
//!
//! Linux has no close-on-fork. A child forked from a process running kvhygiene (a pre-fork
//! server's workers, an engine's subprocesses) inherits these descriptors without the threads
//! that use them, and as long as it lives it would keep what they hold: a listener keeps the
//! address bound, where the kernel accepts connections nobody answers and the next process
//! cannot bind it; a log file keeps its writer's `flock` (a lock of the open file description,
//! which the fork shares), so that after the writer's process dies its chain still reads as
//! written by a live process and crash recovery never continues it. A `pthread_atfork` child
//! handler closes the descriptors registered in [`SLOTS`].
//!
//! Hand-written: no crate offers close-on-fork, and the handler must stay async-signal-safe.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

/// How many descriptors at once a forked child closes; one wrapped beyond them works, but
/// stays open in a child forked meanwhile (said once). A process runs one exporter and one
/// log writer (two files during a rotation); a program embedding many logs stays far below
/// it. The child handler's pass over the table is a few microseconds.
const SLOTS_LEN: usize = 1024;

/// The registered descriptors, -1 in a free slot. Invariant: a slot holds a descriptor only
/// while its owner has it open (it is cleared before the close), so the child handler never
/// closes a descriptor number reused for another file.
static SLOTS: [AtomicI32; SLOTS_LEN] = [const { AtomicI32::new(-1) }; SLOTS_LEN];

/// An owned descriptor (`T`: a `TcpListener`, a `File`) that a child forked while it is
/// open does not keep. A fork racing the wrapping or the drop leaves it open in that child.
pub(crate) struct ForkClosed<T: AsRawFd> {
    inner: T,
    slot: Option<usize>,
}

impl<T: AsRawFd> ForkClosed<T> {
    pub(crate) fn new(inner: T) -> Self {
        register_handler();
        let fd = inner.as_raw_fd();
        let slot = SLOTS.iter().position(|s| {
            s.compare_exchange(-1, fd, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        });
        if slot.is_none() {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                crate::say(format_args!(
                    "kvhygiene: {SLOTS_LEN} descriptors are already closed at a fork; one more \
                     (a metrics listener or a forensic log's file) stays open in a forked \
                     child (said once)"
                ))
            });
        }
        ForkClosed { inner, slot }
    }
}

impl<T: AsRawFd> std::ops::Deref for ForkClosed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsRawFd> std::ops::DerefMut for ForkClosed<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: AsRawFd> Drop for ForkClosed<T> {
    fn drop(&mut self) {
        // Before `inner` closes the descriptor (fields drop after this body).
        if let Some(slot) = self.slot {
            SLOTS[slot].store(-1, Ordering::SeqCst);
        }
    }
}

/// Registers, once per process, the child handler closing the descriptors in [`SLOTS`].
fn register_handler() {
    extern "C" fn close_in_child() {
        // Runs in the child, which has only the forking thread: atomic swaps and `close`
        // (async-signal-safe), on descriptors that were open at the fork.
        for slot in &SLOTS {
            let fd = slot.swap(-1, Ordering::SeqCst);
            if fd >= 0 {
                // SAFETY: `fd` was open in the parent when it forked (the slot invariant), so
                // it is open in the child, and nothing in the child uses it: the thread that
                // did (the exporter's server, the log's writer) does not exist here, and the
                // value owning it is never dropped here (it belongs to that thread, or a
                // forked child forgets it: the runtime it inherited is never used).
                unsafe { libc::close(fd) };
            }
        }
    }
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a child handler that makes only async-signal-safe calls, as a
        // handler running in the child of a multi-threaded process must. In a shared library
        // glibc ties it to this library's DSO and removes it at unload.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(close_in_child)) };
        if rc != 0 {
            crate::say(format_args!(
                "kvhygiene: cannot register the fork handler (error {rc}); a forked child \
                 would keep the metrics listener and the forensic log's lock it inherited"
            ));
        }
    });
}
