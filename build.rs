//! Build script: compiles the C++ out-of-memory shim (csrc/oom_shim.cpp) and the CUDA scrub
//! kernels (kernels/scrub.cu, see build/cuda_kernel.rs), which are embedded in the library.

#[path = "build/cuda_kernel.rs"]
mod cuda_kernel;

fn main() {
    println!("cargo:rerun-if-changed=csrc/oom_shim.cpp");
    cc::Build::new()
        .cpp(true)
        .file("csrc/oom_shim.cpp")
        .flag_if_supported("-std=c++17")
        .compile("kvh_oom_shim");
    cuda_kernel::build();
}
