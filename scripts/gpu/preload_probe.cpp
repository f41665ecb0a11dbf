// The LD_PRELOAD check on a real GPU: a C++ "engine" that uses the CUDA runtime's allocation
// calls directly. It writes a secret into device memory, frees it, allocates the same size
// again and copies the new memory back: with the plain runtime the secret may come back (the
// threat), under LD_PRELOAD=libkvhygiene_preload.so it must read zero. It does so for the
// synchronous pair (cudaMalloc / cudaFree) and the stream-ordered pair (cudaMallocAsync /
// cudaFreeAsync), and prints one JSON object. A third round exports the buffer for another
// process (cudaIpcGetMemHandle) before its free: under kvhygiene that block goes back to the
// driver at its free, never to the pool (`kvh_ipc_exported_blocks`, `kvh_released`), and the
// next allocation of its size is fresh memory, zeroed. A fourth round does the same through
// the driver's export (cuIpcGetMemHandle) called through a pointer from the runtime's lookup
// (cudaGetDriverEntryPoint), which under kvhygiene hands out its interposer; and the probe
// says what the driver's lookup (cuGetProcAddress) taken from the runtime is
// (`proc_address_from_runtime`): the driver's exported function (1: run plain, the driver
// hands out the function whose address tells its version, which kvhygiene needs to
// interpose it), kvhygiene's interposer (2: under the library), another function (0), or
// nothing (-1).
//
// When kvhygiene is loaded (its C API is then in the process: `kvh_loaded`), the probe waits
// with kvh_synchronize between the free and the new allocation, so the freed block is
// scrubbed and verified and the new allocation is that same block (`same_address`): the run
// shows the block's own bytes after kvhygiene, not merely some other fresh memory.
//
// Built on the GPU machine by scripts/gpu-check.sh: nvcc -cudart shared -o probe this.cpp
// (the runtime must be a shared library for LD_PRELOAD to interpose it). Only runtime API
// calls, declared here, so the file needs no CUDA header.

#include <dlfcn.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

extern "C" {
typedef void* cudaStream_t;
int cudaMalloc(void** p, size_t size);
int cudaFree(void* p);
int cudaMallocAsync(void** p, size_t size, cudaStream_t s);
int cudaFreeAsync(void* p, cudaStream_t s);
int cudaStreamCreate(cudaStream_t* s);
int cudaStreamSynchronize(cudaStream_t s);
int cudaMemcpy(void* dst, const void* src, size_t n, int kind);
int cudaDeviceSynchronize(void);
struct cudaIpcMemHandle_st {
    char reserved[64];
};
int cudaIpcGetMemHandle(cudaIpcMemHandle_st* handle, void* p);
int cudaGetDriverEntryPoint(const char* symbol, void** fn, unsigned long long flags, int* status);
}
typedef int (*cu_ipc_get_mem_handle_fn)(cudaIpcMemHandle_st* handle, unsigned long long dptr);

static const int HOST_TO_DEVICE = 1;
static const int DEVICE_TO_HOST = 2;
static const size_t BYTES = 64u << 20;
static const char SECRET[] = "tenant-A secret prompt";

struct Round {
    int rc = 0;            // first non-zero CUDA result, 0 when every call succeeded
    long long secret = 0;  // copies of the secret found in the new allocation
    long long nonzero = 0; // non-zero bytes in the new allocation
    bool same_address = false;
};

// kvhygiene's C API, present only when the interposer library is loaded.
typedef int (*kvh_sync_fn)(void);
typedef int (*kvh_stats_fn)(char*, size_t, size_t*);

static kvh_sync_fn kvh_sync() {
    return reinterpret_cast<kvh_sync_fn>(dlsym(RTLD_DEFAULT, "kvh_synchronize"));
}

// Waits until kvhygiene has scrubbed and verified every freed block (no-op without it).
static void settle() {
    if (kvh_sync_fn f = kvh_sync()) f();
}

// A counter of kvhygiene's stats JSON (`"name":N`), or -1.
static long long kvh_counter(const char* name) {
    kvh_stats_fn f = reinterpret_cast<kvh_stats_fn>(dlsym(RTLD_DEFAULT, "kvh_stats_json"));
    if (!f) return -1;
    std::vector<char> buf(1 << 16);
    size_t len = 0;
    if (f(buf.data(), buf.size(), &len) != 0) return -1;
    char key[128];
    std::snprintf(key, sizeof key, "\"%s\":", name);
    const char* at = std::strstr(buf.data(), key);
    return at ? std::atoll(at + std::strlen(key)) : -1;
}

static void note(Round& r, int rc) {
    if (r.rc == 0 && rc != 0) r.rc = rc;
}

static void inspect(Round& r, void* p, std::vector<char>& host) {
    note(r, cudaMemcpy(host.data(), p, BYTES, DEVICE_TO_HOST));
    for (size_t i = 0; i < BYTES; i++) r.nonzero += host[i] != 0;
    for (size_t i = 0; i + sizeof SECRET - 1 <= BYTES; i += sizeof SECRET)
        r.secret += std::memcmp(host.data() + i, SECRET, sizeof SECRET - 1) == 0;
}

// How a round exports its buffer before the free: not at all, with the runtime's
// cudaIpcGetMemHandle, or with the driver's cuIpcGetMemHandle through a pointer from
// cudaGetDriverEntryPoint.
enum Export { NO_EXPORT, RUNTIME_EXPORT, LOOKUP_EXPORT };

static int export_buffer(Export how, cudaIpcMemHandle_st* handle, void* p) {
    if (how == RUNTIME_EXPORT) return cudaIpcGetMemHandle(handle, p);
    void* f = nullptr;
    int status = -1;
    int rc = cudaGetDriverEntryPoint("cuIpcGetMemHandle", &f, 0, &status);
    if (rc != 0) return rc;
    if (f == nullptr) return -2;
    auto get = reinterpret_cast<cu_ipc_get_mem_handle_fn>(f);
    return get(handle, static_cast<unsigned long long>(reinterpret_cast<size_t>(p)));
}

// What the driver's lookup taken from the runtime is: 1 the driver's exported
// cuGetProcAddress(_v2), 2 kvhygiene's interposer of it, 0 another function, -1 none.
static int proc_address_from_runtime() {
    void* f = nullptr;
    int status = -1;
    if (cudaGetDriverEntryPoint("cuGetProcAddress", &f, 0, &status) != 0 || f == nullptr) return -1;
    // The runtime loaded the driver, maybe outside the global scope: asked by its soname.
    void* driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
    if (driver && (f == dlsym(driver, "cuGetProcAddress_v2") || f == dlsym(driver, "cuGetProcAddress"))) return 1;
    // Under kvhygiene, the global scope's lookups are its interposers.
    bool kvh = dlsym(RTLD_DEFAULT, "kvh_synchronize") != nullptr;
    if (kvh && (f == dlsym(RTLD_DEFAULT, "cuGetProcAddress_v2") || f == dlsym(RTLD_DEFAULT, "cuGetProcAddress")))
        return 2;
    return 0;
}

// cudaMalloc, write the secret, cudaFree, cudaMalloc again, read back. With `export_rc`, the
// buffer is exported (as `how` says) before its free, and the result stored there.
static Round sync_round(std::vector<char>& secret, std::vector<char>& host, int* export_rc = nullptr,
                        Export how = RUNTIME_EXPORT) {
    Round r;
    void* a = nullptr;
    void* b = nullptr;
    cudaIpcMemHandle_st handle;
    note(r, cudaMalloc(&a, BYTES));
    if (a) note(r, cudaMemcpy(a, secret.data(), BYTES, HOST_TO_DEVICE));
    note(r, cudaDeviceSynchronize());
    if (export_rc) *export_rc = a ? export_buffer(how, &handle, a) : -1;
    note(r, cudaFree(a));
    settle();
    note(r, cudaMalloc(&b, BYTES));
    if (b) inspect(r, b, host);
    r.same_address = a == b;
    note(r, cudaFree(b));
    return r;
}

// The same with the stream-ordered allocator on one stream.
static Round async_round(std::vector<char>& secret, std::vector<char>& host) {
    Round r;
    cudaStream_t s = nullptr;
    void* a = nullptr;
    void* b = nullptr;
    note(r, cudaStreamCreate(&s));
    note(r, cudaMallocAsync(&a, BYTES, s));
    note(r, cudaStreamSynchronize(s));
    if (a) note(r, cudaMemcpy(a, secret.data(), BYTES, HOST_TO_DEVICE));
    note(r, cudaFreeAsync(a, s));
    settle();
    note(r, cudaMallocAsync(&b, BYTES, s));
    note(r, cudaStreamSynchronize(s));
    if (b) inspect(r, b, host);
    r.same_address = a == b;
    note(r, cudaFreeAsync(b, s));
    note(r, cudaStreamSynchronize(s));
    return r;
}

static void print(const char* name, const Round& r, bool last) {
    std::printf("  \"%s\": {\"rc\": %d, \"secret_seen\": %lld, \"nonzero\": %lld, \"same_address\": %s}%s\n",
                name, r.rc, r.secret, r.nonzero, r.same_address ? "true" : "false", last ? "" : ",");
}

int main() {
    std::vector<char> secret(BYTES, 0), host(BYTES, 0);
    for (size_t i = 0; i + sizeof SECRET <= BYTES; i += sizeof SECRET)
        std::memcpy(secret.data() + i, SECRET, sizeof SECRET);
    Round s = sync_round(secret, host);
    Round a = async_round(secret, host);
    int export_rc = 0;
    Round i = sync_round(secret, host, &export_rc);
    settle();
    long long exported = kvh_counter("ipc_exported_blocks");
    long long released = kvh_counter("released");
    int lookup_export_rc = 0;
    Round l = sync_round(secret, host, &lookup_export_rc, LOOKUP_EXPORT);
    settle();
    std::printf("{\n");
    std::printf("  \"kvh_loaded\": %d,\n", kvh_sync() ? 1 : 0);
    std::printf("  \"kvh_verifications_passed\": %lld,\n", kvh_counter("verifications_passed"));
    std::printf("  \"kvh_verifications_failed\": %lld,\n", kvh_counter("verifications_failed"));
    std::printf("  \"kvh_ipc_exported_blocks\": %lld,\n", exported);
    std::printf("  \"kvh_released\": %lld,\n", released);
    std::printf("  \"ipc_export_rc\": %d,\n", export_rc);
    std::printf("  \"kvh_ipc_lookup_exported_blocks\": %lld,\n", kvh_counter("ipc_exported_blocks") - exported);
    std::printf("  \"kvh_ipc_lookup_released\": %lld,\n", kvh_counter("released") - released);
    std::printf("  \"ipc_lookup_export_rc\": %d,\n", lookup_export_rc);
    std::printf("  \"proc_address_from_runtime\": %d,\n", proc_address_from_runtime());
    print("sync", s, false);
    print("async", a, false);
    print("ipc", i, false);
    print("ipc_lookup", l, true);
    std::printf("}\n");
    // Flushed now: stdio would otherwise flush after the libraries' exit handlers, and a crash
    // there would lose the result.
    std::fflush(stdout);
    return s.rc != 0 || a.rc != 0 || i.rc != 0 || l.rc != 0 ? 1 : 0;
}
