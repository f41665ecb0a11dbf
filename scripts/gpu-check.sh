#!/usr/bin/env bash
# The real-GPU checks of kvhygiene, run from prebuilt artifacts on a machine with a GPU, PyTorch
# and transformers but no Rust toolchain. One call of about 4 minutes, every step time-boxed.
#
# Layout (scripts/build-gpu-artifacts.sh fills gpu-artifacts/ on a build machine):
#   gpu-artifacts/libkvhygiene.so   the library PyTorch loads (release, kernels embedded)
#   gpu-artifacts/libkvhygiene_preload.so   the LD_PRELOAD interposers for C++ engines
#   gpu-artifacts/gpu_kernel        tests/gpu_kernel.rs, the #[ignore]d GPU tests
#   gpu-artifacts/gpu_scrub         benches/gpu_scrub.rs, the criterion benches
#   gpu-artifacts/kvh               the CLI (kvh demo runs on the CUDA backend)
#   gpu-artifacts/MANIFEST.txt      commit, build date, kernel origin, sizes
#   scripts/gpu/*.py                the Python steps (tracked in git)
#
# Usage, from the repository root:   bash scripts/gpu-check.sh
# On a device call that hands back only a few top-level files of $OUT, run it as
# docs/gpu-results.md shows (OUT elsewhere, GPU_CHECK_COPY_TO=$OUT, its log into $OUT): this
# script writes dozens of files, criterion's folders among them.
# Output: $OUT (or ./gpu-check-out): results.md (table) and results.json (summary), written
# again after every step (and on SIGTERM) and copied to $GPU_CHECK_COPY_TO when set; raw logs,
# criterion/ estimates, py/*.json. Exit status 0 when every check ran to the end and passed
# (scripts/gpu/report.py); an earlier run's outputs in $OUT are removed first, so nothing stale
# can pass for this run's, and a directory this script did not write is refused.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
art="$root/gpu-artifacts"
out="${OUT:-$root/gpu-check-out}"
# An earlier run's copies go first, before anything can end this run: a run that cannot
# start must not leave them to be read as its results.
if [[ -n "${GPU_CHECK_COPY_TO:-}" ]]; then
    if ! mkdir -p "$GPU_CHECK_COPY_TO"; then
        echo "gpu-check: GPU_CHECK_COPY_TO=$GPU_CHECK_COPY_TO cannot be created" >&2
        exit 2
    fi
    rm -f "$GPU_CHECK_COPY_TO/results.md" "$GPU_CHECK_COPY_TO/results.json"
fi
# This script's outputs carry a marker file; only a directory with it (or an empty or new
# one) is written to, so a mistaken OUT never loses anyone else's files.
marker="$out/.gpu-check-out"
if [[ -d "$out" && ! -f "$marker" && -n "$(ls -A "$out" 2>/dev/null)" ]]; then
    echo "gpu-check: $out is neither empty nor an earlier gpu-check output; set OUT to a new directory" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
# The whole run must end inside one device call, with room left in a session's device time
# (machine start included) for a second try: every step's limit is capped by what is left of
# this budget (seconds), keeping time for the report. Full runs have taken 217-257 s.
budget="${GPU_CHECK_BUDGET_S:-370}"
deadline=$(( $(date +%s) + budget ))

log() { printf '\n=== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

# The report of what has run so far: written after every step, and when the run is stopped
# (the device call's own limit sends SIGTERM), so that a run cut short still leaves the
# results of the steps that finished. With GPU_CHECK_COPY_TO, results.md and results.json are
# copied there too each time (a directory the caller gets back whatever happens later).
# A report that fails (a traceback, not a verdict: report.py writes nothing to stderr
# otherwise) is said on stderr, where the device call's output shows it.
report() {
    python3 scripts/gpu/report.py "$out" >/dev/null 2>"$out/report.err"
    local rc=$?
    if [[ -s "$out/report.err" ]]; then
        echo "gpu-check: the report failed (rc $rc); results.md may be an earlier step's:" >&2
        tail -n 5 "$out/report.err" >&2
    fi
    copy_results
    return $rc
}

# Copies results.md and results.json to GPU_CHECK_COPY_TO, when set; a copy the report did not
# write this time is removed rather than left from before.
copy_results() {
    [[ -n "${GPU_CHECK_COPY_TO:-}" ]] || return 0
    local f
    for f in results.md results.json; do
        if [[ -f "$out/$f" ]]; then
            cp "$out/$f" "$GPU_CHECK_COPY_TO/" ||
                echo "gpu-check: $f not copied to $GPU_CHECK_COPY_TO" >&2
        else
            rm -f "$GPU_CHECK_COPY_TO/$f"
        fi
    done
}

# Stopped from outside (the device call's limit sends SIGTERM): the running step is stopped,
# and the report of the steps that finished written. Steps run in the background and are
# waited for, because bash runs a trap only once the foreground command returns.
step_pid=""
on_stop() {
    if [[ -n "$step_pid" ]]; then
        kill -TERM "$step_pid" 2>/dev/null
        wait "$step_pid" 2>/dev/null
    fi
    report
    exit "$1"
}

# step NAME SECONDS CMD...: runs a step with a time limit, output to $out/NAME.log, status kept.
step() {
    local name="$1" limit="$2"
    shift 2
    log "$name"
    local left=$(( deadline - $(date +%s) - 20 ))
    if (( left < 15 )); then
        echo "skipped: out of time" | tee "$out/$name.log"
        echo 124 >"$out/status/$name.rc"
        return
    fi
    (( limit > left )) && limit=$left
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1 &
    step_pid=$!
    wait "$step_pid"
    local rc=$?
    step_pid=""
    echo "$rc" >"$out/status/$name.rc"
    tail -n 25 "$out/$name.log"
    echo "--- $name: exit $rc"
    report
}

for f in libkvhygiene.so libkvhygiene_preload.so gpu_kernel gpu_scrub kvh; do
    if [[ ! -f "$art/$f" ]]; then
        echo "gpu-check: $art/$f missing; build with scripts/build-gpu-artifacts.sh and carry gpu-artifacts/" >&2
        exit 2
    fi
done
chmod +x "$art/gpu_kernel" "$art/gpu_scrub" "$art/kvh"

# Only now, with the artifacts there, an earlier run's outputs go: nothing stale can pass for
# this run's, and a run that cannot start leaves the previous results alone.
mkdir -p "$out"
touch "$marker"
rm -rf "$out/py" "$out/status" "$out/criterion"
rm -f "$out"/*.log "$out/results.md" "$out/results.json" "$out/manifest.txt" "$out/nvidia-smi.csv" \
    "$out/preload_probe" "$out/report.err"
mkdir -p "$out/py" "$out/status"
echo "${GPU_CHECK_LLAMA_ROUNDS:-3}" >"$out/status/llama_rounds"
echo "${GPU_CHECK_ALLOC_ROUNDS:-3}" >"$out/status/alloc_rounds"
cat "$art/MANIFEST.txt" 2>/dev/null | tee "$out/manifest.txt"
# Built from this tree's sources? The report fails the run when not: the figures would
# describe other code. Checked in the repository root, where SOURCES.txt's paths start.
if [[ ! -f "$art/SOURCES.txt" ]]; then
    echo "no SOURCES.txt (artifacts from an older build script)" >"$out/status/sources"
elif ! command -v sha256sum >/dev/null; then
    echo "not checked: no sha256sum on this machine" >"$out/status/sources"
# Its stdout alone is compared: a warning on stderr (from git, find or sha256sum) says nothing
# about the sources and must not read as other sources.
elif ! now="$(bash scripts/gpu/digest-sources.sh 2>"$out/status/digest.err")"; then
    printf 'not digested here: %s\n' "$(cat "$out/status/digest.err")" | head -n 20 >"$out/status/sources"
elif [[ "$now" == "$(cat "$art/SOURCES.txt")" ]]; then
    echo "same" >"$out/status/sources"
else
    # The tree's sources now against those built: a file changed (sha256sum names it), or
    # one the build did not have, or had and the tree lacks (a cargo setting added later).
    {
        sha256sum --quiet -c "$art/SOURCES.txt" 2>&1 || true
        diff <(cut -c67- "$art/SOURCES.txt") <(cut -c67- <<<"$now") |
            sed -n 's/^> /not in the build: /p; s/^< /not in this tree: /p' || true
    } | head -n 20 >"$out/status/sources"
    if [[ ! -s "$out/status/sources" ]]; then
        echo "the sources differ from those built (SOURCES.txt)" >"$out/status/sources"
    fi
fi
# Artifacts of other sources (or of an older build script) fail the run whatever the steps
# measure: it ends here, with the report naming why, rather than spend the device's time.
case "$(cat "$out/status/sources")" in
same | "not checked"*) ;;
*)
    echo "gpu-check: the artifacts were built from other sources than this tree's, or do not" \
        "say which (rebuild with scripts/build-gpu-artifacts.sh); no GPU step runs:" >&2
    head -n 5 "$out/status/sources" >&2
    report
    echo "gpu-check: results in $out/results.md and $out/results.json"
    exit 1
    ;;
esac
trap 'on_stop 143' TERM
trap 'on_stop 130' INT
# A first report before any step: a run killed outright (SIGKILL at the caller's time limit)
# still leaves one, with the sources row and every step missing.
report || true

log "GPU"
command -v nvidia-smi >/dev/null ||
    echo "gpu-check: nvidia-smi not found; is this a GPU machine? The steps below will say." >&2
# Time-boxed as every step: nvidia-smi hangs on a GPU or driver in a bad state, and a hang here
# would end the device call before any result is written.
# In the background and waited for, as the steps are, so that a SIGTERM is acted on at once.
timeout --kill-after=5 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
    --format=csv >"$out/nvidia-smi.csv" &
step_pid=$!
wait "$step_pid" ||
    echo "gpu-check: nvidia-smi failed or did not answer in 20 s; the steps below will say more" >&2
step_pid=""
cat "$out/nvidia-smi.csv"
date -u +"run at %Y-%m-%dT%H:%M:%SZ" | tee -a "$out/manifest.txt"

# 1. Kernel benchmarks (criterion, short measurement times), estimates under $out/criterion.
#    First: the figures only a GPU can give (the batched scrub's ratio to one memset is an open
#    target), so that a step that hangs later cannot take their time.
CRITERION_HOME="$out/criterion" step gpu_scrub 100 "$art/gpu_scrub" --bench

# 1a. Kernel correctness through the Backend trait (sizes 1 B .. 1 GiB, batches up to 10,000).
step gpu_kernel 180 "$art/gpu_kernel" --ignored --test-threads=1

# 1b. The demo on the real GPU path: every new allocation is copied back and must be zero.
KVH_BACKEND=cuda step kvh_demo 60 "$art/kvh" demo --backend cuda --requests 8
# 1c. kvh preflight's backend check on the real driver: starts the backend, loads the kernels.
KVH_BACKEND=cuda step kvh_preflight 30 "$art/kvh" preflight

# 2. PyTorch: each measurement in its own process (the allocator is chosen per process,
#    before its first CUDA allocation). The library path travels in GPU_CHECK_LIBRARY.
export GPU_CHECK_LIBRARY="$art/libkvhygiene.so"
# Fail closed: the kvhygiene runs must use the GPU, never fall back to host memory.
export KVH_BACKEND=cuda
for mode in default kvh; do
    step "residue_$mode" 60 python3 scripts/gpu/residue.py --mode "$mode" \
        --out "$out/py/residue_$mode.json"
    step "residue_threads_$mode" 60 python3 scripts/gpu/residue.py --mode "$mode" --threads \
        --out "$out/py/residue_threads_$mode.json"
done
# The allocator loop's two sides drift between processes and machines as Llama's do (the
# default allocator's own time per pair differed 1.8x between two machines of one kind):
# rounds alternating default / kvhygiene in fresh processes, the median of their ratios.
for round in $(seq 1 "${GPU_CHECK_ALLOC_ROUNDS:-3}"); do
    for mode in default kvh; do
        step "alloc_${mode}_$round" 60 python3 scripts/gpu/alloc_bench.py --mode "$mode" \
            --out "$out/py/alloc_${mode}_$round.json"
    done
done
# Paged KV cache blocks (vLLM layout) scrubbed through kvhygiene.scrub_blocks.
step kv_blocks_kvh 40 python3 scripts/gpu/kv_blocks.py --mode kvh --out "$out/py/kv_blocks_kvh.json"
# LD_PRELOAD: a C++ "engine" on the CUDA runtime, built here against the shared runtime (so it
# can be interposed; nvcc, or the host compiler and PyTorch's libcudart), run plain (the
# threat) and under libkvhygiene_preload.so (LD_PRELOAD on the probe only, not on the shell
# around it). The limits are tight: these steps run before the Llama rounds, which need time.
step preload_build 45 bash scripts/gpu/build_preload_probe.sh "$out/preload_probe"
step preload_default 20 bash -c '"$0" >"$1"' "$out/preload_probe" "$out/py/preload_default.json"
# The loader splits LD_PRELOAD at spaces and colons, which quoting cannot help: from a path
# holding one, the interposer is preloaded from a copy in a directory whose path has neither.
preload_so="$art/libkvhygiene_preload.so"
preload_copy=""
if [[ "$preload_so" == *[[:space:]:]* ]]; then
    preload_copy="$(mktemp -d /tmp/kvh-preload.XXXXXX)"
    cp "$preload_so" "$preload_copy/"
    preload_so="$preload_copy/libkvhygiene_preload.so"
fi
step preload_kvh 20 bash -c 'LD_PRELOAD="$2" "$0" >"$1"' "$out/preload_probe" \
    "$out/py/preload_kvh.json" "$preload_so"
if [[ -n "$preload_copy" ]]; then rm -rf "$preload_copy"; fi
# The PyTorch example as a user runs it (exit 0: no residue, KV blocks scrubbed).
KVH_LIBRARY="$GPU_CHECK_LIBRARY" step example_torch 40 python3 examples/torch_pluggable.py
# The host CPU's speed drifts between processes by more than the effect measured here, so
# Llama runs alternate default / kvhygiene in fresh processes, ROUNDS times; the report takes
# the median of the per-round ratios.
for round in $(seq 1 "${GPU_CHECK_LLAMA_ROUNDS:-3}"); do
    for mode in default kvh; do
        step "llama_${mode}_$round" 60 python3 scripts/gpu/llama_bench.py --mode "$mode" \
            --out "$out/py/llama_${mode}_$round.json"
    done
done

log "report"
trap - TERM INT
python3 scripts/gpu/report.py "$out"
rc=$?
copy_results
echo "gpu-check: results in $out/results.md and $out/results.json"
exit $rc
