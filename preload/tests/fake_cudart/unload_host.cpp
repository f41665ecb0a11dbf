// Loads a CUDA runtime with dlopen(RTLD_NOW | RTLD_GLOBAL), as a plugin host or a language
// binding may, calls cudaFree(NULL) through the global scope (the interposer's, when it is
// preloaded), then dlcloses the runtime and calls cudaFree(NULL) again. Prints `key value`
// lines. Usage: unload_host /path/to/runtime.so
#include <dlfcn.h>
#include <cstdio>

int main(int argc, char** argv) {
    if (argc < 2) return 2;
    void* runtime = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
    if (runtime == nullptr) {
        std::fprintf(stderr, "dlopen: %s\n", dlerror());
        return 2;
    }
    typedef int (*free_fn)(void*);
    free_fn cuda_free = reinterpret_cast<free_fn>(dlsym(RTLD_DEFAULT, "cudaFree"));
    if (cuda_free == nullptr) return 2;
    std::printf("kvh_loaded %d\n", dlsym(RTLD_DEFAULT, "kvh_synchronize") != nullptr);
    std::printf("rc_free_null %d\n", cuda_free(nullptr));
    std::fflush(stdout);
    dlclose(runtime);
    std::printf("rc_free_null_after_dlclose %d\n", cuda_free(nullptr));
    std::printf("done 1\n");
    std::fflush(stdout);
    return 0;
}
