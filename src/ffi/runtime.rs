//! The process-wide allocator behind the C ABI, started on first use.
//!
//! Start-up reads the configuration once, picks the backend and opens the event sinks. A
//! start-up failure is remembered: every later call fails with the same error (an allocator
//! that half-started must not serve memory), and the reason is printed once on stderr.

use std::sync::{Arc, OnceLock};

use crate::alloc::Allocator;
use crate::backend;
use crate::config::Config;
use crate::events::EventSink;

use super::error::kvh_result;

/// The started allocator and what hangs off it.
pub(crate) struct Runtime {
    pub allocator: Allocator,
}

impl Runtime {
    pub(crate) fn stats_json(&self) -> String {
        self.allocator.stats().to_json()
    }
}

/// Why the allocator did not start.
#[derive(Clone, Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("kvhygiene configuration: {0}")]
    Config(String),
    #[error("kvhygiene backend: {0}")]
    Backend(String),
}

impl StartError {
    pub(crate) fn code(&self) -> kvh_result {
        match self {
            StartError::Config(_) => kvh_result::KVH_ERR_CONFIG,
            StartError::Backend(_) => kvh_result::KVH_ERR_BACKEND,
        }
    }
}

static RUNTIME: OnceLock<Result<Runtime, StartError>> = OnceLock::new();

/// The runtime, started on first call.
pub(crate) fn get() -> Result<&'static Runtime, &'static StartError> {
    RUNTIME.get_or_init(start).as_ref()
}

fn start() -> Result<Runtime, StartError> {
    let result = try_start();
    match &result {
        Ok(_) => register_exit_handler(),
        Err(e) => eprintln!("{e}"),
    }
    result
}

fn try_start() -> Result<Runtime, StartError> {
    let config = Config::from_env().map_err(|e| StartError::Config(e.to_string()))?;
    let backend =
        backend::select(config.backend).map_err(|e| StartError::Backend(e.to_string()))?;
    let sink: Option<Arc<dyn EventSink>> = None;
    let allocator = Allocator::new(backend, config, sink);
    Ok(Runtime { allocator })
}

/// Orderly shutdown (`kvh_shutdown`).
pub(crate) fn shutdown() {
    if let Some(Ok(rt)) = RUNTIME.get() {
        rt.allocator.shutdown();
    }
}

fn register_exit_handler() {
    extern "C" fn on_exit() {
        // Invariant 6: once exit begins, no driver calls. Nothing here may unwind.
        let _ = std::panic::catch_unwind(|| {
            if let Some(Ok(rt)) = RUNTIME.get() {
                rt.allocator.begin_exit();
            }
        });
    }
    // SAFETY: `on_exit` is an `extern "C" fn()` that never unwinds (catch_unwind above).
    let rc = unsafe { libc::atexit(on_exit) };
    if rc != 0 {
        eprintln!("kvhygiene: cannot register the exit handler; driver calls may run during exit");
    }
}
