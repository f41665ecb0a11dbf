//! examples/c/paged_kv_engine.c, a C engine's use of the C API, built against the committed
//! header and this build's libkvhygiene.so with warnings as errors, and run on the host
//! backend: every block it is given reads zero and every scrub verifies, and with
//! `--inject-fault` exactly the sabotaged block is reported and retired. The header is also
//! compiled as C++. Skips, saying so, when there is no C compiler.

#[path = "skip/mod.rs"]
mod skip;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding this build's libkvhygiene.so (next to the test binary, or above).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("test executable directory");
    [deps.to_path_buf(), deps.join("..")]
        .into_iter()
        .find(|d| d.join("libkvhygiene.so").is_file())
        .unwrap_or_else(|| panic!("libkvhygiene.so not found beside {}", deps.display()))
}

fn compiler(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

/// Runs a compiler; `None` (said on stderr) when it cannot be started at all.
fn compile(cmd: &mut Command) -> Option<Output> {
    match cmd.output() {
        Ok(out) => Some(out),
        Err(e) => {
            skip::skipped(&format!("no compiler ({cmd:?}: {e})"));
            None
        }
    }
}

fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the example into a temporary directory; `None` without a C compiler.
fn build_example(dir: &Path) -> Option<PathBuf> {
    let lib = library_dir();
    let exe = dir.join("paged_kv_engine");
    let out = compile(
        Command::new(compiler("CC", "cc"))
            .args(["-std=c11", "-Wall", "-Wextra", "-pedantic", "-Werror"])
            .arg("-I")
            .arg(root().join("include"))
            .arg(root().join("examples/c/paged_kv_engine.c"))
            .arg("-L")
            .arg(&lib)
            .arg("-lkvhygiene")
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .arg("-o")
            .arg(&exe),
    )?;
    assert_success("compiling examples/c/paged_kv_engine.c", &out);
    Some(exe)
}

/// Runs the example on the host backend with no other policy than its own: every `KVH_*`
/// variable of this environment is left out (an unknown one would stop the library).
fn run(exe: &Path, args: &[&str]) -> Output {
    run_with(exe, args, &[])
}

/// As `run`, with the policy variables `policy` added.
fn run_with(exe: &Path, args: &[&str], policy: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(exe);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KVH_") || name == "FORENSIC_HMAC_SECRET" {
            cmd.env_remove(name);
        }
    }
    cmd.envs(policy.iter().copied());
    cmd.args(args)
        .env("KVH_BACKEND", "host")
        .output()
        .expect("run the example")
}

#[test]
fn the_c_example_builds_and_every_scrub_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = build_example(dir.path()) else {
        return;
    };
    let out = run(&exe, &[]);
    assert_success("paged_kv_engine", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("scrubbed and verified").count(),
        6,
        "{stdout}"
    );
    assert!(stdout.contains("PASS: blocks retired: 0"), "{stdout}");
    assert!(
        !stdout.contains("not on the host backend"),
        "the example did not read the blocks back: {stdout}"
    );
}

#[test]
fn the_c_example_retires_exactly_the_block_whose_scrub_failed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = build_example(dir.path()) else {
        return;
    };
    let out = run(&exe, &["--inject-fault"]);
    assert_success("paged_kv_engine --inject-fault", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("scrub FAILED for 1, retired"), "{stdout}");
    assert!(stdout.contains("PASS: blocks retired: 1"), "{stdout}");
}

#[test]
fn the_c_example_refuses_unknown_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = build_example(dir.path()) else {
        return;
    };
    let out = run(&exe, &["--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"));
}

/// The README's eviction gate under `KVH_KV_GATE=enforce`: "the engine scrubs, then claims
/// again; scrub the whole cache once at start, since unknown blocks are refused too". The
/// example, "a complete, commented C engine of a paged KV cache", runs as well under that
/// documented policy: its blocks are handed to requests and every scrub verifies.
#[test]
fn the_c_example_runs_under_the_enforcing_gate() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = build_example(dir.path()) else {
        return;
    };
    let out = run_with(&exe, &[], &[("KVH_KV_GATE", "enforce")]);
    assert_success("paged_kv_engine under KVH_KV_GATE=enforce", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("PASS: blocks retired: 0"), "{stdout}");
}

/// The header is valid C++ as well (engines in C++ include it directly), with its exports
/// under `extern "C"`.
#[test]
fn the_header_compiles_as_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("header.cpp");
    std::fs::write(
        &src,
        "#include \"kvhygiene.h\"\n\
         static_assert(sizeof(kvh_kv_layout) == 5 * 8, \"layout\");\n\
         int main() { return kvh_version() == nullptr; }\n",
    )
    .unwrap();
    let Some(out) = compile(
        Command::new(compiler("CXX", "c++"))
            .args([
                "-std=c++17",
                "-Wall",
                "-Wextra",
                "-pedantic",
                "-Werror",
                "-c",
            ])
            .arg("-I")
            .arg(root().join("include"))
            .arg(&src)
            .arg("-o")
            .arg(dir.path().join("header.o")),
    ) else {
        return;
    };
    assert_success("compiling include/kvhygiene.h as C++17", &out);
}

/// The oldest standards the header's own comment names, C99 and C++11, take it without a
/// warning under `-pedantic` (older ones do not: it has `//` comments, and in C++ a typed
/// enum). A change that needs a newer standard fails here and must say so in that comment.
#[test]
fn the_header_compiles_under_the_oldest_standards_it_names() {
    let dir = tempfile::tempdir().unwrap();
    for (env, default, standard, name) in [
        ("CC", "cc", "-std=c99", "header.c"),
        ("CXX", "c++", "-std=c++11", "header.cpp"),
    ] {
        let src = dir.path().join(name);
        std::fs::write(&src, "#include \"kvhygiene.h\"\n").unwrap();
        let Some(out) = compile(
            Command::new(compiler(env, default))
                .args([standard, "-Wall", "-Wextra", "-pedantic", "-Werror"])
                .arg("-fsyntax-only")
                .arg("-I")
                .arg(root().join("include"))
                .arg(&src),
        ) else {
            return;
        };
        assert_success(
            &format!("compiling include/kvhygiene.h as {standard}"),
            &out,
        );
    }
}
