#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on the GPU machine (which has no Rust toolchain) and
# puts it in gpu-artifacts/ (git-ignored; carry it to the GPU machine with the working tree):
# libkvhygiene.so, libkvhygiene_preload.so, the gpu_kernel test binary, the gpu_scrub bench
# binary and the kvh CLI, stripped, plus MANIFEST.txt. Release build with the kernels compiled by the pinned toolchain (SASS for
# sm_80/86/89/90 + PTX), never the PTX fallback.
#
# Usage, from the repository root:   scripts/build-gpu-artifacts.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Checked first, before the toolchain's install: cargo's output goes outside the tree, or
# under its target/ (git-ignored): anywhere else in it, the digest below would take it in as
# sources, or it would travel to the GPU machine with the tree (gpu-artifacts/ above all).
# The path is judged both as written and as the directory it leads to (symlinks resolved).
if [[ -n "${CARGO_TARGET_DIR+set}" && -z "$CARGO_TARGET_DIR" ]]; then
    echo "build-gpu-artifacts: CARGO_TARGET_DIR is set but empty (cargo refuses it)" >&2
    exit 1
fi
# Where cargo builds, as cargo decides it (CARGO_TARGET_DIR, CARGO_BUILD_TARGET_DIR,
# build.target-dir in a .cargo/config.toml, else target/): the artifacts are copied from
# there, never from an older build in another directory.
target_dir="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
if [[ -n "${CARGO_TARGET_DIR:-}" ]]; then
    target_name="CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
else
    target_name="cargo's target directory"
fi
if [[ -z "$target_dir" ]]; then
    echo "build-gpu-artifacts: cargo did not say where it builds" >&2
    exit 1
fi
root_real="$(pwd -P)"
for target_path in "$(realpath -m -s -- "$target_dir")" "$(realpath -m -- "$target_dir")"; do
    for tree in "$root" "$root_real"; do
        case "$target_path" in
        "$tree/target" | "$tree/target/"*) ;;
        "$tree" | "$tree/"*)
            echo "build-gpu-artifacts: $target_name ($target_path) is inside the source tree" \
                "but not under target/: its output would count as sources or travel with the" \
                "tree; use target/ or a directory outside the tree" >&2
            exit 1
            ;;
        esac
    done
done

scripts/install-nvcc.sh

# The pinned toolchain, not whatever nvcc the environment names (PATH included), and no
# silent PTX fallback.
build_env=(env -u NVCC -u CUDA_HOME -u CUDA_PATH KVHYGIENE_KERNEL_TOOLCHAIN=pinned
    KVHYGIENE_REQUIRE_KERNEL_BUILD=1)

# Path of the file cargo built for target $1 (from its JSON messages on stdin): its executable
# with "exe", else its file ending in $2 (".so": a cdylib). Cargo's own word, since where it
# writes depends on settings this script does not read (a build target triple puts the
# profile directory under TARGET_DIR/<triple>/). Nothing printed when it built none.
built() {
    python3 -c '
import json, sys
want, suffix = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or m["target"]["name"] != want:
        continue
    if suffix == "exe":
        if m.get("executable"):
            print(m["executable"])
    else:
        print(next((f for f in m.get("filenames", []) if f.endswith(suffix)), ""))
' "$1" "$2"
}

# The path `built` printed, or the script stops naming what cargo did not say it built.
one_built() {
    local path
    path="$(built "$1" "$2" | tail -n1)"
    if [[ -z "$path" || ! -f "$path" ]]; then
        echo "build-gpu-artifacts: cargo did not report building $1 ($2)" >&2
        exit 1
    fi
    printf '%s\n' "$path"
}

# Built in a directory of cargo's (never read by gpu-check.sh), renamed into place only once
# complete and checked: a build that fails or is stopped part way leaves no artifacts for
# gpu-check.sh to run. An older build's go at once, for the same reason.
final="$root/gpu-artifacts"
dest="$target_dir/gpu-artifacts.partial"
rm -rf "$final" "$dest"
mkdir -p "$dest"
# The digests of the sources, taken before the build and compared after it: a tree edited
# while it built would leave binaries of one tree recorded as another's. Cargo.lock is
# brought up to date first (cargo would rewrite a stale one during the build).
"${build_env[@]}" cargo metadata --format-version 1 >/dev/null
before="$(bash scripts/gpu/digest-sources.sh)"
# Cargo renders the compiler's diagnostics on stderr (json-render-diagnostics): only its
# artifact messages reach the captured JSON, and a compile error is shown, not swallowed.
# The shipped library, preload library and CLI are copied as soon as they are built: the test
# and bench builds below may build the library again (with the features of the
# dev-dependencies) over the same paths.
messages="$("${build_env[@]}" cargo build --release -p kvhygiene --lib --bin kvh \
    --message-format=json-render-diagnostics)"
lib="$(one_built kvhygiene .so <<<"$messages")"
cli="$(one_built kvh exe <<<"$messages")"
cp "$lib" "$cli" "$dest/"
# The release directory of this build, whose build-script output names the kernels.
release="$(dirname "$lib")"
messages="$("${build_env[@]}" cargo build --release -p kvhygiene-preload --lib \
    --message-format=json-render-diagnostics)"
preload="$(one_built kvhygiene_preload .so <<<"$messages")"
cp "$preload" "$dest/"
messages="$("${build_env[@]}" cargo test --release --test gpu_kernel --no-run \
    --message-format=json-render-diagnostics)"
test_bin="$(one_built gpu_kernel exe <<<"$messages")"
cp "$test_bin" "$dest/gpu_kernel"
messages="$("${build_env[@]}" cargo bench --bench gpu_scrub --no-run \
    --message-format=json-render-diagnostics)"
bench_bin="$(one_built gpu_scrub exe <<<"$messages")"
cp "$bench_bin" "$dest/gpu_scrub"
strip --strip-unneeded "$dest/libkvhygiene.so" "$dest/libkvhygiene_preload.so" \
    "$dest/gpu_kernel" "$dest/gpu_scrub" "$dest/kvh"

# The newest glibc symbol version any artifact needs: the GPU machine's image (Ubuntu 22.04:
# glibc 2.35) must provide it, which is said here rather than found out on the device.
glibc="$(cd "$dest" && objdump -T libkvhygiene.so libkvhygiene_preload.so gpu_kernel gpu_scrub kvh \
    2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -n1 || true)"
if [[ -n "$glibc" && "$(printf '%s\nGLIBC_2.35\n' "$glibc" | sort -V | tail -n1)" != GLIBC_2.35 ]]; then
    # Removed: gpu-check.sh runs whatever artifacts it finds.
    rm -rf "$dest"
    echo "build-gpu-artifacts: the artifacts need $glibc, newer than Ubuntu 22.04's 2.35; removed" >&2
    exit 1
fi
if [[ -z "$glibc" ]]; then
    echo "build-gpu-artifacts: warning: the glibc the artifacts need is unknown (objdump missing?)" >&2
fi

# The build script's output of this build: the newest of the package's build directories
# (an earlier configuration leaves others beside it).
images="$(ls -t "$release"/build/kvhygiene-*/out/kernel_images.rs | head -n1)"
origin="$(grep -ho 'KERNEL_ORIGIN: &str = "[^"]*"' "$images" | cut -d'"' -f2)"
{
    # Changed or new (untracked) source files: the commit alone does not hold what was built.
    # Only for a tree that is a repository of its own (as digest-sources.sh decides).
    if [[ "$(git rev-parse --show-toplevel 2>/dev/null)" == "$root_real" ]]; then
        mapfile -t digested < <(bash scripts/gpu/digest-sources.sh --paths)
        changed="$(git status --porcelain --untracked-files=all -- "${digested[@]}")"
        echo "commit: $(git rev-parse HEAD)${changed:+ (with uncommitted changes)}"
    else
        echo "commit: none (a tree without git metadata; SOURCES.txt names what was built)"
    fi
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(rustc --version)"
    echo "kernels: ${origin:-unknown}"
    echo "glibc needed: $glibc"
    (cd "$dest" && ls -l libkvhygiene.so libkvhygiene_preload.so gpu_kernel gpu_scrub kvh | awk '{print "size: " $9 " " $5 " bytes"}')
} >"$dest/MANIFEST.txt"
# The digests of the sources the artifacts were built from, as the tree has them now (with
# any uncommitted change): gpu-check.sh checks the tree it runs in against them, so that
# artifacts left from an older build are not taken for this tree's.
bash scripts/gpu/digest-sources.sh >"$dest/SOURCES.txt"
if [[ "$(cat "$dest/SOURCES.txt")" != "$before" ]]; then
    rm -rf "$dest"
    echo "build-gpu-artifacts: the sources changed while they were built; removed (build again)" >&2
    exit 1
fi
echo "sources: $(wc -l <"$dest/SOURCES.txt") files digested in SOURCES.txt" >>"$dest/MANIFEST.txt"
mv "$dest" "$final"
cat "$final/MANIFEST.txt"
du -sh "$final"
