#!/usr/bin/env bash
# Regenerates kernels/scrub.ptx (the fallback embedded when no CUDA compiler is present) and
# kernels/scrub.resources.txt (ptxas register / spill report per architecture) with the pinned
# toolchain. The compile itself is build.rs's (build/cuda_kernel.rs), so the committed PTX comes
# from exactly the code path and options the library build uses.
#
# Usage: scripts/gen-ptx.sh     (runs scripts/install-nvcc.sh first)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/install-nvcc.sh
# Make sure no system nvcc takes precedence over the pinned toolchain.
env -u NVCC -u CUDA_HOME -u CUDA_PATH KVHYGIENE_KERNEL_EXPORT_DIR="$root/kernels" \
    cargo build --quiet --lib
echo "gen-ptx: wrote kernels/scrub.ptx and kernels/scrub.resources.txt"
grep -E "^## |registers|spill" kernels/scrub.resources.txt
