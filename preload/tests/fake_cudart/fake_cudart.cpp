// A host stand-in for the CUDA runtime (libcudart.so.12), for the interposer tests: the
// allocation entry points of the real runtime, backed by malloc, behaving like every caching
// allocator inside one process: a freed block goes on a free list and the next allocation
// of the same size gets it back *unchanged* (the threat kvhygiene removes). Every entry point
// counts its calls, so tests can see what reached the real runtime and what did not.
//
// Deliberately absent: the `_ptsz` entry points, so that a forward to them exercises the
// interposer's "real symbol not found" path. Built with FAKE_CUDART_PTSZ_LOOKUPS, it has the
// `_ptsz` forms of the driver lookups (cudaGetDriverEntryPoint_ptsz, ...ByVersion_ptsz).
//
// Driver functions: this library defines the few the tests use (cuIpcGetMemHandle,
// cuGetProcAddress, ...), as if the driver were part of it, and its lookups hand them out.
// Built with FAKE_CUDART_WITHOUT_DRIVER, it defines none and its lookups ask the loaded
// libcuda.so.1 instead, as the real runtime does (fake_driver.cpp is then the driver).
//
// Streams: cudaStreamCreate hands out handles it tracks; a destroyed handle given to any
// stream call afterwards fails with cudaErrorInvalidResourceHandle and is counted
// (`fake_cudart_dead_stream_uses`), unless a test asked for handles to be reused
// (`fake_cudart_reuse_handles`, as the real runtime may hand a destroyed stream's handle to
// the next stream created): then the next cudaStreamCreate hands out the handle destroyed
// last, alive again. A test can mark any handle as capturing a graph
// (`fake_cudart_set_capturing`); the synchronisations then fail as the runtime's do
// (cudaErrorStreamCaptureUnsupported).

#include <cstdint>
#include <cstdlib>
#include <dlfcn.h>
#include <cstring>
#include <map>
#include <mutex>
#include <pthread.h>
#include <set>
#include <string>
#include <vector>

namespace {

std::mutex mu;
std::map<void*, size_t> live;                     // pointer -> size
std::multimap<size_t, void*> cached;              // size -> freed block, contents kept
std::map<std::string, int> calls;
int current_device = 0;
int last_synced_device = -1;
int sync_error = 0;                               // returned by the synchronisations when set
uintptr_t next_stream = 0x10000;
std::set<uintptr_t> streams;                      // created, not destroyed
std::set<uintptr_t> destroyed;
bool reuse_handles = false;
uintptr_t last_destroyed = 0;                     // 0: none to reuse
std::map<uintptr_t, int> capture_status;          // handle -> cudaStreamCaptureStatus
std::map<uintptr_t, int> stream_syncs;            // handle -> cudaStreamSynchronize calls
std::map<uintptr_t, int> syncs_at_destroy;        // handle -> its syncs when destroyed
int dead_stream_uses = 0;
pthread_t per_thread_sync_thread;                 // last caller of cudaStreamSynchronize(2)
bool per_thread_synced = false;

const int INVALID_RESOURCE_HANDLE = 400;
const int CAPTURE_UNSUPPORTED = 900;

// A destroyed handle used again: an error, counted.
bool dead(void* s) {
    if (destroyed.count(reinterpret_cast<uintptr_t>(s)) == 0) return false;
    dead_stream_uses += 1;
    return true;
}

bool any_capturing() {
    for (auto& c : capture_status)
        if (c.second != 0) return true;
    return false;
}

void count(const char* name) { calls[name] += 1; }

int allocate(void** out, size_t size) {
    if (out == nullptr) return 1;                 // cudaErrorInvalidValue
    if (size == 0) { *out = nullptr; return 0; }
    auto hit = cached.find(size);
    if (hit != cached.end()) {
        *out = hit->second;                       // the previous owner's bytes, as they were
        cached.erase(hit);
    } else {
        void* p = std::malloc(size);
        if (p == nullptr) return 2;               // cudaErrorMemoryAllocation
        *out = p;
    }
    live[*out] = size;
    return 0;
}

int release(void* p) {
    if (p == nullptr) return 0;
    auto it = live.find(p);
    if (it == live.end()) return 1;               // unknown or already freed
    cached.emplace(it->second, p);
    live.erase(it);
    return 0;
}

}  // namespace

extern "C" {

typedef void* cudaStream_t;

int cudaMalloc(void** p, size_t size) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaMalloc");
    return allocate(p, size);
}

int cudaMallocManaged(void** p, size_t size, unsigned int) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaMallocManaged");
    return allocate(p, size);
}

int cudaMallocAsync(void** p, size_t size, cudaStream_t) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaMallocAsync");
    return allocate(p, size);
}

int cudaMallocPitch(void** p, size_t* pitch, size_t width, size_t height) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaMallocPitch");
    if (pitch == nullptr) return 1;
    *pitch = (width + 511) / 512 * 512;
    return allocate(p, *pitch * height);
}

int cudaFree(void* p) {
    std::lock_guard<std::mutex> g(mu);
    count(p == nullptr ? "cudaFree(NULL)" : "cudaFree");
    return release(p);
}

int cudaFreeAsync(void* p, cudaStream_t) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaFreeAsync");
    return release(p);
}

// The handle (a 64-byte struct) of any non-NULL pointer: the pointer itself, zero-padded.
int cudaIpcGetMemHandle(void* handle, void* p) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaIpcGetMemHandle");
    if (handle == nullptr || p == nullptr) return 1;  // cudaErrorInvalidValue
    std::memset(handle, 0, 64);
    std::memcpy(handle, &p, sizeof p);
    return 0;
}

// The driver functions below are defined under hidden names and exported as aliases of
// them, so that the addresses the lookups hand out are this library's own functions (as a
// driver's lookup hands out its own), not whatever the dynamic linker would bind the
// exported name to (an interposer's). Without the driver, the names are declared only.
#ifdef FAKE_CUDART_WITHOUT_DRIVER
#define FAKE_EXPORT_AS(hidden)
#else
#define FAKE_EXPORT_AS(hidden) __attribute__((alias(#hidden)))
#endif
#define FAKE_HIDDEN __attribute__((visibility("hidden")))

// The driver API's export (cuIpcGetMemHandle; a CUdeviceptr is a 64-bit integer), as
// libcuda.so.1 defines it, for an engine that calls the driver directly: the same handle.
FAKE_HIDDEN int fake_cuIpcGetMemHandle(void* handle, unsigned long long dptr) {
    std::lock_guard<std::mutex> g(mu);
    count("cuIpcGetMemHandle");
    void* p = reinterpret_cast<void*>(uintptr_t(dptr));
    if (handle == nullptr || p == nullptr) return 1;  // CUDA_ERROR_INVALID_VALUE
    std::memset(handle, 0, 64);
    std::memcpy(handle, &p, sizeof p);
    return 0;
}
int cuIpcGetMemHandle(void* handle, unsigned long long dptr) FAKE_EXPORT_AS(fake_cuIpcGetMemHandle);

// A driver function no interposer takes.
FAKE_HIDDEN int fake_cuDeviceGetCount(int* n) {
    if (n == nullptr) return 1;
    *n = 1;
    return 0;
}
int cuDeviceGetCount(int* n) FAKE_EXPORT_AS(fake_cuDeviceGetCount);

FAKE_HIDDEN int fake_cuGetProcAddress(const char*, void**, int, unsigned long long);
FAKE_HIDDEN int fake_cuGetProcAddress_v2(const char*, void**, int, unsigned long long, int*);
FAKE_HIDDEN int fake_unexported_lookup(const char*, void**, int, unsigned long long, int*);

// The driver functions the lookups know, by name; `version` chooses cuGetProcAddress's
// (CUDA 12 and later: _v2, five arguments), as the driver's versioned lookup does; from
// "CUDA 13" on, a lookup of five arguments that is not exported (a driver may hand out
// another function than its exported one).
static void* driver_function(const char* symbol, int version) {
    if (symbol == nullptr) return nullptr;
#ifdef FAKE_CUDART_WITHOUT_DRIVER
    // The loaded driver's function of that name (the reference taken is never dropped).
    (void)version;
    void* driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    return driver == nullptr ? nullptr : dlsym(driver, symbol);
#endif
    if (std::strcmp(symbol, "cuIpcGetMemHandle") == 0) return reinterpret_cast<void*>(&fake_cuIpcGetMemHandle);
    if (std::strcmp(symbol, "cuDeviceGetCount") == 0) return reinterpret_cast<void*>(&fake_cuDeviceGetCount);
    if (std::strcmp(symbol, "cuGetProcAddress") == 0)
        return version >= 13000   ? reinterpret_cast<void*>(&fake_unexported_lookup)
               : version >= 12000 ? reinterpret_cast<void*>(&fake_cuGetProcAddress_v2)
                                  : reinterpret_cast<void*>(&fake_cuGetProcAddress);
    return nullptr;
}

// The driver's lookup: CUDA_ERROR_INVALID_VALUE (1) without an output, CUDA_ERROR_NOT_FOUND
// (500) for a name it does not know, with the output NULL.
static int driver_lookup(const char* symbol, void** pfn, int version) {
    if (pfn == nullptr || symbol == nullptr) return 1;
    *pfn = driver_function(symbol, version);
    return *pfn ? 0 : 500;
}

FAKE_HIDDEN int fake_cuGetProcAddress(const char* symbol, void** pfn, int version, unsigned long long) {
    std::lock_guard<std::mutex> g(mu);
    count("cuGetProcAddress");
    return driver_lookup(symbol, pfn, version);
}
int cuGetProcAddress(const char*, void**, int, unsigned long long) FAKE_EXPORT_AS(fake_cuGetProcAddress);

FAKE_HIDDEN int fake_cuGetProcAddress_v2(const char* symbol, void** pfn, int version, unsigned long long,
                                         int* status) {
    std::lock_guard<std::mutex> g(mu);
    count("cuGetProcAddress_v2");
    int rc = driver_lookup(symbol, pfn, version);
    if (status != nullptr) *status = rc == 0 ? 0 : 1;  // CU_GET_PROC_ADDRESS_SUCCESS / _SYMBOL_NOT_FOUND
    return rc;
}
int cuGetProcAddress_v2(const char*, void**, int, unsigned long long, int*) FAKE_EXPORT_AS(fake_cuGetProcAddress_v2);

FAKE_HIDDEN int fake_unexported_lookup(const char* symbol, void** pfn, int version, unsigned long long flags,
                                       int* status) {
    return fake_cuGetProcAddress_v2(symbol, pfn, version, flags, status);
}

// The runtime's lookups, as a CUDA 12 runtime's: cudaSuccess with the status
// cudaDriverEntryPointSymbolNotFound (1) and a NULL output for a name the driver does not
// know; cudaErrorInvalidValue (1) without an output. Without a version, the runtime's own
// (12000).
static int runtime_lookup(const char* symbol, void** fn, int version, int* status) {
    if (fn == nullptr || symbol == nullptr) return 1;
    *fn = driver_function(symbol, version);
    if (status != nullptr) *status = *fn ? 0 : 1;
    return 0;
}

int cudaGetDriverEntryPoint(const char* symbol, void** fn, unsigned long long, int* status) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaGetDriverEntryPoint");
    return runtime_lookup(symbol, fn, 12000, status);
}

int cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int version, unsigned long long,
                                     int* status) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaGetDriverEntryPointByVersion");
    return runtime_lookup(symbol, fn, int(version), status);
}

#ifdef FAKE_CUDART_PTSZ_LOOKUPS
int cudaGetDriverEntryPoint_ptsz(const char* symbol, void** fn, unsigned long long, int* status) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaGetDriverEntryPoint_ptsz");
    return runtime_lookup(symbol, fn, 12000, status);
}

int cudaGetDriverEntryPointByVersion_ptsz(const char* symbol, void** fn, unsigned int version,
                                          unsigned long long, int* status) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaGetDriverEntryPointByVersion_ptsz");
    return runtime_lookup(symbol, fn, int(version), status);
}
#endif

int cudaGetDevice(int* d) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaGetDevice");
    if (d == nullptr) return 1;
    *d = current_device;
    return 0;
}

int cudaSetDevice(int d) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaSetDevice");
    if (d < 0 || d >= 16) return 101;             // cudaErrorInvalidDevice
    current_device = d;
    return 0;
}

int cudaDeviceSynchronize(void) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaDeviceSynchronize");
    if (any_capturing()) return CAPTURE_UNSUPPORTED;
    last_synced_device = current_device;
    return sync_error;
}

// Counted only: the real reset (cudaDeviceReset, or the deprecated cudaThreadExit) destroys
// the device's context and every allocation in it, kvhygiene's included; these stand-ins
// keep the memory readable, so a test can see what the reset would have destroyed.
int reset_error = 0;                              // returned by both resets when set

int cudaDeviceReset(void) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaDeviceReset");
    if (any_capturing()) return CAPTURE_UNSUPPORTED;
    return reset_error;
}

// The deprecated form of cudaDeviceReset, counted apart.
int cudaThreadExit(void) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaThreadExit");
    if (any_capturing()) return CAPTURE_UNSUPPORTED;
    return reset_error;
}

void fake_cudart_fail_reset(int rc) {
    std::lock_guard<std::mutex> g(mu);
    reset_error = rc;
}

// The calling thread's capture mode (0 global, 1 thread-local, 2 relaxed), swapped by
// cudaThreadExchangeStreamCaptureMode.
thread_local int capture_mode = 0;

int cudaStreamSynchronize(cudaStream_t s) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaStreamSynchronize");
    if (dead(s)) return INVALID_RESOURCE_HANDLE;
    uintptr_t h = reinterpret_cast<uintptr_t>(s);
    if (capture_status[h] != 0) return CAPTURE_UNSUPPORTED;
    // A synchronisation outside the relaxed mode while a stream captures (in the global mode,
    // the runtime's default): the real runtime refuses it and invalidates that capture. Only
    // counted here, so that the other scenarios keep their answers.
    if (capture_mode != 2 && any_capturing()) count("unsafe sync during a capture");
    stream_syncs[h] += 1;
    if (h == 2) {
        per_thread_sync_thread = pthread_self();
        per_thread_synced = true;
    }
    return sync_error;
}

int cudaThreadExchangeStreamCaptureMode(int* mode) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaThreadExchangeStreamCaptureMode");
    if (mode == nullptr) return 1;
    int previous = capture_mode;
    capture_mode = *mode;
    *mode = previous;
    return 0;
}

int cudaStreamCreate(cudaStream_t* s) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaStreamCreate");
    if (s == nullptr) return 1;
    uintptr_t h = next_stream;
    if (reuse_handles && last_destroyed != 0) {
        h = last_destroyed;
        destroyed.erase(h);
        last_destroyed = 0;
    } else {
        next_stream += 0x10;
    }
    streams.insert(h);
    *s = reinterpret_cast<cudaStream_t>(h);
    return 0;
}

int cudaStreamDestroy(cudaStream_t s) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaStreamDestroy");
    if (dead(s)) return INVALID_RESOURCE_HANDLE;
    uintptr_t h = reinterpret_cast<uintptr_t>(s);
    if (streams.erase(h) == 0) return INVALID_RESOURCE_HANDLE;
    destroyed.insert(h);
    last_destroyed = h;
    syncs_at_destroy[h] = stream_syncs[h];
    return 0;
}

int cudaStreamIsCapturing(cudaStream_t s, int* status) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaStreamIsCapturing");
    if (dead(s)) return INVALID_RESOURCE_HANDLE;
    if (status == nullptr) return 1;
    *status = capture_status[reinterpret_cast<uintptr_t>(s)];
    return 0;
}

// ----- test controls (not CUDA) -----

int fake_cudart_calls(const char* name) {
    std::lock_guard<std::mutex> g(mu);
    auto it = calls.find(name);
    return it == calls.end() ? 0 : it->second;
}

int fake_cudart_last_synced_device(void) {
    std::lock_guard<std::mutex> g(mu);
    return last_synced_device;
}

void fake_cudart_fail_syncs(int rc) {
    std::lock_guard<std::mutex> g(mu);
    sync_error = rc;
}

// 1: the stream captures (cudaStreamCaptureStatusActive); 0: it does not.
void fake_cudart_set_capturing(cudaStream_t s, int status) {
    std::lock_guard<std::mutex> g(mu);
    capture_status[reinterpret_cast<uintptr_t>(s)] = status;
}

int fake_cudart_stream_syncs(cudaStream_t s) {
    std::lock_guard<std::mutex> g(mu);
    return stream_syncs[reinterpret_cast<uintptr_t>(s)];
}

// How many times the handle had been synchronised when it was destroyed (-1: never destroyed).
int fake_cudart_syncs_at_destroy(cudaStream_t s) {
    std::lock_guard<std::mutex> g(mu);
    auto it = syncs_at_destroy.find(reinterpret_cast<uintptr_t>(s));
    return it == syncs_at_destroy.end() ? -1 : it->second;
}

// 1: the next cudaStreamCreate calls hand out the handle destroyed last, if any; 0: new ones.
void fake_cudart_reuse_handles(int on) {
    std::lock_guard<std::mutex> g(mu);
    reuse_handles = on != 0;
}

int fake_cudart_dead_stream_uses(void) {
    std::lock_guard<std::mutex> g(mu);
    return dead_stream_uses;
}

// Whether the last cudaStreamSynchronize(cudaStreamPerThread) came from the calling thread.
int fake_cudart_per_thread_synced_here(void) {
    std::lock_guard<std::mutex> g(mu);
    return per_thread_synced && pthread_equal(per_thread_sync_thread, pthread_self());
}

}  // extern "C"
