// A minimal stand-in CUDA runtime that can be unloaded: plain functions and integers only (no
// C++ library objects, whose unique symbols would make the loader keep the library loaded),
// so that a host that dlopens it with RTLD_GLOBAL and later dlcloses it really unmaps it.
// Used by the test of runtimes found in the global scope (unload_host.cpp).

#include <cstddef>

extern "C" {

typedef void* cudaStream_t;

static int frees = 0;

int cudaFree(void* p) {
    (void)p;
    frees += 1;
    return 0;
}

int cudaMalloc(void** p, size_t size) {
    (void)size;
    if (p == nullptr) return 1;
    *p = nullptr;
    return 2;  // cudaErrorMemoryAllocation: this runtime has no memory to give
}

int minimal_cudart_frees(void) { return frees; }

}  // extern "C"
