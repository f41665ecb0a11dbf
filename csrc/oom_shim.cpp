// The one piece of C++ in kvhygiene: PyTorch's pluggable-allocator caller does not check
// kvh_malloc's result for NULL, so an allocation failure must surface as a C++ exception.
// PyTorch turns any std::exception into a RuntimeError carrying its what() (only c10's own
// out-of-memory error becomes torch.OutOfMemoryError, and c10 is not linked here), so the
// exception says what failed: for an out-of-memory, in the words PyTorch's own message
// starts with ("CUDA out of memory."), which handlers that retry with less memory look for.
// Rust declares the throwing function "C-unwind", which makes unwinding through the Rust
// frame of kvh_malloc defined behaviour.
#include <cstring>
#include <new>

namespace {

// A std::bad_alloc with a message. The text is held in the object itself: copying an
// exception must not throw, which a std::string member could.
class kvh_bad_alloc : public std::bad_alloc {
 public:
  explicit kvh_bad_alloc(const char* what) noexcept {
    std::strncpy(what_, what != nullptr ? what : "std::bad_alloc", sizeof what_ - 1);
    what_[sizeof what_ - 1] = '\0';
  }
  const char* what() const noexcept override { return what_; }

 private:
  char what_[512];
};

}  // namespace

// Throws a std::bad_alloc whose what() is `what` (at most 511 bytes are kept; NULL: the
// plain "std::bad_alloc").
extern "C" [[noreturn]] void kvh_shim_throw_bad_alloc(const char* what) {
  throw kvh_bad_alloc(what);
}
