// The one piece of C++ in kvhygiene: PyTorch's pluggable-allocator caller does not check
// kvh_malloc's result for NULL, so an allocation failure must surface as a C++ exception that
// PyTorch turns into torch.OutOfMemoryError. Rust declares this function "C-unwind", which
// makes unwinding through the Rust frame of kvh_malloc defined behaviour.
#include <new>

extern "C" [[noreturn]] void kvh_shim_throw_bad_alloc(void) {
    throw std::bad_alloc();
}
