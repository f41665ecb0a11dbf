#!/usr/bin/env bash
# Prints the median of every criterion benchmark under target/criterion (CARGO_TARGET_DIR's
# criterion/ when it is set; CRITERION_DIR overrides both) and the ratios the issues set
# targets for. Run after `cargo bench --bench host` (and other benches).
set -euo pipefail
dir=${CRITERION_DIR:-${CARGO_TARGET_DIR:-target}/criterion}
if [[ ! -d "$dir" ]]; then
    echo "bench-report: $dir does not exist: run cargo bench first" >&2
    exit 2
fi
python3 - "$dir" <<'PY'
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
med = {}
for est in sorted(root.glob("**/new/estimates.json")):
    name = str(est.parent.parent.relative_to(root))
    med[name] = json.loads(est.read_text())["median"]["point_estimate"]
    print(f"{name:<60} median {med[name] / 1e3:12.3f} us")
def ratio(label, num, den, target, higher_is_better=True):
    if num in med and den in med:
        r = med[den] / med[num] if higher_is_better else med[num] / med[den]
        print(f"{label:<60} {r:8.3f}  (target {target})")
print()
ratio("host scrub+verify throughput / memset throughput", "scrub_64MiB/kvh_scrub_verify", "scrub_64MiB/memset", ">= 0.9")
ratio("KV blocks: memset time / kvh scrub_blocks time", "kv_scrub/scrub_blocks", "kv_scrub/memset", "none; the overhead of checks and verification")
ratio("glibc malloc+memset+free time / kvh pool-hit pair time", "alloc_pair_mixed/kvh_pool_hit/mixed", "alloc_pair_mixed/glibc_malloc_free_memset/mixed", ">= 1.0")
PY
