"""scripts/gpu/report.py, the GPU check's table, on made-up raw outputs: it runs only on a GPU
machine, where a mistake costs a rerun, so its verdicts are checked here."""

import json
import runpy
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[2] / "scripts" / "gpu" / "report.py"


def estimate(out: Path, *parts: str, median_ns: float) -> None:
    d = out.joinpath("criterion", *parts, "new")
    d.mkdir(parents=True, exist_ok=True)
    (d / "estimates.json").write_text(json.dumps({"median": {"point_estimate": median_ns}}))


def status(out: Path, step: str, rc: int) -> None:
    (out / "status").mkdir(exist_ok=True)
    (out / "status" / f"{step}.rc").write_text(f"{rc}\n")


def py_result(out: Path, name: str, **fields) -> None:
    (out / "py").mkdir(exist_ok=True)
    (out / "py" / f"{name}.json").write_text(json.dumps(fields))
    (out / f"{name}.log").write_text(json.dumps(fields) + "\n")
    status(out, name, 0)


def preload_kvh(**round_changes) -> dict:
    """The probe's output under libkvhygiene_preload.so, as a passing run prints it."""
    clean = {"rc": 0, "secret_seen": 0, "nonzero": 0, "same_address": True}
    return {
        "kvh_loaded": 1,
        "kvh_verifications_passed": 6,
        "kvh_verifications_failed": 0,
        "kvh_ipc_exported_blocks": 1,
        "kvh_released": 1,
        "ipc_export_rc": 0,
        "kvh_ipc_lookup_exported_blocks": 1,
        "kvh_ipc_lookup_released": 1,
        "ipc_lookup_export_rc": 0,
        "proc_address_from_runtime": 2,
        "sync": clean,
        "async": {**clean, **round_changes},
        "ipc": {**clean, "same_address": False},
        "ipc_lookup": {**clean, "same_address": False},
    }


def complete_run(out: Path, batched_ratio: float = 0.85) -> None:
    """Every output a passing gpu-check run leaves behind."""
    (out / "status").mkdir(exist_ok=True)
    (out / "status" / "sources").write_text("same\n")
    (out / "gpu_kernel.log").write_text(
        "test a ... ok\ntest b ... ok\n\ntest result: ok. 2 passed; 0 failed\n"
    )
    status(out, "gpu_kernel", 0)
    (out / "kvh_demo.log").write_text(
        "  new allocations read back   10, with residue: 0\n"
        "  paged KV blocks read back   7, with residue: 0 (3 scrub_blocks calls; blocks retired: 0)\n"
        "PASS: ok\n"
    )
    status(out, "kvh_demo", 0)
    (out / "kvh_preflight.log").write_text(
        "kvh preflight: a process started in this environment (config digest 00)\n"
        "  ok       policy   valid (KVH_CONFIG and KVH_* variables)\n"
        "  ok       backend  cuda: the driver loaded and the kernels loaded on device 0\n"
        "ready: no check failed\n"
    )
    status(out, "kvh_preflight", 0)
    (out / "status" / "llama_rounds").write_text("1\n")
    (out / "status" / "alloc_rounds").write_text("1\n")
    for label in ["256MiB", "1GiB"]:
        estimate(out, "scrub_vs_memset", "memset", label, median_ns=1000)
        estimate(out, "scrub_vs_memset", "scrub_verify", label, median_ns=1050)
    estimate(out, "batched", "memset_256MiB", median_ns=500_000)
    estimate(out, "batched", "scrub_4096x64KiB_per_chunk", median_ns=500_000 / batched_ratio)
    (out / "gpu_scrub.log").write_text("gpu_scrub: default item grid: per_chunk\n")
    status(out, "gpu_scrub", 0)
    for name in ["residue", "residue_threads"]:
        py_result(out, f"{name}_default", secret_seen=8, nonzero=8)
    py_result(out, "residue_kvh", secret_seen=0, nonzero=0, reused_block=True, reused_secret_seen=0, reused_nonzero=0)
    py_result(out, "residue_threads_kvh", secret_seen=0, nonzero=0)
    py_result(
        out,
        "kv_blocks_kvh",
        named_nonzero=0,
        others_changed=0,
        request_blocks=32,
        regions=8,
        call_us_median=150.0,
        gate_nonzero=0,
        claim_same_owner_us_median=12.0,
    )
    status(out, "example_torch", 0)
    (out / "preload_build.log").write_text("built with nvcc\n\tlibcudart.so.13 => /usr/local/cuda/lib64/libcudart.so.13\n")
    status(out, "preload_build", 0)
    threat = {"rc": 0, "secret_seen": 9, "nonzero": 100, "same_address": True}
    py_result(out, "preload_default", kvh_loaded=0, **{"sync": threat, "async": threat})
    py_result(out, "preload_kvh", **preload_kvh())
    py_result(out, "alloc_default_1", us_per_op=4.0)
    py_result(out, "alloc_kvh_1", us_per_op=6.0)
    py_result(out, "llama_default_1", tokens_per_s=1000.0)
    py_result(out, "llama_kvh_1", tokens_per_s=990.0)


def run_report(out: Path, monkeypatch) -> tuple:
    monkeypatch.setattr(sys, "argv", ["report.py", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPORT), run_name="__main__")
    summary = json.loads((out / "results.json").read_text())
    return done.value.code, {r["check"]: r for r in summary["rows"]}, summary


def batched_rows(rows: dict) -> tuple:
    default = [r for c, r in rows.items() if c.startswith("batched") and "(the default)" in c]
    other = [r for c, r in rows.items() if c.startswith("batched") and "not the default" in c]
    assert len(default) == 1 and len(other) == 1, rows.keys()
    return default[0], other[0]


def test_a_complete_passing_run_exits_0(tmp_path, monkeypatch):
    complete_run(tmp_path)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    verdicts = {c: r["verdict"] for c, r in rows.items()}
    default, other = batched_rows(rows)
    assert default["verdict"] == "PASS"
    # The alternative shape was not measured: shown as n/a, not counted against the run.
    assert other["verdict"] == "n/a" and other["measured"].startswith("missing")
    assert verdicts.pop(PLAIN_PROBE) == "yes", "the threat shown is information, not a check"
    assert all(v == "PASS" for c, v in verdicts.items() if "not the default" not in c), verdicts
    assert code == 0


def test_the_batched_target_judges_the_default_shape_only(tmp_path, monkeypatch):
    complete_run(tmp_path, batched_ratio=0.75)
    # The alternative at 0.9 is only shown.
    estimate(tmp_path, "batched", "scrub_4096x64KiB_resident", median_ns=500_000 / 0.9)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    default, other = batched_rows(rows)
    assert default["verdict"] == "FAIL" and "ratio 0.75" in default["measured"]
    assert other["verdict"] == "n/a" and "ratio 0.9" in other["measured"]
    assert code == 1


def test_the_target_follows_the_default_the_bench_reports(tmp_path, monkeypatch):
    complete_run(tmp_path, batched_ratio=0.75)
    estimate(tmp_path, "batched", "scrub_4096x64KiB_resident", median_ns=500_000 / 0.9)
    (tmp_path / "gpu_scrub.log").write_text("gpu_scrub: default item grid: resident\n")
    code, rows, _ = run_report(tmp_path, monkeypatch)
    default, other = batched_rows(rows)
    assert "resident grid" in [c for c, r in rows.items() if r is default][0]
    assert default["verdict"] == "PASS" and other["verdict"] == "n/a"
    assert code == 0


def test_benchmark_notes_are_kept(tmp_path, monkeypatch):
    complete_run(tmp_path)
    (tmp_path / "gpu_scrub.log").write_text(
        "noise\ngpu_scrub: kernel image sm_90 cubin\n"
        "gpu_scrub: timeline of 8 batches of 4096 x 64 KiB, per_chunk (median us): 1, 2, 3, 4\n"
    )
    code, _, summary = run_report(tmp_path, monkeypatch)
    assert summary["bench_notes"] == [
        "kernel image sm_90 cubin",
        "timeline of 8 batches of 4096 x 64 KiB, per_chunk (median us): 1, 2, 3, 4",
    ]
    assert "Benchmark notes" in (tmp_path / "results.md").read_text()
    assert code == 0


def _torch_missing(out: Path) -> None:
    (out / "py" / "residue_kvh.json").unlink()
    (out / "residue_kvh.log").write_text("ModuleNotFoundError: No module named 'torch'\n")
    status(out, "residue_kvh", 1)


def _kernel_tests_killed(out: Path) -> None:
    # Killed by its time limit after two passing tests: no summary line, exit 124.
    (out / "gpu_kernel.log").write_text("test a ... ok\ntest b ... ok\n")
    status(out, "gpu_kernel", 124)


def _crashed_after_writing(out: Path) -> None:
    status(out, "residue_kvh", 139)


def _one_llama_round_of_three(out: Path) -> None:
    (out / "status" / "llama_rounds").write_text("3\n")


def _one_alloc_round_of_three(out: Path) -> None:
    (out / "status" / "alloc_rounds").write_text("3\n")


def _unknown_default_shape(out: Path) -> None:
    (out / "gpu_scrub.log").write_text("gpu_scrub: default item grid: sideways\n")


@pytest.mark.parametrize(
    "spoil, check, says",
    [
        (_torch_missing, "residue, kvhygiene (one thread)", "No module named 'torch'"),
        (_kernel_tests_killed, "kernel correctness", "exit 124"),
        (_crashed_after_writing, "residue, kvhygiene (one thread)", "exited 139"),
        (_one_llama_round_of_three, "Llama", "1 of 3 rounds"),
        (_one_alloc_round_of_three, "torch.empty/del", "1 of 3 rounds"),
        (_unknown_default_shape, "batched 4096 x 64 KiB, default shape 'sideways'", "not measured"),
    ],
    ids=["not-run", "cut-short", "crashed", "rounds", "alloc-rounds", "unknown-shape"],
)
def test_a_check_that_did_not_finish_fails_the_run(tmp_path, monkeypatch, spoil, check, says):
    complete_run(tmp_path)
    spoil(tmp_path)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    row = [r for c, r in rows.items() if c.startswith(check)][0]
    assert row["verdict"] == "MISSING" and says in row["measured"], row
    assert code == 1


@pytest.mark.parametrize(
    "fields, verdict",
    [
        ({"named_nonzero": 3, "others_changed": 0}, "FAIL"),
        ({"named_nonzero": 0, "others_changed": 12}, "FAIL"),
        (None, "MISSING"),
    ],
)
def test_kv_block_scrub_fails_on_residue_overreach_or_absence(tmp_path, monkeypatch, fields, verdict):
    complete_run(tmp_path)
    if fields is None:
        (tmp_path / "py" / "kv_blocks_kvh.json").unlink()
    else:
        base = {"request_blocks": 32, "regions": 8, "call_us_median": 150.0}
        py_result(tmp_path, "kv_blocks_kvh", **base, **fields)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    kv = next(r for c, r in rows.items() if c.startswith("KV cache blocks"))
    assert kv["verdict"] == verdict
    assert code == 1


@pytest.mark.parametrize("gate_nonzero, verdict", [(0, "PASS"), (5, "FAIL"), (None, "MISSING")])
def test_the_eviction_gate_row_fails_on_residue_or_absence(tmp_path, monkeypatch, gate_nonzero, verdict):
    complete_run(tmp_path)
    fields = {"named_nonzero": 0, "others_changed": 0, "request_blocks": 32, "regions": 8, "call_us_median": 150.0}
    if gate_nonzero is not None:
        fields.update(gate_nonzero=gate_nonzero, claim_same_owner_us_median=12.0)
    py_result(tmp_path, "kv_blocks_kvh", **fields)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    gate = next(r for c, r in rows.items() if c.startswith("KV eviction gate"))
    assert gate["verdict"] == verdict, gate
    assert (code == 0) == (verdict == "PASS")


REUSE_ROW = "residue, kvhygiene, same tenant: the freed block handed back after its scrub"


@pytest.mark.parametrize(
    "reuse, verdict",
    [
        ({"reused_block": True, "reused_secret_seen": 0, "reused_nonzero": 0}, "PASS"),
        # Zeros in another block show nothing about the scrub: a block never used reads zero.
        ({"reused_block": False, "reused_secret_seen": 0, "reused_nonzero": 0}, "FAIL"),
        ({"reused_block": True, "reused_secret_seen": 0, "reused_nonzero": 7}, "FAIL"),
        ({"reused_block": True, "reused_secret_seen": 7, "reused_nonzero": 7}, "FAIL"),
        # A residue step of an older script, without the reuse figures: not measured.
        ({}, "MISSING"),
    ],
)
def test_the_reused_block_row_needs_the_same_block_and_zeros(tmp_path, monkeypatch, reuse, verdict):
    complete_run(tmp_path)
    py_result(tmp_path, "residue_kvh", secret_seen=0, nonzero=0, **reuse)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    assert rows[REUSE_ROW]["verdict"] == verdict, rows[REUSE_ROW]
    # The cross-tenant row judges its own figures only.
    assert rows["residue, kvhygiene (one thread)"]["verdict"] == "PASS"
    assert (code == 0) == (verdict == "PASS")


def test_demo_residue_in_paged_blocks_fails_the_run(tmp_path, monkeypatch):
    complete_run(tmp_path)
    (tmp_path / "kvh_demo.log").write_text(
        "  scrub latency (free→clean)  p50 1031 µs, p95 5187 µs, max 5539 µs\n"
        "  new allocations read back   10, with residue: 0\n"
        "  paged KV blocks read back   7, with residue: 2 (3 scrub_blocks calls; blocks retired: 0)\n"
        "PASS: ok\n"
    )
    code, rows, _ = run_report(tmp_path, monkeypatch)
    demo = next(r for c, r in rows.items() if c.startswith("kvh demo"))
    assert demo["verdict"] == "FAIL"
    assert demo["measured"] == "new allocations read back: residue in 0; paged KV blocks read back: residue in 2"
    assert code == 1


KVH_PROBE = "LD_PRELOAD probe under libkvhygiene_preload.so (the freed block reused, read back)"
PLAIN_PROBE = "LD_PRELOAD probe, plain CUDA runtime (cudaMalloc/cudaFree, cudaMallocAsync/cudaFreeAsync)"


@pytest.mark.parametrize(
    "probe",
    [
        preload_kvh(nonzero=12),
        preload_kvh(same_address=False),  # some other fresh memory: the scrub was not shown
        {**preload_kvh(), "kvh_loaded": 0},  # not interposed at all
        {**preload_kvh(), "kvh_verifications_failed": 1},
    ],
)
def test_the_preload_probe_must_show_the_freed_block_clean(tmp_path, monkeypatch, probe):
    complete_run(tmp_path)
    py_result(tmp_path, "preload_kvh", **probe)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    assert rows[KVH_PROBE]["verdict"] == "FAIL"
    assert code == 1


IPC_PROBE = "LD_PRELOAD probe: a block exported with cudaIpcGetMemHandle is released at its free, never reused"


@pytest.mark.parametrize(
    "changes, verdict",
    [
        ({}, "PASS"),
        ({"kvh_released": 0}, "FAIL"),  # pooled, not returned to the driver
        ({"kvh_ipc_exported_blocks": 0}, "FAIL"),  # the export was not seen
        ({"ipc_export_rc": 1}, "FAIL"),  # the runtime refused the export
        ({"ipc": {"rc": 0, "secret_seen": 3, "nonzero": 9, "same_address": True}}, "FAIL"),
        ({"ipc": None}, "MISSING"),  # a probe without the round
    ],
)
def test_the_ipc_round_needs_the_exported_block_released_and_zeros_after(tmp_path, monkeypatch, changes, verdict):
    complete_run(tmp_path)
    probe = {**preload_kvh(), **changes}
    py_result(tmp_path, "preload_kvh", **{k: v for k, v in probe.items() if v is not None})
    code, rows, _ = run_report(tmp_path, monkeypatch)
    assert rows[IPC_PROBE]["verdict"] == verdict, rows[IPC_PROBE]
    assert code == (0 if verdict == "PASS" else 1)


LOOKUP_PROBE = (
    "LD_PRELOAD probe: a block exported through a driver lookup (cudaGetDriverEntryPoint) is released at its free"
)


@pytest.mark.parametrize(
    "changes, verdict",
    [
        ({}, "PASS"),
        ({"proc_address_from_runtime": 0}, "PASS"),  # a fact reported, not judged
        ({"kvh_ipc_lookup_released": 0}, "FAIL"),  # pooled, not returned to the driver
        ({"kvh_ipc_lookup_exported_blocks": 0}, "FAIL"),  # the lookup handed out the driver's own
        ({"ipc_lookup_export_rc": -2}, "FAIL"),  # the lookup found nothing
        ({"ipc_lookup": {"rc": 0, "secret_seen": 3, "nonzero": 9, "same_address": True}}, "FAIL"),
        ({"ipc_lookup": None}, "MISSING"),  # a probe without the round
    ],
)
def test_the_lookup_round_needs_the_exported_block_released_and_zeros_after(tmp_path, monkeypatch, changes, verdict):
    complete_run(tmp_path)
    probe = {**preload_kvh(), **changes}
    py_result(tmp_path, "preload_kvh", **{k: v for k, v in probe.items() if v is not None})
    code, rows, _ = run_report(tmp_path, monkeypatch)
    assert rows[LOOKUP_PROBE]["verdict"] == verdict, rows[LOOKUP_PROBE]
    assert code == (0 if verdict == "PASS" else 1)


def test_a_quiet_plain_runtime_is_information_not_a_failure(tmp_path, monkeypatch):
    complete_run(tmp_path)
    clean = {"rc": 0, "secret_seen": 0, "nonzero": 0, "same_address": False}
    py_result(tmp_path, "preload_default", kvh_loaded=0, **{"sync": clean, "async": clean})
    code, rows, _ = run_report(tmp_path, monkeypatch)
    assert rows[PLAIN_PROBE]["verdict"] == "no"
    assert code == 0, {c: r["verdict"] for c, r in rows.items()}


def test_a_probe_that_did_not_build_or_crashed_is_named(tmp_path, monkeypatch):
    complete_run(tmp_path)
    (tmp_path / "preload_build.log").write_text("preload_probe.cpp:3: error: something\n")
    status(tmp_path, "preload_build", 1)
    (tmp_path / "py" / "preload_kvh.json").unlink()
    status(tmp_path, "preload_kvh", 127)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    assert rows[KVH_PROBE]["verdict"] == "MISSING"
    assert "preload_build exited 1: preload_probe.cpp:3: error" in rows[KVH_PROBE]["measured"]
    # Built, but the probe crashed: the probe step is named, not the build.
    status(tmp_path, "preload_build", 0)
    (tmp_path / "preload_kvh.log").write_text("error while loading shared libraries: libcudart.so.12\n")
    code, rows, _ = run_report(tmp_path, monkeypatch)
    assert "preload_kvh exited 127: error while loading shared libraries" in rows[KVH_PROBE]["measured"]
    assert code == 1


def test_a_probe_left_from_an_earlier_run_never_counts(tmp_path, monkeypatch):
    complete_run(tmp_path)
    # This run's build failed; the probe outputs present are not this run's to count.
    (tmp_path / "preload_build.log").write_text("nvcc: fatal error\n")
    status(tmp_path, "preload_build", 1)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    assert rows[KVH_PROBE]["verdict"] == "MISSING"
    assert "preload_build exited 1" in rows[KVH_PROBE]["measured"]
    assert code == 1


DEMO = "kvh demo on the CUDA backend (every new allocation and paged KV block read back)"


@pytest.mark.parametrize(
    "log, rc",
    [
        # A clean output from a run that did not exit 0.
        ("  new allocations read back   10, with residue: 0\n  paged KV blocks read back   7, with residue: 0\nPASS\n", 1),
        # The paged KV line missing.
        ("  new allocations read back   10, with residue: 0\nPASS\n", 0),
    ],
)
def test_the_demo_row_needs_both_read_back_lines_and_a_clean_exit(tmp_path, monkeypatch, log, rc):
    complete_run(tmp_path)
    (tmp_path / "kvh_demo.log").write_text(log)
    status(tmp_path, "kvh_demo", rc)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    assert rows[DEMO]["verdict"] == "FAIL"
    assert code == 1


def test_an_example_that_fails_fails_the_run(tmp_path, monkeypatch):
    complete_run(tmp_path)
    status(tmp_path, "example_torch", 2)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    assert rows["examples/torch_pluggable.py runs as documented"]["verdict"] == "FAIL"
    assert code == 1


def test_a_failed_preflight_backend_check_fails_its_row(tmp_path, monkeypatch):
    complete_run(tmp_path)
    (tmp_path / "kvh_preflight.log").write_text(
        "  FAIL     backend  CUDA_ERROR_NO_DEVICE\nNOT READY: 1 check(s) failed\n"
    )
    status(tmp_path, "kvh_preflight", 1)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    (row,) = [r for c, r in rows.items() if c.startswith("kvh preflight")]
    assert row["verdict"] == "FAIL" and row["measured"].startswith("FAIL"), row
    assert code != 0


def test_a_bench_that_crashed_after_its_measurements_fails_the_run(tmp_path, monkeypatch):
    # gpu_scrub measured every group, then panicked in a later scrub (its iteration timeline)
    # and exited 101: its figures come from a run that failed, which the run must not pass,
    # as a Python step that crashed after writing its figures does not.
    complete_run(tmp_path)
    (tmp_path / "gpu_scrub.log").write_text(
        "gpu_scrub: kernel image sm_90 cubin\n"
        "thread 'main' panicked at benches/gpu_scrub.rs:60:10:\n"
        "scrub failed: CUDA_ERROR_ILLEGAL_ADDRESS\n"
    )
    status(tmp_path, "gpu_scrub", 101)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    bench_rows = {c: r["verdict"] for c, r in rows.items() if c.startswith(("scrub+verify", "batched"))}
    assert bench_rows and not any(v == "PASS" for v in bench_rows.values()), bench_rows
    assert code == 1
    # What it measured before it failed is still shown (a device session is scarce), marked
    # as not counted.
    (default,) = [r for c, r in rows.items() if c.startswith("batched") and "(the default)" in c]
    assert default["verdict"] == "MISSING", default
    assert default["measured"].startswith("ratio ") and "not counted" in default["measured"], default


@pytest.mark.parametrize(
    "log",
    [
        # The binary ran without --ignored: every GPU test was listed as ignored, none ran.
        "running 2 tests\ntest a ... ignored, needs a CUDA GPU\ntest b ... ignored, needs a CUDA GPU\n\n"
        "test result: ok. 0 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out\n",
        # A binary holding none of the GPU tests (or all filtered out).
        "running 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 10 filtered out\n",
    ],
    ids=["all-ignored", "none-run"],
)
def test_kernel_tests_that_did_not_run_do_not_pass(tmp_path, monkeypatch, log):
    # "kernel correctness: all pass" needs kernel tests that ran; a harness that ran none of
    # them exits 0 with a clean summary line, which is not a check that ran to the end.
    complete_run(tmp_path)
    (tmp_path / "gpu_kernel.log").write_text(log)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    (row,) = [r for c, r in rows.items() if c.startswith("kernel correctness")]
    assert row["verdict"] != "PASS", row
    assert code == 1


def test_the_llama_median_of_an_even_number_of_rounds_is_the_middle_of_the_two(tmp_path, monkeypatch):
    # GPU_CHECK_LLAMA_ROUNDS=2: per-round ratios 0.5 and 0.95. Their median is 0.725, under the
    # 0.9 target; the row must not pass on the better round alone.
    complete_run(tmp_path)
    (tmp_path / "status" / "llama_rounds").write_text("2\n")
    py_result(tmp_path, "llama_default_1", tokens_per_s=1000.0)
    py_result(tmp_path, "llama_kvh_1", tokens_per_s=500.0)
    py_result(tmp_path, "llama_default_2", tokens_per_s=1000.0)
    py_result(tmp_path, "llama_kvh_2", tokens_per_s=950.0)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    (row,) = [r for c, r in rows.items() if c.startswith("Llama")]
    assert row["verdict"] == "FAIL", row
    assert code == 1


@pytest.mark.parametrize(
    "kvh_us, verdict, measured",
    [
        # Per-round ratios 1.5, 2.5 and 1.8: median 1.8, a pass, though one round is over 2x.
        ((6.0, 10.0, 7.2), "PASS", "1.8x (3 of 3 rounds: 6 us vs 4 us, 10 us vs 4 us, 7.2 us vs 4 us)"),
        # 1.5, 2.5 and 2.2: median 2.2, a failure, though one round is under 2x.
        ((6.0, 10.0, 8.8), "FAIL", "2.2x (3 of 3 rounds"),
    ],
    ids=["median-passes", "median-fails"],
)
def test_the_allocator_loop_is_judged_on_the_median_of_its_rounds(tmp_path, monkeypatch, kvh_us, verdict, measured):
    complete_run(tmp_path)
    (tmp_path / "status" / "alloc_rounds").write_text("3\n")
    for n, us in enumerate(kvh_us, start=1):
        py_result(tmp_path, f"alloc_default_{n}", us_per_op=4.0)
        py_result(tmp_path, f"alloc_kvh_{n}", us_per_op=us)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    (row,) = [r for c, r in rows.items() if c.startswith("torch.empty/del")]
    assert row["verdict"] == verdict and row["measured"].startswith(measured), row
    assert code == (0 if verdict == "PASS" else 1)


def test_a_step_that_exited_0_without_its_figures_still_gets_a_report(tmp_path, monkeypatch):
    # residue.py --threads writes its JSON and exits 0 even when the reader thread raised (an
    # exception in a thread does not change the exit status), so the JSON has no secret_seen.
    # The report must still be written, that check MISSING or FAIL, and the run fail: every
    # other row's figures are kept.
    complete_run(tmp_path)
    py_result(tmp_path, "residue_threads_kvh", step="residue_threads", mode="kvh", elements=8 << 20)
    monkeypatch.setattr(sys, "argv", ["report.py", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPORT), run_name="__main__")
    assert (tmp_path / "results.md").is_file() and (tmp_path / "results.json").is_file()
    rows = {r["check"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    row = rows["residue, kvhygiene (two threads, two tenants)"]
    assert row["verdict"] in ("MISSING", "FAIL"), row
    assert done.value.code == 1


def test_kernel_tests_that_were_all_ignored_are_not_reported_as_a_run_cut_short(tmp_path, monkeypatch):
    # A gpu_kernel binary run without --ignored exits 0 with its summary line: it was not cut
    # short (no timeout, no crash), it ran none of the GPU tests. The row says so, rather than
    # that the run "ended without a result", which sends the reader after a timeout or a crash.
    complete_run(tmp_path)
    (tmp_path / "gpu_kernel.log").write_text(
        "running 2 tests\ntest a ... ignored, needs a CUDA GPU\ntest b ... ignored, needs a CUDA GPU\n\n"
        "test result: ok. 0 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out\n"
    )
    code, rows, _ = run_report(tmp_path, monkeypatch)
    (row,) = [r for c, r in rows.items() if c.startswith("kernel correctness")]
    assert row["verdict"] != "PASS" and code == 1, row
    assert "without a result" not in row["measured"], row
    assert "ignored" in row["measured"] or "no test ran" in row["measured"] or "none ran" in row["measured"], row


@pytest.mark.parametrize(
    "step, check",
    [
        ("example_torch", "examples/torch_pluggable.py"),
        ("kvh_demo", "kvh demo"),
        ("kvh_preflight", "kvh preflight"),
    ],
)
def test_a_step_skipped_for_time_is_missing_not_failed(tmp_path, monkeypatch, step, check):
    # docs/gpu-results.md: a check with no figure (a step that crashed, exited non-zero or
    # timed out) is MISSING; FAIL is for a check that ran and missed its target. A step
    # gpu-check.sh skipped when the budget ran out (its log says so, exit 124) never ran.
    complete_run(tmp_path)
    (tmp_path / f"{step}.log").write_text("skipped: out of time\n")
    status(tmp_path, step, 124)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    (row,) = [r for c, r in rows.items() if c.startswith(check)]
    assert row["verdict"] == "MISSING", row
    assert code == 1


def test_a_failed_kernel_test_is_counted_when_a_library_line_splits_its_result(tmp_path, monkeypatch):
    # The library writes its own lines straight to file descriptor 2 (kvhygiene::stderr_line),
    # which the test harness does not capture: in the step's log (stdout and stderr together)
    # such a line lands between "test NAME ... " and the test's result. The harness's summary
    # line still says how many failed; the row must say that tests failed, not that the run
    # was cut short.
    complete_run(tmp_path)
    (tmp_path / "gpu_kernel.log").write_text(
        "running 2 tests\n"
        "test a ... ok\n"
        "test b ... kvhygiene: a flusher pass panicked; the flusher goes on (said once)\n"
        "FAILED\n\nfailures:\n\n---- b stdout ----\nassertion failed\n\nfailures:\n    b\n\n"
        "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n"
    )
    status(tmp_path, "gpu_kernel", 101)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    (row,) = [r for c, r in rows.items() if c.startswith("kernel correctness")]
    assert row["verdict"] == "FAIL" and "1 failed" in row["measured"], row
    assert code == 1


@pytest.mark.parametrize(
    "sources, verdict",
    [
        ("src/alloc/mod.rs: FAILED\nsha256sum: WARNING: 1 computed checksum did NOT match\n", "FAIL"),
        ("no SOURCES.txt (artifacts from an older build script)\n", "MISSING"),
        (None, "MISSING"),
    ],
)
def test_artifacts_built_from_other_sources_fail_the_run(tmp_path, monkeypatch, sources, verdict):
    # Figures from artifacts of an older build describe other code than the tree's: the run
    # fails whatever the other rows say.
    complete_run(tmp_path)
    if sources is None:
        (tmp_path / "status" / "sources").unlink()
    else:
        (tmp_path / "status" / "sources").write_text(sources)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    (row,) = [r for c, r in rows.items() if c.startswith("artifacts built from")]
    assert row["verdict"] == verdict, row
    assert code == 1


def test_artifacts_built_from_the_trees_sources_pass_that_row(tmp_path, monkeypatch):
    complete_run(tmp_path)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    (row,) = [r for c, r in rows.items() if c.startswith("artifacts built from")]
    assert row["verdict"] == "PASS", row


def test_kernel_tests_listed_as_ignored_with_their_reason_are_counted(tmp_path, monkeypatch):
    # libtest writes an ignored test with its #[ignore = "..."] reason ("test a ... ignored,
    # needs a CUDA GPU"), as every test in tests/gpu_kernel.rs is: a binary run without
    # --ignored lists each of them so, and the row counts them.
    complete_run(tmp_path)
    (tmp_path / "gpu_kernel.log").write_text(
        "\nrunning 3 tests\n"
        "test a ... ignored, needs a CUDA GPU\n"
        "test b ... ignored, needs a CUDA GPU\n"
        "test c ... ignored, needs a CUDA GPU\n\n"
        "test result: ok. 0 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.00s\n\n"
    )
    code, rows, _ = run_report(tmp_path, monkeypatch)
    (row,) = [r for c, r in rows.items() if c.startswith("kernel correctness")]
    assert "3 ignored" in row["measured"], row
    assert code == 1


def test_a_failed_kernel_test_is_counted_when_a_split_result_is_followed_by_a_timeout(tmp_path, monkeypatch):
    # A library line between "test NAME ... " and its result, then a later test that hung and
    # was killed by the step's time limit (exit 124, no summary line). The failure written
    # before the kill is a result: the row says that a test failed and fails, rather than
    # reporting only the tests that passed and a run cut short.
    complete_run(tmp_path)
    (tmp_path / "gpu_kernel.log").write_text(
        "running 3 tests\n"
        "test a ... ok\n"
        "test b ... kvhygiene: a flusher pass panicked; the flusher goes on (said once)\n"
        "FAILED\n"
        "test c ... "
    )
    status(tmp_path, "gpu_kernel", 124)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    (row,) = [r for c, r in rows.items() if c.startswith("kernel correctness")]
    assert "1 failed" in row["measured"] and row["verdict"] == "FAIL", row
    assert code == 1


def test_a_harness_that_reported_failed_is_not_described_as_ending_without_a_result(tmp_path, monkeypatch):
    # The harness printed its summary line with "FAILED" (exit 101) though it counted no
    # test as failed (a panic in the harness itself). That is a result, a failed one: the row
    # fails and does not say that the run ended without a result.
    complete_run(tmp_path)
    (tmp_path / "gpu_kernel.log").write_text(
        "running 2 tests\n"
        "thread 'main' panicked at library/test/src/lib.rs:1:1:\nharness error\n\n"
        "test result: FAILED. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s\n"
    )
    status(tmp_path, "gpu_kernel", 101)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    (row,) = [r for c, r in rows.items() if c.startswith("kernel correctness")]
    assert "without a result" not in row["measured"], row
    assert row["verdict"] == "FAIL", row
    assert code == 1


def test_a_demo_without_a_recorded_exit_status_is_missing(tmp_path, monkeypatch):
    # gpu-check.sh records every step's exit status as it ends; a demo log without one is from
    # a step that never finished. As the example row does for a step with no exit status, the
    # demo row has no figure (MISSING), rather than a FAIL whose measured text names no reason.
    complete_run(tmp_path)
    (tmp_path / "status" / "kvh_demo.rc").unlink()
    code, rows, _ = run_report(tmp_path, monkeypatch)
    assert rows[DEMO]["verdict"] == "MISSING", rows[DEMO]
    assert code == 1


def test_a_demo_that_read_back_residue_fails_even_without_a_recorded_exit_status(tmp_path, monkeypatch):
    # docs/gpu-results.md: FAIL is for a check that ran and missed its target; MISSING is for
    # one with no figure. A demo whose log already says it read back memory with residue has a
    # figure, a failing one, whether or not its exit status was recorded (as with exit 124).
    complete_run(tmp_path)
    (tmp_path / "kvh_demo.log").write_text(
        "  new allocations read back   10, with residue: 4\n"
        "  paged KV blocks read back   7, with residue: 0 (3 scrub_blocks calls; blocks retired: 0)\n"
    )
    (tmp_path / "status" / "kvh_demo.rc").unlink()
    code, rows, _ = run_report(tmp_path, monkeypatch)
    assert rows[DEMO]["verdict"] == "FAIL", rows[DEMO]
    assert code == 1


def test_a_demo_row_without_a_recorded_exit_status_does_not_say_exited_none(tmp_path, monkeypatch):
    # A demo step with no recorded exit status (it never finished) is MISSING; the row's
    # measured text says so in words, never "exited None".
    complete_run(tmp_path)
    (tmp_path / "status" / "kvh_demo.rc").unlink()
    code, rows, _ = run_report(tmp_path, monkeypatch)
    assert rows[DEMO]["verdict"] == "MISSING", rows[DEMO]
    assert "None" not in rows[DEMO]["measured"], rows[DEMO]
    assert code == 1
