// Helpers shared by the C++ engines of the interposer tests (probe.cpp, plugin.cpp,
// exit_alloc.h): one `key value` line of output, and whether a buffer reads zero.
#pragma once

#include <cstddef>
#include <cstdio>

static inline void out(const char* key, long long v) { std::printf("%s %lld\n", key, v); }

static inline bool all_zero(const void* p, size_t n) {
    if (p == nullptr) return false;
    const unsigned char* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; i++)
        if (b[i] != 0) return false;
    return true;
}
