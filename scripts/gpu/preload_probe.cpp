// The LD_PRELOAD check on a real GPU: a C++ "engine" that uses the CUDA runtime's allocation
// calls directly. It writes a secret into device memory, frees it, allocates the same size
// again and copies the new memory back: with the plain runtime the secret may come back (the
// threat), under LD_PRELOAD=libkvhygiene_preload.so it must read zero. It does so for the
// synchronous pair (cudaMalloc / cudaFree) and the stream-ordered pair (cudaMallocAsync /
// cudaFreeAsync), and prints one JSON object.
//
// Built on the GPU machine by scripts/gpu-check.sh: nvcc -cudart shared -o probe this.cpp
// (the runtime must be a shared library for LD_PRELOAD to interpose it). Only runtime API
// calls, declared here, so the file needs no CUDA header.

#include <cstddef>
#include <cstdio>
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
}

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

static void note(Round& r, int rc) {
    if (r.rc == 0 && rc != 0) r.rc = rc;
}

static void inspect(Round& r, void* p, std::vector<char>& host) {
    note(r, cudaMemcpy(host.data(), p, BYTES, DEVICE_TO_HOST));
    for (size_t i = 0; i < BYTES; i++) r.nonzero += host[i] != 0;
    for (size_t i = 0; i + sizeof SECRET - 1 <= BYTES; i += sizeof SECRET)
        r.secret += std::memcmp(host.data() + i, SECRET, sizeof SECRET - 1) == 0;
}

// cudaMalloc, write the secret, cudaFree, cudaMalloc again, read back.
static Round sync_round(std::vector<char>& secret, std::vector<char>& host) {
    Round r;
    void* a = nullptr;
    void* b = nullptr;
    note(r, cudaMalloc(&a, BYTES));
    if (a) note(r, cudaMemcpy(a, secret.data(), BYTES, HOST_TO_DEVICE));
    note(r, cudaDeviceSynchronize());
    note(r, cudaFree(a));
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
    std::printf("{\n");
    print("sync", s, false);
    print("async", a, true);
    std::printf("}\n");
    return s.rc != 0 || a.rc != 0 ? 1 : 0;
}
