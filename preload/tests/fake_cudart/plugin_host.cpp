// Loads plugin.cpp's library with dlopen(RTLD_NOW | RTLD_LOCAL) and runs it. Not linked
// against the CUDA runtime itself. Usage: plugin_host /path/to/libengine.so
#include <dlfcn.h>
#include <cstdio>

int main(int argc, char** argv) {
    if (argc < 2) return 2;
    void* h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
        std::fprintf(stderr, "dlopen: %s\n", dlerror());
        return 2;
    }
    typedef int (*run_fn)(void);
    run_fn run = reinterpret_cast<run_fn>(dlsym(h, "engine_run"));
    if (run == nullptr) return 2;
    return run();
}
