//! The CUDA half of the build script: kernels/scrub.cu -> device code embedded in the library.
//!
//! Toolchains, first found wins:
//! 1. a CUDA toolkit's `nvcc` (`NVCC`, then `CUDA_HOME`/`CUDA_PATH` `/bin/nvcc`, then `PATH`):
//!    one fatbin with SASS for every target architecture plus PTX;
//! 2. the pinned PyPI toolchain in `.tools/cuda` (scripts/install-nvcc.sh): NVRTC compiles the
//!    source to PTX in-process, ptxas turns it into one cubin per architecture; the library
//!    embeds the cubins and the PTX and picks the image at load time, as a fatbin would;
//! 3. nothing: the committed `kernels/scrub.ptx` is embedded (JIT-compiled by the driver) and a
//!    `cargo:warning` says so. `KVHYGIENE_REQUIRE_KERNEL_BUILD=1` (set by CI) turns that into an error.
//!
//! `KVHYGIENE_KERNEL_EXPORT_DIR=dir` (used by scripts/gen-ptx.sh) writes the PTX with its provenance
//! header and the ptxas resource report there; only the pinned toolchain may do that, so the
//! committed PTX always comes from the same compiler. `KVHYGIENE_KERNEL_TOOLCHAIN=pinned` (used
//! by scripts/build-gpu-artifacts.sh) skips step 1 too.
//!
//! The generated `OUT_DIR/kernel_images.rs` is included by src/backend/cuda/kernel.rs.

use std::env;
use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

const SOURCE: &str = "kernels/scrub.cu";
const FALLBACK_PTX: &str = "kernels/scrub.ptx";
const HOST_RULE_WRAPPER: &str = "csrc/scrub_host_rule.cpp";
/// SASS targets: A100 / A30 (80), A10 / A40 / RTX 30 (86), L4 / L40 / RTX 40 (89), H100 /
/// H200 (90). Newer GPUs JIT the PTX.
const SASS_ARCHS: [u32; 4] = [80, 86, 89, 90];
/// PTX target: the oldest architecture we support, so any newer GPU can JIT it.
const PTX_ARCH: u32 = 80;
const NVRTC_OPTIONS: [&str; 2] = ["--gpu-architecture=compute_80", "-std=c++17"];

pub fn build() {
    for path in [SOURCE, FALLBACK_PTX, HOST_RULE_WRAPPER] {
        println!("cargo:rerun-if-changed={path}");
    }
    // Watch the pinned toolchain's stamp only when it exists: a watched path that does not
    // exist makes cargo rerun this script on every build. Until then the tools directory
    // (committed with a placeholder, its contents git-ignored) is watched, so that installing
    // the toolchain into it makes the next build compile the kernels with it. It is never
    // created here: a directory this script made would be newer than the run, and make the
    // next build rerun it.
    if Path::new(".tools/cuda/.pins").exists() {
        println!("cargo:rerun-if-changed=.tools/cuda/.pins");
    } else if Path::new(".tools").is_dir() {
        println!("cargo:rerun-if-changed=.tools");
    }
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "KVHYGIENE_KERNEL_EXPORT_DIR",
        "KVHYGIENE_KERNEL_TOOLCHAIN",
        "KVHYGIENE_REQUIRE_KERNEL_BUILD",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    build_host_rule();
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let toolchain = find_toolchain();
    watch_nvcc_places(&toolchain);
    let images = match toolchain {
        Toolchain::Nvcc(nvcc) => build_with_nvcc(&nvcc, &out),
        Toolchain::Pinned(tools) => build_with_nvrtc(&tools, &out),
        Toolchain::None => fallback(&out),
    };
    fs::write(out.join("kernel_images.rs"), images.render()).expect("write kernel_images.rs");
}

/// The rule functions of scrub.cu compiled as C++ for the kernel/host agreement test.
fn build_host_rule() {
    cc::Build::new()
        .cpp(true)
        .file(HOST_RULE_WRAPPER)
        .flag_if_supported("-std=c++17")
        .compile("kvh_scrub_host_rule");
}

enum Toolchain {
    Nvcc(PathBuf),
    Pinned(PathBuf),
    None,
}

fn find_toolchain() -> Toolchain {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let tools = root.join(".tools/cuda");
    let pinned = tools.join("bin/ptxas").exists() && tools.join("lib/libnvrtc.so.12").exists();
    // The committed PTX (KVHYGIENE_KERNEL_EXPORT_DIR) and builds that ask for it
    // (KVHYGIENE_KERNEL_TOOLCHAIN=pinned: the GPU artifacts, releases) come from the pinned
    // toolchain only, whatever nvcc the environment offers (a CUDA 13 toolkit's output would
    // need R580 drivers).
    let only_pinned = env::var_os("KVHYGIENE_KERNEL_EXPORT_DIR").is_some_and(|v| !v.is_empty())
        || env::var("KVHYGIENE_KERNEL_TOOLCHAIN").is_ok_and(|v| v == "pinned");
    if only_pinned {
        return if pinned {
            Toolchain::Pinned(tools)
        } else {
            Toolchain::None
        };
    }
    if let Some(nvcc) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        return Toolchain::Nvcc(PathBuf::from(nvcc));
    }
    if let Some(nvcc) = nvcc_places().into_iter().find_map(|(_, nvcc)| nvcc) {
        return Toolchain::Nvcc(nvcc);
    }
    if pinned {
        return Toolchain::Pinned(tools);
    }
    Toolchain::None
}

/// Where an nvcc is looked for after `NVCC`, in order: `CUDA_HOME/bin`, `CUDA_PATH/bin`, then
/// each absolute directory of `PATH` (the shell skips nothing else that exists; a relative
/// entry would depend on where cargo runs the script). Each existing directory, with the
/// nvcc it holds when that is an executable file, as the shell would run it.
fn nvcc_places() -> Vec<(PathBuf, Option<PathBuf>)> {
    let homes = ["CUDA_HOME", "CUDA_PATH"]
        .into_iter()
        .filter_map(|var| env::var_os(var).filter(|v| !v.is_empty()))
        .map(|home| Path::new(&home).join("bin"));
    let path = env::var_os("PATH").unwrap_or_default();
    let on_path = env::split_paths(&path).filter(|d| d.is_absolute());
    homes
        .chain(on_path)
        .filter(|d| d.is_dir())
        .map(|d| {
            let nvcc = d.join("nvcc");
            let runnable = executable(&nvcc).then_some(nvcc);
            (d, runnable)
        })
        .collect()
}

/// Whether `path` is a file the shell would run: a regular file (or a link to one) with an
/// execute bit.
fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Tells cargo what could change the nvcc [`find_toolchain`] picks: the one picked (upgraded
/// in place), and the toolkit directories `CUDA_HOME/bin` and `CUDA_PATH/bin`, which take
/// precedence over `PATH`, so that a toolkit installed where they point is used by the next
/// build. `PATH`'s directories are not watched: cargo reads a watched directory whole, and
/// one the build writes into (a target directory on `PATH`), or one as large as a home
/// directory, would make every build run this script again. Only existing paths are watched
/// (cargo reruns the script on every build for one that does not exist); `NVCC` and the
/// pinned-only builds need none but the nvcc named.
fn watch_nvcc_places(toolchain: &Toolchain) {
    let only_pinned = env::var_os("KVHYGIENE_KERNEL_EXPORT_DIR").is_some_and(|v| !v.is_empty())
        || env::var("KVHYGIENE_KERNEL_TOOLCHAIN").is_ok_and(|v| v == "pinned");
    if only_pinned {
        return;
    }
    if let Toolchain::Nvcc(nvcc) = toolchain {
        if nvcc.exists() {
            println!("cargo:rerun-if-changed={}", nvcc.display());
        }
    }
    if env::var_os("NVCC").is_some_and(|v| !v.is_empty()) {
        return;
    }
    for (dir, _) in nvcc_places()
        .into_iter()
        .take_while(|(d, _)| toolkit_dir(d))
    {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
}

/// Whether `dir` is `CUDA_HOME/bin` or `CUDA_PATH/bin` (the first places [`nvcc_places`]
/// lists).
fn toolkit_dir(dir: &Path) -> bool {
    ["CUDA_HOME", "CUDA_PATH"].into_iter().any(|var| {
        env::var_os(var)
            .filter(|v| !v.is_empty())
            .is_some_and(|home| Path::new(&home).join("bin") == dir)
    })
}

/// What the library embeds; rendered as Rust constants.
struct Images {
    origin: String,
    fatbin: Option<PathBuf>,
    cubins: Vec<(u32, PathBuf)>,
    ptx: PathBuf,
}

impl Images {
    fn render(&self) -> String {
        let mut s = String::new();
        let lit = |p: &Path| format!("include_bytes!({:?})", p.display().to_string());
        writeln!(s, "/// How the embedded kernel images were produced.").ok();
        writeln!(s, "pub const KERNEL_ORIGIN: &str = {:?};", self.origin).ok();
        let fatbin = self.fatbin.as_deref().map(lit);
        writeln!(s, "/// A fatbin (nvcc builds only).").ok();
        match fatbin {
            Some(f) => writeln!(s, "pub const FATBIN: Option<&[u8]> = Some({f});").ok(),
            None => writeln!(s, "pub const FATBIN: Option<&[u8]> = None;").ok(),
        };
        writeln!(s, "/// (compute capability x 10, cubin) pairs.").ok();
        writeln!(s, "pub const CUBINS: &[(u32, &[u8])] = &[").ok();
        for (arch, path) in &self.cubins {
            writeln!(s, "    ({arch}, {}),", lit(path)).ok();
        }
        writeln!(s, "];").ok();
        writeln!(s, "/// NUL-terminated PTX for compute_{PTX_ARCH}.").ok();
        writeln!(s, "pub const PTX: &[u8] = {};", lit(&self.ptx)).ok();
        s
    }
}

fn build_with_nvcc(nvcc: &Path, out: &Path) -> Images {
    let fatbin = out.join("scrub.fatbin");
    let mut cmd = Command::new(nvcc);
    cmd.args(["--fatbin", "-O3", "-std=c++17", "-Xptxas", "-v"]);
    for arch in SASS_ARCHS {
        cmd.arg(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
    }
    cmd.arg(format!(
        "-gencode=arch=compute_{PTX_ARCH},code=compute_{PTX_ARCH}"
    ));
    cmd.arg("-o").arg(&fatbin).arg(SOURCE);
    run(&mut cmd);
    // The PTX is also embedded so that a fatbin the driver rejects still has a fallback.
    let ptx = out.join("scrub.nvcc.ptx");
    let mut ptx_cmd = Command::new(nvcc);
    ptx_cmd
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{PTX_ARCH}"))
        .arg("-o")
        .arg(&ptx)
        .arg(SOURCE);
    run(&mut ptx_cmd);
    let text = fs::read(&ptx).unwrap_or_else(|e| panic!("read {}: {e}", ptx.display()));
    Images {
        origin: format!("nvcc ({})", nvcc.display()),
        fatbin: Some(fatbin),
        cubins: Vec::new(),
        ptx: write_nul_terminated(out, "scrub.ptx.nul", &text),
    }
}

fn build_with_nvrtc(tools: &Path, out: &Path) -> Images {
    let source = fs::read_to_string(SOURCE).unwrap_or_else(|e| panic!("read {SOURCE}: {e}"));
    let ptx = nvrtc_compile(&tools.join("lib/libnvrtc.so.12"), &source);
    let ptx_path = out.join("scrub.nvrtc.ptx");
    fs::write(&ptx_path, &ptx).expect("write PTX");
    let mut cubins = Vec::new();
    let mut report = String::new();
    for arch in SASS_ARCHS {
        let cubin = out.join(format!("scrub.sm_{arch}.cubin"));
        let mut cmd = Command::new(tools.join("bin/ptxas"));
        cmd.args(["-O3", "-v"])
            .arg(format!("-arch=sm_{arch}"))
            .arg("-o")
            .arg(&cubin)
            .arg(&ptx_path);
        let log = run(&mut cmd);
        writeln!(report, "## sm_{arch}\n{}", log.trim_end()).ok();
        cubins.push((arch, cubin));
    }
    if let Some(dir) = env::var_os("KVHYGIENE_KERNEL_EXPORT_DIR").filter(|v| !v.is_empty()) {
        export(Path::new(&dir), &source, &ptx, &report);
    }
    Images {
        origin: "nvrtc 12.4 + ptxas 12.4 (.tools/cuda)".to_string(),
        fatbin: None,
        cubins,
        ptx: write_nul_terminated(out, "scrub.ptx.nul", ptx.as_bytes()),
    }
}

fn fallback(out: &Path) -> Images {
    let msg = if env::var("KVHYGIENE_KERNEL_TOOLCHAIN").is_ok_and(|v| v == "pinned") {
        "KVHYGIENE_KERNEL_TOOLCHAIN=pinned, and the pinned toolchain is not in .tools/cuda \
         (run scripts/install-nvcc.sh); embedding the committed kernels/scrub.ptx"
    } else {
        "no CUDA compiler found (NVCC, CUDA_HOME, CUDA_PATH, PATH, .tools/cuda); \
         embedding the committed kernels/scrub.ptx (run scripts/install-nvcc.sh to build SASS)"
    };
    if env::var("KVHYGIENE_REQUIRE_KERNEL_BUILD").is_ok_and(|v| v == "1") {
        panic!("KVHYGIENE_REQUIRE_KERNEL_BUILD=1 but {msg}");
    }
    if env::var_os("KVHYGIENE_KERNEL_EXPORT_DIR").is_some_and(|v| !v.is_empty()) {
        panic!(
            "KVHYGIENE_KERNEL_EXPORT_DIR needs the pinned toolchain: run scripts/install-nvcc.sh"
        );
    }
    println!("cargo:warning={msg}");
    let text = fs::read(FALLBACK_PTX).unwrap_or_else(|e| panic!("read {FALLBACK_PTX}: {e}"));
    Images {
        origin: "committed kernels/scrub.ptx".to_string(),
        fatbin: None,
        cubins: Vec::new(),
        ptx: write_nul_terminated(out, "scrub.ptx.nul", &text),
    }
}

/// Writes the committed PTX (provenance header + NVRTC output) and the resource report.
fn export(dir: &Path, source: &str, ptx: &str, report: &str) {
    let hash = hex(&Sha256::digest(source.as_bytes()));
    let header = format!(
        "// Generated by scripts/gen-ptx.sh from kernels/scrub.cu; do not edit.\n\
         // kvhygiene-source-sha256: {hash}\n\
         // compiler: NVRTC 12.4 (nvidia-cuda-nvrtc-cu12), options: {}\n",
        NVRTC_OPTIONS.join(" ")
    );
    fs::create_dir_all(dir).expect("create export dir");
    fs::write(dir.join("scrub.ptx"), format!("{header}{ptx}")).expect("write scrub.ptx");
    let resources = format!(
        "# ptxas -v resource report for kernels/scrub.cu (scripts/gen-ptx.sh)\n\
         # kvhygiene-source-sha256: {hash}\n{report}\n"
    );
    fs::write(dir.join("scrub.resources.txt"), resources).expect("write resources");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        write!(s, "{b:02x}").ok();
        s
    })
}

fn write_nul_terminated(out: &Path, name: &str, text: &[u8]) -> PathBuf {
    let mut bytes = text.to_vec();
    if bytes.last() != Some(&0) {
        bytes.push(0);
    }
    let path = out.join(name);
    fs::write(&path, bytes).expect("write PTX image");
    path
}

/// Runs a compiler; on failure prints its command line and output and fails the build.
/// Returns stdout + stderr (ptxas writes its -v report to stdout).
fn run(cmd: &mut Command) -> String {
    let line = format!("{cmd:?}");
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {line}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        panic!("kernel build failed ({}):\n{line}\n{text}", output.status);
    }
    text
}

type NvrtcProgram = *mut std::ffi::c_void;

/// Compiles CUDA C++ to PTX with NVRTC, loaded from the pinned wheel at build time.
fn nvrtc_compile(lib: &Path, source: &str) -> String {
    // SAFETY: 1. libnvrtc is NVIDIA's library from the pinned wheel, whose initialisers are
    // sound to run; 2. the symbols below are declared with the C signatures of nvrtc.h 12.4;
    // 3. every pointer passed lives until the call returns, and the program is destroyed once.
    unsafe {
        let nvrtc =
            libloading::Library::new(lib).unwrap_or_else(|e| panic!("load {}: {e}", lib.display()));
        let create: libloading::Symbol<
            unsafe extern "C" fn(
                *mut NvrtcProgram,
                *const c_char,
                *const c_char,
                c_int,
                *const *const c_char,
                *const *const c_char,
            ) -> c_int,
        > = sym(&nvrtc, b"nvrtcCreateProgram\0");
        let compile: libloading::Symbol<
            unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> c_int,
        > = sym(&nvrtc, b"nvrtcCompileProgram\0");
        let size_fn = |name: &[u8]| -> libloading::Symbol<
            unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int,
        > { sym(&nvrtc, name) };
        let get_fn = |name: &[u8]| -> libloading::Symbol<
            unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int,
        > { sym(&nvrtc, name) };
        let destroy: libloading::Symbol<unsafe extern "C" fn(*mut NvrtcProgram) -> c_int> =
            sym(&nvrtc, b"nvrtcDestroyProgram\0");

        let src = CString::new(source).expect("scrub.cu contains NUL");
        let mut prog: NvrtcProgram = std::ptr::null_mut();
        let rc = create(
            &mut prog,
            src.as_ptr(),
            c"scrub.cu".as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        );
        assert_eq!(rc, 0, "nvrtcCreateProgram failed: {rc}");
        let opts: Vec<CString> = NVRTC_OPTIONS
            .iter()
            .map(|o| CString::new(*o).expect("option"))
            .collect();
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let rc = compile(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr());
        let log = read_string(
            prog,
            &size_fn(b"nvrtcGetProgramLogSize\0"),
            &get_fn(b"nvrtcGetProgramLog\0"),
        );
        if rc != 0 {
            panic!(
                "NVRTC ({}) failed to compile {SOURCE} with {:?} (code {rc}):\n{log}",
                lib.display(),
                NVRTC_OPTIONS
            );
        }
        let ptx = read_string(
            prog,
            &size_fn(b"nvrtcGetPTXSize\0"),
            &get_fn(b"nvrtcGetPTX\0"),
        );
        destroy(&mut prog);
        ptx
    }
}

/// # Safety
/// 1. `T` must be the exact function-pointer type of symbol `name` in `lib`.
unsafe fn sym<'l, T>(lib: &'l libloading::Library, name: &[u8]) -> libloading::Symbol<'l, T> {
    // SAFETY: the caller guarantees the type (contract 1).
    unsafe { lib.get(name) }
        .unwrap_or_else(|e| panic!("libnvrtc lacks {}: {e}", String::from_utf8_lossy(name)))
}

/// # Safety
/// 1. `prog` must be a live NVRTC program; 2. `size` / `get` must be a matching NVRTC
///    size/getter pair (the getter writes at most `size` bytes including the NUL).
unsafe fn read_string(
    prog: NvrtcProgram,
    size: &unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int,
    get: &unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int,
) -> String {
    let mut n = 0usize;
    // SAFETY: contract 1; `n` is a valid out-pointer.
    let rc = unsafe { size(prog, &mut n) };
    assert_eq!(rc, 0, "NVRTC size query failed: {rc}");
    let mut buf = vec![0u8; n.max(1)];
    // SAFETY: contract 2; `buf` holds `n` bytes.
    let rc = unsafe { get(prog, buf.as_mut_ptr().cast()) };
    assert_eq!(rc, 0, "NVRTC getter failed: {rc}");
    CStr::from_bytes_until_nul(&buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}
