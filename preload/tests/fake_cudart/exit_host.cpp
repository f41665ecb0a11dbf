// A program whose first CUDA allocation is made by a static destructor while it exits: one
// of its own (`exit_host main`), or one of the shared library it links (`exit_host library`:
// exit_engine.cpp, which the loader initialises before an LD_PRELOAD library, and so
// finalises after it). Prints `key value` lines.

#include <dlfcn.h>
#include <cstdio>
#include <cstring>

#include "exit_alloc.h"

extern "C" void exit_engine_arm(void);

namespace {

bool armed = false;

struct AllocatesAtExit {
    ~AllocatesAtExit() {
        if (armed) allocate_at_exit("main");
    }
};

AllocatesAtExit at_exit;

}  // namespace

int main(int argc, char** argv) {
    const char* which = argc > 1 ? argv[1] : "";
    out("kvh_loaded", dlsym(RTLD_DEFAULT, "kvh_synchronize") != nullptr);
    if (std::strcmp(which, "main") == 0) {
        armed = true;
    } else if (std::strcmp(which, "library") == 0) {
        exit_engine_arm();
    } else {
        std::fprintf(stderr, "usage: exit_host main | library\n");
        return 2;
    }
    std::fflush(stdout);
    return 0;
}
