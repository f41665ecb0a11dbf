// An "engine" for the interposer tests: calls the CUDA runtime's allocation entry points the
// way a C++ inference engine does, and prints what it saw as `key value` lines. It links
// against the fake runtime (fake_cudart.cpp) and runs with or without
// LD_PRELOAD=libkvhygiene_preload.so; the Rust test compares the two. It never stops early:
// every step guards its own pointers, so one failure cannot hide the next.
//
// Usage: probe main | sync-failure | threads | capture | per-thread | streams | fork |
//        fork-before-start | fork-during-notice | released-double-free |
//        fork-during-symbol-report | shutdown-before-start | fork-after-c-api-start |
//        fork-after-c-api-start-only | setenv-before-first-malloc |
//        per-thread-alloc-during-capture | large-allocation-that-fits |
//        forwarded-allocation-without-real-function | captured-allocation | device-reset |
//        thread-exit | device-reset-during-capture | thread-exit-during-capture |
//        device-reset-that-fails |
//        device-reset-that-fails-retired | device-reset-c-api-malloc |
//        device-reset-then-captured-allocation | device-reset-c-api-free | ipc | ipc-driver |
//        ipc-entry-point | ipc-proc-address | entry-points

#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "probe_util.h"

extern "C" {
typedef void* cudaStream_t;
int cudaMalloc(void** p, size_t size);
int cudaMallocManaged(void** p, size_t size, unsigned int flags);
int cudaMallocAsync(void** p, size_t size, cudaStream_t s);
int cudaMallocPitch(void** p, size_t* pitch, size_t width, size_t height);
int cudaFree(void* p);
int cudaFreeAsync(void* p, cudaStream_t s);
int cudaSetDevice(int d);
int cudaGetDevice(int* d);
int cudaStreamCreate(cudaStream_t* s);
int cudaStreamDestroy(cudaStream_t s);
int cudaDeviceReset(void);
int cudaThreadExit(void);
int cudaIpcGetMemHandle(void* handle, void* p);
int cuIpcGetMemHandle(void* handle, unsigned long long dptr);
int cuGetProcAddress(const char* symbol, void** pfn, int version, unsigned long long flags);
int cuGetProcAddress_v2(const char* symbol, void** pfn, int version, unsigned long long flags, int* status);
int cudaGetDriverEntryPoint(const char* symbol, void** fn, unsigned long long flags, int* status);
int cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int version,
                                     unsigned long long flags, int* status);
void fake_cudart_fail_reset(int rc);
int fake_cudart_calls(const char* name);
int fake_cudart_last_synced_device(void);
void fake_cudart_fail_syncs(int rc);
void fake_cudart_set_capturing(cudaStream_t s, int status);
int fake_cudart_stream_syncs(cudaStream_t s);
int fake_cudart_syncs_at_destroy(cudaStream_t s);
int fake_cudart_dead_stream_uses(void);
void fake_cudart_reuse_handles(int on);
int fake_cudart_per_thread_synced_here(void);
}

static const cudaStream_t PER_THREAD = reinterpret_cast<cudaStream_t>(uintptr_t(2));

static const char SECRET[] = "tenant-A: the patient's diagnosis is confidential";


static bool holds_secret(const void* p, size_t n) {
    if (p == nullptr) return false;
    return memmem(p, n, SECRET, sizeof SECRET - 1) != nullptr;
}

static void fill_secret(void* p, size_t n) {
    char* c = static_cast<char*>(p);
    for (size_t i = 0; i + sizeof SECRET <= n; i += sizeof SECRET) std::memcpy(c + i, SECRET, sizeof SECRET);
}

// kvhygiene's C API, present only when the interposer library is loaded.
typedef int (*sync_fn)(void);
typedef int (*stats_fn)(char*, size_t, size_t*);

static void kvh_sync() {
    sync_fn f = reinterpret_cast<sync_fn>(dlsym(RTLD_DEFAULT, "kvh_synchronize"));
    if (f) f();
}

static long long kvh_counter(const char* name) {
    stats_fn f = reinterpret_cast<stats_fn>(dlsym(RTLD_DEFAULT, "kvh_stats_json"));
    if (!f) return -1;
    static char buf[1 << 16];
    size_t len = 0;
    if (f(buf, sizeof buf, &len) != 0) return -1;
    char key[128];
    std::snprintf(key, sizeof key, "\"%s\":", name);
    const char* at = std::strstr(buf, key);
    return at ? std::atoll(at + std::strlen(key)) : -1;
}

static int scenario_main() {
    out("kvh_loaded", dlsym(RTLD_DEFAULT, "kvh_synchronize") != nullptr);

    // Engines create the context with cudaFree(NULL): it must reach the runtime.
    out("rc_free_null", cudaFree(nullptr));
    out("real_free_null", fake_cudart_calls("cudaFree(NULL)"));

    // Request 1 leaves a secret in its buffer; request 2 allocates the same size.
    const size_t N = 4096;
    void* p = nullptr;
    out("rc_malloc", cudaMalloc(&p, N));
    out("fresh_zero", all_zero(p, N));
    if (p) fill_secret(p, N);
    out("rc_free", cudaFree(p));
    kvh_sync();
    // The freed block itself, once its scrub is done (both allocators keep it allocated).
    out("old_block_zero", all_zero(p, N));
    void* q = nullptr;
    out("rc_malloc_again", cudaMalloc(&q, N));
    out("same_block", p != nullptr && p == q);
    out("reuse_zero", all_zero(q, N));
    out("secret_seen", holds_secret(q, N));

    // A double free is refused and not forwarded a second time.
    int frees = fake_cudart_calls("cudaFree");
    out("rc_free_q", cudaFree(q));
    out("rc_double_free", cudaFree(q));
    out("real_frees_for_q", fake_cudart_calls("cudaFree") - frees);

    // An interior pointer.
    void* r = nullptr;
    cudaMalloc(&r, N);
    frees = fake_cudart_calls("cudaFree");
    out("rc_interior_free", r ? cudaFree(static_cast<char*>(r) + 8) : -1);
    out("real_frees_for_interior", fake_cudart_calls("cudaFree") - frees);
    out("rc_free_r", cudaFree(r));

    // Memory kvhygiene never handed out (managed memory is not interposed) is forwarded.
    void* m = nullptr;
    out("rc_managed", cudaMallocManaged(&m, 256, 1));
    frees = fake_cudart_calls("cudaFree");
    out("rc_foreign_free", cudaFree(m));
    out("real_frees_for_foreign", fake_cudart_calls("cudaFree") - frees);
    void* m2 = nullptr;
    cudaMallocManaged(&m2, 256, 1);
    int async_frees = fake_cudart_calls("cudaFreeAsync");
    out("rc_foreign_free_async", cudaFreeAsync(m2, nullptr));
    out("real_async_frees_for_foreign", fake_cudart_calls("cudaFreeAsync") - async_frees);

    // A pool hit queues nothing of kvhygiene's: no stream synchronisation. Fresh memory
    // (zeroed on the legacy stream) waits for it.
    kvh_sync();
    int syncs = fake_cudart_calls("cudaStreamSynchronize");
    void* hit = nullptr;
    cudaMalloc(&hit, N);
    out("syncs_for_pool_hit", fake_cudart_calls("cudaStreamSynchronize") - syncs);
    syncs = fake_cudart_calls("cudaStreamSynchronize");
    void* fresh = nullptr;
    cudaMalloc(&fresh, 3 * N);
    out("syncs_for_fresh", fake_cudart_calls("cudaStreamSynchronize") - syncs);
    cudaFree(hit);
    cudaFree(fresh);

    // Size 0 and a NULL output pointer.
    int mallocs = fake_cudart_calls("cudaMalloc");
    void* z = reinterpret_cast<void*>(1);
    out("rc_malloc_zero", cudaMalloc(&z, 0));
    out("zero_is_null", z == nullptr);
    out("real_mallocs_for_zero", fake_cudart_calls("cudaMalloc") - mallocs);
    out("rc_malloc_null_out", cudaMalloc(nullptr, 16));

    // No device has these. The output starts non-NULL: a failure must clear it.
    void* h = reinterpret_cast<void*>(0x1);
    out("rc_malloc_huge", cudaMalloc(&h, size_t(1) << 50));
    out("huge_is_null", h == nullptr);
    out("rc_malloc_max", cudaMalloc(&h, SIZE_MAX));

    // Stream-ordered allocation on a stream.
    cudaStream_t s = reinterpret_cast<cudaStream_t>(uintptr_t(0x5000));
    void* a = nullptr;
    out("rc_malloc_async", cudaMallocAsync(&a, 1000, s));
    out("async_fresh_zero", all_zero(a, 1000));
    if (a) fill_secret(a, 1000);
    out("rc_free_async", cudaFreeAsync(a, s));
    kvh_sync();
    void* b = nullptr;
    out("rc_malloc_async_again", cudaMallocAsync(&b, 1000, s));
    out("async_same_block", a != nullptr && a == b);
    out("async_reuse_zero", all_zero(b, 1000));
    out("rc_free_async_b", cudaFreeAsync(b, s));

    // Pitched rows.
    void* pp = nullptr;
    size_t pitch = 0;
    out("rc_malloc_pitch", cudaMallocPitch(&pp, &pitch, 100, 3));
    out("pitch", (long long)pitch);
    out("pitch_zero", all_zero(pp, pitch * 3));
    if (pp) fill_secret(pp, pitch * 3);
    out("rc_free_pitch", cudaFree(pp));
    kvh_sync();
    out("pitch_block_scrubbed", all_zero(pp, pitch * 3));
    // Rows whose total overflows: an error, and the output pointer NULL as for any failure.
    void* po = reinterpret_cast<void*>(0x1);
    size_t pitch_o = 0;
    out("rc_malloc_pitch_overflow", cudaMallocPitch(&po, &pitch_o, SIZE_MAX / 2, 4));
    out("pitch_overflow_is_null", po == nullptr);
    // No place for the pitch: invalid, and the output pointer NULL all the same.
    void* pn = reinterpret_cast<void*>(0x1);
    out("rc_malloc_pitch_no_pitch", cudaMallocPitch(&pn, nullptr, 100, 3));
    out("pitch_no_pitch_is_null", pn == nullptr);

    // The per-thread-default-stream variants (exported only by the interposer library).
    typedef int (*malloc_async_fn)(void**, size_t, cudaStream_t);
    typedef int (*free_async_fn)(void*, cudaStream_t);
    malloc_async_fn malloc_ptsz = reinterpret_cast<malloc_async_fn>(dlsym(RTLD_DEFAULT, "cudaMallocAsync_ptsz"));
    free_async_fn free_ptsz = reinterpret_cast<free_async_fn>(dlsym(RTLD_DEFAULT, "cudaFreeAsync_ptsz"));
    if (malloc_ptsz && free_ptsz) {
        void* t = nullptr;
        out("rc_malloc_ptsz", malloc_ptsz(&t, 64, nullptr));
        out("ptsz_zero", all_zero(t, 64));
        out("rc_free_ptsz", free_ptsz(t, nullptr));
        // A pointer kvhygiene does not hold must go to the runtime's cudaFreeAsync_ptsz,
        // which this runtime lacks.
        void* m3 = nullptr;
        cudaMallocManaged(&m3, 64, 1);
        out("rc_foreign_free_ptsz", free_ptsz(m3, nullptr));
        out("rc_foreign_free_after", cudaFree(m3));
    }

    // Devices: the allocation is made on the runtime's current device, and the synchronous
    // free synchronises the block's device, then restores the thread's device.
    int device_syncs = fake_cudart_calls("cudaDeviceSynchronize");
    cudaSetDevice(3);
    void* d3 = nullptr;
    out("rc_malloc_device3", cudaMalloc(&d3, 64));
    cudaSetDevice(0);
    out("rc_free_device3", cudaFree(d3));
    out("device_syncs_for_free", fake_cudart_calls("cudaDeviceSynchronize") - device_syncs);
    out("synced_device", fake_cudart_last_synced_device());
    int dev = -1;
    cudaGetDevice(&dev);
    out("device_after_free", dev);
    cudaSetDevice(9);
    void* d9 = nullptr;
    out("rc_malloc_device9", cudaMalloc(&d9, 64));
    cudaFree(d9);
    cudaSetDevice(0);

    // What the core counted (kvhygiene's stats; -1 without it).
    out("kvh_invalid_frees", kvh_counter("invalid_frees"));
    out("kvh_size_mismatches", kvh_counter("size_mismatches"));
    out("kvh_verifications_passed", kvh_counter("verifications_passed"));

    // What reached the runtime.
    out("real_cudaMalloc", fake_cudart_calls("cudaMalloc"));
    out("real_cudaMallocAsync", fake_cudart_calls("cudaMallocAsync"));
    out("real_cudaMallocPitch", fake_cudart_calls("cudaMallocPitch"));
    out("real_cudaStreamSynchronize", fake_cudart_calls("cudaStreamSynchronize"));
    out("done", 1);
    return 0;
}

// The runtime reports an earlier asynchronous error at the synchronisation the interposer
// makes: the call returns it, and no memory is lost or left unscrubbed.
static int scenario_sync_failure() {
    const size_t N = 4096;
    void* p = nullptr;
    out("rc_malloc", cudaMalloc(&p, N));
    if (p) fill_secret(p, N);
    fake_cudart_fail_syncs(700);  // cudaErrorIllegalAddress
    void* q = nullptr;
    out("rc_malloc_failing_sync", cudaMalloc(&q, N));
    out("failed_is_null", q == nullptr);
    out("rc_free_failing_sync", cudaFree(p));
    fake_cudart_fail_syncs(0);
    // The block was freed regardless: a second free is a double free.
    out("rc_free_again", cudaFree(p));
    kvh_sync();
    out("old_block_zero", all_zero(p, N));
    out("kvh_invalid_frees", kvh_counter("invalid_frees"));
    out("done", 1);
    return 0;
}

// Eight engine threads allocate, check, fill with a secret and free, synchronously and in
// stream order, mixed with memory the runtime owns (managed), all at once.
static int scenario_threads() {
    std::atomic<long long> allocations{0}, nonzero{0}, errors{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; t++) {
        threads.emplace_back([t, &allocations, &nonzero, &errors] {
            const size_t sizes[] = {512, 4096, 40000};
            cudaStream_t s = reinterpret_cast<cudaStream_t>(uintptr_t(0x7000 + 0x10 * t));
            for (int i = 0; i < 200; i++) {
                size_t n = sizes[(i + t) % 3];
                bool async = i % 2 == 1;
                void* p = nullptr;
                int rc = async ? cudaMallocAsync(&p, n, s) : cudaMalloc(&p, n);
                if (rc != 0 || p == nullptr) {
                    errors++;
                    continue;
                }
                allocations++;
                if (!all_zero(p, n)) nonzero++;
                fill_secret(p, n);
                void* m = nullptr;
                if (cudaMallocManaged(&m, 64, 1) != 0 || cudaFree(m) != 0) errors++;
                rc = async ? cudaFreeAsync(p, s) : cudaFree(p);
                if (rc != 0) errors++;
            }
        });
    }
    for (auto& th : threads) th.join();
    out("threads_allocations", allocations);
    out("threads_nonzero", nonzero);
    out("threads_errors", errors);
    out("kvh_invalid_frees", kvh_counter("invalid_frees"));
    out("real_cudaMalloc", fake_cudart_calls("cudaMalloc"));
    out("done", 1);
    return 0;
}

typedef int (*malloc_async_fn)(void**, size_t, cudaStream_t);
typedef int (*free_async_fn)(void*, cudaStream_t);

// CUDA graph capture: a capturing stream gets the runtime's own stream-ordered allocator,
// kvhygiene blocks are not freed into a capture, and a cudaFree whose device
// synchronisation the capture refuses keeps its block.
static int scenario_capture() {
    const size_t N = 4096;
    cudaStream_t s = nullptr;
    out("rc_stream_create", cudaStreamCreate(&s));
    // Clean blocks in kvhygiene's pool: what a capture was wrongly served from.
    void* warm = nullptr;
    cudaMallocAsync(&warm, N, s);
    cudaFreeAsync(warm, s);
    kvh_sync();
    void* before = nullptr;
    out("rc_malloc_before", cudaMallocAsync(&before, N, s));
    void* sync_block = nullptr;
    out("rc_malloc_sync_before", cudaMalloc(&sync_block, N));
    // A block freed before the capture (another size class: not handed out again).
    void* gone = nullptr;
    cudaMallocAsync(&gone, 4 * N, s);
    cudaFreeAsync(gone, s);

    fake_cudart_set_capturing(s, 1);
    int real_mallocs = fake_cudart_calls("cudaMallocAsync");
    void* g = nullptr;
    out("rc_malloc_captured", cudaMallocAsync(&g, N, s));
    out("captured_malloc_forwarded", fake_cudart_calls("cudaMallocAsync") - real_mallocs);
    int real_frees = fake_cudart_calls("cudaFreeAsync");
    out("rc_free_captured", cudaFreeAsync(g, s));
    out("captured_free_forwarded", fake_cudart_calls("cudaFreeAsync") - real_frees);
    out("rc_free_kvh_in_capture", cudaFreeAsync(before, s));
    out("rc_cudafree_in_capture", cudaFree(sync_block));
    // Frees that would free nothing are refused and logged, capture or not.
    out("rc_double_free_in_capture", cudaFreeAsync(gone, s));
    out("rc_interior_free_in_capture", cudaFreeAsync(static_cast<char*>(before) + 16, s));
    out("rc_interior_cudafree_in_capture", cudaFree(static_cast<char*>(sync_block) + 16));
    // A stream not capturing is still served by kvhygiene.
    real_mallocs = fake_cudart_calls("cudaMallocAsync");
    void* other = nullptr;
    out("rc_malloc_other_stream", cudaMallocAsync(&other, N, nullptr));
    out("other_stream_forwarded", fake_cudart_calls("cudaMallocAsync") - real_mallocs);
    fake_cudart_set_capturing(s, 0);

    // The blocks were kept live: freeing them now succeeds (no double free).
    out("rc_free_kvh_after", cudaFreeAsync(before, s));
    out("rc_cudafree_after", cudaFree(sync_block));
    out("rc_free_other", cudaFreeAsync(other, nullptr));

    // The per-thread stream capturing: a _ptsz call with stream 0 asks about it and
    // forwards (to the runtime's cudaMallocAsync_ptsz, which this runtime lacks).
    malloc_async_fn malloc_ptsz =
        reinterpret_cast<malloc_async_fn>(dlsym(RTLD_DEFAULT, "cudaMallocAsync_ptsz"));
    fake_cudart_set_capturing(PER_THREAD, 1);
    void* t = nullptr;
    out("rc_malloc_ptsz_captured", malloc_ptsz ? malloc_ptsz(&t, 64, nullptr) : -1);
    fake_cudart_set_capturing(PER_THREAD, 0);
    out("kvh_invalid_frees", kvh_counter("invalid_frees"));
    out("done", 1);
    return 0;
}

// The per-thread default stream from an engine thread: the free synchronises that thread's
// stream on that thread.
static int scenario_per_thread() {
    malloc_async_fn malloc_ptsz =
        reinterpret_cast<malloc_async_fn>(dlsym(RTLD_DEFAULT, "cudaMallocAsync_ptsz"));
    free_async_fn free_ptsz =
        reinterpret_cast<free_async_fn>(dlsym(RTLD_DEFAULT, "cudaFreeAsync_ptsz"));
    if (!malloc_ptsz || !free_ptsz) {
        out("done", 1);
        return 0;
    }
    long long rc_malloc = -1, rc_free = -1, syncs = -1, here = -1, zero = -1;
    long long rc_malloc2 = -1, rc_free2 = -1, syncs2 = -1, here2 = -1;
    std::thread th([&] {
        int before = fake_cudart_stream_syncs(PER_THREAD);
        void* t = nullptr;
        rc_malloc = malloc_ptsz(&t, 4096, nullptr);
        zero = all_zero(t, 4096);
        if (t) fill_secret(t, 4096);
        rc_free = free_ptsz(t, nullptr);
        syncs = fake_cudart_stream_syncs(PER_THREAD) - before;
        here = fake_cudart_per_thread_synced_here();
        // cudaStreamPerThread named explicitly, through the plain entry points.
        before = fake_cudart_stream_syncs(PER_THREAD);
        void* u = nullptr;
        rc_malloc2 = cudaMallocAsync(&u, 4096, PER_THREAD);
        rc_free2 = cudaFreeAsync(u, PER_THREAD);
        syncs2 = fake_cudart_stream_syncs(PER_THREAD) - before;
        here2 = fake_cudart_per_thread_synced_here();
    });
    th.join();
    out("rc_malloc_ptsz", rc_malloc);
    out("ptsz_zero", zero);
    out("rc_free_ptsz", rc_free);
    out("per_thread_syncs", syncs);
    out("per_thread_synced_by_caller", here);
    out("rc_malloc_per_thread", rc_malloc2);
    out("rc_free_per_thread", rc_free2);
    out("per_thread_syncs_plain", syncs2);
    out("per_thread_synced_by_caller_plain", here2);
    kvh_sync();
    out("kvh_invalid_frees", kvh_counter("invalid_frees"));
    out("done", 1);
    return 0;
}

// An engine destroys a stream right after freeing on it, and frees a block allocated on
// it afterwards: both legal.
static int scenario_streams() {
    const size_t N = 4096;
    cudaStream_t s = nullptr;
    out("rc_stream_create", cudaStreamCreate(&s));
    void* a = nullptr;
    void* b = nullptr;
    out("rc_malloc_a", cudaMallocAsync(&a, N, s));
    out("rc_malloc_b", cudaMallocAsync(&b, N, s));
    if (a) fill_secret(a, N);
    out("rc_free_a", cudaFreeAsync(a, s));
    // With the batch delay long (the test sets it), a's scrub is still in its open batch on
    // s here: the destroy must submit it while s exists.
    long long batches = kvh_counter("scrub_batches");
    out("rc_destroy", cudaStreamDestroy(s));
    out("batches_submitted_at_destroy", kvh_counter("scrub_batches") - batches);
    out("syncs_at_destroy", fake_cudart_syncs_at_destroy(s));
    out("real_destroys", fake_cudart_calls("cudaStreamDestroy"));
    out("rc_free_b", b ? cudaFreeAsync(b, nullptr) : -1);
    kvh_sync();
    out("a_zero", all_zero(a, N));
    // A stream whose synchronisation a capture refuses is not destroyed: the capture's
    // error is returned, and the stream can be destroyed once the capture is over.
    cudaStream_t c = nullptr;
    cudaStreamCreate(&c);
    void* x = nullptr;
    cudaMallocAsync(&x, N, c);  // kvhygiene now names c
    int destroys = fake_cudart_calls("cudaStreamDestroy");
    fake_cudart_set_capturing(c, 1);
    out("rc_destroy_capturing", cudaStreamDestroy(c));
    out("real_destroys_capturing", fake_cudart_calls("cudaStreamDestroy") - destroys);
    fake_cudart_set_capturing(c, 0);
    if (x) cudaFreeAsync(x, c);
    out("rc_destroy_after_capture", cudaStreamDestroy(c));
    // A stream kvhygiene never saw is destroyed as the runtime does: no synchronisation.
    cudaStream_t u = nullptr;
    cudaStreamCreate(&u);
    int syncs_before = fake_cudart_calls("cudaStreamSynchronize");
    out("rc_destroy_unknown", cudaStreamDestroy(u));
    out("syncs_for_unknown_destroy", fake_cudart_calls("cudaStreamSynchronize") - syncs_before);
    // The synchronisations kvhygiene adds run in the relaxed capture mode.
    out("capture_mode_swaps", fake_cudart_calls("cudaThreadExchangeStreamCaptureMode") > 0);
    // The legacy, per-thread and NULL handles are not the engine's to destroy: forwarded
    // without a synchronisation.
    int syncs = fake_cudart_calls("cudaStreamSynchronize");
    out("rc_destroy_per_thread", cudaStreamDestroy(PER_THREAD));
    out("syncs_for_special_destroy", fake_cudart_calls("cudaStreamSynchronize") - syncs);
    out("dead_stream_uses", fake_cudart_dead_stream_uses());
    // After the count above (it uses the destroyed stream itself): an allocation on it
    // fails, and leaves no stale pointer behind.
    void* stale = &stale;
    out("rc_malloc_on_destroyed", cudaMallocAsync(&stale, N, s));
    out("malloc_on_destroyed_null", stale == nullptr);
    out("kvh_invalid_frees", kvh_counter("invalid_frees"));
    // A destroy whose synchronisation fails with another error than a capture's: kvhygiene
    // forgets the stream without submitting anything on it (its open batch is not submitted
    // there), and the runtime's destroy is made and answers.
    cudaStream_t f = nullptr;
    cudaStreamCreate(&f);
    void* y = nullptr;
    out("rc_malloc_y", cudaMallocAsync(&y, N, f));
    if (y) fill_secret(y, N);
    out("rc_free_y", cudaFreeAsync(y, f));
    long long open_batches = kvh_counter("scrub_batches");
    int destroys_before = fake_cudart_calls("cudaStreamDestroy");
    fake_cudart_fail_syncs(719);  // cudaErrorLaunchFailure
    out("rc_destroy_failed_sync", cudaStreamDestroy(f));
    fake_cudart_fail_syncs(0);
    out("batches_submitted_at_failed_destroy", kvh_counter("scrub_batches") - open_batches);
    out("real_destroys_failed_sync", fake_cudart_calls("cudaStreamDestroy") - destroys_before);
    // The runtime may give the destroyed stream's handle to the next stream created. That
    // stream is not one kvhygiene saw: its destroy neither synchronises it nor submits there
    // the scrub kvhygiene held from the destroyed stream.
    fake_cudart_reuse_handles(1);
    cudaStream_t g = nullptr;
    out("rc_stream_create_reused", cudaStreamCreate(&g));
    fake_cudart_reuse_handles(0);
    out("handle_reused", g == f);
    long long batches_before_reused = kvh_counter("scrub_batches");
    int syncs_before_reused = fake_cudart_calls("cudaStreamSynchronize");
    out("rc_destroy_reused", cudaStreamDestroy(g));
    out("syncs_for_reused_destroy", fake_cudart_calls("cudaStreamSynchronize") - syncs_before_reused);
    out("batches_submitted_at_reused_destroy", kvh_counter("scrub_batches") - batches_before_reused);
    // y's scrub is not skipped: it runs, on the legacy stream, at the next flush.
    kvh_sync();
    out("y_zero", all_zero(y, N));
    out("done", 1);
    return 0;
}

// A forked child of a process kvhygiene serves: its calls go to the real runtime.
static int scenario_fork() {
    void* p = nullptr;
    out("rc_malloc", cudaMalloc(&p, 4096));
    std::fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        int mallocs = fake_cudart_calls("cudaMalloc");
        int frees = fake_cudart_calls("cudaFree");
        void* c = nullptr;
        out("child_rc_malloc", cudaMalloc(&c, 4096));
        out("child_malloc_forwarded", fake_cudart_calls("cudaMalloc") - mallocs);
        out("child_rc_free", cudaFree(c));
        out("child_free_forwarded", fake_cudart_calls("cudaFree") - frees);
        // The parent's block, inherited: not the child's kvhygiene's to free.
        int before_parent = fake_cudart_calls("cudaFree");
        cudaFree(p);
        out("child_parent_free_forwarded", fake_cudart_calls("cudaFree") - before_parent);
        std::fflush(stdout);
        _exit(0);
    }
    int status = -1;
    waitpid(child, &status, 0);
    out("child_exited_cleanly", WIFEXITED(status) && WEXITSTATUS(status) == 0);
    out("rc_free", cudaFree(p));
    out("kvh_invalid_frees", kvh_counter("invalid_frees"));
    out("done", 1);
    return 0;
}

// A process that loaded the interposer but never allocated (a launcher, a pre-fork server)
// forks a worker, and the worker is the engine: kvhygiene never started in the parent, so the
// child is not using anything it inherited, and its allocations must be served and scrubbed.
static int scenario_fork_before_start() {
    std::fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        const size_t N = 4096;
        int mallocs = fake_cudart_calls("cudaMalloc");
        void* p = nullptr;
        out("child_rc_malloc", cudaMalloc(&p, N));
        out("child_malloc_forwarded", fake_cudart_calls("cudaMalloc") - mallocs);
        if (p) fill_secret(p, N);
        out("child_rc_free", cudaFree(p));
        kvh_sync();
        void* q = nullptr;
        out("child_rc_malloc_again", cudaMalloc(&q, N));
        out("child_secret_seen", holds_secret(q, N));
        cudaFree(q);
        std::fflush(stdout);
        _exit(0);
    }
    int status = -1;
    waitpid(child, &status, 0);
    out("child_exited_cleanly", WIFEXITED(status) && WEXITSTATUS(status) == 0);
    out("done", 1);
    return 0;
}

// Runs `call` on a thread of its own while stderr is a full pipe, waits (up to 10 s) until
// that thread is blocked writing to stderr, and forks then: the child, which has none of the
// parent's threads, makes one allocation and must finish within 5 s (it is killed and
// reported hung otherwise). Then drains the pipe so that `call` can end, and restores stderr.
// Prints `blocked_key` (whether the thread was seen blocked in write(2)), child_hung,
// child_exited_cleanly and `rc_key` (what `call` returned).
static int fork_while_stderr_blocks(const std::function<int()>& call, const char* blocked_key,
                                    const char* rc_key) {
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0) return 2;
    int saved_stderr = dup(2);
    dup2(pipe_fds[1], 2);
    int flags = fcntl(2, F_GETFL);
    fcntl(2, F_SETFL, flags | O_NONBLOCK);
    char fill[4096];
    std::memset(fill, '.', sizeof fill);
    while (write(2, fill, sizeof fill) > 0) {}
    while (write(2, fill, 1) > 0) {}
    fcntl(2, F_SETFL, flags);

    int rc = -1;
    std::atomic<long> tid{0};
    std::thread caller([&] {
        tid = syscall(SYS_gettid);
        rc = call();
    });
    bool blocked = false;
    for (int i = 0; i < 1000 && !blocked; i++) {
        long t = tid.load();
        if (t != 0) {
            char path[64];
            std::snprintf(path, sizeof path, "/proc/self/task/%ld/syscall", t);
            if (FILE* f = std::fopen(path, "r")) {
                long nr = -1;
                if (std::fscanf(f, "%ld", &nr) == 1 && nr == SYS_write) blocked = true;
                std::fclose(f);
            }
        }
        if (!blocked) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    out(blocked_key, blocked);

    std::fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        int null_fd = open("/dev/null", O_WRONLY);
        dup2(null_fd, 2);
        void* p = nullptr;
        int rc_child = cudaMalloc(&p, 4096);
        out("child_rc_malloc", rc_child);
        if (rc_child == 0) cudaFree(p);
        std::fflush(stdout);
        _exit(0);
    }
    int status = -1;
    bool hung = true;
    for (int i = 0; i < 100; i++) {
        if (waitpid(child, &status, WNOHANG) == child) {
            hung = false;
            break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (hung) {
        kill(child, SIGKILL);
        waitpid(child, &status, 0);
    }
    // Unblock the parent's write: drain the pipe until the call is done.
    fcntl(pipe_fds[0], F_SETFL, O_NONBLOCK);
    std::atomic<bool> finished{false};
    std::thread drain([&] {
        char buf[4096];
        while (!finished.load()) {
            while (read(pipe_fds[0], buf, sizeof buf) > 0) {}
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
        while (read(pipe_fds[0], buf, sizeof buf) > 0) {}
    });
    caller.join();
    finished = true;
    drain.join();
    dup2(saved_stderr, 2);
    out("child_hung", hung);
    out("child_exited_cleanly", !hung && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    out(rc_key, rc);
    return 0;
}

// A process forks while another of its threads is making the first allocation call, before
// kvhygiene has started: that thread is still writing the interposers' start-up notice
// (stderr is a full pipe here, so the write takes as long as the test needs). The child is
// forked before start-up and, like any such child, must be able to allocate: it is served or
// forwarded, never left waiting for a thread that does not exist in it.
static int scenario_fork_during_notice() {
    void* first = nullptr;
    int rc = fork_while_stderr_blocks([&] { return cudaMalloc(&first, 4096); },
                                      "starter_blocked_in_notice", "rc_first");
    if (first) cudaFree(first);
    out("done", 1);
    return rc;
}

// A block kvhygiene handed out, freed, then returned to the device by an empty-cache, is
// freed a second time (a double free in the engine). kvhygiene no longer holds the address,
// which could hold an allocation made since outside it: the free goes to the runtime, which
// answers for it, and kvhygiene records no invalid free.
static int scenario_released_double_free() {
    typedef void (*empty_fn)(void);
    empty_fn empty = reinterpret_cast<empty_fn>(dlsym(RTLD_DEFAULT, "kvh_empty_cache"));
    const size_t N = 4096;
    void* p = nullptr;
    out("rc_malloc", cudaMalloc(&p, N));
    out("rc_free", cudaFree(p));
    if (empty) empty();
    int frees = fake_cudart_calls("cudaFree");
    out("rc_double_free", cudaFree(p));
    out("real_frees_for_double", fake_cudart_calls("cudaFree") - frees);
    void* a = nullptr;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(uintptr_t(0x5000));
    out("rc_malloc_async", cudaMallocAsync(&a, N, s));
    out("rc_free_async", cudaFreeAsync(a, s));
    kvh_sync();
    if (empty) empty();
    int async_frees = fake_cudart_calls("cudaFreeAsync");
    out("rc_double_free_async", cudaFreeAsync(a, s));
    out("real_async_frees_for_double", fake_cudart_calls("cudaFreeAsync") - async_frees);
    out("kvh_invalid_frees", kvh_counter("invalid_frees"));
    out("done", 1);
    return 0;
}

// A process that loaded the interposer but has not started kvhygiene forks while another of
// its threads is reporting, on stderr, a runtime function that is not loaded (here the
// runtime's cudaFreeAsync_ptsz, for a pointer kvhygiene does not hold). The child is forked
// before start-up and must be able to allocate, as any such child: not wait for a lock held
// by a thread that does not exist in it.
static int scenario_fork_during_symbol_report() {
    void* m = nullptr;
    cudaMallocManaged(&m, 64, 1);
    free_async_fn free_ptsz = reinterpret_cast<free_async_fn>(dlsym(RTLD_DEFAULT, "cudaFreeAsync_ptsz"));
    if (free_ptsz == nullptr) return 3;
    int rc = fork_while_stderr_blocks([&] { return free_ptsz(m, nullptr); },
                                      "reporter_blocked_in_write", "rc_reporter");
    cudaFree(m);
    out("done", 1);
    return rc;
}

// kvh_shutdown (exported by the interposer library) before the first allocation keeps
// kvhygiene from starting; the allocations that follow are refused, and the engine is told
// why: the same code as an allocation after a shutdown of a started kvhygiene, or the
// reason on stderr.
static int scenario_shutdown_before_start() {
    typedef void (*shutdown_fn)(void);
    shutdown_fn shutdown = reinterpret_cast<shutdown_fn>(dlsym(RTLD_DEFAULT, "kvh_shutdown"));
    if (shutdown == nullptr) return 3;
    shutdown();
    void* p = reinterpret_cast<void*>(uintptr_t(0x1234));
    int rc = cudaMalloc(&p, 4096);
    out("rc_malloc_after_early_shutdown", rc);
    out("early_shutdown_is_null", p == nullptr);
    out("real_cudaMalloc", fake_cudart_calls("cudaMalloc"));
    out("done", 1);
    return 0;
}

// kvhygiene started through the C API the library also exports (kvh_init), then, when
// `malloc_in_parent`, one interposed allocation in the parent, then a fork: the child
// allocates once. Under an invalid KVH_PRELOAD (fail closed) the child's allocations are
// refused as its parent's are (forwarded, they would hand out the runtime's unscrubbed
// memory); otherwise they are forwarded, and nothing on stderr may say they are served.
static int fork_after_c_api_start(bool malloc_in_parent) {
    typedef int (*init_fn)(void);
    init_fn init = reinterpret_cast<init_fn>(dlsym(RTLD_DEFAULT, "kvh_init"));
    if (init == nullptr) return 3;
    out("rc_kvh_init", init());
    if (malloc_in_parent) {
        void* p = reinterpret_cast<void*>(uintptr_t(0x1234));
        out("rc_malloc", cudaMalloc(&p, 4096));
    }
    std::fflush(stdout);
    std::fflush(stderr);
    pid_t child = fork();
    if (child == 0) {
        int mallocs = fake_cudart_calls("cudaMalloc");
        void* c = reinterpret_cast<void*>(uintptr_t(0x1234));
        out("child_rc_malloc", cudaMalloc(&c, 4096));
        out("child_malloc_forwarded", fake_cudart_calls("cudaMalloc") - mallocs);
        out("child_malloc_is_null", c == nullptr);
        std::fflush(stdout);
        _exit(0);
    }
    int status = -1;
    waitpid(child, &status, 0);
    out("child_exited_cleanly", WIFEXITED(status) && WEXITSTATUS(status) == 0);
    out("done", 1);
    return 0;
}

static int scenario_fork_after_c_api_start() { return fork_after_c_api_start(true); }

static int scenario_fork_after_c_api_start_only() { return fork_after_c_api_start(false); }

// The program changes KVH_PRELOAD (setenv, or unsetenv when PROBE_NEW_PRELOAD is "-") to
// PROBE_NEW_PRELOAD before its first interposed call, then allocates once.
static int scenario_setenv_before_first_malloc() {
    const char* value = std::getenv("PROBE_NEW_PRELOAD");
    if (value == nullptr) return 3;
    if (std::strcmp(value, "-") == 0) {
        unsetenv("KVH_PRELOAD");
    } else {
        setenv("KVH_PRELOAD", value, 1);
    }
    void* p = nullptr;
    out("rc_malloc", cudaMalloc(&p, 4096));
    out("real_cudaMalloc", fake_cudart_calls("cudaMalloc"));
    out("done", 1);
    return 0;
}

// While one engine thread captures a CUDA graph on its stream (in the global capture mode,
// the runtime's default), another thread allocates fresh memory in stream order on its
// per-thread default stream, through cudaMallocAsync(cudaStreamPerThread) and
// cudaMallocAsync_ptsz(stream 0). The runtime's own stream-ordered allocation makes no
// synchronisation, so it leaves the capture alone; the fake counts every synchronisation made
// outside the relaxed mode during a capture (one the real runtime refuses, invalidating the
// capture).
static int scenario_per_thread_alloc_during_capture() {
    malloc_async_fn malloc_ptsz =
        reinterpret_cast<malloc_async_fn>(dlsym(RTLD_DEFAULT, "cudaMallocAsync_ptsz"));
    cudaStream_t s = nullptr;
    out("rc_stream_create", cudaStreamCreate(&s));
    fake_cudart_set_capturing(s, 1);
    long long rc_plain = -1, rc_ptsz = -1, unsafe_plain = -1, unsafe_ptsz = -1;
    std::thread th([&] {
        int before = fake_cudart_calls("unsafe sync during a capture");
        void* p = nullptr;
        rc_plain = cudaMallocAsync(&p, 3 * 4096, PER_THREAD);
        unsafe_plain = fake_cudart_calls("unsafe sync during a capture") - before;
        if (malloc_ptsz) {
            before = fake_cudart_calls("unsafe sync during a capture");
            void* q = nullptr;
            rc_ptsz = malloc_ptsz(&q, 5 * 4096, nullptr);
            unsafe_ptsz = fake_cudart_calls("unsafe sync during a capture") - before;
        }
    });
    th.join();
    fake_cudart_set_capturing(s, 0);
    out("rc_malloc_per_thread", rc_plain);
    out("unsafe_syncs_per_thread", unsafe_plain);
    out("rc_malloc_ptsz", rc_ptsz);
    out("unsafe_syncs_ptsz", unsafe_ptsz);
    out("done", 1);
    return 0;
}

// The process's mapped address space, in bytes (/proc/self/statm's first field).
static long long mapped_bytes() {
    FILE* f = std::fopen("/proc/self/statm", "r");
    if (f == nullptr) return -1;
    long long pages = -1;
    if (std::fscanf(f, "%lld", &pages) != 1) pages = -1;
    std::fclose(f);
    return pages < 0 ? -1 : pages * sysconf(_SC_PAGESIZE);
}

// A device with room for a large allocation but not much more, as when an engine sizes one
// buffer (a KV cache pool) from the free memory: the address space is limited to what the
// process maps now plus the request and 16 MiB, and one buffer of 256 MiB + 1 byte is
// allocated. The runtime serves it.
static int scenario_large_allocation_that_fits() {
    void* w = nullptr;
    out("rc_warm", cudaMalloc(&w, 4096));
    cudaFree(w);
    kvh_sync();
    const size_t large = (size_t(1) << 28) + 1;
    struct rlimit saved;
    getrlimit(RLIMIT_AS, &saved);
    long long now = mapped_bytes();
    struct rlimit tight = saved;
    tight.rlim_cur = static_cast<rlim_t>(now + large + (16 << 20));
    out("rc_limit", now < 0 ? -1 : setrlimit(RLIMIT_AS, &tight));
    void* p = nullptr;
    out("rc_malloc_large", cudaMalloc(&p, large));
    out("large_is_null", p == nullptr);
    setrlimit(RLIMIT_AS, &saved);
    if (p) out("rc_free_large", cudaFree(p));
    out("done", 1);
    return 0;
}

// Allocations the interposer forwards to a runtime function this runtime lacks
// (cudaMallocAsync_ptsz): a zero-size request, and one on a stream capturing a graph. Each
// fails with cudaErrorSharedObjectSymbolNotFound; the output pointer starts non-NULL, and a
// failed allocation leaves it NULL, as every other failed allocation does.
static int scenario_forwarded_allocation_without_real_function() {
    malloc_async_fn malloc_ptsz =
        reinterpret_cast<malloc_async_fn>(dlsym(RTLD_DEFAULT, "cudaMallocAsync_ptsz"));
    if (malloc_ptsz == nullptr) return 3;
    void* z = reinterpret_cast<void*>(uintptr_t(0x1234));
    out("rc_malloc_ptsz_zero", malloc_ptsz(&z, 0, nullptr));
    out("zero_is_null", z == nullptr);
    cudaStream_t s = nullptr;
    out("rc_stream_create", cudaStreamCreate(&s));
    fake_cudart_set_capturing(s, 1);
    void* c = reinterpret_cast<void*>(uintptr_t(0x1234));
    out("rc_malloc_ptsz_capturing", malloc_ptsz(&c, 4096, s));
    out("capturing_is_null", c == nullptr);
    fake_cudart_set_capturing(s, 0);
    cudaStreamDestroy(s);
    out("done", 1);
    return 0;
}

// A stream-ordered allocation on a stream capturing a CUDA graph, made as the process's first
// allocation: the output pointer starts non-NULL, and what reached the runtime is counted.
static int scenario_captured_allocation() {
    cudaStream_t s = nullptr;
    out("rc_stream_create", cudaStreamCreate(&s));
    fake_cudart_set_capturing(s, 1);
    int real_mallocs = fake_cudart_calls("cudaMallocAsync");
    void* g = reinterpret_cast<void*>(uintptr_t(0x1234));
    out("rc_malloc_captured", cudaMallocAsync(&g, 4096, s));
    out("captured_malloc_forwarded", fake_cudart_calls("cudaMallocAsync") - real_mallocs);
    out("captured_is_null", g == nullptr);
    fake_cudart_set_capturing(s, 0);
    if (g != nullptr && g != reinterpret_cast<void*>(uintptr_t(0x1234))) cudaFreeAsync(g, s);
    cudaStreamDestroy(s);
    out("done", 1);
    return 0;
}

// The device resets an engine may call: `real_reset` is the name the stand-in runtime
// counts the call under, `other_reset` the other's.
typedef int (*reset_fn)(void);
struct Reset {
    reset_fn call;
    const char* real_reset;
    const char* other_reset;
};
static const Reset DEVICE_RESET = {cudaDeviceReset, "cudaDeviceReset", "cudaThreadExit"};
static const Reset THREAD_EXIT = {cudaThreadExit, "cudaThreadExit", "cudaDeviceReset"};

// A device reset (cudaDeviceReset, or the deprecated cudaThreadExit) at the end of an
// engine's run: one block still allocated and one freed just before, both holding a
// secret; then what the engine's later calls get.
static int scenario_device_reset(const Reset& reset) {
    const size_t N = 4096;
    void* held = nullptr;
    out("rc_malloc_held", cudaMalloc(&held, N));
    if (held) fill_secret(held, N);
    void* freed = nullptr;
    out("rc_malloc_freed", cudaMalloc(&freed, N));
    if (freed) fill_secret(freed, N);
    out("rc_free_freed", cudaFree(freed));
    int syncs = fake_cudart_calls("cudaDeviceSynchronize");
    out("rc_reset", reset.call());
    out("real_resets", fake_cudart_calls(reset.real_reset));
    out("other_real_resets", fake_cudart_calls(reset.other_reset));
    out("synced_for_reset", fake_cudart_calls("cudaDeviceSynchronize") > syncs);
    // What the reset would have destroyed (the stand-ins keep it readable).
    out("held_zero", all_zero(held, N));
    out("freed_zero", all_zero(freed, N));
    int frees = fake_cudart_calls("cudaFree");
    out("rc_free_held_after_reset", cudaFree(held));
    out("real_frees_after_reset", fake_cudart_calls("cudaFree") - frees);
    int mallocs = fake_cudart_calls("cudaMalloc");
    void* again = reinterpret_cast<void*>(uintptr_t(0x1234));
    out("rc_malloc_after_reset", cudaMalloc(&again, N));
    out("after_reset_is_null", again == nullptr);
    out("real_mallocs_after_reset", fake_cudart_calls("cudaMalloc") - mallocs);
    out("done", 1);
    return 0;
}

// cudaDeviceReset whose real reset fails after kvhygiene did its part: the device's memory is
// still there, and still kvhygiene's, so the engine's free of its block is kvhygiene's too.
static int scenario_device_reset_that_fails() {
    const size_t N = 4096;
    void* held = nullptr;
    out("rc_malloc_held", cudaMalloc(&held, N));
    if (held) fill_secret(held, N);
    fake_cudart_fail_reset(999);
    out("rc_reset", cudaDeviceReset());
    out("real_resets", fake_cudart_calls("cudaDeviceReset"));
    out("held_zero", all_zero(held, N));
    int frees = fake_cudart_calls("cudaFree");
    out("rc_free_held", cudaFree(held));
    out("rc_free_held_again", cudaFree(held));
    out("real_frees_of_held", fake_cudart_calls("cudaFree") - frees);
    void* again = nullptr;
    out("rc_malloc_after_failed_reset", cudaMalloc(&again, N));
    out("done", 1);
    return 0;
}

// cudaDeviceReset whose real reset fails, the engine's block one the reset's free retires
// (KVH_MAX_REUSE=1: a block is served once): the engine's free of it after the failed reset.
static int scenario_device_reset_that_fails_retired() {
    const size_t N = 4096;
    void* held = nullptr;
    out("rc_malloc_held", cudaMalloc(&held, N));
    fake_cudart_fail_reset(999);
    out("rc_reset", cudaDeviceReset());
    int frees = fake_cudart_calls("cudaFree");
    out("rc_free_held", cudaFree(held));
    out("real_frees_of_held", fake_cudart_calls("cudaFree") - frees);
    out("done", 1);
    return 0;
}

// A device reset refused by a graph capture under way: nothing of kvhygiene's changes.
static int scenario_device_reset_during_capture(const Reset& reset) {
    const size_t N = 4096;
    void* held = nullptr;
    out("rc_malloc_held", cudaMalloc(&held, N));
    if (held) fill_secret(held, N);
    cudaStream_t s = nullptr;
    out("rc_stream_create", cudaStreamCreate(&s));
    fake_cudart_set_capturing(s, 1);
    out("rc_reset", reset.call());
    out("real_resets", fake_cudart_calls(reset.real_reset));
    fake_cudart_set_capturing(s, 0);
    out("held_kept", holds_secret(held, N));
    void* again = nullptr;
    out("rc_malloc_after_refused_reset", cudaMalloc(&again, N));
    out("rc_free_held", cudaFree(held));
    out("rc_free_again", cudaFree(again));
    cudaStreamDestroy(s);
    out("done", 1);
    return 0;
}

// kvhygiene's C API allocation after cudaDeviceReset: a block freed and scrubbed before the
// reset is clean in kvhygiene's pool; kvh_malloc on the reset device, afterwards, asks for
// the same size (the run sets KVH_OOM=null, so a refusal is a NULL pointer).
static int scenario_device_reset_c_api_malloc() {
    typedef void* (*kvh_malloc_fn)(long, int, void*);
    kvh_malloc_fn kmalloc = reinterpret_cast<kvh_malloc_fn>(dlsym(RTLD_DEFAULT, "kvh_malloc"));
    const size_t N = 4096;
    void* pooled = nullptr;
    out("rc_malloc_pooled", cudaMalloc(&pooled, N));
    out("rc_free_pooled", cudaFree(pooled));
    kvh_sync();
    out("rc_reset", cudaDeviceReset());
    void* again = kmalloc ? kmalloc(long(N), 0, nullptr) : nullptr;
    out("c_api_after_reset_is_null", again == nullptr);
    out("c_api_after_reset_is_reset_block", again != nullptr && again == pooled);
    out("done", 1);
    return 0;
}

// A stream-ordered allocation on a stream capturing a CUDA graph, on the device reset just
// before: the output pointer starts non-NULL, and what reached the runtime is counted.
static int scenario_device_reset_then_captured_allocation() {
    void* p = nullptr;
    out("rc_malloc", cudaMalloc(&p, 4096));
    out("rc_free", cudaFree(p));
    out("rc_reset", cudaDeviceReset());
    cudaStream_t s = nullptr;
    out("rc_stream_create", cudaStreamCreate(&s));
    fake_cudart_set_capturing(s, 1);
    int real_mallocs = fake_cudart_calls("cudaMallocAsync");
    void* g = reinterpret_cast<void*>(uintptr_t(0x1234));
    out("rc_malloc_captured_after_reset", cudaMallocAsync(&g, 4096, s));
    out("captured_after_reset_forwarded", fake_cudart_calls("cudaMallocAsync") - real_mallocs);
    out("captured_after_reset_is_null", g == nullptr);
    fake_cudart_set_capturing(s, 0);
    if (g != nullptr && g != reinterpret_cast<void*>(uintptr_t(0x1234))) cudaFreeAsync(g, s);
    cudaStreamDestroy(s);
    out("done", 1);
    return 0;
}

// kvhygiene's C API free, after cudaDeviceReset, of a block it allocated before the reset on
// the reset device (the reset itself freed it to kvhygiene).
static int scenario_device_reset_c_api_free() {
    typedef void* (*kvh_malloc_fn)(long, int, void*);
    typedef void (*kvh_free_fn)(void*, long, int, void*);
    kvh_malloc_fn kmalloc = reinterpret_cast<kvh_malloc_fn>(dlsym(RTLD_DEFAULT, "kvh_malloc"));
    kvh_free_fn kfree = reinterpret_cast<kvh_free_fn>(dlsym(RTLD_DEFAULT, "kvh_free"));
    const size_t N = 4096;
    void* kept = kmalloc ? kmalloc(long(N), 0, nullptr) : nullptr;
    out("c_api_malloc_ok", kept != nullptr);
    out("rc_reset", cudaDeviceReset());
    if (kfree && kept) kfree(kept, long(N), 0, nullptr);
    out("kvh_invalid_frees", kvh_counter("invalid_frees"));
    out("done", 1);
    return 0;
}

// One way to export a buffer to another process, and the name the fake counts its calls by.
struct Exporter {
    int (*get_handle)(void* handle, void* p);
    const char* name;
};

static int export_by_driver(void* handle, void* p) {
    return cuIpcGetMemHandle(handle, static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(p)));
}

typedef int (*cu_ipc_get_mem_handle_fn)(void* handle, unsigned long long dptr);
typedef int (*cu_get_proc_address_v2_fn)(const char*, void**, int, unsigned long long, int*);

static int export_through(void* f, void* handle, void* p) {
    if (f == nullptr) return -1;
    auto get = reinterpret_cast<cu_ipc_get_mem_handle_fn>(f);
    return get(handle, static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(p)));
}

// The driver's export through a pointer from cudaGetDriverEntryPoint, as engines that use
// the runtime API take driver functions (Transformer Engine, say).
static int export_by_entry_point(void* handle, void* p) {
    void* f = nullptr;
    int status = -1;
    if (cudaGetDriverEntryPoint("cuIpcGetMemHandle", &f, 0, &status) != 0 || status != 0) return -1;
    return export_through(f, handle, p);
}

// The driver's lookup taken from the runtime, then the export from that lookup, as NCCL
// takes every driver function.
static int export_by_proc_address(void* handle, void* p) {
    void* lookup = nullptr;
    int status = -1;
    if (cudaGetDriverEntryPointByVersion("cuGetProcAddress", &lookup, 12000, 0, &status) != 0 || lookup == nullptr)
        return -1;
    void* f = nullptr;
    if (reinterpret_cast<cu_get_proc_address_v2_fn>(lookup)("cuIpcGetMemHandle", &f, 12000, 0, &status) != 0)
        return -1;
    return export_through(f, handle, p);
}

static const Exporter RUNTIME_EXPORT = {cudaIpcGetMemHandle, "cudaIpcGetMemHandle"};
static const Exporter DRIVER_EXPORT = {export_by_driver, "cuIpcGetMemHandle"};
static const Exporter ENTRY_POINT_EXPORT = {export_by_entry_point, "cuIpcGetMemHandle"};
static const Exporter PROC_ADDRESS_EXPORT = {export_by_proc_address, "cuIpcGetMemHandle"};

// Every lookup of a driver function, as the engine sees it: `cuIpcGetMemHandle` and the
// driver's lookups are what the dynamic linker binds their names to (kvhygiene's under
// LD_PRELOAD, the fake's otherwise), every other function the driver's own, and failures
// and missing outputs as the lookup answers them.
static int scenario_entry_points() {
    void* linked_ipc = dlsym(RTLD_DEFAULT, "cuIpcGetMemHandle");
    void* linked_v1 = dlsym(RTLD_DEFAULT, "cuGetProcAddress");
    void* linked_v2 = dlsym(RTLD_DEFAULT, "cuGetProcAddress_v2");
    void* linked_count = dlsym(RTLD_DEFAULT, "cuDeviceGetCount");
    int status = -1;
    void* f = nullptr;
    int ipc = 0;
    f = nullptr;
    ipc += cudaGetDriverEntryPoint("cuIpcGetMemHandle", &f, 0, &status) == 0 && f == linked_ipc;
    f = nullptr;
    ipc += cudaGetDriverEntryPointByVersion("cuIpcGetMemHandle", &f, 12000, 0, &status) == 0 && f == linked_ipc;
    f = nullptr;
    ipc += cuGetProcAddress("cuIpcGetMemHandle", &f, 11030, 0) == 0 && f == linked_ipc;
    f = nullptr;
    ipc += cuGetProcAddress_v2("cuIpcGetMemHandle", &f, 12000, 0, &status) == 0 && f == linked_ipc;
    out("ipc_as_linked", ipc);

    int lookups = 0;
    f = nullptr;
    lookups += cudaGetDriverEntryPointByVersion("cuGetProcAddress", &f, 11030, 0, &status) == 0 && f == linked_v1;
    f = nullptr;
    lookups += cudaGetDriverEntryPointByVersion("cuGetProcAddress", &f, 12000, 0, &status) == 0 && f == linked_v2;
    f = nullptr;
    lookups += cudaGetDriverEntryPoint("cuGetProcAddress", &f, 0, &status) == 0 && f == linked_v2;
    f = nullptr;
    lookups += cuGetProcAddress_v2("cuGetProcAddress", &f, 11030, 0, &status) == 0 && f == linked_v1;
    out("lookups_as_linked", lookups);
    // A lookup the driver hands out at an address it does not export passes unchanged, and
    // works.
    f = nullptr;
    void* g = nullptr;
    bool unexported = cudaGetDriverEntryPointByVersion("cuGetProcAddress", &f, 13000, 0, &status) == 0 &&
                      f != nullptr && f != linked_v1 && f != linked_v2 &&
                      reinterpret_cast<cu_get_proc_address_v2_fn>(f)("cuDeviceGetCount", &g, 13000, 0, &status) == 0 &&
                      g == linked_count;
    out("unexported_lookup_unchanged", unexported);

    int others = 0;
    f = nullptr;
    others += cudaGetDriverEntryPoint("cuDeviceGetCount", &f, 0, &status) == 0 && f == linked_count;
    f = nullptr;
    others += cuGetProcAddress_v2("cuDeviceGetCount", &f, 12000, 0, &status) == 0 && f == linked_count;
    out("others_as_linked", others);

    f = reinterpret_cast<void*>(uintptr_t(1));
    out("rc_unknown_driver", cuGetProcAddress_v2("cuNoSuchFunction", &f, 12000, 0, &status));
    out("unknown_driver_null", f == nullptr);
    f = reinterpret_cast<void*>(uintptr_t(1));
    status = -1;
    out("rc_unknown_runtime", cudaGetDriverEntryPoint("cuNoSuchFunction", &f, 0, &status));
    out("unknown_runtime_status", status);
    out("unknown_runtime_null", f == nullptr);
    out("rc_no_output", cudaGetDriverEntryPoint("cuIpcGetMemHandle", nullptr, 0, &status));

    // The fake runtime has no _ptsz entry points: kvhygiene's, when preloaded, answers that
    // the real one is missing and leaves the output alone.
    typedef int (*entry_point_fn)(const char*, void**, unsigned long long, int*);
    auto ptsz = reinterpret_cast<entry_point_fn>(dlsym(RTLD_DEFAULT, "cudaGetDriverEntryPoint_ptsz"));
    f = reinterpret_cast<void*>(uintptr_t(1));
    out("rc_ptsz", ptsz ? ptsz("cuIpcGetMemHandle", &f, 0, &status) : -1);
    out("ptsz_output_untouched", f == reinterpret_cast<void*>(uintptr_t(1)));
    out("done", 1);
    return 0;
}

// An engine that shares a buffer with another process (`ex`: the runtime's
// cudaIpcGetMemHandle or the driver's cuIpcGetMemHandle), frees it, and allocates the same
// size again; then exports a freed block, and memory of the runtime's.
static int scenario_ipc(const Exporter& ex) {
    const size_t N = 4096;
    unsigned char handle[64];
    void* p = nullptr;
    out("rc_malloc", cudaMalloc(&p, N));
    if (p) fill_secret(p, N);
    // An interior pointer, as an engine exporting a slice of a larger buffer passes.
    out("rc_export", p ? ex.get_handle(handle, static_cast<char*>(p) + 64) : -1);
    out("rc_export_again", p ? ex.get_handle(handle, p) : -1);
    out("real_exports", fake_cudart_calls(ex.name));
    out("rc_free", cudaFree(p));
    kvh_sync();
    void* q = nullptr;
    out("rc_malloc_again", cudaMalloc(&q, N));
    out("secret_seen", holds_secret(q, N));
    out("exported_blocks", kvh_counter("ipc_exported_blocks"));
    out("released", kvh_counter("released"));
    out("pool_hits", kvh_counter("pool_hits"));

    // A call without a handle exports nothing (the runtime refuses it): `q` is not marked,
    // and its free pools it as any block's.
    out("rc_export_no_handle", q ? ex.get_handle(nullptr, q) : -1);
    // `q`, freed and scrubbed: its export is the next owner's memory.
    out("rc_free_again", cudaFree(q));
    kvh_sync();
    out("exported_blocks_after", kvh_counter("ipc_exported_blocks"));
    out("released_after", kvh_counter("released"));
    int before = fake_cudart_calls(ex.name);
    out("rc_export_freed", ex.get_handle(handle, q));
    out("freed_export_forwarded", fake_cudart_calls(ex.name) - before);

    // Memory of the runtime's own: its export is the runtime's affair.
    void* m = nullptr;
    out("rc_managed", cudaMallocManaged(&m, N, 1));
    before = fake_cudart_calls(ex.name);
    out("rc_export_runtime", ex.get_handle(handle, m));
    out("runtime_export_forwarded", fake_cudart_calls(ex.name) - before);
    if (m) cudaFree(m);
    out("done", 1);
    return 0;
}

int main(int argc, char** argv) {
    const char* which = argc > 1 ? argv[1] : "main";
    if (std::strcmp(which, "main") == 0) return scenario_main();
    if (std::strcmp(which, "sync-failure") == 0) return scenario_sync_failure();
    if (std::strcmp(which, "threads") == 0) return scenario_threads();
    if (std::strcmp(which, "capture") == 0) return scenario_capture();
    if (std::strcmp(which, "per-thread") == 0) return scenario_per_thread();
    if (std::strcmp(which, "streams") == 0) return scenario_streams();
    if (std::strcmp(which, "fork") == 0) return scenario_fork();
    if (std::strcmp(which, "fork-before-start") == 0) return scenario_fork_before_start();
    if (std::strcmp(which, "fork-during-notice") == 0) return scenario_fork_during_notice();
    if (std::strcmp(which, "released-double-free") == 0) return scenario_released_double_free();
    if (std::strcmp(which, "fork-during-symbol-report") == 0) return scenario_fork_during_symbol_report();
    if (std::strcmp(which, "shutdown-before-start") == 0) return scenario_shutdown_before_start();
    if (std::strcmp(which, "fork-after-c-api-start") == 0) return scenario_fork_after_c_api_start();
    if (std::strcmp(which, "fork-after-c-api-start-only") == 0) return scenario_fork_after_c_api_start_only();
    if (std::strcmp(which, "setenv-before-first-malloc") == 0) return scenario_setenv_before_first_malloc();
    if (std::strcmp(which, "large-allocation-that-fits") == 0)
        return scenario_large_allocation_that_fits();
    if (std::strcmp(which, "per-thread-alloc-during-capture") == 0)
        return scenario_per_thread_alloc_during_capture();
    if (std::strcmp(which, "forwarded-allocation-without-real-function") == 0)
        return scenario_forwarded_allocation_without_real_function();
    if (std::strcmp(which, "captured-allocation") == 0) return scenario_captured_allocation();
    if (std::strcmp(which, "device-reset") == 0) return scenario_device_reset(DEVICE_RESET);
    if (std::strcmp(which, "thread-exit") == 0) return scenario_device_reset(THREAD_EXIT);
    if (std::strcmp(which, "device-reset-during-capture") == 0)
        return scenario_device_reset_during_capture(DEVICE_RESET);
    if (std::strcmp(which, "thread-exit-during-capture") == 0)
        return scenario_device_reset_during_capture(THREAD_EXIT);
    if (std::strcmp(which, "device-reset-that-fails") == 0) return scenario_device_reset_that_fails();
    if (std::strcmp(which, "device-reset-that-fails-retired") == 0)
        return scenario_device_reset_that_fails_retired();
    if (std::strcmp(which, "device-reset-c-api-malloc") == 0) return scenario_device_reset_c_api_malloc();
    if (std::strcmp(which, "device-reset-c-api-free") == 0) return scenario_device_reset_c_api_free();
    if (std::strcmp(which, "ipc") == 0) return scenario_ipc(RUNTIME_EXPORT);
    if (std::strcmp(which, "ipc-driver") == 0) return scenario_ipc(DRIVER_EXPORT);
    if (std::strcmp(which, "ipc-entry-point") == 0) return scenario_ipc(ENTRY_POINT_EXPORT);
    if (std::strcmp(which, "ipc-proc-address") == 0) return scenario_ipc(PROC_ADDRESS_EXPORT);
    if (std::strcmp(which, "entry-points") == 0) return scenario_entry_points();
    if (std::strcmp(which, "device-reset-then-captured-allocation") == 0)
        return scenario_device_reset_then_captured_allocation();
    std::fprintf(stderr, "unknown scenario %s\n", which);
    return 2;
}
