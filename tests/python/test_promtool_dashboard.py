"""The dashboard's stat panels that total a counter over the dashboard range, evaluated by
promtool (tests/python/test_dashboard.py reads the expressions; this file runs them).

A stat panel counts the events of its range. A process that starts within the range and has
already counted events when it is first scraped (a failed verification in its first scrape
interval) shows its first value at once: `increase()` alone, which starts from each series'
first sample, would show 0 for it. A process that was there before the range shows only its
growth within the range (a failed scrape or a gap of up to a day at the range's start does
not make it new), and a range with no series at all shows no data, not a 0.

A series is new when it has no sample in the day before the range. Its first value is taken
as the larger of its maximum and its minimum plus its increase: both are at most what it
counted, and the maximum keeps the first value of a process that restarted within the range
under the same labels (a `server` container restart without `{pid}`), whose minimum is 0.
Still missed: the first value of a process that replaced another under the same labels while
no scrape succeeded across the range's start.
"""

import re
import subprocess

import pytest
import yaml

from test_dashboard import load, targets
from test_promtool import promtool, run  # noqa: F401  (promtool is a fixture)

# The dashboard's variables, as an evaluation here fixes them.
RANGE = "1h"
VARIABLES = {"$__range": RANGE, "$job": ".*", "$instance": ".*"}
LABELS = 'job="kvh", instance="pod-a:9400"'
# Evaluated at the end of a one-hour range, scraped every minute.
EVAL_AT = "2h"


def counter_stats() -> list:
    """(title, expression with the variables filled in, the counter's series) of every stat
    panel that totals a counter over the range."""
    out = []
    for p, expr in targets(load()):
        if p["type"] != "stat" or "increase(" not in expr:
            continue
        for name, value in VARIABLES.items():
            expr = expr.replace(name, value)
        out.append((p["title"], expr))
    return out


def series_of(expr: str) -> list:
    """The selectors of the counters the expression reads (one series each, with the test's
    target labels and the panel's fixed matchers)."""
    out = []
    for m in re.finditer(r"(kvh_[a-z_]+)\{([^}]*)\}\[", expr):
        fixed = [x for x in m.group(2).split(",") if "=~" not in x]
        labels = ", ".join([LABELS, *fixed])
        sel = f"{m.group(1)}{{{labels}}}"
        if sel not in out:
            out.append(sel)
    return out


def evaluate(promtool: str, tmp_path, expr: str, values: str, expected: list) -> subprocess.CompletedProcess:
    series = [{"series": s, "values": values} for s in series_of(expr)]
    test = {
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [{"expr": expr, "eval_time": EVAL_AT, "exp_samples": expected}],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": [], "tests": [test]}))
    return run(promtool, "test", "rules", str(tmp_path / "tests.yaml"))


def test_the_counter_stats_were_found():
    titles = [t for t, _ in counter_stats()]
    assert len(titles) >= 10, titles
    assert any("Residue" in t or "residue" in t for t in titles), titles


@pytest.mark.parametrize("title,expr", counter_stats(), ids=[t for t, _ in counter_stats()])
def test_a_process_first_scraped_with_events_counts_them(promtool, tmp_path, title, expr):
    # No series for the first 90 minutes; from then on the counter stands at 1 per series.
    per_series = len(series_of(expr))
    r = evaluate(promtool, tmp_path, expr, "_x90 1x30", [{"labels": "{}", "value": per_series}])
    assert r.returncode == 0, f"{title}: {r.stdout}{r.stderr}"


@pytest.mark.parametrize("title,expr", counter_stats(), ids=[t for t, _ in counter_stats()])
def test_events_before_the_range_do_not_count(promtool, tmp_path, title, expr):
    # The counter stood at 3 before the range began and did not move within it.
    r = evaluate(promtool, tmp_path, expr, "3x120", [{"labels": "{}", "value": 0}])
    assert r.returncode == 0, f"{title}: {r.stdout}{r.stderr}"


@pytest.mark.parametrize("title,expr", counter_stats(), ids=[t for t, _ in counter_stats()])
def test_events_within_the_range_count(promtool, tmp_path, title, expr):
    # A process there before the range counts 2 events within it (0 until 90m, then 2).
    threshold = f"({expr}) > bool 1"
    r = evaluate(promtool, tmp_path, threshold, "0x90 2x30", [{"labels": "{}", "value": 1}])
    assert r.returncode == 0, f"{title}: {r.stdout}{r.stderr}"


def test_no_series_shows_no_data(promtool, tmp_path):
    title, expr = counter_stats()[0]
    test = {
        "interval": "1m",
        "input_series": [{"series": 'up{job="other"}', "values": "1x120"}],
        "promql_expr_test": [{"expr": expr, "eval_time": EVAL_AT, "exp_samples": []}],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": [], "tests": [test]}))
    r = run(promtool, "test", "rules", str(tmp_path / "tests.yaml"))
    assert r.returncode == 0, f"{title}: {r.stdout}{r.stderr}"


def test_a_counter_read_by_increase_alone_misses_a_new_process(promtool, tmp_path):
    # What the expressions guard against, shown on the bare increase().
    expr = f'sum(increase(kvh_residue_detected_total{{job=~".*"}}[{RANGE}]))'
    r = evaluate(promtool, tmp_path, expr, "_x90 1x30", [{"labels": "{}", "value": 0}])
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("title,expr", counter_stats(), ids=[t for t, _ in counter_stats()])
def test_a_failed_scrape_at_the_ranges_start_does_not_count_events_before_it(promtool, tmp_path, title, expr):
    # The counter stood at 3 before the range began and did not move within it. The scrape at
    # the range's start failed (Prometheus wrote stale markers; the sidecar answers 503 while
    # a snapshot is stale), and the next one succeeded. The process was there before the
    # range, so the total is its growth within the range: 0, not the 3 it had counted before.
    r = evaluate(promtool, tmp_path, expr, "3x59 stale 3x60", [{"labels": "{}", "value": 0}])
    assert r.returncode == 0, f"{title}: {r.stdout}{r.stderr}"


@pytest.mark.parametrize("title,expr", counter_stats(), ids=[t for t, _ in counter_stats()])
def test_a_scrape_gap_over_the_ranges_start_does_not_count_events_before_it(promtool, tmp_path, title, expr):
    # The counter stood at 3 before the range began and did not move within it; no sample
    # was taken from 55m to 60m (a Prometheus restart, a network partition): the range starts
    # at 60m. The process was there before the range: the total is 0.
    r = evaluate(promtool, tmp_path, expr, "3x54 _x6 3x60", [{"labels": "{}", "value": 0}])
    assert r.returncode == 0, f"{title}: {r.stdout}{r.stderr}"


@pytest.mark.parametrize("title,expr", counter_stats(), ids=[t for t, _ in counter_stats()])
def test_a_new_process_restarted_within_the_range_counts_its_first_value(promtool, tmp_path, title, expr):
    # A pod started within the range: its first scrape (90m) shows 5 events. At 100m its
    # server container restarts (same pod, same labels: the example exports one file without
    # {pid}); the sidecar answers 503 until the new process's first snapshot, which counts 0.
    # The range holds the 5 events of the first process.
    per_series = len(series_of(expr))
    values = "_x90 5x9 stale _x4 0x15"
    r = evaluate(promtool, tmp_path, expr, values, [{"labels": "{}", "value": 5 * per_series}])
    assert r.returncode == 0, f"{title}: {r.stdout}{r.stderr}"
