#!/usr/bin/env bash
# Writes to stdout the SHA-256 of every source file a build of the GPU artifacts reads, as
# the working tree has them now: committed, changed, or new and not yet added to git (but not
# git-ignored), one `sha256sum` line each, sorted by path, relative to the repository root
# (wherever it is run from). A file deleted from the tree is not built and is left out. In a
# tree without git metadata (a tarball, a container build context), every file under the
# same paths but build outputs (`target/`). build-gpu-artifacts.sh writes it to
# gpu-artifacts/SOURCES.txt; gpu-check.sh checks the tree it runs in against that file.
# With --paths, prints the paths digested instead, one per line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# Everything the library, the interposer, the kvh CLI, the gpu_kernel test binary and the
# gpu_scrub bench compile: the crates' sources and build scripts, the kernels, the C++ shim,
# the header, the two targets with the modules they name by #[path]; the scripts that pin
# the kernel toolchain and drive the build; and the settings cargo reads from the tree (flags,
# environment, profiles, the toolchain), each only when the tree has it.
# (The interposer's own tests, under preload/tests, are built only by its `cargo test`.)
paths=(
    src preload/Cargo.toml preload/src preload/build.rs kernels build build.rs Cargo.toml Cargo.lock
    csrc include
    tests/gpu_kernel.rs tests/backend_common benches/gpu_scrub.rs
    scripts/install-nvcc.sh scripts/build-gpu-artifacts.sh
    .cargo/config.toml .cargo/config rust-toolchain.toml rust-toolchain
)
if [[ "${1:-}" == --paths ]]; then
    printf '%s\n' "${paths[@]}"
    exit 0
fi

list() {
    # Git's list only when this tree is a repository of its own: inside another one (a
    # tarball unpacked in a home directory kept in git), git would list nothing of it.
    if [[ "$(git rev-parse --show-toplevel 2>/dev/null)" == "$(pwd -P)" ]]; then
        git ls-files -z --cached --others --exclude-standard -- "${paths[@]}"
    else
        local present=()
        for p in "${paths[@]}"; do
            if [[ -e "$p" ]]; then present+=("$p"); fi
        done
        if ((${#present[@]})); then
            find "${present[@]}" -path '*/target' -prune -o -type f -print0
        fi
    fi
}

digests="$(
    list |
        LC_ALL=C sort -zu |
        while IFS= read -r -d '' f; do
            if [[ -f "$f" ]]; then printf '%s\0' "$f"; fi
        done |
        xargs -0 --no-run-if-empty sha256sum
)"
if [[ -z "$digests" ]]; then
    echo "digest-sources: no source file found under $(pwd -P)" >&2
    exit 1
fi
printf '%s\n' "$digests"
