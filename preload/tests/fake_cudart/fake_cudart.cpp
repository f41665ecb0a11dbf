// A host stand-in for the CUDA runtime (libcudart.so.12), for the interposer tests: the
// allocation entry points of the real runtime, backed by malloc, behaving like every caching
// allocator inside one process: a freed block goes on a free list and the next allocation
// of the same size gets it back *unchanged* (the threat kvhygiene removes). Every entry point
// counts its calls, so tests can see what reached the real runtime and what did not.
//
// Deliberately absent: the `_ptsz` entry points, so that a forward to them exercises the
// interposer's "real symbol not found" path.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
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
    last_synced_device = current_device;
    return sync_error;
}

int cudaStreamSynchronize(cudaStream_t) {
    std::lock_guard<std::mutex> g(mu);
    count("cudaStreamSynchronize");
    return sync_error;
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

}  // extern "C"
