//! The real CUDA runtime functions, found at run time, and typed calls to them.
//!
//! Each symbol is looked up on first use with `dlsym(RTLD_NEXT, ...)`: the next definition
//! after this library in the global lookup order, which is the CUDA runtime's when the
//! engine links `libcudart.so`. When the runtime is not in the global scope (a plugin that
//! links it was loaded with `dlopen(RTLD_LOCAL)`, as Python loads extension modules), the
//! already-loaded runtime is found by its soname with `RTLD_NOLOAD` instead. When no soname
//! matches either (a runtime bundled under another name, as Python wheels rename the
//! libraries they vendor: `libcudart-<hash>.so.12`), the loaded objects are scanned in load
//! order (`dl_iterate_phdr`) for the first, other than this library, through which
//! `cudaMalloc` is found; that object is kept for every later look-up. A symbol found
//! is cached for the life of the process (the runtime is kept loaded: the `RTLD_NOLOAD`
//! handles are never closed, and the object a `RTLD_NEXT` symbol was found in is opened so
//! once too, since `RTLD_NEXT` takes no reference); a symbol not found is looked up again at the next call, and the
//! call returns `cudaErrorSharedObjectSymbolNotFound`, with a line on stderr once per symbol.
//!
//! Several runtimes in one process: each symbol is taken from the first of these that
//! defines it (the next runtime in the global scope, then the sonames newest first, then the
//! scanned object), and the forwarded calls of every library go there, whichever runtime
//! the library was linked against; the current device and the synchronisations are asked
//! of that runtime too. Such a mix is not tested.
//!
//! Nothing here calls the runtime's allocator by itself, and kvhygiene's own CUDA backend
//! uses the driver API (`libcuda.so.1`), so no interposer can recurse into another.

#![allow(non_snake_case)] // the functions carry the CUDA runtime's names

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use crate::cuda::{cudaError_t, cudaStream_t, SHARED_OBJECT_SYMBOL_NOT_FOUND};

/// Sonames of CUDA runtimes that may be loaded outside the global scope, newest first.
const RUNTIME_SONAMES: &[&CStr] = &[
    c"libcudart.so.13",
    c"libcudart.so.12",
    c"libcudart.so.11.0",
    c"libcudart.so",
];

/// Sonames of the CUDA driver, for a driver function that is not in the global scope.
const DRIVER_SONAMES: &[&CStr] = &[c"libcuda.so.1", c"libcuda.so"];

/// Which library defines a real function.
#[derive(Clone, Copy)]
enum Library {
    /// The CUDA runtime (`libcudart`): found as `lookup` says.
    Runtime,
    /// The CUDA driver (`libcuda.so.1`): the next definition in the global scope, else the
    /// loaded driver by its soname. Never scanned for: the driver is not renamed.
    Driver,
}

/// One real function: its name and, once found, its address.
struct Symbol {
    name: &'static CStr,
    library: Library,
    addr: AtomicPtr<c_void>,
    warned: AtomicBool,
}

impl Symbol {
    const fn new(name: &'static CStr, library: Library) -> Self {
        Symbol {
            name,
            library,
            addr: AtomicPtr::new(std::ptr::null_mut()),
            warned: AtomicBool::new(false),
        }
    }

    /// The function's address, or `None` when no loaded library defines it (said nowhere:
    /// for a caller that only compares addresses).
    fn find(&self) -> Option<*mut c_void> {
        let cached = self.addr.load(Ordering::Acquire);
        if !cached.is_null() {
            return Some(cached);
        }
        let found = match self.library {
            Library::Runtime => lookup(self.name),
            Library::Driver => lookup_driver(self.name),
        }?;
        self.addr.store(found, Ordering::Release);
        Some(found)
    }

    /// The function's address, or `None` (said once on stderr) when no loaded library
    /// defines it.
    fn get(&self) -> Option<*mut c_void> {
        match self.find() {
            Some(addr) => Some(addr),
            None => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    let (library, code) = match self.library {
                        Library::Runtime => ("runtime", "cudaErrorSharedObjectSymbolNotFound"),
                        Library::Driver => ("driver", "CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND"),
                    };
                    kvhygiene::stderr_line(&format!(
                        "kvhygiene-preload: the CUDA {library}'s {} is not loaded in this \
                         process; calls that need it return {code}",
                        self.name.to_string_lossy()
                    ));
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
    if !next.is_null() && keep_loaded(next) {
        return Some(next);
    }
    let by_soname = RUNTIME_SONAMES.iter().find_map(|soname| {
        let handle = loaded(soname)?;
        // SAFETY: `handle` is a live handle from dlopen (never closed, so the address found
        // stays valid for the life of the process); `name` is NUL-terminated.
        let addr = unsafe { libc::dlsym(handle, name.as_ptr()) };
        (!addr.is_null()).then_some(addr)
    });
    by_soname.or_else(|| {
        let handle = scanned_runtime()?;
        // SAFETY: as above: a live handle that is never closed, a NUL-terminated name.
        let addr = unsafe { libc::dlsym(handle, name.as_ptr()) };
        (!addr.is_null()).then_some(addr)
    })
}

/// A driver function: the next definition after this library in the global scope (the
/// driver's, when the engine links `libcuda.so.1`), else the loaded driver's by its soname
/// (a plugin that links the driver was loaded with `dlopen(RTLD_LOCAL)`). Nothing is loaded
/// here: when no driver is loaded, no caller can hold a pointer of its.
fn lookup_driver(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: as in `lookup`: a pseudo-handle valid in any shared object, a NUL-terminated
    // name that outlives the call.
    let next = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    if !next.is_null() && keep_loaded(next) {
        return Some(next);
    }
    DRIVER_SONAMES.iter().find_map(|soname| {
        let handle = loaded(soname)?;
        // SAFETY: a live handle from dlopen, never closed (the address stays valid for the
        // life of the process); a NUL-terminated name.
        let addr = unsafe { libc::dlsym(handle, name.as_ptr()) };
        (!addr.is_null()).then_some(addr)
    })
}

/// Takes a reference, never dropped, on the loaded object that holds `addr` (found through
/// `RTLD_NEXT`, which takes none), so that the address stays valid for the life of the
/// process: a host that loaded the runtime with `dlopen(RTLD_GLOBAL)` may close it later,
/// and the cached address must not then point into unmapped memory. `false` when the object
/// cannot be named or is no longer loaded (it was closed meanwhile): the address is not used.
fn keep_loaded(addr: *mut c_void) -> bool {
    let Some(path) = object_name_holding(addr) else {
        return false;
    };
    if path.is_empty() {
        // The main program: never unloaded.
        return true;
    }
    loaded(&path).is_some()
}

/// The path of the loaded object one of whose loaded segments holds `addr` (empty for the
/// main program), or `None` when no loaded object holds it.
///
/// Not `dladdr`: it hands back the loader's own copy of the name after releasing the
/// loader's lock, so a `dlclose` of the object on another thread (the race [`keep_loaded`]
/// exists for) could free the name while it is read. `dl_iterate_phdr` runs its callback
/// under that lock, where the name is copied.
fn object_name_holding(addr: *const c_void) -> Option<CString> {
    struct Search {
        addr: usize,
        found: Option<CString>,
    }
    /// Stops at the object whose `PT_LOAD` segments hold `search.addr`, keeping its name.
    ///
    /// # Safety
    /// 1. `info` points to a valid `dl_phdr_info` for the duration of the call, whose
    ///    `dlpi_phdr` points to `dlpi_phnum` program headers (the loader's contract), and
    ///    `data` is the `&mut Search` passed to `dl_iterate_phdr` below.
    unsafe extern "C" fn holds(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: by (1).
        let (info, search) = unsafe { (&*info, &mut *data.cast::<Search>()) };
        let headers = if info.dlpi_phdr.is_null() {
            &[][..]
        } else {
            // SAFETY: by (1): `dlpi_phnum` headers at `dlpi_phdr`, alive during the callback.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
        };
        let inside = headers.iter().any(|h| {
            // Segment addresses are the object's load bias plus the header's virtual address;
            // the subtraction wraps below the segment's start, which then tests as outside.
            let start = (info.dlpi_addr as usize).wrapping_add(h.p_vaddr as usize);
            h.p_type == libc::PT_LOAD && search.addr.wrapping_sub(start) < h.p_memsz as usize
        });
        if !inside {
            return 0;
        }
        search.found = Some(if info.dlpi_name.is_null() {
            CString::default()
        } else {
            // SAFETY: a non-null `dlpi_name` is a NUL-terminated string owned by the loader,
            // valid during the callback (the loader's lock is held); copied before it returns.
            unsafe { CStr::from_ptr(info.dlpi_name) }.to_owned()
        });
        1
    }
    let mut search = Search {
        addr: addr as usize,
        found: None,
    };
    // SAFETY: `holds` keeps the callback contract (it reads `info`, writes `search`, and does
    // not call into the loader, which holds its lock meanwhile); `data` is `&mut search`,
    // alive for the whole call.
    unsafe { libc::dl_iterate_phdr(Some(holds), (&mut search as *mut Search).cast()) };
    search.found
}

/// A handle to the already-loaded object `name`, or `None` when it is not loaded.
fn loaded(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: `name` is NUL-terminated and outlives the call. With RTLD_NOLOAD nothing is
    // loaded (no initialiser runs): the call only returns a handle to an object already
    // loaded, or NULL.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    (!handle.is_null()).then_some(handle)
}

/// The first loaded object, in load order, through which `cudaMalloc` resolves to a
/// function outside this library: a CUDA runtime under a name no soname matches. Found once
/// and kept (its handle is never closed); while none is found, every call scans again.
fn scanned_runtime() -> Option<*mut c_void> {
    static FOUND: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
    let cached = FOUND.load(Ordering::Acquire);
    if !cached.is_null() {
        return Some(cached);
    }
    let own = object_base(scanned_runtime as *const c_void);
    let handle = loaded_object_names().into_iter().find_map(|name| {
        let handle = loaded(&name)?;
        // SAFETY: a live handle from dlopen; the name is a static NUL-terminated string.
        let addr = unsafe { libc::dlsym(handle, c"cudaMalloc".as_ptr()) };
        if !addr.is_null() && object_base(addr) != own {
            return Some(handle);
        }
        // SAFETY: `handle` came from the dlopen above and is not used after; closing an
        // RTLD_NOLOAD handle only drops the reference that dlopen added.
        unsafe { libc::dlclose(handle) };
        None
    })?;
    FOUND.store(handle, Ordering::Release);
    Some(handle)
}

/// The load address of the object holding `addr` (`None` when none does).
fn object_base(addr: *const c_void) -> Option<usize> {
    // SAFETY: `Dl_info` is plain data (pointers and integers): all zeroes is a valid value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is writable for the call; dladdr only reads the loader's tables.
    let found = unsafe { libc::dladdr(addr, &mut info) };
    (found != 0).then_some(info.dli_fbase as usize)
}

/// The path of every loaded shared object, in load order, except the main program (whose
/// empty name would open the global scope, where this library's own functions are).
pub(crate) fn loaded_object_names() -> Vec<CString> {
    /// Collects one object's name; `data` is the `Vec<CString>` being filled.
    ///
    /// # Safety
    /// 1. `info` points to a valid `dl_phdr_info` for the duration of the call (the loader's
    ///    contract) and `data` is the `&mut Vec<CString>` passed to `dl_iterate_phdr` below.
    unsafe extern "C" fn collect(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: by (1).
        let (info, names) = unsafe { (&*info, &mut *data.cast::<Vec<CString>>()) };
        if !info.dlpi_name.is_null() {
            // SAFETY: a non-null `dlpi_name` is a NUL-terminated string owned by the loader,
            // valid during the callback; it is copied before the callback returns.
            let name = unsafe { CStr::from_ptr(info.dlpi_name) };
            if !name.is_empty() {
                names.push(name.to_owned());
            }
        }
        0
    }
    let mut names: Vec<CString> = Vec::new();
    // SAFETY: `collect` keeps the callback contract (it only reads `info` and pushes to the
    // vector, and does not call into the loader, which holds its lock meanwhile); `data`
    // is `&mut names`, alive for the whole call.
    unsafe { libc::dl_iterate_phdr(Some(collect), (&mut names as *mut Vec<CString>).cast()) };
    names
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
                static SYMBOL: Symbol = Symbol::new(
                    // The C name, NUL-terminated at compile time.
                    match CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                        Ok(name) => name,
                        Err(_) => panic!("symbol names have no interior NUL"),
                    },
                    Library::Runtime,
                );
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
    /// `cudaError_t cudaDeviceReset(void)`
    fn cudaDeviceReset();
    /// `cudaError_t cudaThreadExit(void)`: deprecated, the same reset as `cudaDeviceReset`.
    fn cudaThreadExit();
    /// `cudaError_t cudaStreamSynchronize(cudaStream_t stream)`
    fn cudaStreamSynchronize(stream: cudaStream_t);
    /// `cudaError_t cudaStreamIsCapturing(cudaStream_t stream, enum cudaStreamCaptureStatus *pCaptureStatus)`
    fn cudaStreamIsCapturing(stream: cudaStream_t, status: *mut c_int);
    /// `cudaError_t cudaStreamDestroy(cudaStream_t stream)`
    fn cudaStreamDestroy(stream: cudaStream_t);
    /// `cudaError_t cudaThreadExchangeStreamCaptureMode(enum cudaStreamCaptureMode *mode)`
    fn cudaThreadExchangeStreamCaptureMode(mode: *mut c_int);
    /// `cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t *handle, void *devPtr)`: the
    /// handle is a 64-byte struct the runtime writes, passed through untouched.
    fn cudaIpcGetMemHandle(handle: *mut c_void, dev_ptr: *mut c_void);
    /// `cudaError_t cudaGetDriverEntryPoint(const char *symbol, void **funcPtr, unsigned long
    /// long flags, cudaDriverEntryPointQueryResult *driverStatus)` (CUDA 12; CUDA 11 has no
    /// `driverStatus`, and its runtime ignores the fourth argument passed on here).
    fn cudaGetDriverEntryPoint(symbol: *const c_char, func_ptr: *mut *mut c_void, flags: u64, driver_status: *mut c_int);
    /// `cudaGetDriverEntryPoint` of translation units built with `--default-stream per-thread`.
    fn cudaGetDriverEntryPoint_ptsz(symbol: *const c_char, func_ptr: *mut *mut c_void, flags: u64, driver_status: *mut c_int);
    /// `cudaError_t cudaGetDriverEntryPointByVersion(const char *symbol, void **funcPtr,
    /// unsigned int cudaVersion, unsigned long long flags, cudaDriverEntryPointQueryResult
    /// *driverStatus)` (CUDA 12.5 and later).
    fn cudaGetDriverEntryPointByVersion(symbol: *const c_char, func_ptr: *mut *mut c_void, cuda_version: c_uint, flags: u64, driver_status: *mut c_int);
    /// `cudaGetDriverEntryPointByVersion` of translation units built with `--default-stream
    /// per-thread`.
    fn cudaGetDriverEntryPointByVersion_ptsz(symbol: *const c_char, func_ptr: *mut *mut c_void, cuda_version: c_uint, flags: u64, driver_status: *mut c_int);
}

/// The driver's `cuIpcGetMemHandle`.
static CU_IPC_GET_MEM_HANDLE: Symbol = Symbol::new(c"cuIpcGetMemHandle", Library::Driver);

/// Whether [`cuIpcGetMemHandle`] finds the driver's function (said nowhere when not).
pub(crate) fn driver_ipc_export_found() -> bool {
    CU_IPC_GET_MEM_HANDLE.find().is_some()
}

/// `CUresult cuIpcGetMemHandle(CUipcMemHandle *pHandle, CUdeviceptr dptr)`, the driver's: the
/// handle is a 64-byte struct the driver writes, passed through untouched. Returns
/// `CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND` (302, the runtime's number for the same error)
/// when no loaded driver defines it.
///
/// # Safety
/// 1. The arguments meet the CUDA driver's contract for this function (the caller's own,
///    passed on unchanged).
pub(crate) unsafe fn cuIpcGetMemHandle(handle: *mut c_void, dptr: u64) -> cudaError_t {
    let Some(addr) = CU_IPC_GET_MEM_HANDLE.get() else {
        return SHARED_OBJECT_SYMBOL_NOT_FOUND;
    };
    // SAFETY: `addr` is the loaded driver's function of this name, whose C signature (from
    // cuda.h: `CUresult` an enum passed as an int, `CUdeviceptr` an unsigned 64-bit integer)
    // is the one declared here.
    let f = unsafe {
        std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_void, u64) -> cudaError_t>(
            addr,
        )
    };
    // SAFETY: the arguments meet the function's contract, by (1).
    unsafe { f(handle, dptr) }
}

/// The driver's `cuGetProcAddress` (CUDA 11.3, four arguments; `_v2` since CUDA 12 adds a
/// fifth), whose address a lookup may hand out: [`driver_lookup_at`] tells them apart.
static CU_GET_PROC_ADDRESS: Symbol = Symbol::new(c"cuGetProcAddress", Library::Driver);
static CU_GET_PROC_ADDRESS_V2: Symbol = Symbol::new(c"cuGetProcAddress_v2", Library::Driver);

/// Which of the driver's lookups an address is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DriverLookup {
    /// `cuGetProcAddress`: `(symbol, pfn, cudaVersion, flags)`.
    V1,
    /// `cuGetProcAddress_v2`: `(symbol, pfn, cudaVersion, flags, symbolStatus)`.
    V2,
}

/// The driver lookup at `addr`, if it is the loaded driver's `cuGetProcAddress` or
/// `cuGetProcAddress_v2`; `None` for any other address, and when no driver is loaded.
pub(crate) fn driver_lookup_at(addr: *mut c_void) -> Option<DriverLookup> {
    if addr.is_null() {
        return None;
    }
    if CU_GET_PROC_ADDRESS.find() == Some(addr) {
        return Some(DriverLookup::V1);
    }
    (CU_GET_PROC_ADDRESS_V2.find() == Some(addr)).then_some(DriverLookup::V2)
}

/// `CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, cuuint64_t
/// flags)`, the driver's. Returns `CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND` (302) when no
/// loaded driver defines it.
///
/// # Safety
/// 1. The arguments meet the CUDA driver's contract for this function (the caller's own,
///    passed on unchanged).
pub(crate) unsafe fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
) -> cudaError_t {
    let Some(addr) = CU_GET_PROC_ADDRESS.get() else {
        return SHARED_OBJECT_SYMBOL_NOT_FOUND;
    };
    // SAFETY: `addr` is the loaded driver's function of this name, whose C signature (from
    // cuda.h: `CUresult` an enum passed as an int, `cuuint64_t` an unsigned 64-bit integer)
    // is the one declared here.
    let f = unsafe {
        std::mem::transmute::<
            *mut c_void,
            unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64) -> cudaError_t,
        >(addr)
    };
    // SAFETY: the arguments meet the function's contract, by (1).
    unsafe { f(symbol, pfn, cuda_version, flags) }
}

/// `CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, cuuint64_t
/// flags, CUdriverProcAddressQueryResult *symbolStatus)`, the driver's (what `cuGetProcAddress`
/// names in CUDA 12's cuda.h). Returns `CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND` (302) when
/// no loaded driver defines it.
///
/// # Safety
/// 1. The arguments meet the CUDA driver's contract for this function (the caller's own,
///    passed on unchanged).
pub(crate) unsafe fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
    symbol_status: *mut c_int,
) -> cudaError_t {
    let Some(addr) = CU_GET_PROC_ADDRESS_V2.get() else {
        return SHARED_OBJECT_SYMBOL_NOT_FOUND;
    };
    // SAFETY: `addr` is the loaded driver's function of this name, whose C signature (from
    // cuda.h; `CUdriverProcAddressQueryResult` an enum, written as an int) is the one
    // declared here.
    let f = unsafe {
        std::mem::transmute::<
            *mut c_void,
            unsafe extern "C" fn(
                *const c_char,
                *mut *mut c_void,
                c_int,
                u64,
                *mut c_int,
            ) -> cudaError_t,
        >(addr)
    };
    // SAFETY: the arguments meet the function's contract, by (1).
    unsafe { f(symbol, pfn, cuda_version, flags, symbol_status) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The object holding an address is named as the loader names it: the C library for
    /// `malloc`, the main program (an empty name) for a function of this test program, and
    /// none for an address no object holds.
    #[test]
    fn the_object_holding_an_address_is_named_as_the_loader_names_it() {
        let malloc = object_name_holding(libc::malloc as *const c_void);
        assert!(
            malloc
                .as_ref()
                .is_some_and(|n| n.to_string_lossy().contains("libc.so")),
            "{malloc:?}"
        );
        let own = the_object_holding_an_address_is_named_as_the_loader_names_it as *const c_void;
        assert_eq!(object_name_holding(own), Some(CString::default()));
        assert_eq!(object_name_holding(std::ptr::null()), None);
        // The main program is never unloaded; the C library stays loaded.
        assert!(keep_loaded(own.cast_mut()));
        assert!(keep_loaded((libc::malloc as *const c_void).cast_mut()));
        assert!(!keep_loaded(std::ptr::null_mut()));
    }
}
