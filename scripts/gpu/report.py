"""Builds the GPU check's Markdown table and JSON summary from the raw outputs in OUT.

Usage: python3 scripts/gpu/report.py OUT   (writes OUT/results.md and OUT/results.json)
"""

import json
import re
import statistics
import sys
from pathlib import Path


# What the LD_PRELOAD probe's `proc_address_from_runtime` says of the driver's lookup
# (cuGetProcAddress) the runtime's cudaGetDriverEntryPoint handed out.
LOOKUP_SAID = {
    1: "the driver's exported function",
    2: "kvhygiene's interposer",
    0: "another function",
    -1: "not found",
}

def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def bench_note(out: Path) -> str:
    try:
        lines = [l for l in (out / "gpu_scrub.log").read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "gpu_scrub did not run"
    skipped = [l for l in lines if "skipped" in l]
    return (skipped or lines or ["no output"])[-1].strip()[:120]


def bench_lines(out: Path) -> list:
    """The gpu_scrub lines that are not criterion's: kernel image and iteration timelines."""
    try:
        text = (out / "gpu_scrub.log").read_text(errors="replace")
    except OSError:
        return []
    return [l.strip()[len("gpu_scrub: "):] for l in text.splitlines() if l.startswith("gpu_scrub: ")]


def criterion_ns(out: Path, *parts: str):
    est = load_json(out.joinpath("criterion", *parts, "new", "estimates.json"))
    if not est:
        return None
    return est["median"]["point_estimate"]


#: The exit status gpu-check.sh records for a step that timed out or was skipped for time.
TIMED_OUT = 124


def step_rc(out: Path, name: str):
    """The exit status gpu-check.sh recorded for a step (124: timed out), or None."""
    try:
        return int((out / "status" / f"{name}.rc").read_text().strip())
    except (OSError, ValueError):
        return None


def test_results(log: str) -> dict:
    """``{name: "ok" | "FAILED" | "ignored"}`` from libtest's lines: "test NAME ... RESULT",
    RESULT possibly followed by ", REASON" for an ignored test. The library writes its own
    lines to stderr (into the same log) while a test runs, unseen by the harness's capture,
    so a result may come on a later line than its test's name, before the next test's."""
    results, pending = {}, None
    for line in log.splitlines():
        named = re.match(r"^test (\S+) \.\.\. ?(.*)$", line)
        if named:
            pending = named.group(1)
            line = named.group(2)
        if pending is None:
            continue
        # The result alone ("ok", "FAILED", "ignored" or "ignored, REASON"), on the test's
        # line or after a library line that ends with a line break; a library line that
        # merely ends in one of those words is not a result.
        word = re.match(r"^(ok|FAILED)$|^(ignored)(?:, .*)?$", line.strip())
        if word:
            results[pending] = word.group(1) or word.group(2)
            pending = None
    return results


def tests(out: Path) -> dict:
    try:
        log = (out / "gpu_kernel.log").read_text(errors="replace")
    except OSError:
        return {"ran": False, "passed": 0, "failed": 0, "ignored": 0, "complete": False, "rc": None, "cases": {}}
    cases = test_results(log)
    rc = step_rc(out, "gpu_kernel")
    passed = sum(v == "ok" for v in cases.values())
    failed = sum(v == "FAILED" for v in cases.values())
    ignored = sum(v == "ignored" for v in cases.values())
    # The harness's own counts, when its summary line is there; a FAILED summary is a failure
    # even when it counts none (the harness itself panicked).
    summary = re.search(r"^test result: (ok|FAILED)\. (\d+) passed; (\d+) failed; (\d+) ignored", log, re.M)
    harness_failed = False
    if summary:
        harness_failed = summary.group(1) == "FAILED"
        passed = int(summary.group(2))
        failed = max(failed, int(summary.group(3)), int(harness_failed))
        ignored = int(summary.group(4))
    return {
        "ran": True,
        "passed": passed,
        "failed": failed,
        "ignored": ignored,
        # The harness's summary line and a clean exit: a run killed part way (timeout) has
        # neither, whatever the tests before the kill said. And a test that ran: a binary run
        # without --ignored (every GPU test ignored), or one without GPU tests, passes nothing.
        "complete": rc == 0
        and re.search(r"^test result: ok\.", log, re.M) is not None
        and passed > 0,
        "rc": rc,
        "cases": cases,
    }


#: The figures each Python step's JSON must hold: one without them (a step that exited 0
#: after a thread failed, say) is missing, not a crash of the report.
FIGURES = {
    "residue": ("secret_seen", "nonzero"),
    "residue_threads": ("secret_seen", "nonzero"),
    "alloc_default": ("us_per_op",),
    "alloc_kvh": ("us_per_op",),
    "llama_default": ("tokens_per_s",),
    "llama_kvh": ("tokens_per_s",),
    "kv_blocks": ("named_nonzero", "others_changed", "request_blocks", "regions", "call_us_median"),
}


def py(out: Path, name: str):
    """A Python step's result, only if the step exited 0 and its JSON holds the step's
    figures: a crash after the measurement (at interpreter exit, say) is a failure to look
    at, not a figure to report."""
    if step_rc(out, name) != 0:
        return None
    data = load_json(out / "py" / f"{name}.json")
    if not isinstance(data, dict):
        return None
    step = name.rsplit("_", 1)[0]
    if any(k not in data for k in FIGURES.get(step, ())):
        return None
    return data


def failed_step(out: Path, step: str, needs_json: bool = True):
    """'missing (...)' naming how `step` failed (exit status, last log line), or None when it
    exited 0 (and wrote its JSON, if it writes one)."""
    try:
        lines = [l for l in (out / f"{step}.log").read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return f"missing ({step} did not run)"
    rc = step_rc(out, step)
    if rc != 0 or (needs_json and not (out / "py" / f"{step}.json").exists()):
        last = lines[-1].strip()[:120] if lines else "no output"
        how = "did not finish (no exit status recorded)" if rc is None else f"exited {rc}"
        return f"missing ({step} {how}: {last})"
    if needs_json and py(out, step) is None:
        return f"missing ({step} exited 0 without its figures)"
    return None


def why(out: Path, *steps: str) -> str:
    """'missing' plus the exit status and last log line of the first failed step."""
    for step in steps:
        failure = failed_step(out, step)
        if failure:
            return failure
    return "missing"


def default_item_grid(out: Path) -> str:
    """The launch shape the library uses for batches with work items unless told otherwise,
    as benches/gpu_scrub.rs prints it (`ItemGrid::default()`); one block per chunk if absent."""
    try:
        text = (out / "gpu_scrub.log").read_text(errors="replace")
    except OSError:
        return "per_chunk"
    m = re.search(r"^gpu_scrub: default item grid: (\w+)", text, re.M)
    return m.group(1) if m else "per_chunk"


def row(rows, check, measured, target, ok, required=True):
    """One table row. A required check without a figure is MISSING, which fails the run as a
    FAIL does: a check that did not run has not passed. A row that is not required is
    information (`yes` / `no` / `n/a`) and never fails the run."""
    if not required:
        verdict = "n/a" if ok is None else ("yes" if ok else "no")
    elif ok is None:
        verdict = "MISSING"
    else:
        verdict = "PASS" if ok else "FAIL"
    rows.append({"check": check, "measured": measured, "target": target, "verdict": verdict})


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def alternating_rounds(out: Path, kind: str, figure: str):
    """The rounds `{kind}_default_N` / `{kind}_kvh_N` that both finished, as (default, kvh)
    figure pairs; the rounds planned (`status/{kind}_rounds`, else as many as ran); and the
    median of the per-round ratios kvh / default, or None. The median counts only when every
    planned round finished: a verdict on fewer rounds is no verdict."""
    rounds = []
    for n in range(1, 100):
        d, k = py(out, f"{kind}_default_{n}"), py(out, f"{kind}_kvh_{n}")
        if d is None and k is None:
            break
        if d and k:
            rounds.append((d[figure], k[figure]))
    ratios = sorted(kv / dv for dv, kv in rounds if dv)
    median = statistics.median(ratios) if ratios else None
    try:
        planned = int((out / "status" / f"{kind}_rounds").read_text().strip())
    except (OSError, ValueError):
        planned = len(rounds)
    if len(rounds) < planned:
        return rounds, planned, median, False
    return rounds, planned, median, median is not None


def main() -> int:
    out = Path(sys.argv[1])
    rows = []
    try:
        sources = (out / "status" / "sources").read_text().strip()
    except OSError:
        sources = ""
    row(
        rows,
        "artifacts built from this tree's sources (gpu-artifacts/SOURCES.txt)",
        "same" if sources == "same" else (sources.splitlines()[0][:120] if sources else "not checked"),
        "same",
        None if not sources or sources.startswith(("no SOURCES.txt", "not checked")) else sources == "same",
    )
    t = tests(out)
    if not t["ran"]:
        measured, ok = "not run", None
    elif not t["complete"] and t["failed"] == 0 and t["rc"] == 0 and t["passed"] == 0:
        ignored = t["ignored"]
        measured, ok = f"no test ran ({ignored} ignored: the binary was run without --ignored?)", None
    elif not t["complete"] and t["failed"] == 0:
        measured, ok = f"{t['passed']} passed, then the run ended without a result (exit {t['rc']})", None
    else:
        measured, ok = f"{t['passed']} passed, {t['failed']} failed", t["complete"] and t["failed"] == 0
    row(rows, "kernel correctness (tests/gpu_kernel.rs)", measured, "all pass", ok)
    # The bench's figures count only when it exited 0: a bench that failed after criterion
    # wrote its estimates (a scrub that failed in a later step) is no pass, as a Python step
    # that crashed after writing its JSON is not.
    bench_failed = failed_step(out, "gpu_scrub", needs_json=False)

    def bench(*parts):
        return criterion_ns(out, *parts)

    def bench_missing():
        return bench_failed or f"missing ({bench_note(out)})"

    def bench_row(check, memset, scrub, target, passes, required=True):
        """A bench ratio's row. The figures of a bench that failed after criterion wrote
        them are shown, for what they are worth, but count for nothing (MISSING)."""
        r = ratio(memset, scrub)
        if r is None:
            row(rows, check, bench_missing(), target, None, required=required)
            return
        measured = f"ratio {r:.3g} (scrub {scrub / 1e3:.4g} us, memset {memset / 1e3:.4g} us)"
        if bench_failed:
            measured += f"; not counted: the bench then failed, {bench_failed}"
        row(rows, check, measured, target, None if bench_failed or not required else passes(r), required=required)

    for label in ["256MiB", "1GiB"]:
        bench_row(
            f"scrub+verify vs cuMemsetD8Async, {label}",
            bench("scrub_vs_memset", "memset", label),
            bench("scrub_vs_memset", "scrub_verify", label),
            ">= 0.9",
            lambda r: r >= 0.9,
        )
    # Both launch shapes of a batch with work items (ItemGrid in src/backend/cuda/safe.rs); the
    # target applies to the one the library uses by default, the other is a comparison.
    memset = bench("batched", "memset_256MiB")
    default_shape = default_item_grid(out)
    shapes = [("per_chunk", "one block per chunk"), ("resident", "resident grid")]
    if default_shape not in dict(shapes):
        # The target must apply to some row: a shape this report does not know is a gap.
        row(rows, f"batched 4096 x 64 KiB, default shape {default_shape!r}", "not measured", ">= 0.8", None)
    for shape, label in shapes:
        default = shape == default_shape
        bench_row(
            f"batched 4096 x 64 KiB vs one 256 MiB memset, {label}"
            + (" (the default)" if default else " (alternative, not the default)"),
            memset,
            bench("batched", f"scrub_4096x64KiB_{shape}"),
            ">= 0.8" if default else "comparison",
            lambda r: r >= 0.8,
            required=default,
        )
    for name, label in [("residue", "one thread"), ("residue_threads", "two threads, two tenants")]:
        d, k = py(out, f"{name}_default"), py(out, f"{name}_kvh")
        row(
            rows,
            f"residue, default allocator ({label})",
            why(out, f"{name}_default") if not d else f"{d['secret_seen']} secret values seen",
            "> 0 (the threat)",
            None if not d else d["secret_seen"] > 0,
        )
        row(
            rows,
            f"residue, kvhygiene ({label})",
            why(out, f"{name}_kvh") if not k else f"{k['secret_seen']} secret, {k['nonzero']} non-zero",
            "0 and 0",
            None if not k else (k["secret_seen"] == 0 and k["nonzero"] == 0),
        )
    # Another tenant never gets the writer's block, so zeros above could come from a block
    # never used: this row shows the scrub itself, on the block that held the secret.
    k = py(out, "residue_kvh")
    reuse = ("reused_block", "reused_secret_seen", "reused_nonzero")
    if k and not all(f in k for f in reuse):
        k = None
    row(
        rows,
        "residue, kvhygiene, same tenant: the freed block handed back after its scrub",
        (why(out, "residue_kvh") if not py(out, "residue_kvh") else "no reuse figures")
        if not k
        else ("the same block" if k["reused_block"] else "another block (the scrubbed one not reused)")
        + f", {k['reused_secret_seen']} secret, {k['reused_nonzero']} non-zero",
        "the same block, 0 and 0",
        None if not k else (k["reused_block"] is True and k["reused_secret_seen"] == 0 and k["reused_nonzero"] == 0),
    )
    kv = py(out, "kv_blocks_kvh")
    row(
        rows,
        "KV cache blocks, vLLM layout: scrub_blocks zeroes the named blocks only",
        why(out, "kv_blocks_kvh")
        if not kv
        else f"{kv['named_nonzero']} non-zero in named blocks, {kv['others_changed']} changed elsewhere; "
        + f"{kv['request_blocks']} blocks x {kv['regions']} regions per call, median {kv['call_us_median']:.4g} us",
        "0 and 0",
        None if not kv else (kv["named_nonzero"] == 0 and kv["others_changed"] == 0),
    )
    gate = kv if kv and "gate_nonzero" in kv else None
    row(
        rows,
        "KV eviction gate: claim_blocks zeroes blocks another request wrote",
        (why(out, "kv_blocks_kvh") if not kv else "the kv_blocks step predates the gate")
        if not gate
        else f"{gate['gate_nonzero']} non-zero after the new owner's claim; "
        + f"a claim by the owner itself, median {gate['claim_same_owner_us_median']:.4g} us",
        "0",
        None if not gate else gate["gate_nonzero"] == 0,
    )
    d, k = py(out, "preload_default"), py(out, "preload_kvh")

    def probe(r):
        rounds = "; ".join(
            f"{name}: {r[name]['secret_seen']} secret copies, {r[name]['nonzero']} non-zero bytes"
            + (" (same address)" if r[name]["same_address"] else " (another address)")
            for name in ("sync", "async")
        )
        if r.get("kvh_loaded"):
            rounds += f"; kvhygiene verifications passed {r['kvh_verifications_passed']}, failed {r['kvh_verifications_failed']}"
        return rounds

    def probe_missing(step):
        failure = failed_step(out, "preload_build", needs_json=False) or why(out, step)
        raw = load_json(out / "py" / f"{step}.json")
        if isinstance(raw, dict) and all(isinstance(raw.get(n), dict) for n in ("sync", "async")):
            failure += f" (CUDA results: sync {raw['sync'].get('rc')}, async {raw['async'].get('rc')})"
        return failure

    # A probe counts only if this run built it (a failed build must not run an old binary).
    if step_rc(out, "preload_build") != 0:
        d = k = None

    row(
        rows,
        "LD_PRELOAD probe, plain CUDA runtime (cudaMalloc/cudaFree, cudaMallocAsync/cudaFreeAsync)",
        probe_missing("preload_default") if not d else probe(d),
        "> 0 shows the threat",
        None if not d else d["sync"]["secret_seen"] + d["async"]["secret_seen"] > 0,
        required=False,
    )
    # Under the library the freed block itself must come back (the probe waits for its scrub),
    # read zero, and kvhygiene must be the one that served it.
    row(
        rows,
        "LD_PRELOAD probe under libkvhygiene_preload.so (the freed block reused, read back)",
        probe_missing("preload_kvh") if not k else probe(k),
        "interposed, same block, 0 and 0",
        None
        if not k
        else k.get("kvh_loaded") == 1
        and k.get("kvh_verifications_failed") == 0
        and all(
            k[n]["rc"] == 0 and k[n]["same_address"] and k[n]["secret_seen"] == 0 and k[n]["nonzero"] == 0
            for n in ("sync", "async")
        ),
    )
    # Under the library, a block exported with cudaIpcGetMemHandle must go back to the driver
    # at its free (another process may still map it), never to the pool: the export
    # succeeded, kvhygiene counted it and released a block, and the next allocation of the
    # size read zero.
    ipc = k.get("ipc") if k else None
    row(
        rows,
        "LD_PRELOAD probe: a block exported with cudaIpcGetMemHandle is released at its free, never reused",
        probe_missing("preload_kvh")
        if not k
        else "the probe printed no ipc round"
        if not ipc
        else f"export {k.get('ipc_export_rc')}; kvhygiene counted {k.get('kvh_ipc_exported_blocks')} exported, "
        + f"{k.get('kvh_released')} released; the next allocation: {ipc['secret_seen']} secret copies, "
        + f"{ipc['nonzero']} non-zero bytes",
        "export 0, 1 exported, >= 1 released, 0 and 0",
        None
        if not ipc
        else k.get("ipc_export_rc") == 0
        and k.get("kvh_ipc_exported_blocks") == 1
        and (k.get("kvh_released") or 0) >= 1
        and ipc["rc"] == 0
        and ipc["secret_seen"] == 0
        and ipc["nonzero"] == 0,
    )
    # The same through the driver's export called through a pointer from the runtime's lookup
    # (cudaGetDriverEntryPoint), which kvhygiene hands out in place of the driver's. The
    # detail also says whether the driver's own lookup (cuGetProcAddress), taken from the
    # runtime, was the interposer's: not judged, since that depends on the driver handing
    # out its exported function (docs/cuda.md, "IPC").
    lookup = k.get("ipc_lookup") if k else None
    plain = d.get("proc_address_from_runtime") if d else None
    under = k.get("proc_address_from_runtime") if k else None
    row(
        rows,
        "LD_PRELOAD probe: a block exported through a driver lookup (cudaGetDriverEntryPoint) is released at its free",
        probe_missing("preload_kvh")
        if not k
        else "the probe printed no ipc_lookup round"
        if not lookup
        else f"export {k.get('ipc_lookup_export_rc')}; kvhygiene counted {k.get('kvh_ipc_lookup_exported_blocks')} "
        + f"exported, {k.get('kvh_ipc_lookup_released')} released; the next allocation: {lookup['secret_seen']} "
        + f"secret copies, {lookup['nonzero']} non-zero bytes; the driver's lookup from the runtime: "
        + f"{LOOKUP_SAID.get(plain, 'unknown')} (plain), {LOOKUP_SAID.get(under, 'unknown')} (under kvhygiene)",
        "export 0, 1 exported, >= 1 released, 0 and 0",
        None
        if not lookup
        else k.get("ipc_lookup_export_rc") == 0
        and k.get("kvh_ipc_lookup_exported_blocks") == 1
        and (k.get("kvh_ipc_lookup_released") or 0) >= 1
        and lookup["rc"] == 0
        and lookup["secret_seen"] == 0
        and lookup["nonzero"] == 0,
    )
    example_rc = step_rc(out, "example_torch")
    # Its exit status is its figure, but for 124: timed out, or skipped when the budget ran
    # out, so it never finished.
    row(
        rows,
        "examples/torch_pluggable.py runs as documented",
        "not run"
        if example_rc is None
        else failed_step(out, "example_torch", needs_json=False)
        if example_rc == TIMED_OUT
        else f"exit {example_rc}",
        "exit 0",
        None if example_rc in (None, TIMED_OUT) else example_rc == 0,
    )
    rounds, planned, median, complete = alternating_rounds(out, "alloc", "us_per_op")
    row(
        rows,
        "torch.empty/del mixed sizes, kvhygiene / default (median of alternating rounds)",
        why(out, "alloc_default_1", "alloc_kvh_1")
        if median is None
        else f"{median:.3g}x ({len(rounds)} of {planned} rounds: "
        + ", ".join(f"{kv:.3g} us vs {dv:.3g} us" for dv, kv in rounds)
        + ")",
        "<= 2x",
        median <= 2.0 if complete else None,
    )
    rounds, planned, median, complete = alternating_rounds(out, "llama", "tokens_per_s")
    row(
        rows,
        "Llama generate 128 tokens, tokens/s kvhygiene / default (median of alternating rounds)",
        why(out, "llama_default_1", "llama_kvh_1")
        if median is None
        else f"{median:.3g} ({len(rounds)} of {planned} rounds: "
        + ", ".join(f"{kv:.4g}/{dv:.4g}" for dv, kv in rounds)
        + " tok/s)",
        ">= 0.9",
        median >= 0.9 if complete else None,
    )
    try:
        demo = (out / "kvh_demo.log").read_text(errors="replace")
    except OSError:
        demo = None
    # One "with residue: N" per kind of memory the demo reads back (new allocations, paged KV
    # blocks): both must be there, and 0.
    residue = re.findall(r"^[ \t]*(\S.*?)[ \t]{2,}[^\n]*with residue: (\d+)", demo or "", re.M)
    kinds = {what for what, _ in residue}
    both = {"new allocations read back", "paged KV blocks read back"} <= kinds
    demo_rc = step_rc(out, "kvh_demo")
    # A demo that exited non-zero before reading anything back (it crashed, timed out or was
    # skipped for time) has no figure: missing, not failed.
    # A demo whose exit status was not recorded is missing too, unless what it read back
    # already missed the target (residue: a figure, and a failure).
    demo_missing = demo is not None and (
        (not residue and demo_rc != 0) or (demo_rc is None and all(n == "0" for _, n in residue))
    )
    row(
        rows,
        "kvh demo on the CUDA backend (every new allocation and paged KV block read back)",
        "not run"
        if demo is None
        else failed_step(out, "kvh_demo", needs_json=False)
        if demo_missing
        else ("; ".join(f"{what}: residue in {n}" for what, n in residue) if residue else demo.strip().splitlines()[-1][:120] if demo.strip() else "no output")
        + ("" if demo_rc in (0, None) else f" (exit {demo_rc})"),
        "0, PASS",
        None
        if demo is None or demo_missing
        else bool(both and all(n == "0" for _, n in residue) and "PASS" in demo and demo_rc == 0),
    )
    try:
        preflight = (out / "kvh_preflight.log").read_text(errors="replace")
    except OSError:
        preflight = None
    backend = re.search(r"^\s*(\S+)\s+backend\s+(.*)$", preflight or "", re.M)
    preflight_rc = step_rc(out, "kvh_preflight")
    # No backend line from a preflight that exited non-zero: it never got to the check.
    preflight_missing = preflight is not None and backend is None and preflight_rc != 0
    row(
        rows,
        "kvh preflight with KVH_BACKEND=cuda (the backend started, kernels loaded)",
        "not run"
        if preflight is None
        else failed_step(out, "kvh_preflight", needs_json=False)
        if preflight_missing
        else (f"{backend.group(1)}: {backend.group(2)[:100]}" if backend else "no backend line"),
        "ok, exit 0",
        None if preflight is None or preflight_missing else bool(backend and backend.group(1) == "ok" and preflight_rc == 0),
    )
    gpu = ""
    try:
        gpu = (out / "nvidia-smi.csv").read_text().strip()
    except OSError:
        pass
    lines = ["# kvhygiene GPU check", "", "```", gpu, "```", ""]
    lines += ["| check | measured | target | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['check']} | {r['measured']} | {r['target']} | {r['verdict']} |" for r in rows]
    notes = bench_lines(out)
    if notes:
        lines += ["", "Benchmark notes (not targets):", ""] + [f"- {n}" for n in notes]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    summary = {
        "gpu": gpu,
        "rows": rows,
        "bench_notes": notes,
        "tests": t,
        "python": {p.stem: load_json(p) for p in sorted((out / "py").glob("*.json"))},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    return 0 if all(r["verdict"] not in ("FAIL", "MISSING") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
