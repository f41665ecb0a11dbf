// A shared library of an "engine", linked by exit_host.cpp (a DT_NEEDED library of the
// program): one static object whose destructor, once armed, makes the process's first
// allocation while the process exits, and prints what it got as `key value` lines.

#include <cstdint>
#include <cstdio>

#include "probe_util.h"

extern "C" int cudaMalloc(void** p, size_t size);

namespace {

bool armed = false;

struct AllocatesAtExit {
    ~AllocatesAtExit() {
        if (!armed) return;
        void* p = reinterpret_cast<void*>(uintptr_t(0x1234));
        out("library_dtor_rc", cudaMalloc(&p, 4096));
        out("library_dtor_null", p == nullptr);
        out("done", 1);
        std::fflush(stdout);
    }
};

AllocatesAtExit at_exit;

}  // namespace

extern "C" void exit_engine_arm(void) { armed = true; }
