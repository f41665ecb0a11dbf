//! The real CUDA runtime functions, found at run time, and typed calls to them.
//!
//! Each symbol is looked up on first use with `dlsym(RTLD_NEXT, ...)`: the next definition
//! after this library in the global lookup order, which is the CUDA runtime's when the
//! engine links `libcudart.so`. When the runtime is not in the global scope (a plugin that
//! links it was loaded with `dlopen(RTLD_LOCAL)`, as Python loads extension modules), the
//! already-loaded runtime is found by its soname with `RTLD_NOLOAD` instead. A symbol found
//! is cached for the life of the process (the runtime is kept loaded: the `RTLD_NOLOAD`
//! handle is never closed); a symbol not found is looked up again at the next call, and the
//! call returns `cudaErrorSharedObjectSymbolNotFound`, with a line on stderr once per symbol.
//!
//! Nothing here calls the runtime's allocator by itself, and kvhygiene's own CUDA backend
//! uses the driver API (`libcuda.so.1`), so no interposer can recurse into another.

#![allow(non_snake_case)] // the functions carry the CUDA runtime's names

use std::ffi::{c_int, c_void, CStr};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use crate::cuda::{cudaError_t, cudaStream_t, SHARED_OBJECT_SYMBOL_NOT_FOUND};

/// Sonames of CUDA runtimes that may be loaded outside the global scope, newest first.
const RUNTIME_SONAMES: &[&CStr] = &[
    c"libcudart.so.13",
    c"libcudart.so.12",
    c"libcudart.so.11.0",
    c"libcudart.so",
];

/// One real function: its name and, once found, its address.
struct Symbol {
    name: &'static CStr,
    addr: AtomicPtr<c_void>,
    warned: AtomicBool,
}

impl Symbol {
    const fn new(name: &'static CStr) -> Self {
        Symbol {
            name,
            addr: AtomicPtr::new(std::ptr::null_mut()),
            warned: AtomicBool::new(false),
        }
    }

    /// The function's address, or `None` (said once on stderr) when no runtime defines it.
    fn get(&self) -> Option<*mut c_void> {
        let cached = self.addr.load(Ordering::Acquire);
        if !cached.is_null() {
            return Some(cached);
        }
        match lookup(self.name) {
            Some(addr) => {
                self.addr.store(addr, Ordering::Release);
                Some(addr)
            }
            None => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    let _ = writeln!(
                        std::io::stderr(),
                        "kvhygiene-preload: the CUDA runtime's {} is not loaded in this process; \
                         calls that need it return cudaErrorSharedObjectSymbolNotFound",
                        self.name.to_string_lossy()
                    );
                }
                None
            }
        }
    }
}

fn lookup(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: `RTLD_NEXT` is a pseudo-handle valid in any shared object, and `name` is a
    // NUL-terminated string that outlives the call. dlsym has no other preconditions.
    let next = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    if !next.is_null() {
        return Some(next);
    }
    RUNTIME_SONAMES.iter().find_map(|soname| {
        // SAFETY: `soname` is NUL-terminated and static. With RTLD_NOLOAD nothing is loaded
        // (no initialiser runs): the call only returns a handle to an object already loaded.
        let handle = unsafe { libc::dlopen(soname.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
        if handle.is_null() {
            return None;
        }
        // SAFETY: `handle` is a live handle from dlopen (never closed, so the address found
        // stays valid for the life of the process); `name` is NUL-terminated.
        let addr = unsafe { libc::dlsym(handle, name.as_ptr()) };
        (!addr.is_null()).then_some(addr)
    })
}

/// Declares typed calls to real runtime functions. Each generated function returns
/// `cudaErrorSharedObjectSymbolNotFound` when no loaded runtime defines its symbol.
macro_rules! real_functions {
    ($( $(#[doc = $doc:literal])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?); )*) => {
        $(
            $(#[doc = $doc])*
            ///
            /// # Safety
            /// 1. The arguments meet the CUDA runtime's contract for this function (they are
            ///    the caller's own arguments, passed on unchanged, or values built here to it).
            pub(crate) unsafe fn $name($($arg: $ty),*) -> cudaError_t {
                static SYMBOL: Symbol = Symbol::new({
                    // The C name, NUL-terminated at compile time.
                    match CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                        Ok(name) => name,
                        Err(_) => panic!("symbol names have no interior NUL"),
                    }
                });
                let Some(addr) = SYMBOL.get() else {
                    return SHARED_OBJECT_SYMBOL_NOT_FOUND;
                };
                // SAFETY: `addr` is the address of the loaded CUDA runtime's function of this
                // name, whose C signature (from cuda_runtime_api.h) is the one declared here.
                let f = unsafe {
                    std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($ty),*) -> cudaError_t>(addr)
                };
                // SAFETY: the arguments meet the function's contract, by (1).
                unsafe { f($($arg),*) }
            }
        )*
    };
}

real_functions! {
    /// `cudaError_t cudaMalloc(void **devPtr, size_t size)`
    fn cudaMalloc(dev_ptr: *mut *mut c_void, size: usize);
    /// `cudaError_t cudaFree(void *devPtr)`
    fn cudaFree(dev_ptr: *mut c_void);
    /// `cudaError_t cudaMallocAsync(void **devPtr, size_t size, cudaStream_t hStream)`
    fn cudaMallocAsync(dev_ptr: *mut *mut c_void, size: usize, stream: cudaStream_t);
    /// `cudaError_t cudaFreeAsync(void *devPtr, cudaStream_t hStream)`
    fn cudaFreeAsync(dev_ptr: *mut c_void, stream: cudaStream_t);
    /// `cudaMallocAsync` of translation units built with `--default-stream per-thread`.
    fn cudaMallocAsync_ptsz(dev_ptr: *mut *mut c_void, size: usize, stream: cudaStream_t);
    /// `cudaFreeAsync` of translation units built with `--default-stream per-thread`.
    fn cudaFreeAsync_ptsz(dev_ptr: *mut c_void, stream: cudaStream_t);
    /// `cudaError_t cudaMallocPitch(void **devPtr, size_t *pitch, size_t width, size_t height)`
    fn cudaMallocPitch(dev_ptr: *mut *mut c_void, pitch: *mut usize, width: usize, height: usize);
    /// `cudaError_t cudaGetDevice(int *device)`
    fn cudaGetDevice(device: *mut c_int);
    /// `cudaError_t cudaSetDevice(int device)`
    fn cudaSetDevice(device: c_int);
    /// `cudaError_t cudaDeviceSynchronize(void)`
    fn cudaDeviceSynchronize();
    /// `cudaError_t cudaStreamSynchronize(cudaStream_t stream)`
    fn cudaStreamSynchronize(stream: cudaStream_t);
    /// `cudaError_t cudaStreamIsCapturing(cudaStream_t stream, enum cudaStreamCaptureStatus *pCaptureStatus)`
    fn cudaStreamIsCapturing(stream: cudaStream_t, status: *mut c_int);
    /// `cudaError_t cudaStreamDestroy(cudaStream_t stream)`
    fn cudaStreamDestroy(stream: cudaStream_t);
}
