// A stand-in for libcuda.so.1 that runs on the host, so the CUDA backend's host side (loader,
// contexts, descriptor layout, kernel parameters, result slots, events, error mapping) can be
// tested through the Backend trait without a GPU. Device memory is host memory; "launches"
// run a host port of the kernels of kernels/scrub.cu synchronously, reusing its structs,
// rule functions and segment search (KVH_HOST_RULE). Not a model of the GPU's concurrency.
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
//   cuModuleLoadData fail; fake_cuda_calls() counts driver calls, fake_cuda_host_allocs(0)
//   counts cuMemHostAlloc calls (each new batch slot makes at least one);
// - fake_cuda_fail_host_allocs(n) makes the next n cuMemHostAlloc calls fail with
//   CUDA_ERROR_OUT_OF_MEMORY; fake_cuda_fail_launch(k) makes the next launch of kernel k
//   (1 kvh_scrub, 2 kvh_scrub_publish, 3 kvh_scrub_strided) fail with
//   CUDA_ERROR_INVALID_VALUE, without running it;
// - the device has 4 SMs, each holding 8 blocks of kvh_scrub or kvh_scrub_publish and 2 of
//   kvh_scrub_strided (cuOccupancyMaxActiveBlocksPerMultiprocessor); fake_cuda_fail_occupancy(n)
//   makes the next n occupancy queries fail; fake_cuda_last_scrub_grid(0) is the grid of the
//   last scrub launch, negative for kvh_scrub_strided;
// - fake_cuda_on_capture_query(cb) makes the next cuStreamIsCapturing call cb() before it
//   returns (standing for another thread, e.g. an atexit handler, acting at that moment);
//   fake_cuda_calls_at_hook(0) is the driver call count when cb returned (-1: not yet run).
//   fake_cuda_on_launch(cb) and fake_cuda_on_mem_alloc(cb) do the same at the next
//   cuLaunchKernel (after the kernel ran) and the next successful cuMemAlloc.
// - fake_cuda_fail_event_creates(n) makes the next n cuEventCreate calls fail with
//   CUDA_ERROR_OUT_OF_MEMORY (one of cuEventCreate's documented returns).
// - fake_cuda_own_per_thread_stream(0) marks the calling thread as the one whose per-thread
//   default stream (handle 2, CU_STREAM_PER_THREAD) the test's work runs on;
//   fake_cuda_foreign_per_thread_uses(0) counts launches and event records on handle 2 made
//   from any other thread (which name that thread's own per-thread stream instead).
// - fake_cuda_on_host_alloc(cb), fake_cuda_on_event_query(cb) and fake_cuda_on_event_create(cb)
//   run cb() once inside the next cuMemHostAlloc (before it succeeds or fails), cuEventQuery
//   or cuEventCreate, as fake_cuda_on_launch does; fake_cuda_calls_at_hook(0) as above.
// - fake_cuda_set_module_load_result(code) makes every cuModuleLoadData fail with `code`
//   (0: normal), e.g. CUDA_ERROR_OUT_OF_MEMORY (2) for a device another library has filled.
// - fake_cuda_live_modules(0) is the number of modules loaded and not unloaded.
// - devices 0 and 1 have primary contexts of their own; stream handles 0xD1000..0xD1FFF are
//   streams of device 1's context, every other handle one of the calling thread's current
//   context (cuStreamGetCtx). An event is recorded only on streams of the context it was
//   created in (else CUDA_ERROR_INVALID_HANDLE, 400), a kernel launched only into a stream of
//   the current context (else 400 as well), and cuStreamIsCapturing needs the stream's
//   context current; fake_cuda_live_events(0) counts events created and not
//   destroyed, fake_cuda_cross_device_waits(0) the waits of a stream for an event of
//   another context.
// - fake_cuda_on_event_synchronize(cb) runs cb() once inside the next cuEventSynchronize,
//   before it returns (a cb that never returns stands for a hung device).
// - fake_cuda_mem_frees(0) counts cuMemFree calls (each one synchronises the device on a GPU).
// - fake_cuda_on_mem_free_host(cb) runs cb() once inside the next cuMemFreeHost, after the
//   memory was freed (as fake_cuda_on_launch does).
// - fake_cuda_mem_allocs(0) counts cuMemAlloc calls, fake_cuda_mem_free_hosts(0) cuMemFreeHost
//   calls; fake_cuda_fail_host_maps(n) makes the next n cuMemHostGetDevicePointer calls fail.
// - every entry point counts in fake_cuda_calls(), cuCtxSetCurrent, cuCtxGetCurrent,
//   cuThreadExchangeStreamCaptureMode, cuGetErrorName and cuEventDestroy included.
// - fake_cuda_scrub_waited_for(w) is how many times the stream of the last scrub launch
//   (kvh_scrub or kvh_scrub_strided) waited, between its previous scrub launch and that one,
//   for an event last recorded on stream w (cuEventRecord then cuStreamWaitEvent).
// - fake_cuda_idle_launches(n): the next n cuLaunchKernel calls succeed without running the
//   kernel (a kernel that reaches no segment).
// - fake_cuda_defer_launches(1): later launches are queued, not run, and run when an event's
//   completion is observed (cuEventQuery returning success, cuEventSynchronize) or at
//   cuCtxSynchronize, as a GPU runs them after the launch call returned; 0 runs them at once
//   again.
// - fake_cuda_fail_event_queries(n) makes the next n cuEventQuery calls fail with
//   CUDA_ERROR_LAUNCH_FAILED (719).
// - stream handle 0xD1C0D (a stream of device 1) is capturing too, and 0xC0DF is a stream whose
//   capture was invalidated (CU_STREAM_CAPTURE_STATUS_INVALIDATED, 2: still capturing);
//   fake_cuda_implicit_capture(1) makes cuStreamIsCapturing on the legacy default stream
//   (handles 0 and 1) return CUDA_ERROR_STREAM_CAPTURE_IMPLICIT (906), as while a blocking
//   stream of its context captures; fake_cuda_capturing_stream_uses(0) counts event records,
//   waits, memsets and launches on a stream that is capturing.
// - fake_cuda_fail_capture_queries(n) makes the next n cuStreamIsCapturing calls fail with
//   CUDA_ERROR_INVALID_HANDLE (400), without saying whether the stream captures.
// - fake_cuda_on_device1_current(cb) runs cb() once inside the next cuCtxSetCurrent that makes
//   device 1's primary context current, after it did (as fake_cuda_on_launch does).
// - fake_cuda_retains(d) counts cuDevicePrimaryCtxRetain calls for device d;
//   fake_cuda_make_current(d) makes device d's primary context current on the calling thread
//   (as a process that chose its device has it), without a retain.
// - fake_cuda_fail_record_after_scrub(code): the first cuEventRecord after the next scrub
//   launch (kvh_scrub or kvh_scrub_strided, which runs) fails with `code`, e.g. 906
//   (CUDA_ERROR_STREAM_CAPTURE_IMPLICIT): a capture's refusal of a later call of a batch.
// - fake_cuda_capture_after_query(h): stream handle h begins a capture just after the next
//   cuStreamIsCapturing call on it answered (not capturing); fake_cuda_end_capture(0) ends
//   it. An event recorded on a capturing stream is captured, and a stream that waits for a
//   captured event joins the capture, as the driver has it (not refused);
//   fake_cuda_joined_captures(0) counts those waits.
// - fake_cuda_fail_next_wait(code): the next cuStreamWaitEvent fails with `code`, e.g. 907
//   (CUDA_ERROR_CAPTURED_EVENT): a capture's refusal of the wait that orders a batch.
// - fake_cuda_scrub_launches(0) counts the scrub kernel launches (either scrub kernel).
// - fake_cuda_set_device_memory(kib): cuMemAlloc fails with CUDA_ERROR_OUT_OF_MEMORY once
//   the bytes it handed out and cuMemFree did not take back would exceed `kib` KiB (0: no
//   limit): a device full to its last byte.
// - fake_cuda_destroy_stream(h) marks stream handle h as destroyed (cuStreamDestroy by the
//   application); fake_cuda_destroyed_stream_uses(0) counts the calls made since on a destroyed
//   handle (capture queries, context queries, event records, waits, memsets, launches).
// - fake_cuda_fail_next_memset(code): the next cuMemsetD8Async fails with `code`, e.g. 906
//   (CUDA_ERROR_STREAM_CAPTURE_IMPLICIT: a blocking stream began a capture after the
//   stream's capture query).
#define KVH_HOST_RULE 1
#include "../../kernels/scrub.cu"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

static const CUresult OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_CONTEXT = 201,
                      INVALID_IMAGE = 200, NOT_FOUND = 500, NOT_READY = 600;
// The primary contexts of devices 0 and 1: a context's address is its identity.
static int g_ctx_tokens[2];
static bool is_primary(void* ctx) { return ctx == &g_ctx_tokens[0] || ctx == &g_ctx_tokens[1]; }
static thread_local void* t_current = nullptr;
// Stream handles 0xD1000..0xD1FFF are streams of device 1's context (streams of another
// device than the one a test works on); every other handle, the special ones (0, 1, 2)
// included, is a stream of the calling thread's current context.
static void* ctx_of(void* s) {
    if (((uintptr_t)s & ~(uintptr_t)0xFFF) == 0xD1000) return &g_ctx_tokens[1];
    return t_current;
}
static std::atomic<int> g_module_load_result{0};  // fake_cuda_set_module_load_result
static std::atomic<int> g_init_result{0}, g_reject_images{0}, g_pending{0}, g_calls{0},
    g_host_allocs{0}, g_fail_host_allocs{0}, g_fail_launch{0}, g_last_scrub_grid{0},
    g_fail_occupancy{0};
static const uintptr_t CAPTURING_STREAM = 0xC0DE;

struct Event {
    std::atomic<int> pending{0};
    void* ctx = nullptr;  // the context current at its creation, whose streams may record it
    void* recorded_on = nullptr;  // the stream of its last record
    bool captured = false;  // its last record was on a capturing stream
};
// Capture status of a stream: 1 capturing, 2 capture invalidated (still in capture mode).
static const uintptr_t FOREIGN_CAPTURING_STREAM = 0xD1C0D, INVALIDATED_STREAM = 0xC0DF;
// The stream that begins a capture after its next query, and the one that began one.
static std::atomic<uintptr_t> g_capture_after_query{0}, g_began_capture{0};
static std::atomic<int> g_joined_captures{0};
extern "C" void fake_cuda_capture_after_query(int h) { g_capture_after_query = (uintptr_t)h; }
extern "C" void fake_cuda_end_capture(int) { g_began_capture = 0; }
extern "C" int fake_cuda_joined_captures(int) { return g_joined_captures.load(); }
static int capture_status(void* s) {
    uintptr_t h = (uintptr_t)s;
    if (h == CAPTURING_STREAM || h == FOREIGN_CAPTURING_STREAM) return 1;
    if (h != 0 && h == g_began_capture.load()) return 1;
    if (h == INVALIDATED_STREAM) return 2;
    return 0;
}
// Stream handles the application destroyed (fake_cuda_destroy_stream), and the calls made on
// them since.
static std::mutex g_destroyed_lock;
static std::vector<uintptr_t> g_destroyed;
static std::atomic<int> g_destroyed_uses{0};
extern "C" void fake_cuda_destroy_stream(int h) {
    std::lock_guard<std::mutex> g(g_destroyed_lock);
    g_destroyed.push_back((uintptr_t)h);
}
extern "C" int fake_cuda_destroyed_stream_uses(int) { return g_destroyed_uses.load(); }
static void note_destroyed_use(void* s) {
    std::lock_guard<std::mutex> g(g_destroyed_lock);
    for (uintptr_t h : g_destroyed) {
        if (h == (uintptr_t)s) g_destroyed_uses++;
    }
}
static std::atomic<int> g_capturing_uses{0};
extern "C" int fake_cuda_capturing_stream_uses(int) { return g_capturing_uses.load(); }
static void note_capturing_use(void* s) {
    if (capture_status(s)) g_capturing_uses++;
}
// Waits of a stream for an event, as (waiting stream, stream the event was recorded on), since
// that stream's last scrub launch; and those that preceded the last scrub launch.
static std::mutex g_waits_lock;
static std::vector<std::pair<void*, void*>> g_waits;
static std::vector<void*> g_last_scrub_waits;
extern "C" int fake_cuda_scrub_waited_for(int w) {
    std::lock_guard<std::mutex> g(g_waits_lock);
    int n = 0;
    for (void* r : g_last_scrub_waits) n += r == (void*)(uintptr_t)w;
    return n;
}
// fake_cuda_scrub_launches(0): scrub kernel launches (kvh_scrub, kvh_scrub_strided) so far.
static std::atomic<int> g_scrub_launches{0};
extern "C" int fake_cuda_scrub_launches(int) { return g_scrub_launches.load(); }
static void note_scrub_launch(void* s) {
    g_scrub_launches++;
    std::lock_guard<std::mutex> g(g_waits_lock);
    g_last_scrub_waits.clear();
    std::vector<std::pair<void*, void*>> rest;
    for (auto& w : g_waits) {
        if (w.first == s) g_last_scrub_waits.push_back(w.second);
        else rest.push_back(w);
    }
    g_waits.swap(rest);
}
static const CUresult INVALID_HANDLE = 400;
static std::atomic<int> g_live_events{0}, g_cross_device_waits{0};
extern "C" int fake_cuda_live_events(int) { return g_live_events.load(); }
extern "C" int fake_cuda_cross_device_waits(int) { return g_cross_device_waits.load(); }

#define NEED_CTX()                                   \
    do {                                             \
        g_calls++;                                   \
        if (!is_primary(t_current)) return INVALID_CONTEXT; \
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
void fake_cuda_fail_host_allocs(int n) { g_fail_host_allocs = n; }
void fake_cuda_fail_launch(int kernel) { g_fail_launch = kernel; }
void fake_cuda_fail_occupancy(int n) { g_fail_occupancy = n; }
int fake_cuda_calls(void) { return g_calls.load(); }
int fake_cuda_host_allocs(int) { return g_host_allocs.load(); }
int fake_cuda_last_scrub_grid(int) { return g_last_scrub_grid.load(); }

CUresult cuGetErrorName(CUresult e, const char** s) {
    g_calls++;
    switch (e) {
        case OK: *s = "CUDA_SUCCESS"; return OK;
        case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; return OK;
        case INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; return OK;
        case INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; return OK;
        case NOT_READY: *s = "CUDA_ERROR_NOT_READY"; return OK;
        case 100: *s = "CUDA_ERROR_NO_DEVICE"; return OK;
        case 400: *s = "CUDA_ERROR_INVALID_HANDLE"; return OK;
        default: *s = nullptr; return INVALID_VALUE;
    }
}
CUresult cuInit(unsigned) { g_calls++; return g_init_result.load(); }
CUresult cuDriverGetVersion(int* v) { g_calls++; *v = 12040; return OK; }
CUresult cuDeviceGetCount(int* n) { g_calls++; *n = 2; return OK; }
CUresult cuDeviceGet(int* d, int ordinal) {
    g_calls++;
    if (ordinal < 0 || ordinal >= 2) return 101;
    *d = ordinal;
    return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    g_calls++;
    switch (attr) {
        case 75: *v = 9; return OK;   // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; return OK;   // COMPUTE_CAPABILITY_MINOR
        case 16: *v = 4; return OK;   // MULTIPROCESSOR_COUNT
        default: *v = 0; return OK;
    }
}
static std::atomic<int> g_retains[2];
CUresult cuDevicePrimaryCtxRetain(void** ctx, int ordinal) {
    g_calls++;
    if (ordinal < 0 || ordinal >= 2) return 101;
    g_retains[ordinal]++;
    *ctx = &g_ctx_tokens[ordinal];
    return OK;
}
int fake_cuda_retains(int ordinal) { return ordinal == 0 || ordinal == 1 ? g_retains[ordinal].load() : -1; }
// Makes device `ordinal`'s primary context current on the calling thread, as the runtime
// does for a process that chose its device (cudaSetDevice), without counting a retain.
void fake_cuda_make_current(int ordinal) {
    if (ordinal == 0 || ordinal == 1) t_current = &g_ctx_tokens[ordinal];
}
static void run_hook(void (**slot)(void));
static void (*g_device1_current_hook)(void) = nullptr;
void fake_cuda_on_device1_current(void (*cb)(void)) { g_device1_current_hook = cb; }
CUresult cuCtxSetCurrent(void* ctx) {
    g_calls++;
    t_current = ctx;
    if (ctx == &g_ctx_tokens[1]) run_hook(&g_device1_current_hook);
    return OK;
}
CUresult cuCtxGetCurrent(void** ctx) { g_calls++; *ctx = t_current; return OK; }
CUresult cuCtxGetDevice(int* dev) {
    g_calls++;
    if (t_current == &g_ctx_tokens[0]) { *dev = 0; return OK; }
    if (t_current == &g_ctx_tokens[1]) { *dev = 1; return OK; }
    return INVALID_CONTEXT;
}
// Makes a context that is not kvhygiene's current on the calling thread (1), or reports
// whether the calling thread's current context is that foreign one (returns 1), or none (0).
static int g_foreign_token;
int fake_cuda_use_foreign_context(int on) {
    if (on) t_current = &g_foreign_token;
    return t_current == &g_foreign_token ? 1 : (t_current == nullptr ? 0 : 2);
}
static void run_deferred();
CUresult cuCtxSynchronize(void) { NEED_CTX(); run_deferred(); return OK; }

static std::atomic<int> g_live_modules{0};
int fake_cuda_live_modules(int) { return g_live_modules.load(); }
CUresult cuModuleLoadData(void** m, const void* image) {
    NEED_CTX();
    if (g_reject_images) return INVALID_IMAGE;
    if (int code = g_module_load_result.load()) return code;
    *m = (void*)image;
    g_live_modules++;
    return OK;
}
CUresult cuModuleUnload(void*) {
    NEED_CTX();
    if (g_live_modules.load() <= 0) return INVALID_VALUE;
    g_live_modules--;
    return OK;
}
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    NEED_CTX();
    if (!strcmp(name, "kvh_scrub")) { *f = (void*)1; return OK; }
    if (!strcmp(name, "kvh_scrub_publish")) { *f = (void*)2; return OK; }
    if (!strcmp(name, "kvh_scrub_strided")) { *f = (void*)3; return OK; }
    return NOT_FOUND;
}
// fake_cuda_on_occupancy(cb) runs cb() once inside the next successful occupancy query
// (after it answered), as fake_cuda_on_launch does.
static void (*g_occupancy_hook)(void) = nullptr;
static void run_hook(void (**slot)(void));
extern "C" void fake_cuda_on_occupancy(void (*cb)(void)) { g_occupancy_hook = cb; }
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void* f, int block, size_t smem) {
    NEED_CTX();
    if (f != (void*)1 && f != (void*)2 && f != (void*)3) return INVALID_VALUE;
    if (block != KVH_BLOCK_THREADS || smem != 0) return INVALID_VALUE;
    if (g_fail_occupancy.load() > 0) {
        g_fail_occupancy--;
        return INVALID_VALUE;
    }
    *n = f == (void*)3 ? 2 : 8;
    run_hook(&g_occupancy_hook);
    return OK;
}

static void (*g_capture_hook)(void) = nullptr;
static void (*g_launch_hook)(void) = nullptr;
static void (*g_mem_alloc_hook)(void) = nullptr;
static void (*g_host_alloc_hook)(void) = nullptr;
static void (*g_event_query_hook)(void) = nullptr;
static void (*g_event_create_hook)(void) = nullptr;
static std::atomic<int> g_calls_at_hook{-1};
void fake_cuda_on_launch(void (*cb)(void)) { g_launch_hook = cb; }
void fake_cuda_on_mem_alloc(void (*cb)(void)) { g_mem_alloc_hook = cb; }
void fake_cuda_on_host_alloc(void (*cb)(void)) { g_host_alloc_hook = cb; }
void fake_cuda_on_event_query(void (*cb)(void)) { g_event_query_hook = cb; }
void fake_cuda_on_event_create(void (*cb)(void)) { g_event_create_hook = cb; }
void fake_cuda_set_module_load_result(int code) { g_module_load_result = code; }
// Runs the hook in `slot` once, if set, and notes the call count when it returned.
static void run_hook(void (**slot)(void)) {
    if (void (*hook)(void) = *slot) {
        *slot = nullptr;
        hook();
        g_calls_at_hook = g_calls.load();
    }
}

static std::atomic<int> g_mem_allocs{0};
int fake_cuda_mem_allocs(int) { return g_mem_allocs.load(); }
// Device memory handed out (pointer -> bytes) and the limit on its sum (0: none).
static std::mutex g_device_lock;
static std::map<CUdeviceptr, size_t> g_device_blocks;
static size_t g_device_used = 0, g_device_limit = 0;
extern "C" void fake_cuda_set_device_memory(int kib) {
    std::lock_guard<std::mutex> g(g_device_lock);
    g_device_limit = (size_t)kib * 1024;
}
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    NEED_CTX();
    g_mem_allocs++;
    g_mode_at_alloc = (int)t_capture_mode;
    if (n > (1ull << 40)) return OUT_OF_MEMORY;
    {
        std::lock_guard<std::mutex> g(g_device_lock);
        if (g_device_limit != 0 && g_device_used + n > g_device_limit) return OUT_OF_MEMORY;
        void* m = aligned_alloc(256, (n + 255) / 256 * 256);
        if (!m) return OUT_OF_MEMORY;
        *p = (CUdeviceptr)m;
        g_device_blocks[*p] = n;
        g_device_used += n;
    }
    run_hook(&g_mem_alloc_hook);
    return OK;
}
static std::atomic<int> g_mem_frees{0};
int fake_cuda_mem_frees(int) { return g_mem_frees.load(); }
CUresult cuMemFree_v2(CUdeviceptr p) {
    NEED_CTX();
    g_mem_frees++;
    {
        std::lock_guard<std::mutex> g(g_device_lock);
        auto it = g_device_blocks.find(p);
        if (it != g_device_blocks.end()) {
            g_device_used -= it->second;
            g_device_blocks.erase(it);
        }
    }
    free((void*)p);
    return OK;
}
CUresult cuMemHostAlloc(void** p, size_t n, unsigned) {
    g_calls++;
    g_host_allocs++;
    run_hook(&g_host_alloc_hook);
    if (g_fail_host_allocs > 0) {
        g_fail_host_allocs--;
        return OUT_OF_MEMORY;
    }
    *p = malloc(n);
    return *p ? OK : OUT_OF_MEMORY;
}
// Host memory is "device" memory here: the mapping is the identity.
static std::atomic<int> g_fail_host_maps{0};
void fake_cuda_fail_host_maps(int n) { g_fail_host_maps = n; }
CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr* d, void* p, unsigned flags) {
    NEED_CTX();
    if (flags != 0) return INVALID_VALUE;
    if (g_fail_host_maps > 0) {
        g_fail_host_maps--;
        return INVALID_VALUE;
    }
    *d = (CUdeviceptr)p;
    return OK;
}
static std::atomic<int> g_mem_free_hosts{0};
int fake_cuda_mem_free_hosts(int) { return g_mem_free_hosts.load(); }
static void (*g_mem_free_host_hook)(void) = nullptr;
void fake_cuda_on_mem_free_host(void (*cb)(void)) { g_mem_free_host_hook = cb; }
CUresult cuMemFreeHost(void* p) {
    g_calls++;
    g_mem_free_hosts++;
    free(p);
    run_hook(&g_mem_free_host_hook);
    return OK;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) { NEED_CTX(); memcpy((void*)d, s, n); return OK; }
CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) { NEED_CTX(); memcpy(d, (void*)s, n); return OK; }
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { NEED_CTX(); memset((void*)d, v, n); return OK; }
static std::atomic<int> g_fail_next_memset{0};
extern "C" void fake_cuda_fail_next_memset(int code) { g_fail_next_memset = code; }
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void* s) {
    note_destroyed_use(s);
    if (int code = g_fail_next_memset.exchange(0)) return code;
    note_capturing_use(s);
    return cuMemsetD8_v2(d, v, n);
}

// A stream may wait for an event of another context (the driver API allows it).
static std::atomic<int> g_fail_next_wait{0};
// fake_cuda_fail_next_wait(code): the next cuStreamWaitEvent fails with `code`, e.g. 907
// (CUDA_ERROR_CAPTURED_EVENT: the event's record was captured by a capture begun on its
// stream after the capture query).
extern "C" void fake_cuda_fail_next_wait(int code) { g_fail_next_wait = code; }
CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
    note_destroyed_use(s);
    NEED_CTX();
    if (int code = g_fail_next_wait.exchange(0)) return code;
    if (static_cast<Event*>(e)->ctx != ctx_of(s)) g_cross_device_waits++;
    if (static_cast<Event*>(e)->captured) g_joined_captures++;
    note_capturing_use(s);
    std::lock_guard<std::mutex> g(g_waits_lock);
    g_waits.emplace_back(s, static_cast<Event*>(e)->recorded_on);
    return OK;
}
CUresult cuStreamGetCtx(void* s, void** ctx) {
    note_destroyed_use(s);
    g_calls++;
    *ctx = ctx_of(s);
    return *ctx ? OK : INVALID_CONTEXT;
}
CUresult cuStreamSynchronize(void*) { NEED_CTX(); return OK; }
void fake_cuda_on_capture_query(void (*cb)(void)) { g_capture_hook = cb; }
static const CUresult STREAM_CAPTURE_IMPLICIT = 906;
static std::atomic<int> g_implicit_capture{0};
void fake_cuda_implicit_capture(int on) { g_implicit_capture = on; }
static std::atomic<int> g_fail_capture_queries{0};
void fake_cuda_fail_capture_queries(int n) { g_fail_capture_queries = n; }
int fake_cuda_calls_at_hook(int) { return g_calls_at_hook.load(); }
CUresult cuStreamIsCapturing(void* s, int* status) {
    note_destroyed_use(s);
    NEED_CTX();
    if (ctx_of(s) != t_current) return INVALID_CONTEXT;
    if (g_fail_capture_queries > 0) {
        g_fail_capture_queries--;
        return INVALID_HANDLE;
    }
    if (void (*hook)(void) = g_capture_hook) {
        g_capture_hook = nullptr;
        hook();
        g_calls_at_hook = g_calls.load();
    }
    if (g_implicit_capture.load() && ((uintptr_t)s == 0 || (uintptr_t)s == 1)) {
        return STREAM_CAPTURE_IMPLICIT;
    }
    *status = capture_status(s);
    uintptr_t asked = (uintptr_t)s;
    if (asked != 0 && g_capture_after_query.compare_exchange_strong(asked, 0)) {
        g_began_capture = (uintptr_t)s;
    }
    return OK;
}
static void (*g_capture_mode_hook)(void) = nullptr;
// fake_cuda_on_capture_mode(cb): cb runs once, inside the next
// cuThreadExchangeStreamCaptureMode (an entry point's first driver call); fake_cuda_calls_at_hook(0)
// as for the other hooks.
extern "C" void fake_cuda_on_capture_mode(void (*cb)(void)) { g_capture_mode_hook = cb; }
CUresult cuThreadExchangeStreamCaptureMode(unsigned* mode) {
    g_calls++;
    unsigned previous = t_capture_mode;
    t_capture_mode = *mode;
    *mode = previous;
    run_hook(&g_capture_mode_hook);
    return OK;
}
extern "C" int fake_cuda_capture_mode(int set) {
    if (set >= 0) t_capture_mode = (unsigned)set;
    return (int)t_capture_mode;
}
extern "C" int fake_cuda_mode_at_alloc(int) { return g_mode_at_alloc.load(); }
static std::atomic<int> g_fail_event_creates{0};
void fake_cuda_fail_event_creates(int n) { g_fail_event_creates = n; }
CUresult cuEventCreate(void** e, unsigned) {
    NEED_CTX();
    if (g_fail_event_creates > 0) {
        g_fail_event_creates--;
        return OUT_OF_MEMORY;
    }
    Event* ev = new Event();
    ev->ctx = t_current;
    g_live_events++;
    *e = ev;
    run_hook(&g_event_create_hook);
    return OK;
}
static thread_local bool t_owns_per_thread = false;
static std::atomic<int> g_foreign_per_thread_uses{0};
int fake_cuda_own_per_thread_stream(int) { t_owns_per_thread = true; return 0; }
int fake_cuda_foreign_per_thread_uses(int) { return g_foreign_per_thread_uses.load(); }
static void note_stream(void* s) {
    if ((uintptr_t)s == 2 && !t_owns_per_thread) g_foreign_per_thread_uses++;
}
// An event is recorded on streams of its own context only (cuda.h: "hEvent and hStream must
// be from the same context").
static std::atomic<int> g_fail_record_after_scrub{0}, g_failing_record{0};
void fake_cuda_fail_record_after_scrub(int code) { g_fail_record_after_scrub = code; }
CUresult cuEventRecord(void* e, void* s) {
    note_destroyed_use(s);
    NEED_CTX();
    if (int code = g_failing_record.exchange(0)) return code;
    if (static_cast<Event*>(e)->ctx != ctx_of(s)) return INVALID_HANDLE;
    note_stream(s);
    note_capturing_use(s);
    static_cast<Event*>(e)->recorded_on = s;
    static_cast<Event*>(e)->captured = capture_status(s) != 0;
    static_cast<Event*>(e)->pending = g_pending.load();
    return OK;
}
static std::atomic<int> g_fail_event_queries{0};
void fake_cuda_fail_event_queries(int n) { g_fail_event_queries = n; }
CUresult cuEventQuery(void* e) {
    NEED_CTX();
    Event* ev = static_cast<Event*>(e);
    run_hook(&g_event_query_hook);
    if (g_fail_event_queries > 0) {
        g_fail_event_queries--;
        return 719;  // CUDA_ERROR_LAUNCH_FAILED
    }
    if (ev->pending > 0) { ev->pending--; return NOT_READY; }
    run_deferred();
    return OK;
}
static void (*g_event_sync_hook)(void) = nullptr;
void fake_cuda_on_event_synchronize(void (*cb)(void)) { g_event_sync_hook = cb; }
CUresult cuEventSynchronize(void* e) {
    NEED_CTX();
    run_hook(&g_event_sync_hook);
    static_cast<Event*>(e)->pending = 0;
    run_deferred();
    return OK;
}
CUresult cuEventDestroy_v2(void* e) {
    g_calls++;
    g_live_events--;
    delete static_cast<Event*>(e);
    return OK;
}

// Host ports of kvh_scrub / kvh_scrub_strided / kvh_scrub_publish: the kernels' own work
// decomposition (one chunk per block, or block b of a grid of G taking chunks b, b + G, ...;
// a chunk's segment found as the kernel finds it; the read-back of the chunk's samples by the
// rule's candidate range) run one block after the other.
static kvh_u64 word_nonzero(const KvhSegment& s, kvh_u64 w) {
    kvh_u64 off = w * KVH_WORD_BYTES;
    kvh_u64 n = s.len - off < KVH_WORD_BYTES ? s.len - off : KVH_WORD_BYTES;
    unsigned char any = 0;
    for (kvh_u64 j = 0; j < n; ++j) any |= ((const unsigned char*)s.addr)[off + j];
    return any != 0;
}

static void scrub_chunk(const KvhBatch* b, kvh_u32 s, KvhSegment seg, kvh_u64 index);

// kvh_scrub's block c.
static void scrub_block(const KvhBatch* b, kvh_u64 c) {
    if (b->chunks) {
        const KvhChunk* w = &b->chunks[c];
        scrub_chunk(b, w->segment, KvhSegment{w->addr, w->len, w->seed, 0}, w->index);
    } else {
        kvh_u32 s = kvh_find_chunk(b->inline_segs, b->count, c);
        scrub_chunk(b, s, b->inline_segs[s], c - b->inline_segs[s].first_chunk);
    }
}

// kvh_scrub_strided's block `block` of `grid`: the kernel's loop over groups of
// KVH_ITEM_GROUP chunks in 32-bit arithmetic, each item copied as four words and unpacked as
// the kernel unpacks them.
static void scrub_strided_block(const KvhBatch* b, kvh_u32 block, kvh_u32 grid) {
    for (kvh_u32 c0 = block; c0 < b->chunk_count; c0 += grid * KVH_ITEM_GROUP) {
        kvh_u64 group[KVH_ITEM_GROUP][4] = {};
        for (kvh_u32 t = 0; t < KVH_ITEM_GROUP * 4; ++t) {
            kvh_u32 c = c0 + (t / 4) * grid;
            if (c < b->chunk_count) {
                memcpy(&group[t / 4][t % 4], (const char*)&b->chunks[c] + 8 * (t % 4), 8);
            }
        }
        for (kvh_u32 j = 0; j < KVH_ITEM_GROUP && c0 + j * grid < b->chunk_count; ++j) {
            KvhSegment seg{group[j][0], group[j][1], group[j][2], 0};
            scrub_chunk(b, (kvh_u32)group[j][3], seg, group[j][3] >> 32);
        }
    }
}

// One chunk: zeroed unless it is the fault-injection segment, then its samples read back.
static void scrub_chunk(const KvhBatch* b, kvh_u32 s, KvhSegment seg, kvh_u64 index) {
    kvh_u64 chunk = 1ULL << b->chunk_shift, off = index << b->chunk_shift;
    kvh_u64 n = seg.len - off < chunk ? seg.len - off : chunk;
    if (s != b->skip_segment) memset((char*)seg.addr + off, 0, n);
    KvhRule rule = kvh_rule(seg.len, b->samples, b->flags);
    kvh_u64 w0 = off / KVH_WORD_BYTES, w1 = kvh_word_count(off + n), first, end;
    kvh_sample_candidates(&rule, w0, w1, &first, &end);
    KvhResult r = {0, 0};
    for (kvh_u64 i = first; i < end; ++i) {
        kvh_u64 w = kvh_sample_word(&rule, seg.seed, i);
        if (w < w0 || w >= w1) continue;
        r.checked += 1;
        r.nonzero += word_nonzero(seg, w);
    }
    if (seg.len <= chunk) {
        b->results[s] = r;
    } else {
        b->sums[s].checked += r.checked;
        b->sums[s].nonzero += r.nonzero;
    }
}

static void publish(const KvhBatch* b) {
    for (kvh_u32 i = 0; i < b->count; ++i) {
        KvhResult r = b->sums[i];
        if (r.checked == 0 && r.nonzero == 0) continue;
        b->results[i] = r;
        b->sums[i] = KvhResult{0, 0};
    }
}

// Runs a kernel's blocks (the launch was checked).
static void run_kernel(void* f, unsigned gx, const KvhBatch* b) {
    if (f == (void*)1) {
        for (kvh_u64 c = 0; c < gx; ++c) scrub_block(b, c);
    } else if (f == (void*)3) {
        for (kvh_u32 block = 0; block < gx; ++block) scrub_strided_block(b, block, gx);
    } else {
        publish(b);
    }
}

static std::atomic<int> g_idle_launches{0}, g_defer_launches{0};
void fake_cuda_idle_launches(int n) { g_idle_launches = n; }
void fake_cuda_defer_launches(int on) { g_defer_launches = on; }
struct Deferred {
    void* f;
    unsigned gx;
    KvhBatch params;  // the driver copies the parameters at the launch
};
static std::mutex g_deferred_lock;
static std::vector<Deferred> g_deferred;
static void run_deferred() {
    std::vector<Deferred> queued;
    {
        std::lock_guard<std::mutex> g(g_deferred_lock);
        queued.swap(g_deferred);
    }
    for (auto& d : queued) run_kernel(d.f, d.gx, &d.params);
}

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned, unsigned, unsigned bx, unsigned,
                        unsigned, unsigned, void* stream, void** params, void**) {
    note_destroyed_use(stream);
    NEED_CTX();
    // A kernel is launched only into a stream of the current context (CUDA's "a kernel launch
    // will fail if it is issued to a stream that is not associated to the current device").
    if (ctx_of(stream) != t_current) return INVALID_HANDLE;
    note_stream(stream);
    note_capturing_use(stream);
    if (gx == 0 || bx != KVH_BLOCK_THREADS) return INVALID_VALUE;
    int failing = (int)(uintptr_t)f;
    if (g_fail_launch.compare_exchange_strong(failing, 0)) return INVALID_VALUE;
    const KvhBatch* b = (const KvhBatch*)params[0];
    if (f == (void*)1) {
        // One block per chunk: a larger grid would read past the work items on a GPU.
        if (gx > b->chunk_count) return INVALID_VALUE;
        g_last_scrub_grid = (int)gx;
    } else if (f == (void*)3) {
        if (!b->chunks) return INVALID_VALUE;  // strided batches always have work items
        g_last_scrub_grid = -(int)gx;
    } else if (f != (void*)2) {
        return INVALID_VALUE;
    }
    if (f != (void*)2) note_scrub_launch(stream);
    if (f != (void*)2) {
        if (int code = g_fail_record_after_scrub.exchange(0)) g_failing_record = code;
    }
    if (g_idle_launches.load() > 0) {
        g_idle_launches--;
    } else if (g_defer_launches.load()) {
        std::lock_guard<std::mutex> g(g_deferred_lock);
        g_deferred.push_back(Deferred{f, gx, *b});
    } else {
        run_kernel(f, gx, b);
    }
    run_hook(&g_launch_hook);
    return OK;
}

}  // extern "C"
