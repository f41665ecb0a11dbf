"""Checks of the build and test scripts under scripts/ that run without a GPU.

The scripts are run from a scratch copy of the checkout; where a check is about which files a
script uses rather than about what cargo builds, cargo (and strip) are stand-ins on PATH that
put their outputs where cargo puts them: under CARGO_TARGET_DIR when it is set.
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def scratch_scripts(tmp: Path, *names: str) -> Path:
    """A directory laid out as the checkout, holding copies of the named scripts."""
    root = tmp / "checkout"
    for name in names:
        dest = root / "scripts" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "scripts" / name, dest)
    return root


# A stand-in for cargo: `build` writes the crate's outputs where cargo writes them (the target
# directory is CARGO_TARGET_DIR, else ./target), marked "fresh"; `test`/`bench --no-run
# --message-format=json` also print the compiler-artifact message naming the executable;
# `metadata` names the target directory.
FAKE_CARGO = r"""#!/bin/sh
t="${CARGO_TARGET_DIR:-$PWD/target}"
if [ "$1" = metadata ]; then printf '{"target_directory":"%s"}\n' "$t"; exit 0; fi
profile=debug
for a in "$@"; do [ "$a" = "--release" ] && profile=release; done
[ "$1" = "bench" ] && profile=release
d="$t/$profile"
mkdir -p "$d/deps" "$d/build/kvhygiene-0123456789abcdef/out"
echo 'pub const KERNEL_ORIGIN: &str = "fresh build";' > "$d/build/kvhygiene-0123456789abcdef/out/kernel_images.rs"
case "$1" in
    build)
        for f in libkvhygiene.so libkvhygiene_preload.so kvh; do echo fresh > "$d/$f"; done
        printf '{"reason":"compiler-artifact","target":{"name":"kvhygiene"},"filenames":["%s","%s"],"executable":null}\n' "$d/libkvhygiene.so" "$d/libkvhygiene.rlib"
        printf '{"reason":"compiler-artifact","target":{"name":"kvh"},"filenames":["%s"],"executable":"%s"}\n' "$d/kvh" "$d/kvh"
        printf '{"reason":"compiler-artifact","target":{"name":"kvhygiene_preload"},"filenames":["%s"],"executable":null}\n' "$d/libkvhygiene_preload.so" ;;
    test|bench)
        name=""; prev=""
        for a in "$@"; do
            if [ "$prev" = "--test" ] || [ "$prev" = "--bench" ]; then name="$a"; fi
            prev="$a"
        done
        if [ -n "$name" ]; then
            echo fresh > "$d/deps/$name-0123"
            printf '{"reason":"compiler-artifact","target":{"name":"%s"},"executable":"%s"}\n' "$name" "$d/deps/$name-0123"
        fi ;;
esac
exit 0
"""


def test_test_sh_runs_the_python_tests_on_the_library_it_just_built(tmp_path):
    # scripts/test.sh builds with cargo, then runs pytest with KVH_LIBRARY naming the built
    # library. With CARGO_TARGET_DIR set, cargo builds into that directory; the library the
    # Python tests load must be that one, not ./target/debug's (missing, or left from an
    # earlier build of other sources).
    root = scratch_scripts(tmp_path, "test.sh")
    stale = root / "target" / "debug" / "libkvhygiene.so"
    stale.parent.mkdir(parents=True)
    stale.write_text("stale\n")
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "cargo", FAKE_CARGO)
    record = tmp_path / "pytest-library.txt"
    executable(
        bin_dir / "python3",
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then\n'
        f'    printf "%s" "$KVH_LIBRARY" > "{record}"; exit 0\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n',
    )
    target = tmp_path / "cargo-target"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CARGO_TARGET_DIR": str(target)}
    env.pop("KVH_LIBRARY", None)
    proc = subprocess.run(
        ["bash", str(root / "scripts/test.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    used = Path(record.read_text())
    assert used.is_file() and used.read_text() == "fresh\n", (
        f"the Python tests ran on {used} ({used.read_text().strip() if used.is_file() else 'missing'}), "
        f"not on the library cargo built in CARGO_TARGET_DIR={target}"
    )


def test_gpu_artifacts_are_the_files_cargo_just_built(tmp_path):
    # scripts/build-gpu-artifacts.sh: every artifact gpu-check.sh runs is the one this build
    # produced, wherever cargo put it (CARGO_TARGET_DIR), never a file left in ./target.
    root = scratch_scripts(tmp_path, "build-gpu-artifacts.sh", "gpu/digest-sources.sh")
    executable(root / "scripts" / "install-nvcc.sh", "#!/bin/sh\nexit 0\n")
    for f in ["libkvhygiene.so", "libkvhygiene_preload.so", "kvh"]:
        stale = root / "target" / "release" / f
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_text("stale\n")
    # An earlier build's, as a build without CARGO_TARGET_DIR leaves it.
    images = root / "target" / "release" / "build" / "kvhygiene-fedcba9876543210" / "out" / "kernel_images.rs"
    images.parent.mkdir(parents=True)
    images.write_text('pub const KERNEL_ORIGIN: &str = "earlier build";\n')
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "cargo", FAKE_CARGO)
    executable(bin_dir / "strip", "#!/bin/sh\nexit 0\n")
    target = tmp_path / "cargo-target"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CARGO_TARGET_DIR": str(target)}
    proc = subprocess.run(
        ["bash", str(root / "scripts/build-gpu-artifacts.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    art = root / "gpu-artifacts"
    contents = {f: (art / f).read_text().strip() for f in ["libkvhygiene.so", "libkvhygiene_preload.so", "gpu_kernel", "gpu_scrub", "kvh"]}
    assert set(contents.values()) == {"fresh"}, contents
    assert "kernels: fresh build" in (art / "MANIFEST.txt").read_text()


def artifacts_tree(tmp_path: Path) -> Path:
    """A scratch tree with build-gpu-artifacts.sh, a stand-in install-nvcc.sh and one source."""
    root = scratch_scripts(tmp_path, "build-gpu-artifacts.sh", "gpu/digest-sources.sh")
    executable(root / "scripts" / "install-nvcc.sh", "#!/bin/sh\nexit 0\n")
    (root / "src").mkdir()
    (root / "src" / "lib.rs").write_text("pub fn f() {}\n")
    return root


def earlier_build_in(target: Path) -> None:
    """What an earlier release build left in `target`: its library, interposer, CLI and kernel
    origin, each saying so."""
    for f in ["libkvhygiene.so", "libkvhygiene_preload.so", "kvh"]:
        stale = target / "release" / f
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_text("stale\n")
    images = target / "release" / "build" / "kvhygiene-fedcba9876543210" / "out" / "kernel_images.rs"
    images.parent.mkdir(parents=True)
    images.write_text('pub const KERNEL_ORIGIN: &str = "earlier build";\n')


def assert_no_earlier_build_shipped(root: Path, env: dict) -> None:
    """build-gpu-artifacts.sh of `root`, run with `env`, ships none of `earlier_build_in`'s
    files, nor names its kernels."""
    proc = subprocess.run(
        ["bash", str(root / "scripts/build-gpu-artifacts.sh")], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    art = root / "gpu-artifacts"
    names = ["libkvhygiene.so", "libkvhygiene_preload.so", "gpu_kernel", "gpu_scrub", "kvh"]
    contents = {f: (art / f).read_text().strip() for f in names if (art / f).is_file()}
    assert "stale" not in contents.values(), f"exit {proc.returncode}: {contents}"
    manifest = (art / "MANIFEST.txt").read_text() if (art / "MANIFEST.txt").is_file() else ""
    assert "earlier build" not in manifest, manifest


def test_gpu_artifacts_are_the_files_cargo_just_built_with_the_target_dir_from_cargo_settings(tmp_path):
    # cargo also takes its target directory from CARGO_BUILD_TARGET_DIR (or build.target-dir
    # in a .cargo/config.toml), with CARGO_TARGET_DIR unset. The artifacts are still the
    # files this build produced, never the ones an earlier build left in ./target, which
    # SOURCES.txt (digested from the tree as it is now) would then describe as this tree's.
    root = artifacts_tree(tmp_path)
    earlier_build_in(root / "target")
    bin_dir = tmp_path / "bin"
    # As cargo: CARGO_TARGET_DIR, else CARGO_BUILD_TARGET_DIR, else ./target.
    executable(
        bin_dir / "cargo",
        FAKE_CARGO.replace('t="${CARGO_TARGET_DIR:-$PWD/target}"', 't="${CARGO_TARGET_DIR:-${CARGO_BUILD_TARGET_DIR:-$PWD/target}}"', 1),
    )
    executable(bin_dir / "strip", "#!/bin/sh\nexit 0\n")
    env = {k: v for k, v in os.environ.items() if k != "CARGO_TARGET_DIR"}
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    env["CARGO_BUILD_TARGET_DIR"] = str(tmp_path / "cargo-target")
    env["GIT_CEILING_DIRECTORIES"] = str(tmp_path)
    assert_no_earlier_build_shipped(root, env)


def test_gpu_artifacts_are_the_files_cargo_just_built_for_a_target_named_in_cargo_settings(tmp_path):
    # With a build target named (CARGO_BUILD_TARGET, or build.target in .cargo/config.toml),
    # cargo writes its outputs under TARGET_DIR/<triple>/release, not TARGET_DIR/release. The
    # artifacts are still the files this build produced, never the library, interposer and
    # CLI that an earlier build without a target left in TARGET_DIR/release.
    root = artifacts_tree(tmp_path)
    target = tmp_path / "cargo-target"
    earlier_build_in(target)
    bin_dir = tmp_path / "bin"
    # As cargo: with CARGO_BUILD_TARGET, the profile directories sit under the triple.
    executable(
        bin_dir / "cargo",
        FAKE_CARGO.replace('d="$t/$profile"', 'd="$t/${CARGO_BUILD_TARGET:+$CARGO_BUILD_TARGET/}$profile"', 1),
    )
    executable(bin_dir / "strip", "#!/bin/sh\nexit 0\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CARGO_TARGET_DIR": str(target)}
    env["CARGO_BUILD_TARGET"] = "x86_64-unknown-linux-gnu"
    env["GIT_CEILING_DIRECTORIES"] = str(tmp_path)
    assert_no_earlier_build_shipped(root, env)


# ---------------------------------------------------------------------------------------------
# The kernel build through the scripts (a real cargo build of a scratch copy, in a target
# directory of its own; needs the pinned toolchain that scripts/install-nvcc.sh installed).

PINNED = ROOT / ".tools" / "cuda"


def scratch_checkout(tmp: Path) -> Path:
    """A copy of the tracked files of the working tree."""
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    root = tmp / "checkout"
    for rel in filter(None, files):
        src = ROOT / os.fsdecode(rel)
        if not src.is_file():
            continue
        dest = root / os.fsdecode(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    return root


def cargo_messages(root: Path, env: dict, verb: str, *args: str) -> list:
    """The JSON messages of a `cargo VERB --lib ARGS` in `root`, which must succeed."""
    proc = subprocess.run(
        ["cargo", verb, "--quiet", "--lib", *args, "--message-format=json"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    messages = []
    for line in proc.stdout.splitlines():
        try:
            messages.append(json.loads(line))
        except ValueError:
            continue
    return messages


def kernel_origin(root: Path, env: dict, verb: str = "build") -> str:
    """KERNEL_ORIGIN of the build script's output in a `cargo VERB` of the library."""
    for m in cargo_messages(root, env, verb):
        if m.get("reason") == "build-script-executed":
            images = Path(m["out_dir"]) / "kernel_images.rs"
            if images.exists():
                for l in images.read_text().splitlines():
                    if l.startswith("pub const KERNEL_ORIGIN"):
                        return l.split('"')[1]
    pytest.fail("no kernel_images.rs in cargo's build messages")


def build_env(tmp: Path, path_prefix: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NVCC", "CUDA_HOME", "CUDA_PATH", "KVHYGIENE_REQUIRE_KERNEL_BUILD", "KVHYGIENE_KERNEL_EXPORT_DIR")}
    env["CARGO_TARGET_DIR"] = str(tmp / "target")
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return env


@pytest.mark.skipif(not (PINNED / ".pins").is_file(), reason="the pinned toolchain is not installed (scripts/install-nvcc.sh)")
def test_a_build_after_install_nvcc_embeds_the_pinned_toolchains_kernels(tmp_path):
    # The order the README and deploy/README.md lead to: a build first (`cargo run --release
    # --bin kvh -- demo`), then scripts/install-nvcc.sh, then a build for release. Once the
    # toolchain is installed, the next build compiles the kernels with it; build-release.sh
    # otherwise warns that the kernels are the committed PTX and says to run install-nvcc.sh,
    # which was run.
    root = scratch_checkout(tmp_path)
    env = build_env(tmp_path)
    assert kernel_origin(root, env) == "committed kernels/scrub.ptx"
    # What scripts/install-nvcc.sh leaves: .tools/cuda with its pins (.tools may exist).
    (root / ".tools").mkdir(exist_ok=True)
    (root / ".tools" / "cuda").symlink_to(PINNED)
    origin = kernel_origin(root, env)
    assert ".tools/cuda" in origin, f"after install-nvcc.sh the build still embeds: {origin}"


@pytest.mark.skipif(not (PINNED / ".pins").is_file(), reason="the pinned toolchain is not installed (scripts/install-nvcc.sh)")
def test_gen_ptx_never_reports_a_ptx_it_did_not_write(tmp_path):
    # scripts/gen-ptx.sh regenerates kernels/scrub.ptx with the pinned toolchain ("make sure no
    # system nvcc takes precedence"). On a machine whose PATH has a CUDA toolkit's nvcc (a
    # stand-in here, which only writes its output files), it must still write the PTX of the
    # current scrub.cu, or fail; never exit 0 with the committed PTX left stale, which
    # scripts/check-ptx.sh then refuses, telling the user to run gen-ptx.sh.
    root = scratch_checkout(tmp_path)
    (root / ".tools").mkdir(exist_ok=True)
    (root / ".tools" / "cuda").symlink_to(PINNED)
    with open(root / "kernels" / "scrub.cu", "a") as f:
        f.write("// a change to the kernel source\n")
    calls = tmp_path / "nvcc-calls.log"
    toolkit = tmp_path / "cuda" / "bin"
    executable(
        toolkit / "nvcc",
        "#!/bin/sh\n"
        f'echo "$*" >> "{calls}"\n'
        'out=""; prev=""\n'
        'for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done\n'
        '[ -n "$out" ] && echo stand-in > "$out"\n'
        "exit 0\n",
    )
    env = build_env(tmp_path, str(toolkit))
    proc = subprocess.run(
        ["bash", str(root / "scripts/gen-ptx.sh")], cwd=root, env=env, capture_output=True, text=True, timeout=1200
    )
    want = hashlib.sha256((root / "kernels" / "scrub.cu").read_bytes()).hexdigest()
    ptx_header = (root / "kernels" / "scrub.ptx").read_text()[:400]
    if proc.returncode == 0:
        assert f"kvhygiene-source-sha256: {want}" in ptx_header, (
            f"gen-ptx.sh exited 0 ({[l for l in proc.stdout.splitlines() if l.startswith('gen-ptx:')]}) but kernels/scrub.ptx is not "
            f"from the current scrub.cu; nvcc on PATH was called: {calls.exists()}"
        )
        check = subprocess.run(["bash", str(root / "scripts/check-ptx.sh")], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


def test_gpu_artifacts_refused_for_their_glibc_are_not_left_for_gpu_check(tmp_path):
    # scripts/build-gpu-artifacts.sh refuses artifacts that need a glibc newer than the GPU
    # machine's (Ubuntu 22.04: 2.35), so that this is found out here rather than on the
    # device. The refused build must not leave behind a gpu-artifacts/ that gpu-check.sh
    # accepts (it checks that its five files are there) and would run on the device anyway.
    root = scratch_scripts(tmp_path, "build-gpu-artifacts.sh", "gpu/digest-sources.sh")
    executable(root / "scripts" / "install-nvcc.sh", "#!/bin/sh\nexit 0\n")
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "cargo", FAKE_CARGO)
    executable(bin_dir / "strip", "#!/bin/sh\nexit 0\n")
    # What objdump -T shows for a binary linked against a newer glibc.
    executable(
        bin_dir / "objdump",
        "#!/bin/sh\n"
        "echo '0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.34) __libc_start_main'\n"
        "echo '0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.38) __isoc23_strtol'\n",
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CARGO_TARGET_DIR": str(tmp_path / "cargo-target")}
    proc = subprocess.run(
        ["bash", str(root / "scripts/build-gpu-artifacts.sh")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "GLIBC_2.38" in proc.stderr, proc.stderr
    art = root / "gpu-artifacts"
    needed = ["libkvhygiene.so", "libkvhygiene_preload.so", "gpu_kernel", "gpu_scrub", "kvh"]
    left = [f for f in needed if (art / f).exists()]
    assert left != needed, f"the refused artifacts are all still in {art}, where gpu-check.sh runs them: {left}"


def test_gpu_artifacts_of_a_build_that_failed_after_copying_them_are_not_left_for_gpu_check(tmp_path):
    # A step of scripts/build-gpu-artifacts.sh that fails after the five files were copied
    # (here strip) ends the script (set -e) with a non-zero status. The failed build must not
    # leave a gpu-artifacts/ that gpu-check.sh accepts (it checks that its five files are
    # there) and would run on the device, unstripped and without MANIFEST.txt or SOURCES.txt.
    root = scratch_scripts(tmp_path, "build-gpu-artifacts.sh", "gpu/digest-sources.sh")
    executable(root / "scripts" / "install-nvcc.sh", "#!/bin/sh\nexit 0\n")
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "cargo", FAKE_CARGO)
    executable(bin_dir / "strip", "#!/bin/sh\necho 'strip: gpu_kernel: file format not recognized' >&2\nexit 1\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CARGO_TARGET_DIR": str(tmp_path / "cargo-target")}
    proc = subprocess.run(
        ["bash", str(root / "scripts/build-gpu-artifacts.sh")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    art = root / "gpu-artifacts"
    needed = ["libkvhygiene.so", "libkvhygiene_preload.so", "gpu_kernel", "gpu_scrub", "kvh"]
    left = [f for f in needed if (art / f).exists()]
    assert left != needed, f"the failed build's artifacts are all still in {art}, where gpu-check.sh runs them: {left}"


def test_test_sh_runs_the_python_tests_on_the_library_cargo_built_with_the_target_dir_from_cargo_settings(tmp_path):
    # cargo also takes its target directory from CARGO_BUILD_TARGET_DIR (or build.target-dir
    # in a .cargo/config.toml), with CARGO_TARGET_DIR unset. scripts/test.sh then runs the
    # Python tests on the library cargo just built there, never on one an earlier build left
    # in ./target/debug.
    root = scratch_scripts(tmp_path, "test.sh")
    stale = root / "target" / "debug" / "libkvhygiene.so"
    stale.parent.mkdir(parents=True)
    stale.write_text("stale\n")
    bin_dir = tmp_path / "bin"
    # As cargo: CARGO_TARGET_DIR, else CARGO_BUILD_TARGET_DIR, else ./target.
    executable(
        bin_dir / "cargo",
        FAKE_CARGO.replace('t="${CARGO_TARGET_DIR:-$PWD/target}"', 't="${CARGO_TARGET_DIR:-${CARGO_BUILD_TARGET_DIR:-$PWD/target}}"', 1),
    )
    record = tmp_path / "pytest-library.txt"
    executable(
        bin_dir / "python3",
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then\n'
        f'    printf "%s" "$KVH_LIBRARY" > "{record}"; exit 0\n'
        "fi\n"
        f'exec "{sys.executable}" "$@"\n',
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CARGO_TARGET_DIR", "KVH_LIBRARY")}
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    env["CARGO_BUILD_TARGET_DIR"] = str(tmp_path / "cargo-target")
    proc = subprocess.run(
        ["bash", str(root / "scripts/test.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    used = Path(record.read_text()) if record.is_file() else None
    assert used is not None and used.is_file() and used.read_text() == "fresh\n", (
        f"exit {proc.returncode}: the Python tests ran on {used} "
        f"({used.read_text().strip() if used and used.is_file() else 'missing'}), not on the library "
        f"cargo built in CARGO_BUILD_TARGET_DIR={tmp_path / 'cargo-target'}"
    )


def test_gen_cuda_sys_check_says_why_when_bindgen_fails(tmp_path):
    # scripts/gen-cuda-sys.sh --check runs bindgen on the pinned cuda.h. When bindgen cannot
    # parse it (libclang missing or broken, a header it cannot find), the check fails and the
    # output says why: bindgen's own message reaches stderr, so that a failed CI step names
    # its cause.
    root = scratch_scripts(tmp_path, "gen-cuda-sys.sh", "install-nvcc.sh")
    header = root / ".tools" / "cuda" / "include" / "cuda.h"
    header.parent.mkdir(parents=True)
    header.write_text("#include <stdlib.h>\n")
    sys_rs = root / "src" / "backend" / "cuda" / "sys.rs"
    sys_rs.parent.mkdir(parents=True)
    shutil.copy2(ROOT / "src" / "backend" / "cuda" / "sys.rs", sys_rs)
    bin_dir = tmp_path / "bin"
    executable(
        bin_dir / "bindgen",
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "bindgen 0.73.2"; exit 0; fi\n'
        "echo \"cuda.h:1:10: fatal error: 'stdlib.h' file not found\" >&2\n"
        "echo 'Unable to generate bindings: ClangDiagnostic' >&2\n"
        "exit 1\n",
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", str(root / "scripts/gen-cuda-sys.sh"), "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "stdlib.h" in proc.stderr, (
        f"gen-cuda-sys.sh --check failed (exit {proc.returncode}) without bindgen's reason; "
        f"stdout: {proc.stdout!r}, stderr: {proc.stderr!r}"
    )


def checked_kernel_origin(root: Path, env: dict) -> str:
    """KERNEL_ORIGIN of the build script's output in a `cargo check` of the library."""
    return kernel_origin(root, env, "check")


# What a CUDA toolkit's nvcc leaves for build.rs: every `-o` file written.
STAND_IN_NVCC = (
    "#!/bin/sh\n"
    'out=""; prev=""\n'
    'for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done\n'
    '[ -n "$out" ] && echo stand-in > "$out"\n'
    "exit 0\n"
)


def test_a_build_after_a_cuda_toolkit_is_installed_compiles_the_kernels_with_its_nvcc(tmp_path):
    # build.rs takes the first nvcc of CUDA_HOME/bin and PATH, else embeds the committed PTX
    # with a warning telling the user to install a compiler. Once a toolkit's nvcc is
    # installed where CUDA_HOME already points, the next build compiles the kernels with it,
    # as it does once scripts/install-nvcc.sh has filled .tools/cuda; so it does when one was
    # found on PATH before, since CUDA_HOME's takes precedence. (PATH's directories are not
    # watched: one the build writes into would make every build run the script again.)
    root = scratch_checkout(tmp_path)
    on_path = tmp_path / "on-path"
    on_path.mkdir()
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    env = build_env(tmp_path, str(on_path))
    env.pop("KVHYGIENE_KERNEL_TOOLCHAIN", None)
    env["CUDA_HOME"] = str(toolkit)
    assert checked_kernel_origin(root, env) == "committed kernels/scrub.ptx"
    # A second build of the unchanged tree (the first one's own changes to it settle).
    assert checked_kernel_origin(root, env) == "committed kernels/scrub.ptx"
    executable(toolkit / "bin" / "nvcc", STAND_IN_NVCC)
    origin = checked_kernel_origin(root, env)
    assert origin == f"nvcc ({toolkit / 'bin' / 'nvcc'})", (
        f"with nvcc installed in CUDA_HOME/bin the build still embeds: {origin}"
    )
    # Found on PATH first, then installed in CUDA_HOME/bin: the toolkit's is taken.
    root2 = scratch_checkout(tmp_path / "second")
    toolkit2 = tmp_path / "cuda2"
    (toolkit2 / "bin").mkdir(parents=True)
    executable(on_path / "nvcc", STAND_IN_NVCC)
    env2 = build_env(tmp_path / "second", str(on_path))
    env2.pop("KVHYGIENE_KERNEL_TOOLCHAIN", None)
    env2["CUDA_HOME"] = str(toolkit2)
    env2["CARGO_TARGET_DIR"] = env["CARGO_TARGET_DIR"]  # the dependencies built once
    assert checked_kernel_origin(root2, env2) == f"nvcc ({on_path / 'nvcc'})"
    executable(toolkit2 / "bin" / "nvcc", STAND_IN_NVCC)
    origin = checked_kernel_origin(root2, env2)
    assert origin == f"nvcc ({toolkit2 / 'bin' / 'nvcc'})", (
        f"with nvcc installed in CUDA_HOME/bin the build still uses: {origin}"
    )


def test_the_kernel_build_takes_the_nvcc_the_shell_would_run_from_path(tmp_path):
    # build.rs looks nvcc up on PATH as the shell does: a file named nvcc that is not
    # executable (a leftover, a data file) is passed over, and the first executable nvcc on
    # PATH compiles the kernels.
    root = scratch_checkout(tmp_path)
    first = tmp_path / "first"
    first.mkdir()
    (first / "nvcc").write_text("not a program\n")
    second = tmp_path / "second"
    executable(second / "nvcc", STAND_IN_NVCC)
    env = build_env(tmp_path, f"{first}:{second}")
    env.pop("KVHYGIENE_KERNEL_TOOLCHAIN", None)
    origin = checked_kernel_origin(root, env)
    assert origin == f"nvcc ({second / 'nvcc'})", origin


def library_fresh(root: Path, env: dict) -> bool:
    """Whether a `cargo check` of the library in `root` found it up to date."""
    for m in cargo_messages(root, env, "check", "-p", "kvhygiene"):
        if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "kvhygiene":
            return m["fresh"]
    pytest.fail("no compiler-artifact message for kvhygiene")


@pytest.mark.parametrize("target_on_path", [False, True])
def test_a_second_build_of_an_unchanged_checkout_rebuilds_nothing(tmp_path, target_on_path):
    # Building a fresh checkout twice without changing anything: the second build finds the
    # library (and its build script's output) up to date, rather than compiling it, and
    # everything that links it, again; also with the target directory's profile folder on
    # PATH (a developer who runs `kvh` from the build), which the build writes into: the
    # kernel build script must not watch it.
    root = scratch_checkout(tmp_path)
    profile_dir = tmp_path / "target" / "debug"
    profile_dir.mkdir(parents=True)
    env = build_env(tmp_path, str(profile_dir) if target_on_path else "")
    env.pop("KVHYGIENE_KERNEL_TOOLCHAIN", None)
    assert library_fresh(root, env) is False
    assert library_fresh(root, env) is True, (
        f"the second build of the unchanged checkout (PATH with {profile_dir}: {target_on_path}) "
        "compiled the library again"
    )
