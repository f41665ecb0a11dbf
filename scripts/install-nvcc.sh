#!/usr/bin/env bash
# Installs the pinned CUDA 12.4 kernel toolchain from PyPI into .tools/cuda (git-ignored).
#
# Why these wheels: PyPI's nvidia-cuda-nvcc-cu12 wheels carry ptxas and libnvvm but not the
# nvcc driver, cicc or fatbinary, so they cannot compile a .cu file on their own. The CUDA 12
# compiler that PyPI does ship whole is NVRTC (nvidia-cuda-nvrtc-cu12): build.rs compiles
# kernels/scrub.cu with it to PTX in-process, then runs this ptxas once per architecture to get
# SASS cubins. The runtime wheel provides cuda.h, from which scripts/gen-cuda-sys.sh generates
# the driver declarations.
#
# Why CUDA 12.x and 12.4 in particular: code built by a CUDA 12.x toolkit runs on every driver
# of the 12.x family onwards (minor-version compatibility for SASS; PTX from 12.4, ISA 8.4, is
# JIT-compiled by drivers >= 550), so the library loads on the R550 / R560 / R570 data-centre
# drivers still widely deployed as well as on R580+ (CUDA 13). A CUDA 13 toolkit would demand
# R580. 12.4 supports every target we build (sm_80, sm_86, sm_89, sm_90).
#
# Usage: scripts/install-nvcc.sh            (idempotent; re-installs when the pins change)
set -euo pipefail

NVRTC_VERSION=12.4.127
PTXAS_VERSION=12.4.131   # nvidia-cuda-nvcc-cu12 (ptxas)
RUNTIME_VERSION=12.4.127 # nvidia-cuda-runtime-cu12 (cuda.h)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.tools/cuda"
stamp="$dest/.pins"
want="nvrtc=$NVRTC_VERSION ptxas=$PTXAS_VERSION runtime=$RUNTIME_VERSION"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "install-nvcc: .tools/cuda already holds $want"
    exit 0
fi

rm -rf "$dest"
mkdir -p "$dest"
python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest/site" \
    "nvidia-cuda-nvrtc-cu12==$NVRTC_VERSION" \
    "nvidia-cuda-nvcc-cu12==$PTXAS_VERSION" \
    "nvidia-cuda-runtime-cu12==$RUNTIME_VERSION"

# A flat, wheel-layout-independent view that build.rs and the scripts rely on.
nv="$dest/site/nvidia"
mkdir -p "$dest/bin" "$dest/lib" "$dest/include"
ln -sfr "$nv/cuda_nvcc/bin/ptxas" "$dest/bin/ptxas"
for f in "$nv"/cuda_nvrtc/lib/libnvrtc*; do ln -sfr "$f" "$dest/lib/$(basename "$f")"; done
ln -sfr "$nv/cuda_runtime/include/cuda.h" "$dest/include/cuda.h"
chmod +x "$nv/cuda_nvcc/bin/ptxas"

"$dest/bin/ptxas" --version | tail -n 1
echo "$want" >"$stamp"
echo "install-nvcc: installed $want into .tools/cuda"
