// The verification-rule functions of kernels/scrub.cu, compiled for the host so that the test
// suite can check the kernel's sample positions against src/backend/verify.rs without a GPU.
// Only the test module in src/backend/cuda/kernel.rs references these symbols; the linker drops
// them from every other build.
#define KVH_HOST_RULE 1
#include "../kernels/scrub.cu"
