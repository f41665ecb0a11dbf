#!/usr/bin/env bash
# Builds scripts/gpu/preload_probe.cpp into OUTPUT, linked against the CUDA runtime as a
# shared library (LD_PRELOAD can only interpose a shared runtime), with the runtime's
# directory in its rpath, and prints which libcudart it will load.
#
# With nvcc (NVCC, PATH or /usr/local/cuda): `nvcc -cudart shared`. When nvcc is missing,
# cannot link a shared runtime (a pip-installed nvcc has no unversioned libcudart.so), or
# builds a probe that does not find its runtime, the host compiler links the versioned
# libcudart.so.N that PyTorch's CUDA wheels installed.
# The probe declares the few runtime functions it calls, so no CUDA header is needed.
#
# Usage: scripts/gpu/build_preload_probe.sh OUTPUT
set -uo pipefail
out="${1:?usage: build_preload_probe.sh OUTPUT}"
src="$(dirname "${BASH_SOURCE[0]}")/preload_probe.cpp"
rm -f "$out"

# Whether the probe at $out finds the shared CUDA runtime it was linked against (ldd says
# "not found" for one its rpath and the loader's paths do not hold).
finds_runtime() {
    local found
    found="$(ldd "$out" 2>/dev/null | grep -i cudart)" || return 1
    ! grep -qi 'not found' <<<"$found"
}

nvcc_bin="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [[ -x "$nvcc_bin" ]]; then
    # The toolkit's root from nvcc's real place (a symlinked nvcc names another directory).
    cuda_root="$(dirname "$(realpath "$nvcc_bin")")/.."
    if "$nvcc_bin" -cudart shared -O1 -o "$out" "$src" -ldl \
        -Xlinker -rpath -Xlinker "$cuda_root/lib64" -Xlinker -rpath -Xlinker "$cuda_root/lib"; then
        if finds_runtime; then
            echo "built with $nvcc_bin"
        else
            echo "the probe nvcc built does not find its CUDA runtime; trying the host compiler" >&2
            rm -f "$out"
        fi
    else
        echo "nvcc could not build the probe; trying the host compiler" >&2
    fi
else
    echo "no nvcc at $nvcc_bin; trying the host compiler" >&2
fi

if [[ ! -x "$out" ]]; then
    # The newest versioned runtime among the Python packages (PyTorch's nvidia-* wheels).
    lib="$(python3 - <<'PY'
import glob, os, re, site
dirs = site.getsitepackages() + [site.getusersitepackages()]
found = [p for d in dirs for p in glob.glob(os.path.join(d, "nvidia", "**", "libcudart.so.*"), recursive=True)]
found = [p for p in found if re.search(r"libcudart\.so\.\d+$", p)]
print(sorted(found, key=lambda p: int(p.rsplit(".", 1)[1]))[-1] if found else "")
PY
)"
    if [[ -z "$lib" ]]; then
        echo "no libcudart.so.N found among the Python packages either" >&2
        exit 1
    fi
    "${CXX:-g++}" -std=c++17 -O1 -o "$out" "$src" -ldl "$lib" -Wl,-rpath,"$(dirname "$lib")" || exit 1
    echo "built with ${CXX:-g++} against $lib"
fi
if ! finds_runtime; then
    ldd "$out" >&2
    echo "the probe does not load a shared CUDA runtime" >&2
    exit 1
fi
ldd "$out" | grep -i cudart
