#!/usr/bin/env bash
# Writes to stdout the SHA-256 of every source file a build of the GPU artifacts reads, as
# the working tree has them now: committed, changed, or new and not yet added to git (but not
# git-ignored), one `sha256sum` line each, sorted by path. A file deleted from the tree is not
# built and is left out. Run from the repository root (build-gpu-artifacts.sh writes it to
# gpu-artifacts/SOURCES.txt; gpu-check.sh checks the tree it runs in against that file).
set -euo pipefail

# Everything the library, the interposer, the kvh CLI, the gpu_kernel test binary and the
# gpu_scrub bench compile: the crates' sources and build scripts, the kernels, the C++ shim,
# the header, and the two targets with the modules they name by #[path].
paths=(
    src preload kernels build build.rs Cargo.toml Cargo.lock csrc include
    tests/gpu_kernel.rs tests/backend_common benches/gpu_scrub.rs
)
git ls-files -z --cached --others --exclude-standard -- "${paths[@]}" |
    sort -zu |
    while IFS= read -r -d '' f; do
        if [[ -f "$f" ]]; then printf '%s\0' "$f"; fi
    done |
    xargs -0 --no-run-if-empty sha256sum
