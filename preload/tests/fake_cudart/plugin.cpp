// An engine plugin for the interposer tests: a shared library linked against the CUDA runtime
// (the fake one) and loaded by plugin_host.cpp with dlopen(RTLD_LOCAL), as Python loads an
// extension module. The runtime is then outside the global lookup scope, where
// dlsym(RTLD_NEXT) cannot find it; the interposers must find it anyway.

#include <cstdio>
#include <cstring>

#include "probe_util.h"

extern "C" {
int cudaMalloc(void** p, size_t size);
int cudaMallocManaged(void** p, size_t size, unsigned int flags);
int cudaFree(void* p);
int fake_cudart_calls(const char* name);


int engine_run(void) {
    const size_t N = 4096;
    void* p = nullptr;
    out("rc_malloc", cudaMalloc(&p, N));
    if (p) std::memset(p, 0x5a, N);
    out("rc_free", cudaFree(p));
    void* q = nullptr;
    out("rc_malloc_again", cudaMalloc(&q, N));
    out("reuse_zero", all_zero(q, N));
    out("rc_free_q", cudaFree(q));
    void* m = nullptr;
    cudaMallocManaged(&m, 64, 1);
    int frees = fake_cudart_calls("cudaFree");
    out("rc_foreign_free", cudaFree(m));
    out("real_frees_for_foreign", fake_cudart_calls("cudaFree") - frees);
    out("real_cudaMalloc", fake_cudart_calls("cudaMalloc"));
    out("done", 1);
    return 0;
}
}
