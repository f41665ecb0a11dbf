// A stand-in for PyTorch's libc10_cuda.so: only its presence among the loaded objects matters
// (the interposers' notice cautions about PyTorch's caching allocator when it is there).
extern "C" int kvh_test_c10_cuda_stand_in() { return 0; }
