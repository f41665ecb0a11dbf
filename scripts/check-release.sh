#!/usr/bin/env bash
# Checks a distribution written by scripts/build-release.sh, from where it lies (so the
# relocated files are what runs, not the build tree):
#   1. it holds exactly the files `build-release.sh --list-layout` names, plus BUILD-INFO and
#      MANIFEST, and MANIFEST's sha256 sums match every other file;
#   2. BUILD-INFO holds its five lines and names the version bin/kvh is (and, with
#      KVHYGIENE_REQUIRE_KERNEL_BUILD=1, kernels compiled here, not the committed PTX); the
#      preload library defines the CUDA interposers and the C API library does not; no
#      binary carries an RPATH/RUNPATH (nothing points back into the build tree);
#   3. bin/kvh runs the demo on the host backend;
#   4. python/ imports, finds lib/libkvhygiene.so through KVH_LIBRARY and without it, and a
#      malloc/free through that library is scrubbed and verified;
#   5. lib/libkvhygiene_preload.so loads with every symbol bound (LD_BIND_NOW) as an
#      LD_PRELOAD, and answers the C API;
#   6. the shipped C example (share/doc/kvhygiene/examples/c) builds against include/ and
#      lib/ alone and passes on the host backend (skipped, said, without a C compiler).
# Each step runs with a clean environment (no inherited KVH_* or LD_* variables) in an empty
# working directory, so nothing is found through the checkout.
#
# Used by .ci/run and by deploy/Dockerfile's builder stage. Needs python3 (no packages).
# Usage: scripts/check-release.sh OUTDIR
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prog="scripts/check-release.sh"
die() {
    echo "$prog: $*" >&2
    exit 1
}

(($# == 1)) || { echo "usage: $prog OUTDIR" >&2; exit 2; }
[[ -d "$1" ]] || { echo "$prog: OUTDIR '$1' is not a directory" >&2; exit 2; }
# Physical: the Python package reports the resolved path of the library it finds.
dist="$(cd -- "$1" && pwd -P)"
[[ -f "$dist/MANIFEST" ]] || { echo "$prog: '$dist' has no MANIFEST: not a distribution from build-release.sh" >&2; exit 2; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# A minimal environment: PATH for the tools, nothing else inherited.
# No bytecode: the import must not write __pycache__ into the distribution.
clean=(env -i "PATH=$PATH" "HOME=$work" "LANG=C.UTF-8" PYTHONDONTWRITEBYTECODE=1)

echo "check-release: layout"
{ "$root/scripts/build-release.sh" --list-layout; printf '%s\n' BUILD-INFO MANIFEST; } | LC_ALL=C sort >"$work/expected"
(cd "$dist" && find . -type f -printf '%P\n' | LC_ALL=C sort) >"$work/actual"
if ! diff -u "$work/expected" "$work/actual" >"$work/layout.diff"; then
    cat "$work/layout.diff" >&2
    die "$dist does not hold the layout build-release.sh defines (- expected, + found)"
fi
for f in bin/kvh lib/libkvhygiene.so lib/libkvhygiene_preload.so; do
    [[ -x "$dist/$f" ]] || die "$dist/$f is not executable"
done

echo "check-release: MANIFEST"
awk '{print $2}' "$dist/MANIFEST" | LC_ALL=C sort >"$work/listed"
grep -vx MANIFEST "$work/actual" | diff -u - "$work/listed" >&2 || die "MANIFEST does not list every file but itself (- found, + listed)"
(cd "$dist" && sha256sum --check --strict --quiet MANIFEST) || die "MANIFEST sums do not match the files"

echo "check-release: BUILD-INFO"
for key in version commit built kernels "glibc needed"; do
    grep -q "^$key: ." "$dist/BUILD-INFO" || die "BUILD-INFO has no '$key:' line"
done
said="$(sed -n 's/^version: //p' "$dist/BUILD-INFO")"
actual="$(cd "$work" && "${clean[@]}" "$dist/bin/kvh" --version)" || die "bin/kvh --version failed"
[[ "$said" == "$actual" ]] || die "BUILD-INFO says version '$said', but bin/kvh is '$actual'"
if [[ "${KVHYGIENE_REQUIRE_KERNEL_BUILD:-}" == 1 ]] && grep -q '^kernels: committed' "$dist/BUILD-INFO"; then
    die "BUILD-INFO says the kernels are the committed PTX, and KVHYGIENE_REQUIRE_KERNEL_BUILD=1"
fi

if command -v readelf >/dev/null; then
    echo "check-release: the interposers are in the preload library, and only there"
    defined() { readelf --dyn-syms --wide "$1" | awk '$7 != "UND" {print $8}' | sed 's/@.*//' | sort -u; }
    defined "$dist/lib/libkvhygiene_preload.so" >"$work/preload.syms"
    for sym in cudaMalloc cudaMallocPitch cudaMallocAsync cudaFree cudaFreeAsync cudaStreamDestroy cudaDeviceReset cudaThreadExit \
        cudaIpcGetMemHandle cuIpcGetMemHandle cuGetProcAddress cuGetProcAddress_v2 \
        cudaGetDriverEntryPoint cudaGetDriverEntryPoint_ptsz cudaGetDriverEntryPointByVersion \
        cudaGetDriverEntryPointByVersion_ptsz; do
        grep -qx "$sym" "$work/preload.syms" ||
            die "lib/libkvhygiene_preload.so does not define $sym: an LD_PRELOAD of it would interpose nothing"
    done
    if defined "$dist/lib/libkvhygiene.so" | grep -qx 'cudaMalloc\|cudaFree\|cuIpcGetMemHandle\|cuGetProcAddress'; then
        die "lib/libkvhygiene.so defines the CUDA interposers: the two libraries are swapped or mixed"
    fi

    echo "check-release: no RPATH/RUNPATH"
    for f in bin/kvh lib/libkvhygiene.so lib/libkvhygiene_preload.so; do
        if readelf -d "$dist/$f" | grep -E 'RPATH|RUNPATH'; then
            die "$f has an RPATH/RUNPATH: the distribution must not depend on where it was built"
        fi
    done
else
    echo "check-release: readelf not found; RPATH check skipped"
fi

echo "check-release: bin/kvh demo (host backend)"
(cd "$work" && "${clean[@]}" KVH_BACKEND=host "$dist/bin/kvh" demo) >"$work/demo.out" 2>&1 ||
    { cat "$work/demo.out" >&2; die "bin/kvh demo failed"; }
grep -q '^PASS' "$work/demo.out" || { cat "$work/demo.out" >&2; die "bin/kvh demo did not say PASS"; }

echo "check-release: python/ with lib/libkvhygiene.so"
(cd "$work" && "${clean[@]}" KVH_BACKEND=host PYTHONPATH="$dist/python" \
    KVH_LIBRARY="$dist/lib/libkvhygiene.so" DIST="$dist" python3 -c '
import ctypes, os
import kvhygiene
dist = os.environ["DIST"]
assert kvhygiene.__file__.startswith(dist + "/python/"), kvhygiene.__file__
assert kvhygiene.find_library() == dist + "/lib/libkvhygiene.so", kvhygiene.find_library()
lib = kvhygiene.load()
p = lib.kvh_malloc(4096, 0, None)
assert p, "kvh_malloc returned NULL"
ctypes.memset(p, 0xAB, 4096)
lib.kvh_free(p, 4096, 0, None)
kvhygiene.synchronize()
c = kvhygiene.stats()["counters"]
assert c["allocations"] == 1 and c["frees"] == 1, c
assert c["verifications_passed"] == 1 and c["verifications_failed"] == 0, c
print("  kvhygiene", kvhygiene.version(), "from", kvhygiene.find_library())
') >"$work/python.out" 2>&1 || { cat "$work/python.out" >&2; die "the Python package could not use lib/libkvhygiene.so"; }
grep '^  ' "$work/python.out"

echo "check-release: python/ finds lib/libkvhygiene.so without KVH_LIBRARY"
(cd "$work" && "${clean[@]}" PYTHONPATH="$dist/python" DIST="$dist" python3 -c '
import os, kvhygiene
assert kvhygiene.find_library() == os.environ["DIST"] + "/lib/libkvhygiene.so", kvhygiene.find_library()
') || die "the Python package does not find the library of its own distribution"

echo "check-release: lib/libkvhygiene_preload.so as LD_PRELOAD"
# The loader only warns about a preload library it cannot load ("cannot be preloaded ...
# ignored") and runs the program anyway: its message is the failure, not the exit status.
loaded=$(cd "$work" && "${clean[@]}" LD_BIND_NOW=1 LD_PRELOAD="$dist/lib/libkvhygiene_preload.so" /bin/true 2>&1) &&
    ! grep -q "ld.so" <<<"$loaded" ||
    die "lib/libkvhygiene_preload.so does not load as an LD_PRELOAD library: $loaded"
(cd "$work" && "${clean[@]}" KVH_BACKEND=host PRELOAD="$dist/lib/libkvhygiene_preload.so" python3 -c '
import ctypes, os
lib = ctypes.CDLL(os.environ["PRELOAD"])  # RTLD_NOW: every symbol bound at load
lib.kvh_version.restype = ctypes.c_char_p
print("  preload library answers kvh_version:", lib.kvh_version().decode())
') || die "lib/libkvhygiene_preload.so does not answer the C API"

cc_bin="${CC:-cc}"
if command -v "$cc_bin" >/dev/null; then
    echo "check-release: a C engine built against include/ and lib/"
    "$cc_bin" -std=c11 -Wall -Wextra -Werror -I"$dist/include" \
        "$dist/share/doc/kvhygiene/examples/c/paged_kv_engine.c" \
        -L"$dist/lib" -lkvhygiene -o "$work/paged_kv_engine" ||
        die "share/doc/kvhygiene/examples/c/paged_kv_engine.c does not build against include/ and lib/"
    (cd "$work" && "${clean[@]}" KVH_BACKEND=host LD_LIBRARY_PATH="$dist/lib" "$work/paged_kv_engine") \
        >"$work/c.out" 2>&1 || { cat "$work/c.out" >&2; die "the C example failed against lib/libkvhygiene.so"; }
    grep -q '^PASS' "$work/c.out" || { cat "$work/c.out" >&2; die "the C example did not say PASS"; }
else
    echo "check-release: no C compiler ($cc_bin); C example skipped"
fi

echo "check-release: $dist OK"
