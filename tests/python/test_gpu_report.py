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
    d.mkdir(parents=True)
    (d / "estimates.json").write_text(json.dumps({"median": {"point_estimate": median_ns}}))


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


def test_the_batched_target_judges_the_default_shape_only(tmp_path, monkeypatch):
    estimate(tmp_path, "batched", "memset_256MiB", median_ns=500_000)
    # The default shape at 0.75 of the memset fails; the alternative at 0.9 is only shown.
    estimate(tmp_path, "batched", "scrub_4096x64KiB_per_chunk", median_ns=500_000 / 0.75)
    estimate(tmp_path, "batched", "scrub_4096x64KiB_resident", median_ns=500_000 / 0.9)
    code, rows, _ = run_report(tmp_path, monkeypatch)
    default, other = batched_rows(rows)
    assert default["verdict"] == "FAIL" and "ratio 0.75" in default["measured"]
    assert other["verdict"] == "n/a" and "ratio 0.9" in other["measured"]
    assert code == 1


def test_a_met_target_passes_and_missing_figures_are_not_verdicts(tmp_path, monkeypatch):
    estimate(tmp_path, "batched", "memset_256MiB", median_ns=500_000)
    estimate(tmp_path, "batched", "scrub_4096x64KiB_per_chunk", median_ns=500_000 / 0.85)
    (tmp_path / "gpu_scrub.log").write_text(
        "noise\ngpu_scrub: kernel image sm_90 cubin\n"
        "gpu_scrub: timeline of 8 batches of 4096 x 64 KiB, per_chunk (median us): 1, 2, 3, 4\n"
    )
    code, rows, summary = run_report(tmp_path, monkeypatch)
    default, other = batched_rows(rows)
    assert default["verdict"] == "PASS"
    assert other["verdict"] == "n/a" and other["measured"].startswith("missing")
    assert summary["bench_notes"] == [
        "kernel image sm_90 cubin",
        "timeline of 8 batches of 4096 x 64 KiB, per_chunk (median us): 1, 2, 3, 4",
    ]
    assert "Benchmark notes" in (tmp_path / "results.md").read_text()
    # Nothing else ran: no FAIL anywhere, so the report exits 0.
    assert code == 0


def test_the_target_follows_the_default_the_bench_reports(tmp_path, monkeypatch):
    estimate(tmp_path, "batched", "memset_256MiB", median_ns=500_000)
    estimate(tmp_path, "batched", "scrub_4096x64KiB_per_chunk", median_ns=500_000 / 0.75)
    estimate(tmp_path, "batched", "scrub_4096x64KiB_resident", median_ns=500_000 / 0.9)
    (tmp_path / "gpu_scrub.log").write_text("gpu_scrub: default item grid: resident\n")
    code, rows, _ = run_report(tmp_path, monkeypatch)
    default, other = batched_rows(rows)
    assert "resident grid" in [c for c, r in rows.items() if r is default][0]
    assert default["verdict"] == "PASS" and other["verdict"] == "n/a"
    assert code == 0
