// What exit_host.cpp's and exit_engine.cpp's static destructors do once armed: the process's
// first CUDA allocation (4 KiB), made while the process exits, printed as `WHO_dtor_rc` and
// `WHO_dtor_null` lines, then `done`.
#pragma once

#include <cstdint>
#include <cstdio>

#include "probe_util.h"

extern "C" int cudaMalloc(void** p, size_t size);

static inline void allocate_at_exit(const char* who) {
    void* p = reinterpret_cast<void*>(uintptr_t(0x1234));
    int rc = cudaMalloc(&p, 4096);
    char key[64];
    std::snprintf(key, sizeof key, "%s_dtor_rc", who);
    out(key, rc);
    std::snprintf(key, sizeof key, "%s_dtor_null", who);
    out(key, p == nullptr);
    out("done", 1);
    std::fflush(stdout);
}
