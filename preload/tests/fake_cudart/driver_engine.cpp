// An engine plugin that exports a buffer through the driver API: linked against the stand-in
// driver (fake_driver.cpp, libcuda.so.1) and a runtime without driver functions of its own,
// and loaded by plugin_host.cpp with dlopen(RTLD_LOCAL), as Python loads an extension module
// that links libcuda. It exports once through the driver function as linked, and once through
// a pointer from the runtime's per-thread-stream lookup (cudaGetDriverEntryPoint_ptsz, which
// code built with `--default-stream per-thread` calls), then frees the buffer and, under the
// interposer, waits for its scrub (kvh_synchronize), so that what became of it is logged.

#include <cstdint>
#include <cstring>
#include <dlfcn.h>

#include "probe_util.h"

extern "C" {
int cudaMalloc(void** p, size_t size);
int cudaFree(void* p);
int cudaGetDriverEntryPoint_ptsz(const char* symbol, void** fn, unsigned long long flags, int* status);
int cuIpcGetMemHandle(void* handle, unsigned long long dptr);
int fake_driver_exports(void);

typedef int (*ipc_get_fn)(void*, unsigned long long);

int engine_run(void) {
    const size_t N = 4096;
    void* p = nullptr;
    out("rc_malloc", cudaMalloc(&p, N));
    if (p == nullptr) return 1;
    std::memset(p, 0x5a, N);
    const unsigned long long dptr = static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(p));

    unsigned char handle[64] = {0};
    out("rc_export", cuIpcGetMemHandle(handle, dptr));
    out("handle_names_block", std::memcmp(handle, &p, sizeof p) == 0);
    out("driver_exports", fake_driver_exports());

    void* f = reinterpret_cast<void*>(uintptr_t(1));
    int status = -1;
    out("rc_ptsz", cudaGetDriverEntryPoint_ptsz("cuIpcGetMemHandle", &f, 0, &status));
    out("ptsz_status", status);
    // The function as this library is linked to it: kvhygiene's interposer under LD_PRELOAD,
    // the driver's otherwise.
    out("ptsz_as_linked", f == reinterpret_cast<void*>(&cuIpcGetMemHandle));
    if (f != nullptr && status == 0) {
        std::memset(handle, 0, sizeof handle);
        out("rc_export_ptsz", reinterpret_cast<ipc_get_fn>(f)(handle, dptr));
        out("driver_exports_after_ptsz", fake_driver_exports());
    }

    out("rc_free", cudaFree(p));
    typedef int (*sync_fn)(void);
    sync_fn kvh_synchronize = reinterpret_cast<sync_fn>(dlsym(RTLD_DEFAULT, "kvh_synchronize"));
    out("rc_kvh_synchronize", kvh_synchronize ? kvh_synchronize() : -1);
    out("done", 1);
    return 0;
}
}
