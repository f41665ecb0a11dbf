//! Descriptors a forked child does not keep: the metrics exporter's listening socket and the
//! forensic log writer's files.
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
//! The table and the descriptors must agree in the child, and a fork does not copy them at one
//! moment: Linux copies the forking process's descriptor table first and its memory after,
//! while its other threads run on. A descriptor closed (and its slot cleared) between the two
//! copies is open in the child with no slot naming it; one opened before the first and
//! registered after the second is too. So a descriptor is opened and registered, or
//! unregistered and closed, under [`GATE`], which the forking thread holds from just before
//! the fork until it returns (the `pthread_atfork` prepare and parent handlers; the child's
//! copy is let go in the child).
//!
//! Hand-written: no crate offers close-on-fork, and the child handler must stay
//! async-signal-safe.

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// How many descriptors at once a forked child closes; one wrapped beyond them works, but
/// stays open in a child forked meanwhile (said once). A process runs one exporter and one
/// log writer (two files during a rotation); a program embedding many logs stays far below
/// it. The child handler's pass over the table is a few microseconds.
const SLOTS_LEN: usize = 1024;

/// The registered descriptors, -1 in a free slot. Invariant: a slot holds a descriptor only
/// while its owner has it open (it is cleared before the close), so the child handler never
/// closes a descriptor number reused for another file.
static SLOTS: [AtomicI32; SLOTS_LEN] = [const { AtomicI32::new(-1) }; SLOTS_LEN];

/// Held (true) while a registered descriptor is opened or closed, and by a thread that is
/// forking: a spin lock, since the fork handlers may take nothing that allocates or that a
/// signal handler could be holding.
static GATE: AtomicBool = AtomicBool::new(false);

/// How long a fork waits for the gate before it forks without it: a descriptor is opened or
/// closed under it in microseconds, but a file system that does not answer (NFS) may hold an
/// `openat` for longer, and a fork must never hang on one. A fork that goes on without the
/// gate may leave that one descriptor open in its child.
const FORK_WAIT: Duration = Duration::from_secs(1);

thread_local! {
    /// Whether this thread's prepare handler took the gate (its parent handler lets it go).
    static FORKING_WITH_GATE: Cell<bool> = const { Cell::new(false) };
}

/// The gate, held until dropped.
struct Gate;

impl Gate {
    fn hold() -> Gate {
        while !Gate::try_take() {
            std::thread::yield_now();
        }
        Gate
    }

    fn try_take() -> bool {
        GATE.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        GATE.store(false, Ordering::Release);
    }
}

/// An owned descriptor (`T`: a `TcpListener`, a `File`) that a child forked while it is
/// open does not keep.
pub(crate) struct ForkClosed<T: AsRawFd> {
    /// Dropped (closed) by [`ForkClosed`]'s own `drop`, under the gate.
    inner: ManuallyDrop<T>,
    slot: Option<usize>,
}

impl<T: AsRawFd> ForkClosed<T> {
    /// Opens the descriptor (`open`) and registers it, one step for a fork: no child gets it
    /// unregistered. `open` opens or drops no other `ForkClosed` (the gate is held).
    pub(crate) fn open<E>(open: impl FnOnce() -> Result<T, E>) -> Result<Self, E> {
        register_handlers();
        let _gate = Gate::hold();
        open().map(register)
    }
}

/// `inner` in a free slot (the gate held).
fn register<T: AsRawFd>(inner: T) -> ForkClosed<T> {
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
    ForkClosed {
        inner: ManuallyDrop::new(inner),
        slot,
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
        let _gate = Gate::hold();
        // The slot before the descriptor: the slot invariant.
        if let Some(slot) = self.slot {
            SLOTS[slot].store(-1, Ordering::SeqCst);
        }
        // SAFETY: `inner` is dropped here once, and never used again: this is `drop`.
        unsafe { ManuallyDrop::drop(&mut self.inner) };
    }
}

/// Registers, once per process, the handlers that hold the gate across a fork and close the
/// descriptors in [`SLOTS`] in the child.
fn register_handlers() {
    extern "C" fn take_gate_before_fork() {
        // Runs in the forking thread before the fork: spins for the gate, never longer than
        // FORK_WAIT (a thread of this process holding it across a fork of its own, from a
        // signal handler, would otherwise hang the fork).
        let deadline = Instant::now() + FORK_WAIT;
        let mut taken = Gate::try_take();
        while !taken && Instant::now() < deadline {
            std::thread::yield_now();
            taken = Gate::try_take();
        }
        FORKING_WITH_GATE.with(|f| f.set(taken));
    }
    extern "C" fn give_gate_back_in_parent() {
        if FORKING_WITH_GATE.with(|f| f.replace(false)) {
            GATE.store(false, Ordering::Release);
        }
    }
    extern "C" fn close_in_child() {
        // Runs in the child, which has only the forking thread: atomic swaps and `close`
        // (async-signal-safe), on descriptors that were open at the fork.
        for slot in &SLOTS {
            let fd = slot.swap(-1, Ordering::SeqCst);
            if fd >= 0 {
                // SAFETY: `fd` was open in the parent when it forked, with the gate held (the
                // slot invariant, and no descriptor opened or closed meanwhile), so it is
                // open in the child, and nothing in the child uses it: the thread that did
                // (the exporter's server, the log's writer) does not exist here, and the value
                // owning it is never dropped here (it belongs to that thread, or a forked
                // child forgets it: the runtime it inherited is never used).
                unsafe { libc::close(fd) };
            }
        }
        // The child's copy of the gate, held by its only thread's prepare handler (or by
        // a thread it does not have, when the fork went on without it): free here.
        FORKING_WITH_GATE.with(|f| f.set(false));
        GATE.store(false, Ordering::Release);
    }
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers handlers that allocate nothing and take no lock but the gate,
        // whose wait is bounded; the child's makes only async-signal-safe calls, as a
        // handler running in the child of a multi-threaded process must. In a shared library
        // glibc ties them to this library's DSO and removes them at unload.
        let rc = unsafe {
            libc::pthread_atfork(
                Some(take_gate_before_fork),
                Some(give_gate_back_in_parent),
                Some(close_in_child),
            )
        };
        if rc != 0 {
            crate::say(format_args!(
                "kvhygiene: cannot register the fork handlers (error {rc}); a forked child \
                 would keep the metrics listener and the forensic log's lock it inherited"
            ));
        }
    });
}
