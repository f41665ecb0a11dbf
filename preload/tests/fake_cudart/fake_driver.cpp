// A host stand-in for the CUDA driver as a library of its own (soname libcuda.so.1), for the
// interposer tests of a driver loaded outside the global scope: driver_engine.cpp links it and
// is loaded with dlopen(RTLD_LOCAL), so dlsym(RTLD_NEXT) cannot find it and the interposer
// must find it by its soname. The runtime beside it is fake_cudart.cpp built without driver
// functions of its own (FAKE_CUDART_WITHOUT_DRIVER), whose lookups ask this library.
//
// It exports cuIpcGetMemHandle (the fake runtime's handle: the pointer, zero-padded to 64
// bytes), counting its calls in fake_driver_exports(); built with FAKE_DRIVER_WITHOUT_IPC it
// lacks that function, as a driver the interposer has no export to forward to.

#include <atomic>
#include <cstdint>
#include <cstring>

namespace {
std::atomic<int> exports{0};
}  // namespace

extern "C" {

int fake_driver_exports(void) { return exports.load(); }

int cuDriverGetVersion(int* version) {
    if (version == nullptr) return 1;  // CUDA_ERROR_INVALID_VALUE
    *version = 12040;
    return 0;
}

#ifndef FAKE_DRIVER_WITHOUT_IPC
int cuIpcGetMemHandle(void* handle, unsigned long long dptr) {
    exports++;
    void* p = reinterpret_cast<void*>(uintptr_t(dptr));
    if (handle == nullptr || p == nullptr) return 1;  // CUDA_ERROR_INVALID_VALUE
    std::memset(handle, 0, 64);
    std::memcpy(handle, &p, sizeof p);
    return 0;
}
#endif
}
