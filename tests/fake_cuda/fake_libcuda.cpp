// A stand-in for libcuda.so.1 that runs on the host, so the CUDA backend's host side (loader,
// contexts, descriptor layout, kernel parameters, result slots, events, error mapping) can be
// tested through the Backend trait without a GPU. Device memory is host memory; "launches"
// run a host port of the two kernels of kernels/scrub.cu synchronously, reusing its rule
// functions and segment search (KVH_HOST_RULE). Not a model of the GPU's concurrency.
//
// Behaviour the tests rely on:
// - every call that needs a context fails with CUDA_ERROR_INVALID_CONTEXT (201) unless the
//   calling thread made the retained primary context current (as PyTorch's free threads don't);
// - cuMemAlloc of more than 1 TiB fails with CUDA_ERROR_OUT_OF_MEMORY (2);
// - stream handle 0xC0DE is "capturing"; events report NOT_READY for the first
//   fake_cuda_set_pending_queries(n) queries after each record;
// - fake_cuda_use_foreign_context(1) makes another context current on the calling thread
//   (standing for PyTorch's current device), fake_cuda_use_foreign_context(0) reports which
//   context is current: 1 that one, 0 none, 2 kvhygiene's;
// - fake_cuda_set_init_result(code) makes cuInit fail; fake_cuda_reject_images(1) makes every
//   cuModuleLoadData fail; fake_cuda_calls() counts driver calls.
#define KVH_HOST_RULE 1
#include "../../kernels/scrub.cu"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

static const CUresult OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_CONTEXT = 201,
                      INVALID_IMAGE = 200, NOT_FOUND = 500, NOT_READY = 600;
static int g_ctx_token;  // the primary context's address is its identity
static thread_local void* t_current = nullptr;
static std::atomic<int> g_init_result{0}, g_reject_images{0}, g_pending{0}, g_calls{0};
static const uintptr_t CAPTURING_STREAM = 0xC0DE;

struct Event {
    std::atomic<int> pending{0};
};

#define NEED_CTX()                                   \
    do {                                             \
        g_calls++;                                   \
        if (t_current != &g_ctx_token) return INVALID_CONTEXT; \
    } while (0)

// The calling thread's stream-capture interaction mode (0 global, 1 thread-local, 2 relaxed),
// and the mode in force at the last cuMemAlloc: kvhygiene must run its driver calls relaxed
// and hand the caller's mode back afterwards.
static thread_local unsigned t_capture_mode = 0;
static std::atomic<int> g_mode_at_alloc{-1};

extern "C" {

void fake_cuda_set_init_result(int code) { g_init_result = code; }
void fake_cuda_reject_images(int on) { g_reject_images = on; }
void fake_cuda_set_pending_queries(int n) { g_pending = n; }
int fake_cuda_calls(void) { return g_calls.load(); }

CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case OK: *s = "CUDA_SUCCESS"; return OK;
        case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; return OK;
        case INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; return OK;
        case INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; return OK;
        case NOT_READY: *s = "CUDA_ERROR_NOT_READY"; return OK;
        case 100: *s = "CUDA_ERROR_NO_DEVICE"; return OK;
        default: *s = nullptr; return INVALID_VALUE;
    }
}
CUresult cuInit(unsigned) { g_calls++; return g_init_result.load(); }
CUresult cuDriverGetVersion(int* v) { *v = 12040; return OK; }
CUresult cuDeviceGetCount(int* n) { g_calls++; *n = 2; return OK; }
CUresult cuDeviceGet(int* d, int ordinal) {
    if (ordinal < 0 || ordinal >= 2) return 101;
    *d = ordinal;
    return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 75: *v = 9; return OK;   // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; return OK;   // COMPUTE_CAPABILITY_MINOR
        case 16: *v = 4; return OK;   // MULTIPROCESSOR_COUNT
        default: *v = 0; return OK;
    }
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) { *ctx = &g_ctx_token; return OK; }
CUresult cuCtxSetCurrent(void* ctx) { t_current = ctx; return OK; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = t_current; return OK; }
// Makes a context that is not kvhygiene's current on the calling thread (1), or reports
// whether the calling thread's current context is that foreign one (returns 1), or none (0).
static int g_foreign_token;
int fake_cuda_use_foreign_context(int on) {
    if (on) t_current = &g_foreign_token;
    return t_current == &g_foreign_token ? 1 : (t_current == nullptr ? 0 : 2);
}
CUresult cuCtxSynchronize(void) { NEED_CTX(); return OK; }

CUresult cuModuleLoadData(void** m, const void* image) {
    NEED_CTX();
    if (g_reject_images) return INVALID_IMAGE;
    *m = (void*)image;
    return OK;
}
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    NEED_CTX();
    if (!strcmp(name, "kvh_scrub_zero")) { *f = (void*)1; return OK; }
    if (!strcmp(name, "kvh_scrub_verify")) { *f = (void*)2; return OK; }
    return NOT_FOUND;
}

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    NEED_CTX();
    g_mode_at_alloc = (int)t_capture_mode;
    if (n > (1ull << 40)) return OUT_OF_MEMORY;
    void* m = aligned_alloc(256, (n + 255) / 256 * 256);
    if (!m) return OUT_OF_MEMORY;
    *p = (CUdeviceptr)m;
    return OK;
}
CUresult cuMemFree_v2(CUdeviceptr p) { NEED_CTX(); free((void*)p); return OK; }
CUresult cuMemHostAlloc(void** p, size_t n, unsigned) {
    *p = malloc(n);
    return *p ? OK : OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void* p) { free(p); return OK; }
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) { NEED_CTX(); memcpy((void*)d, s, n); return OK; }
CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) { NEED_CTX(); memcpy(d, (void*)s, n); return OK; }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, void*) { return cuMemcpyHtoD_v2(d, s, n); }
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, void*) { return cuMemcpyDtoH_v2(d, s, n); }
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { NEED_CTX(); memset((void*)d, v, n); return OK; }
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void*) { return cuMemsetD8_v2(d, v, n); }

CUresult cuStreamWaitEvent(void*, void*, unsigned) { NEED_CTX(); return OK; }
CUresult cuStreamSynchronize(void*) { NEED_CTX(); return OK; }
CUresult cuStreamIsCapturing(void* s, int* status) {
    NEED_CTX();
    *status = ((uintptr_t)s == CAPTURING_STREAM) ? 1 : 0;
    return OK;
}
CUresult cuThreadExchangeStreamCaptureMode(unsigned* mode) {
    unsigned previous = t_capture_mode;
    t_capture_mode = *mode;
    *mode = previous;
    return OK;
}
extern "C" int fake_cuda_capture_mode(int set) {
    if (set >= 0) t_capture_mode = (unsigned)set;
    return (int)t_capture_mode;
}
extern "C" int fake_cuda_mode_at_alloc(int) { return g_mode_at_alloc.load(); }
CUresult cuEventCreate(void** e, unsigned) { NEED_CTX(); *e = new Event(); return OK; }
CUresult cuEventRecord(void* e, void*) {
    NEED_CTX();
    static_cast<Event*>(e)->pending = g_pending.load();
    return OK;
}
CUresult cuEventQuery(void* e) {
    NEED_CTX();
    Event* ev = static_cast<Event*>(e);
    if (ev->pending > 0) { ev->pending--; return NOT_READY; }
    return OK;
}
CUresult cuEventSynchronize(void* e) { NEED_CTX(); static_cast<Event*>(e)->pending = 0; return OK; }
CUresult cuEventDestroy_v2(void* e) { delete static_cast<Event*>(e); return OK; }

// Host ports of kvh_scrub_zero / kvh_scrub_verify: the kernels' own work distribution
// (kvh_zero_walk per block, kvh_verify_walk per thread, for the launch's grid) and rule
// functions, run one block / thread after the other.
struct ZeroPiece {
    const KvhSegment* segs;
    kvh_u32 skip;
    void operator()(kvh_u32 s, kvh_u64 off, kvh_u64 len) const {
        if (s != skip) memset((char*)segs[s].addr + off, 0, len);
    }
};

static void zero(void** p, kvh_u64 grid) {
    const KvhSegment* segs = *(const KvhSegment**)p[0];
    kvh_u32 count = *(kvh_u32*)p[1];
    kvh_u64 total = *(kvh_u64*)p[2];
    kvh_u32 flags = *(kvh_u32*)p[3];
    kvh_u32 skip = *(kvh_u32*)p[4];
    KvhResult* results = *(KvhResult**)p[5];
    for (kvh_u32 i = 0; i < count; ++i) results[i] = KvhResult{0, 0};
    ZeroPiece f = {segs, skip};
    int passes = (flags & KVH_FLAG_DOUBLE_PASS) ? 2 : 1;
    for (kvh_u64 b = 0; b < grid; ++b)
        for (int pass = 0; pass < passes; ++pass) kvh_zero_walk(segs, count, total, grid, b, f);
}

struct VerifyRuns {
    const KvhSegment* segs;
    KvhResult* results;
    kvh_u32 samples, flags;
    void operator()(kvh_u32 seg, kvh_u64 i, kvh_u64 step, kvh_u64 m) const {
        const KvhSegment& s = segs[seg];
        for (kvh_u64 k = 0; k < m; ++k) {
            kvh_u64 w = kvh_sample_word(s.seed, i + k * step, kvh_word_count(s.len),
                                        kvh_is_full(s.len, samples, flags));
            kvh_u64 off = w * KVH_WORD_BYTES;
            kvh_u64 n = s.len - off < KVH_WORD_BYTES ? s.len - off : KVH_WORD_BYTES;
            unsigned char any = 0;
            for (kvh_u64 j = 0; j < n; ++j) any |= ((const unsigned char*)s.addr)[off + j];
            results[seg].checked += 1;
            results[seg].nonzero += any != 0;
        }
    }
};

static void verify(void** p, kvh_u64 threads) {
    const KvhSegment* segs = *(const KvhSegment**)p[0];
    kvh_u32 count = *(kvh_u32*)p[1];
    kvh_u64 total = *(kvh_u64*)p[2];
    kvh_u32 samples = *(kvh_u32*)p[3];
    kvh_u32 flags = *(kvh_u32*)p[4];
    KvhResult* results = *(KvhResult**)p[5];
    VerifyRuns f = {segs, results, samples, flags};
    for (kvh_u64 t = 0; t < threads; ++t)
        kvh_verify_walk(segs, count, total, samples, flags, threads, t, f);
}

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned, unsigned, unsigned bx, unsigned,
                        unsigned, unsigned, void*, void** params, void**) {
    NEED_CTX();
    if (gx == 0 || bx != KVH_BLOCK_THREADS) return INVALID_VALUE;
    if (f == (void*)1) zero(params, gx);
    else if (f == (void*)2) verify(params, (kvh_u64)gx * bx);
    else return INVALID_VALUE;
    return OK;
}

}  // extern "C"
