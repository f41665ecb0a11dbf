#!/usr/bin/env bash
# Fails when kernels/scrub.ptx or kernels/scrub.resources.txt were not generated from the
# current kernels/scrub.cu (the SHA-256 recorded in their headers). The cargo test
# `kernel_artifacts::ptx_is_fresh` checks the same and, when the pinned toolchain is installed,
# also compares the PTX body with a fresh compile.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
want="$(sha256sum "$root/kernels/scrub.cu" | cut -d' ' -f1)"
status=0
for f in kernels/scrub.ptx kernels/scrub.resources.txt; do
    got="$(grep -m1 -o 'kvhygiene-source-sha256: [0-9a-f]*' "$root/$f" | cut -d' ' -f2 || true)"
    if [[ "$got" != "$want" ]]; then
        echo "check-ptx: $f is stale (records ${got:-nothing}, scrub.cu is $want); run scripts/gen-ptx.sh" >&2
        status=1
    fi
done
[[ $status -eq 0 ]] && echo "check-ptx: kernels/scrub.ptx and scrub.resources.txt match scrub.cu"
exit $status
