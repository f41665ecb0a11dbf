// A shared library of an "engine", linked by exit_host.cpp (a DT_NEEDED library of the
// program): one static object whose destructor, once armed, makes the process's first
// allocation while the process exits, and prints what it got as `key value` lines.

#include "exit_alloc.h"

namespace {

bool armed = false;

struct AllocatesAtExit {
    ~AllocatesAtExit() {
        if (armed) allocate_at_exit("library");
    }
};

AllocatesAtExit at_exit;

}  // namespace

extern "C" void exit_engine_arm(void) { armed = true; }
