"""scripts/gpu-check.sh and its Python steps under scripts/gpu/, run here with stand-ins for
what only the GPU machine has (nvidia-smi, torch, the prebuilt artifacts): the run there is
one time-limited call, so how the script behaves when a step or a tool misbehaves is checked
on this machine."""

import json
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# A stand-in torch whose CUDA tensors are plain objects and whose torch.empty fails as a CUDA
# error does (an exception raised by the call).
FAKE_TORCH = '''
class _Cuda:
    @staticmethod
    def is_available():
        return True

    @staticmethod
    def synchronize():
        pass


cuda = _Cuda()


def full(shape, value, device=None, dtype=None):
    return object()


def empty(shape, device=None, dtype=None):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")
'''


def test_residue_with_threads_fails_when_a_thread_raised(tmp_path):
    # The reader thread's torch.empty raises: nothing was measured, so the step must not exit
    # 0 (gpu-check.sh and report.py take exit 0 as "the measurement is in the JSON").
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(FAKE_TORCH)
    out = tmp_path / "residue_threads_default.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/gpu/residue.py"), "--mode", "default", "--threads", "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(fake)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "illegal memory access" in proc.stderr, proc.stderr
    written = json.loads(out.read_text()) if out.exists() else None
    assert proc.returncode != 0, f"exit 0 with {written}"


def test_residue_with_threads_ends_promptly_when_the_writer_raised(tmp_path):
    # The writer thread's torch.full raises: the reader must not wait for a secret that will
    # never be written until gpu-check.sh's time limit kills the step (60 s of the device
    # session, per mode).
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(
        FAKE_TORCH + '\n\ndef full(shape, value, device=None, dtype=None):\n'
        '    raise RuntimeError("CUDA error: out of memory")\n'
    )
    out = tmp_path / "residue_threads_default.json"
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts/gpu/residue.py"), "--mode", "default", "--threads", "--out", str(out)],
            env={**os.environ, "PYTHONPATH": str(fake)},
            capture_output=True,
            text=True,
            timeout=15,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"still waiting after 15 s: {e.stderr!r}") from None
    assert proc.returncode != 0


def scratch_gpu_checkout(tmp: Path) -> Path:
    """A copy of what gpu-check.sh needs, with stand-in artifacts that finish at once."""
    root = tmp / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "gpu-check.sh", root / "scripts" / "gpu-check.sh")
    shutil.copytree(ROOT / "scripts" / "gpu", root / "scripts" / "gpu")
    art = root / "gpu-artifacts"
    art.mkdir()
    for f in ["libkvhygiene.so", "libkvhygiene_preload.so"]:
        (art / f).write_text("stand-in\n")
    (art / "MANIFEST.txt").write_text("commit: stand-in\n")
    # One source file, digested as the build digests the tree (and gpu-check.sh again).
    (root / "src").mkdir()
    (root / "src" / "lib.rs").write_text("pub fn stand_in() {}\n")
    digest = subprocess.run(
        ["bash", str(root / "scripts" / "gpu" / "digest-sources.sh")],
        cwd=root,
        env={**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp)},
        capture_output=True,
        text=True,
        check=True,
    )
    (art / "SOURCES.txt").write_text(digest.stdout)
    executable(
        art / "gpu_kernel",
        "#!/bin/sh\necho 'running 1 tests'\necho 'test a ... ok'\necho\n"
        "echo 'test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out'\n",
    )
    executable(art / "gpu_scrub", "#!/bin/sh\necho 'gpu_scrub: skipped: stand-in'\n")
    executable(art / "kvh", "#!/bin/sh\necho \"stand-in kvh $*\"\nexit 1\n")
    return root


def stand_in_path(tmp: Path, nvidia_smi: str) -> str:
    """PATH with nvidia-smi as given, no nvcc, and a python3 that runs only report.py (the
    Python steps, which need torch, fail at once as they would without it)."""
    bin_dir = tmp / "bin"
    executable(bin_dir / "nvidia-smi", nvidia_smi)
    executable(bin_dir / "nvcc", "#!/bin/sh\nexit 1\n")
    executable(
        bin_dir / "python3",
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'    scripts/gpu/report.py) exec "{sys.executable}" "$@" ;;\n'
        "esac\n"
        "echo 'stand-in python3: no torch here' >&2\nexit 1\n",
    )
    return f"{bin_dir}:{os.environ['PATH']}"


def test_gpu_check_keeps_its_budget_when_nvidia_smi_hangs(tmp_path):
    # nvidia-smi hangs on a GPU in a bad state (a wedged driver, a fallen-off-the-bus card):
    # gpu-check.sh must still end inside GPU_CHECK_BUDGET_S and write results.md and
    # results.json, not be killed by the device call's own limit with nothing written.
    root = scratch_gpu_checkout(tmp_path)
    out = tmp_path / "out"
    budget = 30
    env = {
        **os.environ,
        "PATH": stand_in_path(tmp_path, "#!/bin/sh\nexec sleep 600\n"),
        "OUT": str(out),
        "GPU_CHECK_BUDGET_S": str(budget),
    }
    start = time.monotonic()
    proc = subprocess.Popen(
        ["bash", str(root / "scripts/gpu-check.sh")],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=budget + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
    elapsed = time.monotonic() - start
    assert elapsed <= budget + 15, f"ran {elapsed:.0f} s with GPU_CHECK_BUDGET_S={budget}: {output[-800:]}"
    assert (out / "results.md").is_file() and (out / "results.json").is_file()
    assert proc.returncode == 1


def test_gpu_check_with_a_quick_nvidia_smi_writes_its_report(tmp_path):
    # The same stand-ins with an nvidia-smi that answers: the run ends well inside its budget,
    # with a report and a failing status (the Python checks did not run).
    root = scratch_gpu_checkout(tmp_path)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": stand_in_path(tmp_path, "#!/bin/sh\necho 'name, driver_version'\necho 'Stand-in, 1'\n"),
        "OUT": str(out),
        "GPU_CHECK_BUDGET_S": "30",
    }
    proc = subprocess.run(["bash", str(root / "scripts/gpu-check.sh")], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert (out / "results.md").is_file(), proc.stdout[-800:] + proc.stderr[-800:]
    assert proc.returncode == 1


def test_gpu_check_compares_the_tree_with_the_sources_of_its_artifacts(tmp_path):
    # The artifacts carry the digests of the sources they were built from: the run says so
    # when the tree it runs in has others (artifacts left from an older build), and the
    # report's row then fails the run.
    root = scratch_gpu_checkout(tmp_path)
    env_for = lambda out: {
        **os.environ,
        "PATH": stand_in_path(tmp_path, "#!/bin/sh\necho 'name, driver_version'\necho 'Stand-in, 1'\n"),
        "OUT": str(out),
        "GPU_CHECK_BUDGET_S": "30",
    }
    run = lambda out: subprocess.run(
        ["bash", str(root / "scripts/gpu-check.sh")], cwd=root, env=env_for(out), capture_output=True, text=True, timeout=60
    )
    same = tmp_path / "same"
    run(same)
    assert (same / "status" / "sources").read_text().strip() == "same"
    with open(root / "src" / "lib.rs", "a") as f:
        f.write("\n// changed since the artifacts were built\n")
    other = tmp_path / "other"
    proc = run(other)
    assert "FAILED" in (other / "status" / "sources").read_text()
    assert "other sources than this tree's" in proc.stderr
    report = json.loads((other / "results.json").read_text())
    rows = {r["check"]: r for r in report["rows"]} if "rows" in report else {}
    assert any(c.startswith("artifacts built from") and r["verdict"] == "FAIL" for c, r in rows.items()), report


@pytest.mark.parametrize("sources", ["other", "absent"])
def test_gpu_check_spends_no_device_time_on_artifacts_built_from_other_sources(tmp_path, sources):
    # Artifacts whose SOURCES.txt does not match the tree, or that have none (built by an
    # older build script), fail the run whatever the steps measure: the sources row is FAIL
    # or MISSING. The run ends before the GPU steps, with results.md and results.json naming
    # why, instead of spending its budget on figures the report then refuses.
    root = scratch_gpu_checkout(tmp_path)
    ran = tmp_path / "gpu_kernel-ran"
    executable(root / "gpu-artifacts" / "gpu_kernel", f"#!/bin/sh\ntouch '{ran}'\nsleep 5\n")
    if sources == "other":
        with open(root / "src" / "lib.rs", "a") as f:
            f.write("\n// changed since the artifacts were built\n")
    else:
        (root / "gpu-artifacts" / "SOURCES.txt").unlink()
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": stand_in_path(tmp_path, "#!/bin/sh\necho 'name, driver_version'\necho 'Stand-in, 1'\n"),
        "OUT": str(out),
        "GPU_CHECK_BUDGET_S": "60",
    }
    proc = subprocess.run(
        ["bash", str(root / "scripts/gpu-check.sh")], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert (out / "results.json").is_file(), proc.stderr[-800:]
    rows = {r["check"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert any(c.startswith("artifacts built from") and r["verdict"] in ("FAIL", "MISSING") for c, r in rows.items()), rows
    assert not ran.exists(), f"the GPU steps ran on artifacts whose sources are {sources}"


def test_the_digested_sources_include_every_file_the_kernel_test_binary_is_built_from():
    # docs/gpu-results.md: SOURCES.txt holds "the SHA-256 of every source file the build
    # read". The gpu_kernel binary (and the gpu_scrub bench) compile modules named with
    # #[path = "..."]: a change to one of them must not leave the artifacts passing as this
    # tree's.
    import re

    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu" / "digest-sources.sh")], cwd=ROOT, capture_output=True, text=True, check=True
    )
    listed = {line.split("  ", 1)[1] for line in proc.stdout.splitlines()}
    read = []
    for target in ["tests/gpu_kernel.rs", "benches/gpu_scrub.rs"]:
        text = (ROOT / target).read_text()
        read.append(target)
        for module in re.findall(r'#\[path = "([^"]+)"\]', text):
            read.append((Path(target).parent / module).as_posix())
    assert len(read) > 2, "the kernel test names no #[path] module"
    missing = [f for f in read if f not in listed]
    assert not missing, f"built into the GPU artifacts but not digested in SOURCES.txt: {missing}"
    assert "src/lib.rs" in listed and "kernels/scrub.cu" in listed


def test_gpu_check_without_sha256sum_does_not_report_other_sources(tmp_path):
    # A machine without sha256sum cannot compare the tree with SOURCES.txt: the row has no
    # figure (MISSING), and the script does not warn that the artifacts were built from
    # other sources, which it never found out.
    root = scratch_gpu_checkout(tmp_path)
    tools = tmp_path / "tools"
    tools.mkdir()
    for d in os.environ["PATH"].split(":"):
        if not d or not Path(d).is_dir():
            continue
        for entry in Path(d).iterdir():
            if entry.name == "sha256sum" or (tools / entry.name).exists():
                continue
            if entry.is_file() and os.access(entry, os.X_OK):
                (tools / entry.name).symlink_to(entry.resolve())
    stand_in = stand_in_path(tmp_path, "#!/bin/sh\necho 'name, driver_version'\necho 'Stand-in, 1'\n")
    path = stand_in.split(":", 1)[0] + ":" + str(tools)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": path, "OUT": str(out), "GPU_CHECK_BUDGET_S": "30"}
    proc = subprocess.run(
        ["bash", str(root / "scripts/gpu-check.sh")], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert (out / "results.json").is_file(), proc.stdout[-800:] + proc.stderr[-800:]
    rows = {r["check"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    (row,) = [r for c, r in rows.items() if c.startswith("artifacts built from")]
    assert "other sources than this tree's" not in proc.stderr, proc.stderr[-800:]
    assert row["verdict"] == "MISSING", row


@pytest.mark.parametrize("change", ["untracked", "deleted"])
def test_the_source_digests_describe_the_working_tree_with_its_uncommitted_changes(tmp_path, change):
    # build-gpu-artifacts.sh digests the sources "as the tree has them now (with any
    # uncommitted change)": a new source file not yet added to git is built (and carried to
    # the GPU machine) and so is digested; a source file deleted from the working tree is not
    # built and does not stop the digest (the build script runs with set -euo pipefail).
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "lib.rs").write_text("mod extra;\n")
    (tree / "src" / "old.rs").write_text("// committed\n")
    (tree / ".gitignore").write_text("src/generated.rs\n")
    (tree / "scripts" / "gpu").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "gpu" / "digest-sources.sh", tree / "scripts" / "gpu" / "digest-sources.sh")
    git = lambda *a: subprocess.run(["git", *a], cwd=tree, check=True, capture_output=True)
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "t")
    (tree / "src" / "extra.rs").write_text("pub fn f() {}\n")
    (tree / "src" / "generated.rs").write_text("// ignored\n")
    if change == "deleted":
        (tree / "src" / "old.rs").unlink()
    dest = tmp_path / "dest"
    dest.mkdir()
    with open(dest / "SOURCES.txt", "w") as sources:
        proc = subprocess.run(
            ["bash", str(tree / "scripts" / "gpu" / "digest-sources.sh")],
            cwd=tree / "src",
            stdout=sources,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert proc.returncode == 0, proc.stderr
    digested = (dest / "SOURCES.txt").read_text()
    if change == "untracked":
        assert "src/extra.rs" in digested, digested
    else:
        assert "src/old.rs" not in digested, digested
    assert "src/lib.rs" in digested, digested
    assert "src/generated.rs" not in digested, digested


def test_the_source_digests_are_the_same_whatever_directory_the_script_is_run_from():
    # scripts/gpu/digest-sources.sh lists the sources by their paths from the repository
    # root. Run from a subdirectory it either writes the same lines or fails; it never exits
    # 0 with no digest at all (an empty SOURCES.txt, which gpu-check.sh reports as artifacts
    # built from other sources).
    script = str(ROOT / "scripts" / "gpu" / "digest-sources.sh")
    from_root = subprocess.run(["bash", script], cwd=ROOT, capture_output=True, text=True, check=True)
    from_sub = subprocess.run(["bash", script], cwd=ROOT / "src", capture_output=True, text=True)
    assert from_root.stdout.strip(), "nothing digested from the repository root"
    assert from_sub.returncode != 0 or from_sub.stdout == from_root.stdout, from_sub.stdout[:400]


def test_the_source_digests_of_a_checkout_without_git_metadata(tmp_path):
    # A tree unpacked from an archive, or deploy/Dockerfile's build context (.dockerignore
    # leaves .git out: "the image builds from the sources alone"), has the sources without
    # git's metadata. The digests of the sources it builds from are still written, so that
    # build-gpu-artifacts.sh, which runs with set -e, does not fail after its whole build.
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "lib.rs").write_text("pub fn f() {}\n")
    (tree / "Cargo.toml").write_text("[package]\nname = \"x\"\n")
    (tree / "target" / "release").mkdir(parents=True)
    (tree / "target" / "release" / "libx.so").write_text("built\n")
    (tree / "scripts" / "gpu").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "gpu" / "digest-sources.sh", tree / "scripts" / "gpu" / "digest-sources.sh")
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(tree / "scripts" / "gpu" / "digest-sources.sh")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "src/lib.rs" in proc.stdout and "Cargo.toml" in proc.stdout, proc.stdout
    assert "target/" not in proc.stdout, proc.stdout
    # Nothing to digest is an error, not an empty list every GPU run would then fail on.
    empty = tmp_path / "empty"
    (empty / "scripts" / "gpu").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "gpu" / "digest-sources.sh", empty / "scripts" / "gpu" / "digest-sources.sh")
    proc = subprocess.run(
        ["bash", str(empty / "scripts" / "gpu" / "digest-sources.sh")], env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "no source file" in proc.stderr, proc.stderr


def test_the_source_digests_of_a_tree_without_git_metadata_inside_another_repository(tmp_path):
    # A tree without its own git metadata (unpacked from an archive) that lies inside another
    # git repository, one that ignores it (a home directory kept in git with "*" ignored, say):
    # its sources are still digested, as for any tree without git metadata, and
    # build-gpu-artifacts.sh does not write an empty SOURCES.txt that every GPU run then fails.
    outer = tmp_path / "outer"
    tree = outer / "unpacked"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "lib.rs").write_text("pub fn f() {}\n")
    (tree / "Cargo.toml").write_text("[package]\nname = \"x\"\n")
    (tree / "scripts" / "gpu").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "gpu" / "digest-sources.sh", tree / "scripts" / "gpu" / "digest-sources.sh")
    (outer / ".gitignore").write_text("unpacked/\n")
    subprocess.run(["git", "init", "-q"], cwd=outer, check=True, capture_output=True)
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(tree / "scripts" / "gpu" / "digest-sources.sh")], cwd=tree, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "src/lib.rs" in proc.stdout and "Cargo.toml" in proc.stdout, proc.stdout


# A stand-in cargo for build-gpu-artifacts.sh: it writes the artifacts where cargo would
# (CARGO_TARGET_DIR, else target/), the build script's kernel_images.rs, and the JSON messages
# naming the files built (every build's, as one stand-in answers every cargo command); `metadata` names the target directory.
# With STAND_IN_STALE_LOCK set it brings Cargo.lock up to date, as cargo does with a lock file
# older than Cargo.toml.
STAND_IN_CARGO = r'''#!/bin/sh
t="${CARGO_TARGET_DIR:-target}"
case "$t" in /*) ;; *) t="$PWD/$t" ;; esac
r="$t/release"
if [ -n "$STAND_IN_STALE_LOCK" ] && ! grep -q kvhygiene-preload Cargo.lock; then
    printf '\n[[package]]\nname = "kvhygiene-preload"\nversion = "0.1.0"\n' >>Cargo.lock
fi
if [ "$1" = metadata ]; then printf '{"target_directory":"%s"}\n' "$t"; exit 0; fi
mkdir -p "$r/build/kvhygiene-0/out" "$r/deps"
echo 'pub const KERNEL_ORIGIN: &str = "stand-in";' >"$r/build/kvhygiene-0/out/kernel_images.rs"
for f in libkvhygiene.so kvh libkvhygiene_preload.so deps/gpu_kernel deps/gpu_scrub; do
    echo built >"$r/$f"
done
for name in gpu_kernel gpu_scrub; do
    echo "{\"reason\":\"compiler-artifact\",\"target\":{\"name\":\"$name\"},\"executable\":\"$r/deps/$name\"}"
done
echo "{\"reason\":\"compiler-artifact\",\"target\":{\"name\":\"kvhygiene\"},\"filenames\":[\"$r/libkvhygiene.so\"]}"
echo "{\"reason\":\"compiler-artifact\",\"target\":{\"name\":\"kvh\"},\"filenames\":[\"$r/kvh\"],\"executable\":\"$r/kvh\"}"
echo "{\"reason\":\"compiler-artifact\",\"target\":{\"name\":\"kvhygiene_preload\"},\"filenames\":[\"$r/libkvhygiene_preload.so\"]}"
'''


@pytest.mark.parametrize("case", ["target_dir_under_build", "stale_lock_file"])
def test_build_gpu_artifacts_keeps_a_build_whose_sources_nobody_edited(tmp_path, case):
    # build-gpu-artifacts.sh refuses artifacts whose sources changed while they were built.
    # What the build writes itself is no such change: a Cargo.lock cargo brought up to date
    # is kept, with the artifacts and their SOURCES.txt. cargo's output in a CARGO_TARGET_DIR
    # inside the sources (here build/, beside build/cuda_kernel.rs) would count as sources:
    # refused before anything is built, naming the setting.
    tree, env = artifact_tree(tmp_path)
    if case == "target_dir_under_build":
        env["CARGO_TARGET_DIR"] = "build"
    elif case == "stale_lock_file":
        env["STAND_IN_STALE_LOCK"] = "1"
    proc = run_build(tree, env)
    if case == "target_dir_under_build":
        refused_naming_the_target_dir(proc, tree / "build")
        assert not (tree / "gpu-artifacts").exists()
        return
    assert proc.returncode == 0, f"{case}: exit {proc.returncode}\n{proc.stderr[-800:]}"
    assert (tree / "gpu-artifacts" / "SOURCES.txt").is_file(), proc.stderr[-800:]


def artifact_tree(tmp_path: Path, with_git: bool = True, tree: Path = None):
    """A scratch tree holding build-gpu-artifacts.sh with its sources, and the environment
    that runs it with the stand-in cargo (and stand-ins for the other tools it calls)."""
    tree = tree or tmp_path / "tree"
    (tree / "scripts" / "gpu").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "build-gpu-artifacts.sh", tree / "scripts" / "build-gpu-artifacts.sh")
    shutil.copy2(ROOT / "scripts" / "gpu" / "digest-sources.sh", tree / "scripts" / "gpu" / "digest-sources.sh")
    executable(tree / "scripts" / "install-nvcc.sh", "#!/bin/sh\nexit 0\n")
    (tree / "src").mkdir()
    (tree / "src" / "lib.rs").write_text("pub fn f() {}\n")
    (tree / "build").mkdir()
    (tree / "build" / "cuda_kernel.rs").write_text("pub fn build() {}\n")
    (tree / "Cargo.toml").write_text('[package]\nname = "kvhygiene"\nversion = "0.1.0"\n')
    (tree / "Cargo.lock").write_text('version = 4\n\n[[package]]\nname = "kvhygiene"\nversion = "0.1.0"\n')
    (tree / ".gitignore").write_text("/target\n/gpu-artifacts/\n")
    if with_git:
        git = lambda *a: subprocess.run(["git", *a], cwd=tree, check=True, capture_output=True)
        git("init", "-q")
        git("add", "-A")
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "t")
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "cargo", STAND_IN_CARGO)
    executable(bin_dir / "strip", "#!/bin/sh\nexit 0\n")
    executable(bin_dir / "objdump", "#!/bin/sh\necho 'GLIBC_2.17'\n")
    executable(bin_dir / "rustc", "#!/bin/sh\necho 'rustc stand-in'\n")
    env = {k: v for k, v in os.environ.items() if k != "CARGO_TARGET_DIR"}
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    env["GIT_CEILING_DIRECTORIES"] = str(tmp_path)
    return tree, env


def run_build(tree: Path, env: dict):
    """build-gpu-artifacts.sh of `tree`, run there with `env`."""
    return subprocess.run(
        ["bash", str(tree / "scripts" / "build-gpu-artifacts.sh")], cwd=tree, env=env, capture_output=True, text=True
    )


def refused_naming_the_target_dir(proc, outputs: Path):
    assert proc.returncode == 1 and "CARGO_TARGET_DIR" in proc.stderr, (
        f"exit {proc.returncode}\n{proc.stderr[-800:]}"
    )
    assert not (outputs / "release").exists(), f"built into {outputs} before refusing"


@pytest.mark.parametrize("how", ["symlink_outside_the_tree", "tree_reached_through_a_symlink"])
def test_build_gpu_artifacts_refuses_a_target_dir_in_the_sources_whatever_path_names_it(tmp_path, how):
    # Where cargo writes is the directory the path leads to: a CARGO_TARGET_DIR outside the
    # tree that is a symbolic link to a directory among the sources (here build/out), or the
    # sources' own directory named by its real path while the script runs through a link to
    # the tree, puts the build's output among the sources. It is refused before anything is
    # built, as the same directory named inside the tree is.
    tree, env = artifact_tree(tmp_path)
    outputs = tree / "build" / "out"
    outputs.mkdir()
    cwd = tree
    script = tree / "scripts" / "build-gpu-artifacts.sh"
    if how == "symlink_outside_the_tree":
        link = tmp_path / "target-link"
        link.symlink_to(outputs, target_is_directory=True)
        env["CARGO_TARGET_DIR"] = str(link)
    else:
        link = tmp_path / "tree-link"
        link.symlink_to(tree, target_is_directory=True)
        env["CARGO_TARGET_DIR"] = str(outputs)
        cwd = link
        script = link / "scripts" / "build-gpu-artifacts.sh"
    proc = subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True)
    refused_naming_the_target_dir(proc, outputs)


def test_build_gpu_artifacts_in_a_tree_without_git_metadata_takes_a_directory_under_target(tmp_path):
    # A tree without git metadata (unpacked from an archive) digests its sources without git,
    # leaving build outputs (target/) out. A CARGO_TARGET_DIR under target/ is a build output
    # there as in a git checkout: the artifacts are built, not refused for want of a git
    # repository to ask.
    tree, env = artifact_tree(tmp_path, with_git=False)
    env["CARGO_TARGET_DIR"] = "target/gpu"
    proc = run_build(tree, env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-800:]}"
    assert (tree / "gpu-artifacts" / "SOURCES.txt").is_file()


def test_build_gpu_artifacts_in_a_tree_without_git_metadata_inside_an_ignoring_repository(tmp_path):
    # A tree without git metadata inside another repository that ignores it: its sources are
    # digested without git (every file under the source paths), so a CARGO_TARGET_DIR among
    # them (build/) would count as sources whatever the other repository ignores. It is
    # refused before anything is built.
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / ".gitignore").write_text("unpacked/\n")
    subprocess.run(["git", "init", "-q"], cwd=outer, check=True, capture_output=True)
    tree, env = artifact_tree(tmp_path, with_git=False, tree=outer / "unpacked")
    env["CARGO_TARGET_DIR"] = "build"
    proc = run_build(tree, env)
    refused_naming_the_target_dir(proc, tree / "build")


def test_build_gpu_artifacts_does_not_build_into_its_own_artifact_directory(tmp_path):
    # gpu-artifacts/ holds what is carried to the GPU machine, and the script empties it
    # before each build. A CARGO_TARGET_DIR there (git-ignored like target/) would fill it
    # with the whole build and lose the build cache at every run: it is refused before
    # anything is built.
    tree, env = artifact_tree(tmp_path)
    env["CARGO_TARGET_DIR"] = "gpu-artifacts"
    proc = run_build(tree, env)
    refused_naming_the_target_dir(proc, tree / "gpu-artifacts")


def test_build_gpu_artifacts_refuses_an_empty_target_dir_before_installing_the_toolchain(tmp_path):
    # cargo refuses a CARGO_TARGET_DIR set to the empty string (it does not read it as
    # unset). The check made first names the setting and stops before the toolchain's
    # install and before the artifacts of an earlier build are removed.
    tree, env = artifact_tree(tmp_path)
    marker = tmp_path / "install-nvcc-ran"
    executable(tree / "scripts" / "install-nvcc.sh", f"#!/bin/sh\ntouch '{marker}'\n")
    executable(
        tmp_path / "bin" / "cargo",
        STAND_IN_CARGO.replace(
            "#!/bin/sh\n",
            "#!/bin/sh\n"
            'if [ "${CARGO_TARGET_DIR+set}" = set ] && [ -z "$CARGO_TARGET_DIR" ]; then\n'
            "    echo 'error: the target directory is set to an empty string in the"
            " `CARGO_TARGET_DIR` environment variable' >&2\n"
            "    exit 101\n"
            "fi\n",
            1,
        ),
    )
    earlier = tree / "gpu-artifacts"
    earlier.mkdir()
    (earlier / "SOURCES.txt").write_text("earlier build\n")
    env["CARGO_TARGET_DIR"] = ""
    proc = run_build(tree, env)
    assert proc.returncode == 1 and "build-gpu-artifacts: CARGO_TARGET_DIR" in proc.stderr, (
        f"exit {proc.returncode}\n{proc.stderr[-800:]}"
    )
    assert not marker.exists(), "the toolchain was installed before CARGO_TARGET_DIR was refused"
    assert (earlier / "SOURCES.txt").is_file(), "the earlier build's artifacts were removed"


def test_build_gpu_artifacts_refuses_a_target_dir_inside_the_tree_that_git_does_not_ignore(tmp_path):
    # A CARGO_TARGET_DIR inside the tree other than target/ (here out/, which git does not
    # ignore) puts the whole build among the working tree's files carried to the GPU machine
    # with it; the refusal says to use target/ or a directory outside the tree.
    tree, env = artifact_tree(tmp_path)
    env["CARGO_TARGET_DIR"] = "out"
    proc = run_build(tree, env)
    untracked = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=normal"], cwd=tree, capture_output=True, text=True
    ).stdout
    assert proc.returncode == 1 and "CARGO_TARGET_DIR" in proc.stderr, (
        f"exit {proc.returncode}; untracked after the build:\n{untracked}\n{proc.stderr[-800:]}"
    )
    assert not (tree / "out" / "release").exists(), "built into out/ before refusing"


def test_build_gpu_artifacts_refuses_the_artifact_directory_when_it_is_a_symlink(tmp_path):
    # gpu-artifacts/ here is a symbolic link to a directory elsewhere. The script removes
    # that path and makes a directory there before the build, so a CARGO_TARGET_DIR naming
    # gpu-artifacts is the artifact directory by the time cargo writes into it.
    tree, env = artifact_tree(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    (tree / "gpu-artifacts").symlink_to(store, target_is_directory=True)
    env["CARGO_TARGET_DIR"] = "gpu-artifacts"
    proc = run_build(tree, env)
    refused_naming_the_target_dir(proc, tree / "gpu-artifacts")


def test_the_manifest_says_when_the_artifacts_include_sources_git_has_not_committed(tmp_path):
    # MANIFEST.txt names the commit the artifacts were built at, and says "(with uncommitted
    # changes)" when the tree differed from it. A new source file not yet added to git is
    # built and digested (SOURCES.txt lists it), so it is such a change too: the commit alone
    # does not hold the code the GPU figures describe.
    tree, env = artifact_tree(tmp_path)
    (tree / "src" / "extra.rs").write_text("pub fn g() {}\n")
    proc = run_build(tree, env)
    assert proc.returncode == 0, proc.stderr[-800:]
    assert "src/extra.rs" in (tree / "gpu-artifacts" / "SOURCES.txt").read_text()
    commit = [l for l in (tree / "gpu-artifacts" / "MANIFEST.txt").read_text().splitlines() if l.startswith("commit:")]
    assert commit and "uncommitted" in commit[0], commit


def test_gpu_check_stopped_part_way_leaves_the_results_of_the_steps_that_finished(tmp_path):
    # The device call that runs gpu-check.sh has a limit of its own; when it is reached, the
    # command is stopped (SIGTERM to its processes) wherever it is. The steps that finished
    # by then measured something: results.md and results.json describe them, rather than
    # nothing being written because the report is assembled only after the last step.
    import signal

    root = scratch_gpu_checkout(tmp_path)
    stand_in = stand_in_path(tmp_path, "#!/bin/sh\necho 'name, driver_version'\necho 'Stand-in, 1'\n")
    # Python steps that take a while each (as torch's start-up does) and then fail.
    executable(
        tmp_path / "bin" / "python3",
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'    scripts/gpu/report.py) exec "{sys.executable}" "$@" ;;\n'
        "esac\n"
        "sleep 2\nexit 1\n",
    )
    out = tmp_path / "out"
    env = {**os.environ, "PATH": stand_in, "OUT": str(out), "GPU_CHECK_BUDGET_S": "300"}
    proc = subprocess.Popen(
        ["bash", str(root / "scripts/gpu-check.sh")],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out / "status" / "residue_default.rc").exists():
        time.sleep(0.2)
    assert (out / "status" / "gpu_kernel.rc").is_file(), "the first steps did not finish"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1)
    assert (out / "results.md").is_file() and (out / "results.json").is_file(), (
        f"stopped after {sorted(f.stem for f in (out / 'status').glob('*.rc'))}: no results written"
    )
    rows = {r["check"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    (kernel,) = [r for c, r in rows.items() if c.startswith("kernel correctness")]
    assert kernel["verdict"] == "PASS", kernel


def test_the_digested_sources_leave_out_files_no_artifact_is_built_from():
    # SOURCES.txt decides whether the artifacts are this tree's: a file in it that no
    # artifact is built from (the interposer's own integration tests and their C++ stand-ins,
    # which cargo builds only for `cargo test -p kvhygiene-preload`) makes a change to it
    # refuse artifacts a rebuild would reproduce byte for byte.
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu" / "digest-sources.sh")], cwd=ROOT, capture_output=True, text=True, check=True
    )
    listed = [line.split("  ", 1)[1] for line in proc.stdout.splitlines()]
    not_built = [f for f in listed if f.startswith("preload/tests/")]
    assert not not_built, f"digested, though no GPU artifact is built from them: {not_built}"


def stop_gpu_check_once(tmp_path, root, stand_in, started):
    """Runs gpu-check.sh, sends its process group SIGTERM (as the device call's limit does) 2 s
    after `started` exists, and asserts it then ends promptly with 143 and its report written:
    not only once the command under way (under `timeout`, in a process group of its own) has
    reached its own limit, by when the caller has killed everything."""
    import signal

    out = tmp_path / "out"
    env = {**os.environ, "PATH": stand_in, "OUT": str(out), "GPU_CHECK_BUDGET_S": "300"}
    proc = subprocess.Popen(
        ["bash", str(root / "scripts/gpu-check.sh")],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (out / started).exists():
        time.sleep(0.2)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGTERM)
    start = time.monotonic()
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    elapsed = time.monotonic() - start
    assert elapsed < 10 and rc == 143, f"exit {rc} {elapsed:.0f} s after SIGTERM"
    assert (out / "results.json").is_file(), "no report written when stopped"


def test_gpu_check_stopped_during_a_long_step_ends_promptly_with_143(tmp_path):
    # A first step that takes long (a kernel test run near its limit).
    root = scratch_gpu_checkout(tmp_path)
    stand_in = stand_in_path(tmp_path, "#!/bin/sh\necho 'name, driver_version'\necho 'Stand-in, 1'\n")
    executable(root / "gpu-artifacts" / "gpu_kernel", "#!/bin/sh\nexec sleep 60\n")
    stop_gpu_check_once(tmp_path, root, stand_in, "manifest.txt")


def test_gpu_check_stopped_while_nvidia_smi_hangs_ends_promptly_with_143(tmp_path):
    # The nvidia-smi query runs before the first step, under its own 20 s `timeout`: a
    # wedged driver that makes it hang is stopped as promptly as a step.
    root = scratch_gpu_checkout(tmp_path)
    stand_in = stand_in_path(tmp_path, "#!/bin/sh\nexec sleep 600\n")
    stop_gpu_check_once(tmp_path, root, stand_in, "nvidia-smi.csv")


def test_gpu_check_that_cannot_start_leaves_no_earlier_results_in_its_copy_directory(tmp_path):
    # An earlier run's outputs in $OUT are removed so that nothing stale can pass for this
    # run's. The same holds for GPU_CHECK_COPY_TO, the directory the caller reads back
    # (docs/gpu-results.md: `cat "$R/results.md"`): a run that ends before any report
    # (here: an artifact missing) is expected not to leave an earlier run's results there.
    root = scratch_gpu_checkout(tmp_path)
    (root / "gpu-artifacts" / "kvh").unlink()
    copy_to = tmp_path / "copy"
    copy_to.mkdir()
    (copy_to / "results.md").write_text("| kernel correctness | PASS | (an earlier run) |\n")
    (copy_to / "results.json").write_text('{"ok": true}\n')
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": stand_in_path(tmp_path, "#!/bin/sh\necho 'name, driver_version'\necho 'Stand-in, 1'\n"),
        "OUT": str(out),
        "GPU_CHECK_COPY_TO": str(copy_to),
        "GPU_CHECK_BUDGET_S": "30",
    }
    proc = subprocess.run(
        ["bash", str(root / "scripts/gpu-check.sh")], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0, proc.stderr[-800:]
    left = (copy_to / "results.md").read_text() if (copy_to / "results.md").exists() else ""
    assert "an earlier run" not in left, f"exit {proc.returncode}; {copy_to}/results.md is an earlier run's: {left}"




@pytest.mark.parametrize(
    "config",
    [
        (".cargo/config.toml", '[build]\nrustflags = ["-C", "target-cpu=native"]\n'),
        ("rust-toolchain.toml", '[toolchain]\nchannel = "1.88.0"\n'),
    ],
)
def test_the_source_digests_include_the_build_configuration_cargo_reads_from_the_tree(tmp_path, config):
    # cargo reads .cargo/config.toml (flags, environment, profiles) and rust-toolchain.toml
    # (the compiler) from the tree it builds, and both change the GPU artifacts as Cargo.toml
    # does. SOURCES.txt digests them when the tree has them, so that gpu-check.sh does not
    # take artifacts built without them (or with other contents) for this tree's.
    name, text = config
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "lib.rs").write_text("pub fn f() {}\n")
    (tree / "Cargo.toml").write_text("[package]\nname = \"x\"\n")
    (tree / name).parent.mkdir(parents=True, exist_ok=True)
    (tree / name).write_text(text)
    (tree / "scripts" / "gpu").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "gpu" / "digest-sources.sh", tree / "scripts" / "gpu" / "digest-sources.sh")
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(tree / "scripts" / "gpu" / "digest-sources.sh")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    listed = [line.split("  ", 1)[1] for line in proc.stdout.splitlines()]
    assert name in listed, f"{name} is not digested: {listed}"


def shared_object(path: Path, source: str = "int kvh_synchronize(void) { return 0; }\n", soname: str = None) -> Path:
    """A real shared library built from `source` with the host C compiler (skips without one)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler to build a stand-in shared library")
    path.parent.mkdir(parents=True, exist_ok=True)
    args = [cc, "-shared", "-fPIC", "-o", str(path), "-x", "c", "-"]
    if soname:
        args.append(f"-Wl,-soname,{soname}")
    subprocess.run(args, input=source, text=True, check=True, capture_output=True)
    return path


def one_round_gpu_check(root: Path, tmp: Path, out: Path, budget_s: int, base_env) -> subprocess.CompletedProcess:
    """gpu-check.sh of `root` with the stand-ins (an nvidia-smi that answers), one Llama round,
    writing into `out`."""
    env = {
        **base_env,
        "PATH": stand_in_path(tmp, "#!/bin/sh\necho 'name, driver_version'\necho 'Stand-in, 1'\n"),
        "OUT": str(out),
        "GPU_CHECK_BUDGET_S": str(budget_s),
        "GPU_CHECK_LLAMA_ROUNDS": "1",
    }
    return subprocess.run(
        ["bash", str(root / "scripts/gpu-check.sh")], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def test_gpu_check_preloads_the_interposer_from_a_checkout_whose_path_has_a_space(tmp_path):
    # The preload_kvh step runs the probe with LD_PRELOAD naming
    # gpu-artifacts/libkvhygiene_preload.so. The dynamic loader splits LD_PRELOAD at spaces
    # and colons, so a checkout whose path holds a space must still get the interposer loaded
    # into the probe: the row then reports what the library did, not a run without it.
    base = tmp_path / "with space"
    base.mkdir()
    root = scratch_gpu_checkout(base)
    shared_object(root / "gpu-artifacts" / "libkvhygiene_preload.so")
    # A stand-in probe: says whether the interposer is mapped into the processes it starts,
    # and otherwise reports a clean round, as the real probe does under kvhygiene.
    probe = (
        "#!/bin/sh\n"
        "if grep -q libkvhygiene_preload.so /proc/self/maps; then loaded=1; else loaded=0; fi\n"
        "round='{\"rc\": 0, \"secret_seen\": 0, \"nonzero\": 0, \"same_address\": true}'\n"
        'printf \'{"kvh_loaded": %s, "kvh_verifications_passed": 2, "kvh_verifications_failed": 0, '
        '"sync": %s, "async": %s}\\n\' "$loaded" "$round" "$round"\n'
    )
    executable(
        root / "scripts" / "gpu" / "build_preload_probe.sh",
        "#!/bin/sh\ncat >\"$1\" <<'PROBE'\n" + probe + "PROBE\nchmod +x \"$1\"\necho 'stand-in probe built'\n",
    )
    out = base / "out"
    proc = one_round_gpu_check(root, base, out, 60, os.environ)
    assert (out / "results.json").is_file(), proc.stdout[-800:] + proc.stderr[-800:]
    rows = {r["check"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    (row,) = [r for c, r in rows.items() if c.startswith("LD_PRELOAD probe under")]
    log = (out / "preload_kvh.log").read_text() if (out / "preload_kvh.log").is_file() else ""
    assert row["verdict"] == "PASS", f"{row}; preload_kvh.log: {log[-600:]}"


def test_gpu_check_refuses_artifacts_when_a_build_setting_file_appeared_after_their_build(tmp_path):
    # SOURCES.txt digests cargo's settings in the tree (.cargo/config.toml, rust-toolchain.toml)
    # "each only when the tree has it": artifacts built without a .cargo/config.toml are built
    # from other settings than a tree that has one now. The run says so (the sources row is
    # not "same") instead of reporting the artifacts as this tree's.
    root = scratch_gpu_checkout(tmp_path)
    (root / "Cargo.toml").write_text('[package]\nname = "kvhygiene"\nversion = "0.1.0"\n')
    genv = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    digest = subprocess.run(
        ["bash", str(root / "scripts" / "gpu" / "digest-sources.sh")], cwd=root, env=genv, capture_output=True, text=True, check=True
    )
    (root / "gpu-artifacts" / "SOURCES.txt").write_text(digest.stdout)
    # After the build: a cargo setting that changes every artifact.
    (root / ".cargo").mkdir()
    (root / ".cargo" / "config.toml").write_text('[build]\nrustflags = ["-C", "target-cpu=native"]\n')
    out = tmp_path / "out"
    proc = one_round_gpu_check(root, tmp_path, out, 30, genv)
    sources = (out / "status" / "sources").read_text().strip() if (out / "status" / "sources").is_file() else ""
    assert sources != "same", f"artifacts built without .cargo/config.toml taken for this tree's (exit {proc.returncode})"


def test_the_preload_probe_build_fails_when_the_probe_cannot_find_its_cuda_runtime(tmp_path):
    # build_preload_probe.sh ends by checking that the probe loads a shared CUDA runtime
    # (`ldd | grep cudart`). A probe linked against libcudart.so.N whose directory is neither
    # in its rpath nor known to the loader ("libcudart.so.N => not found") cannot run: the
    # build step fails (or falls back to PyTorch's runtime) rather than report a probe built.
    stub_dir = tmp_path / "elsewhere"
    shared_object(stub_dir / "libcudart.so.13", "int cudaFree(void *p) { return 0; }\n", soname="libcudart.so.13")
    cc = shutil.which("cc") or shutil.which("gcc")
    # A stand-in nvcc that links the shared runtime as `nvcc -cudart shared` does, from a
    # directory the rpath it is given (…/lib64, …/lib beside nvcc's bin/) does not name.
    executable(
        tmp_path / "bin" / "nvcc",
        "#!/bin/sh\n"
        'out=""; prev=""\n'
        'for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done\n'
        f"printf 'int cudaFree(void *);\\nint main(void) {{ return cudaFree(0); }}\\n' | "
        f'"{cc}" -x c - -o "$out" -Wl,--no-as-needed -L"{stub_dir}" -l:libcudart.so.13\n',
    )
    probe = tmp_path / "out" / "preload_probe"
    probe.parent.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("NVCC", "LD_LIBRARY_PATH")}
    env["PATH"] = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu" / "build_preload_probe.sh"), str(probe)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    ldd = subprocess.run(["ldd", str(probe)], capture_output=True, text=True).stdout if probe.exists() else ""
    assert proc.returncode != 0, f"build reported success for a probe whose runtime is missing:\n{ldd}"


def test_gpu_check_creates_its_copy_directory_and_copies_the_results_there(tmp_path):
    # GPU_CHECK_COPY_TO may name a directory that does not exist yet (a folder under the
    # device call's $OUT): it is created, and the results of a run, here one that ends at the
    # sources check, are copied there rather than lost to a copy that failed unseen.
    root = scratch_gpu_checkout(tmp_path)
    with open(root / "src" / "lib.rs", "a") as f:
        f.write("\n// changed since the artifacts were built\n")
    copy_to = tmp_path / "back" / "gc"
    env = {
        **os.environ,
        "PATH": stand_in_path(tmp_path, "#!/bin/sh\necho 'name, driver_version'\necho 'Stand-in, 1'\n"),
        "OUT": str(tmp_path / "out"),
        "GPU_CHECK_COPY_TO": str(copy_to),
        "GPU_CHECK_BUDGET_S": "30",
    }
    proc = subprocess.run(
        ["bash", str(root / "scripts/gpu-check.sh")], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc.stderr[-800:]
    assert (copy_to / "results.md").is_file() and (copy_to / "results.json").is_file(), proc.stderr[-800:]
    copied = (copy_to / "results.md").read_text()
    assert "artifacts built from" in copied, copied


def test_a_warning_on_the_digests_stderr_does_not_read_as_other_sources(tmp_path):
    # The tree's sources are those built; sha256sum (as git or find may) says a warning on
    # stderr while it digests them. The digests on stdout are the same: the run goes on.
    root = scratch_gpu_checkout(tmp_path)
    real = shutil.which("sha256sum")
    assert real, "the test needs sha256sum"
    warn_dir = tmp_path / "warn"
    executable(
        warn_dir / "sha256sum",
        f"#!/bin/sh\necho 'sha256sum: warning: a stand-in speaks' >&2\nexec {real} \"$@\"\n",
    )
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{warn_dir}:"
        + stand_in_path(tmp_path, "#!/bin/sh\necho 'name, driver_version'\necho 'Stand-in, 1'\n"),
        "OUT": str(out),
        "GPU_CHECK_BUDGET_S": "30",
    }
    proc = subprocess.run(
        ["bash", str(root / "scripts/gpu-check.sh")], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert (out / "status" / "sources").read_text().strip() == "same", proc.stderr[-800:]
    assert "other sources than this tree's" not in proc.stderr


def test_a_report_that_fails_is_said_on_stderr(tmp_path):
    # report.py runs after every step with its output discarded; one that raises (a figure
    # it cannot read) must not leave the run to end with an earlier step's results.md unseen.
    root = scratch_gpu_checkout(tmp_path)
    (root / "scripts" / "gpu" / "report.py").write_text(
        "raise ValueError('a figure that is not a number')\n"
    )
    env = {
        **os.environ,
        "PATH": stand_in_path(tmp_path, "#!/bin/sh\necho 'name, driver_version'\necho 'Stand-in, 1'\n"),
        "OUT": str(tmp_path / "out"),
        "GPU_CHECK_BUDGET_S": "30",
    }
    proc = subprocess.run(
        ["bash", str(root / "scripts/gpu-check.sh")], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "gpu-check: the report failed" in proc.stderr, proc.stderr[-800:]
    assert "ValueError: a figure that is not a number" in proc.stderr, proc.stderr[-800:]


def test_the_default_output_directory_of_gpu_check_is_ignored_by_git_and_docker():
    # Without OUT, gpu-check.sh writes into gpu-check-out/ at the root: its logs and reports
    # must not show as changes to commit, travel to the device machine as sources, or enter
    # the image's build context.
    script = (ROOT / "scripts" / "gpu-check.sh").read_text()
    assert 'out="${OUT:-$root/gpu-check-out}"' in script
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "gpu-check-out/results.md"], cwd=ROOT
    )
    assert ignored.returncode == 0, "git does not ignore gpu-check-out/"
    patterns = {
        l.strip()
        for l in (ROOT / ".dockerignore").read_text().splitlines()
        if l.strip() and not l.startswith("#")
    }
    assert "gpu-check-out/" in patterns, ".dockerignore lacks gpu-check-out/"
