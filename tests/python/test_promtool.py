"""The exposition and the alerting rules checked by Prometheus's own tool, promtool (Debian's
`prometheus` package; .ci/run installs it and sets KVHYGIENE_REQUIRE_PROMTOOL, so there a missing
promtool fails instead of skipping):

- `promtool check metrics` lints snapshots the library writes (types, names, the histogram
  and summary families);
- `promtool check rules` parses deploy/prometheus/kvhygiene-rules.yaml;
- `promtool test rules` evaluates its alerts on synthetic series: each alert tested here fires
  when it must, and not before or otherwise. The rules are the file's own (expressions,
  `for`, labels), with the annotations left out, since they are text for people and
  promtool compares them word for word.
"""

import copy
import os
import re
import shutil
import subprocess

import pytest
import yaml

from test_alert_rules import RULES, snapshot
from test_c_abi import run_child


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        why = "promtool not installed (apt-get install prometheus)"
        if os.environ.get("KVHYGIENE_REQUIRE_PROMTOOL"):
            pytest.fail(why)
        pytest.skip(why)
    return path


def run(promtool: str, *args: str, stdin: str = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], input=stdin, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# The exposition


def test_snapshots_pass_promtool_check_metrics(promtool, tmp_path):
    for d in ("plain", "logged", "per-process"):
        (tmp_path / d).mkdir()
    plain = snapshot(tmp_path / "plain")
    logged = snapshot(tmp_path / "logged", KVH_LOG_DIR=str(tmp_path / "logged" / "log"))
    per_process = tmp_path / "per-process"
    run_child(
        """
        p = lib.kvh_malloc(4096, 0, STREAM)
        lib.kvh_free(p, 4096, 0, STREAM)
        assert lib.kvh_synchronize() == 0
        lib.kvh_shutdown()
        """,
        KVH_METRICS_FILE=str(per_process / "kvh-{pid}.prom"),
    )
    (pid_file,) = per_process.glob("kvh-*.prom")
    for name, text in [("plain", plain), ("with log", logged), ("per process", pid_file.read_text())]:
        assert "# TYPE kvh_free_to_clean_seconds histogram" in text, name
        r = run(promtool, "check", "metrics", stdin=text)
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), f"{name}: {r.stdout}{r.stderr}"


def test_promtool_check_metrics_catches_a_gauge_with_quantiles(promtool):
    # The lint the summary type answers: a quantile label on a gauge.
    text = "# HELP kvh_x_seconds X.\n# TYPE kvh_x_seconds gauge\nkvh_x_seconds{quantile=\"0.5\"} 1\n"
    r = run(promtool, "check", "metrics", stdin=text)
    assert r.returncode != 0 and "quantile" in r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# The rules


def test_rules_pass_promtool_check_rules(promtool):
    for rules in (RULES, RULES.with_name("kvhygiene-k8s-rules.yaml")):
        r = run(promtool, "check", "rules", str(rules))
        assert r.returncode == 0, r.stdout + r.stderr


def rules_without_annotations(rules: dict) -> dict:
    out = copy.deepcopy(rules)
    for group in out["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return out


def alert(name: str, at: str, *firing: dict) -> dict:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": labels} for labels in firing]}


def series(metric: str, values: str, **labels: str) -> dict:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{inner}}}", "values": values}


def case(*groups: tuple) -> dict:
    """One promtool test group from (input series, alert tests) pairs, series every minute."""
    return {
        "interval": "1m",
        "input_series": [s for ins, _ in groups for s in ins],
        "alert_rule_test": [t for _, tests in groups for t in tests],
    }


def critical(**labels: str) -> dict:
    return {"severity": "critical", **labels}


def warning(**labels: str) -> dict:
    return {"severity": "warning", **labels}


# The labels of one process's series: the scrape's (instance, job) and, for per-process files
# (`{pid}` in KVH_METRICS_FILE, served by `kvh serve-metrics`), its pid.
A11 = {"instance": "a", "job": "kvh", "pid": "11"}
A12 = {"instance": "a", "job": "kvh", "pid": "12"}
A13 = {"instance": "a", "job": "kvh", "pid": "13"}
# One metrics file without `{pid}`: a restarted process writes the same series.
ONE_FILE = {"instance": "b", "job": "kvh"}

# The counter alerts (`increase(x[W]) > N or (x > N unless x offset W)`): the counter, its
# other labels, the window W in minutes, the threshold N and the severity.
COUNTERS = {
    "KvhScrubVerificationFailed": ("kvh_verifications_total", {"result": "failed"}, 5, 0, "critical"),
    "KvhResidueDetected": ("kvh_residue_detected_total", {}, 5, 0, "critical"),
    "KvhRescrubFailed": ("kvh_rescrub_failures_total", {}, 15, 0, "critical"),
    "KvhKvBlockScrubFailed": ("kvh_kv_failed_blocks_total", {}, 5, 0, "critical"),
    "KvhForensicRecordsLost": ("kvh_log_records_lost_total", {}, 5, 0, "critical"),
    "KvhForensicWriteErrors": ("kvh_log_write_errors_total", {}, 5, 0, "warning"),
    "KvhAnomaly": ("kvh_anomalies_total", {"signal": "verify_failed"}, 10, 0, "warning"),
    "KvhEvictionGateScrubbing": ("kvh_kv_gate_owner_changed_blocks_total", {}, 15, 0, "warning"),
    "KvhKvClaimsRefused": ("kvh_kv_claims_refused_total", {}, 15, 0, "warning"),
    "KvhKvScrubsRefused": ("kvh_kv_scrubs_refused_total", {}, 15, 0, "warning"),
    "KvhInvalidFrees": ("kvh_invalid_frees_total", {}, 15, 10, "warning"),
    "KvhOutOfMemory": ("kvh_out_of_memory_total", {}, 5, 0, "warning"),
    "KvhBackendErrors": ("kvh_backend_errors_total", {}, 15, 0, "warning"),
}


def counters(behaviour) -> dict:
    """A group over every counter alert: `behaviour(name, counter, labels, window, threshold,
    expected)` gives its series and alert tests, `labels(process)` its series' labels and
    `expected(process)` the labels of its alert."""
    groups = []
    for name, (metric, own, window, threshold, severity) in COUNTERS.items():
        def counter(values: str, process: dict, metric=metric, own=own) -> dict:
            return series(metric, values, **own, **process)

        def expected(process: dict, own=own, severity=severity) -> dict:
            return {"severity": severity, **own, **process}

        groups.append(behaviour(name, counter, window, threshold, expected))
    return case(*groups)


# Series every minute; `_xN` is N missing samples, `AxN` A then N repeats of it, `A+BxN` a
# ramp of N steps after A, `stale` the marker Prometheus writes when a series is no longer
# exposed (its process's series are no longer served, or the scrape failed).
TESTS = {
    # --- The counter alerts -------------------------------------------------------------------
    # An event (a count above the threshold) fires at once, with the instance, job and pid of
    # the process, for as long as it lies within the window, and no longer.
    "counter: an event fires within its window": counters(
        lambda name, counter, w, n, expected: (
            [counter(f"0x10 {n + 1}x{w + 20}", A11)],  # the event at 11m
            [
                alert(name, "10m"),
                alert(name, "11m", expected(A11)),
                alert(name, f"{10 + w - 1}m", expected(A11)),
                alert(name, f"{12 + w}m"),
            ],
        )
    ),
    # A series first seen above the threshold (a process whose events came before its first
    # scrape) fires, which increase() alone cannot see, until the window has passed.
    "counter: a series first seen above its threshold fires": counters(
        lambda name, counter, w, n, expected: (
            [counter(f"_x10 {n + 1}x{w + 20}", A11)],  # first scraped at 10m
            [
                alert(name, "10m", expected(A11)),
                alert(name, f"{9 + w}m", expected(A11)),
                alert(name, f"{10 + w}m"),
            ],
        )
    ),
    # A healthy process: its counter stays at 0 (at the threshold, for KvhInvalidFrees).
    "counter: a healthy process does not fire": counters(
        lambda name, counter, w, n, expected: (
            [counter(f"{n}x40", A11)],
            [alert(name, "0m"), alert(name, "1m"), alert(name, "10m"), alert(name, "30m")],
        )
    ),
    # One metrics file without `{pid}`: the restarted process writes the same series, its
    # counter back at 0. The reset is no event; the new process's first event is.
    "counter: a restart's reset to 0 does not fire, the new process's event does": counters(
        lambda name, counter, w, n, expected: (
            # The old process's event at 6m, the restart at 32m, the new event at 48m.
            [counter(f"0x5 {n + 1}x25 0x15 {n + 1}x20", ONE_FILE)],
            [
                alert(name, "6m", expected(ONE_FILE)),
                alert(name, "32m"),
                alert(name, "40m"),
                alert(name, "47m"),
                alert(name, "48m", expected(ONE_FILE)),
            ],
        )
    ),
    # A tensor-parallel engine: per-process series with a `pid`. Process 11 had an event, then
    # exited; `kvh serve-metrics` no longer serves its series (stale). Process 13, which took
    # its place, is first seen at 0, and process 12 runs on, healthy: nothing fires again.
    "counter: a process that exits and its successor do not fire again": counters(
        lambda name, counter, w, n, expected: (
            [
                counter(f"0x1 {n + 1}x17 stale", A11),  # the event at 2m, exits at 20m
                counter("0x60", A12),
                counter("_x21 0x40", A13),  # from 21m
            ],
            [
                alert(name, "2m", expected(A11)),
                alert(name, "22m"),
                alert(name, "30m"),
                alert(name, "50m"),
            ],
        )
    ),
    # A count seen before a gap in the scrapes (the target down for half an hour, its series
    # stale meanwhile, or Prometheus itself down) is no event when the scrapes resume with the
    # same count: nothing fires. The series was seen before, so it is not first seen.
    "counter: a count seen before a scrape gap does not fire again": counters(
        lambda name, counter, w, n, expected: (
            # The event at 6m; scrapes fail from 17m to 46m; the same count from 47m.
            [counter(f"0x5 {n + 1}x10 stale _x29 {n + 1}x20", A11)],
            [
                alert(name, "6m", expected(A11)),
                alert(name, "47m"),
                alert(name, "50m"),
            ],
        )
    ),
    # More than 10 invalid frees in 15 minutes; 7.5 is not.
    "invalid frees: more than 10 in 15 minutes": case((
        [
            series("kvh_invalid_frees_total", "0+1x30", instance="noisy", job="kvh"),
            series("kvh_invalid_frees_total", "0+0.5x30", instance="quiet", job="kvh"),
        ],
        [alert("KvhInvalidFrees", "20m", warning(instance="noisy", job="kvh"))],
    )),
    # A counter that grows fires; so does one first seen above zero (a process whose
    # scrubs failed before its first scrape), which increase() alone cannot see; neither
    # fires once the failures are older than the window.
    "verification failures: new and first seen above zero": case((
        [
            series("kvh_verifications_total", "0x10 1x20", result="failed", instance="a", job="kvh"),
            series("kvh_verifications_total", "_x5 2x20", result="failed", instance="b", job="kvh"),  # from 5m
        ],
        [
            alert("KvhScrubVerificationFailed", "4m"),
            alert("KvhScrubVerificationFailed", "7m", critical(result="failed", instance="b", job="kvh")),
            alert("KvhScrubVerificationFailed", "12m", critical(result="failed", instance="a", job="kvh")),
            alert("KvhScrubVerificationFailed", "25m"),
        ],
    )),
    # --- Gauges -------------------------------------------------------------------------------
    # A backend error is sticky for the life of the process: it fires at once, with the pid;
    # a healthy process does not; the restarted process (gauge back to 0) clears it.
    "backend error: fires at once, cleared by a restart": case((
        [
            series("kvh_async_error", "0x5 1x10 0x20", **ONE_FILE),  # error at 6m, restart at 17m
            series("kvh_async_error", "0x5 1x30", **A11),
            series("kvh_async_error", "0x35", **A12),
        ],
        [
            alert("KvhBackendError", "5m"),
            alert("KvhBackendError", "6m", critical(**ONE_FILE), critical(**A11)),
            alert("KvhBackendError", "17m", critical(**A11)),
        ],
    )),
    # No forensic log for 10 minutes fires; a process with its log does not, and a restart
    # with the log on clears it.
    "log off: after 10 minutes, cleared by a restart with the log": case((
        [
            series("kvh_log_enabled", "0x30", instance="a", job="kvh"),
            series("kvh_log_enabled", "1x30", **A11),
            series("kvh_log_enabled", "0x15 1x15", **ONE_FILE),  # restarted with a log at 16m
        ],
        [
            alert("KvhForensicLogOff", "5m"),
            alert("KvhForensicLogOff", "15m", warning(instance="a", job="kvh"), warning(**ONE_FILE)),
            alert("KvhForensicLogOff", "16m", warning(instance="a", job="kvh")),
        ],
    )),
    # The log's volume: under 256 MiB left fires after 30 minutes; 10 GiB left that shrinks by
    # 10 MB a minute (full in about 17 hours) fires too; 10 GiB left that holds steady does
    # not, nor a low figure of a process whose snapshots stopped (its series is not judged).
    "log volume filling: low, or full within a day": case((
        [
            series("kvh_log_free_bytes", "200000000x60", **A11),
            series("kvh_snapshot_timestamp_seconds", "0+60x60", **A11),
            series("kvh_log_free_bytes", "10737418240-10000000x60", **A12),
            series("kvh_snapshot_timestamp_seconds", "0+60x60", **A12),
            series("kvh_log_free_bytes", "10737418240x60", **A13),
            series("kvh_snapshot_timestamp_seconds", "0+60x60", **A13),
            series("kvh_log_free_bytes", "200000000x60", instance="c", job="kvh"),
            series("kvh_snapshot_timestamp_seconds", "0x60", instance="c", job="kvh"),
        ],
        [
            alert("KvhForensicLogVolumeFilling", "20m"),
            alert("KvhForensicLogVolumeFilling", "40m", warning(**A11), warning(**A12)),
        ],
    )),
    # The anomaly detector off for 10 minutes fires, with the pid; on, nothing.
    "anomaly detector off: after 10 minutes": case((
        [
            series("kvh_anomaly_enabled", "0x30", **A11),
            series("kvh_anomaly_enabled", "1x30", **A12),
        ],
        [
            alert("KvhAnomalyDetectorOff", "9m"),
            alert("KvhAnomalyDetectorOff", "11m", warning(**A11)),
        ],
    )),
    # The gate scrubbing a new cache's blocks at start (their owner unknown) is not the engine's
    # skipped scrub: only blocks that changed owner fire, with the pid of their process.
    "eviction gate: a new cache's first claims do not fire": case((
        [
            series("kvh_kv_gate_scrubbed_blocks_total", "0 64x30", **A11),
            series("kvh_kv_gate_owner_changed_blocks_total", "0x30", **A11),
            series("kvh_kv_gate_scrubbed_blocks_total", "0 64x10 65x20", **A12),
            series("kvh_kv_gate_owner_changed_blocks_total", "0x10 1x20", **A12),
        ],
        [
            alert("KvhEvictionGateScrubbing", "5m"),
            alert("KvhEvictionGateScrubbing", "12m", warning(**A12)),
        ],
    )),
    # --- The exports --------------------------------------------------------------------------
    # A snapshot that stops being rewritten is stale after 120 s.
    "stale: after 120 s": case((
        [series("kvh_snapshot_timestamp_seconds", "0+60x5 300x10", instance="a", job="kvh")],
        [
            alert("KvhMetricsStale", "6m"),
            alert("KvhMetricsStale", "8m", warning(instance="a", job="kvh")),
        ],
    )),
    # Per-process series (`kvh serve-metrics` without --max-age): a hung process's snapshot
    # is stale, with its pid, until it writes again; its live neighbour's is not; a process
    # that exited is no longer served (its series are stale), so it is not judged.
    "stale: per process, hung or gone": case((
        [
            series("kvh_snapshot_timestamp_seconds", "0+60x5 300x5 720+60x10", **A11),  # hung 6m-11m
            series("kvh_snapshot_timestamp_seconds", "0+60x25", **A12),
            series("kvh_snapshot_timestamp_seconds", "0+60x5 stale", **A13),  # exits at 6m
        ],
        [
            alert("KvhMetricsStale", "6m"),
            alert("KvhMetricsStale", "8m", warning(**A11)),
            alert("KvhMetricsStale", "11m", warning(**A11)),
            alert("KvhMetricsStale", "12m"),
            alert("KvhMetricsStale", "20m"),
        ],
    )),
    # A kvhygiene target whose scrapes fail (serve-metrics answers 503: its series are stale)
    # fires after 5 minutes, once, with its instance and job, whatever number of processes it
    # served; KvhMetricsStale, without series, cannot. A recovered target clears; a target
    # that never exported kvhygiene metrics does not fire; nor does a deleted pod (its `up`
    # series ends).
    "down: a kvhygiene target's failed scrapes": case((
        [
            series("up", "1x10 0x30", instance="a", job="kvh"),  # down from 11m
            series("kvh_snapshot_timestamp_seconds", "0+60x10 stale", **A11),
            series("kvh_snapshot_timestamp_seconds", "0+60x10 stale", **A12),
            series("up", "1x10 0x10 1x20", instance="c", job="kvh"),  # down 11m-20m
            series("kvh_snapshot_timestamp_seconds", "0+60x10 stale _x9 1260+60x20", instance="c", job="kvh"),
            series("up", "1x10 stale", instance="d", job="kvh"),  # deleted at 11m
            series("kvh_snapshot_timestamp_seconds", "0+60x10 stale", instance="d", job="kvh"),
            series("up", "0x40", instance="n", job="node"),
        ],
        [
            alert("KvhMetricsDown", "14m"),
            alert("KvhMetricsDown", "17m", critical(instance="a", job="kvh"), critical(instance="c", job="kvh")),
            alert("KvhMetricsDown", "22m", critical(instance="a", job="kvh")),
            alert("KvhMetricsStale", "17m"),
        ],
    )),
    # Two live processes of one job with different policies, for longer than 30 minutes;
    # another job whose processes agree does not fire.
    "policy drift: two live policies in a job": case((
        [
            *(series("kvh_build_info", "1x50", instance=i, job=job, namespace="ns", config_digest=d)
              for i, job, d in (("a", "kvh", "d1"), ("b", "kvh", "d2"), ("c", "other", "d1"), ("d", "other", "d1"))),
            *(series("kvh_snapshot_timestamp_seconds", "0+60x50", instance=i, job=job, namespace="ns")
              for i, job in (("a", "kvh"), ("b", "kvh"), ("c", "other"), ("d", "other"))),
        ],
        [
            alert("KvhPolicyDrift", "20m"),
            alert("KvhPolicyDrift", "40m", warning(namespace="ns", job="kvh")),
        ],
    )),
    # A target whose scrapes keep failing for longer than an hour keeps its alert: the
    # condition (every other kvhygiene alert blind for it) has not cleared.
    "down: for longer than an hour": case((
        [
            series("up", "1x10 0x150", instance="a", job="kvh"),  # down from 11m
            series("kvh_snapshot_timestamp_seconds", "0+60x10 stale", **A11),
        ],
        [
            alert("KvhMetricsDown", "17m", critical(instance="a", job="kvh")),
            alert("KvhMetricsDown", "75m", critical(instance="a", job="kvh")),
            alert("KvhMetricsDown", "150m", critical(instance="a", job="kvh")),
        ],
    )),
    # A rolling restart to a new policy (pods a, b with d1 replaced by c, d with d2) takes
    # less than 30 minutes: no drift.
    "policy drift: a rolling restart is not drift": case((
        [
            *(series("kvh_build_info", values, instance=i, job="kvh", namespace="ns", config_digest=d)
              for i, d, values in (("a", "d1", "1x20 stale"), ("b", "d1", "1x10 stale"),
                                   ("c", "d2", "_x5 1x50"), ("d", "d2", "_x15 1x40"))),
            *(series("kvh_snapshot_timestamp_seconds", values, instance=i, job="kvh", namespace="ns")
              for i, values in (("a", "0+60x20 stale"), ("b", "0+60x10 stale"),
                                ("c", "_x5 300+60x50"), ("d", "_x15 900+60x40"))),
        ],
        [alert("KvhPolicyDrift", "25m"), alert("KvhPolicyDrift", "50m")],
    )),
    # Only live processes count, matched by instance and pid: the file of an exited process
    # (pid 12 of instance a), still exposed with its old policy and a snapshot that no longer
    # ages, is not drift, nor is one of instance b whose pid repeats a live process's of
    # instance a (pids repeat across pods). Two live processes that differ are.
    "policy drift: per process, only live processes count": case((
        [
            series("kvh_build_info", "1x60", config_digest="d1", namespace="ns", **A11),
            series("kvh_snapshot_timestamp_seconds", "0+60x60", namespace="ns", **A11),
            series("kvh_build_info", "1x60", config_digest="d2", namespace="ns", **A12),
            series("kvh_snapshot_timestamp_seconds", "0x60", namespace="ns", **A12),
            series("kvh_build_info", "1x60", config_digest="d2", namespace="ns", instance="b", job="kvh", pid="11"),
            series("kvh_snapshot_timestamp_seconds", "0x60", namespace="ns", instance="b", job="kvh", pid="11"),
            # Another job: two live processes of one pod that differ.
            series("kvh_build_info", "1x60", config_digest="d1", namespace="ns", instance="c", job="tp", pid="7"),
            series("kvh_snapshot_timestamp_seconds", "0+60x60", namespace="ns", instance="c", job="tp", pid="7"),
            series("kvh_build_info", "1x60", config_digest="d2", namespace="ns", instance="c", job="tp", pid="8"),
            series("kvh_snapshot_timestamp_seconds", "0+60x60", namespace="ns", instance="c", job="tp", pid="8"),
        ],
        [
            alert("KvhPolicyDrift", "20m"),
            alert("KvhPolicyDrift", "45m", warning(namespace="ns", job="tp")),
        ],
    )),
    # --- Latency ------------------------------------------------------------------------------
    # p99 over 10 minutes from the histogram: the slow instance's scrubs take 0.5-1 s, the
    # fast one's under 0.1 s; the alert waits its 15 minutes.
    "latency: p99 above 0.25 s for 15 minutes": case((
        [
            *(series("kvh_free_to_clean_seconds_bucket", "0x40" if float(le) < 1 else "0+100x40",
                     le=le, instance="slow", job="kvh")
              for le in ("0.1", "0.25", "0.5", "1", "+Inf")),
            *(series("kvh_free_to_clean_seconds_bucket", "0+100x40", le=le, instance="fast", job="kvh")
              for le in ("0.1", "0.25", "0.5", "1", "+Inf")),
        ],
        [
            alert("KvhScrubLatencyHigh", "10m"),
            alert("KvhScrubLatencyHigh", "25m", warning(instance="slow", job="kvh")),
        ],
    )),
    # The alert carries the scrape's job and namespace, as every other alert does: they say
    # whose workload it is, and Alertmanager routes on them.
    "latency: the alert names the job and namespace": case((
        [
            *(series("kvh_free_to_clean_seconds_bucket", "0x40" if float(le) < 1 else "0+100x40",
                     le=le, instance="slow", job="kvh", namespace="ns")
              for le in ("0.1", "0.25", "0.5", "1", "+Inf")),
        ],
        [alert("KvhScrubLatencyHigh", "25m", warning(instance="slow", job="kvh", namespace="ns"))],
    )),
    # An idle process (no free in the window), a fast one restarted (its buckets back to 0 in
    # the same series), and a slow one that became fast again: nothing fires once the slow
    # frees are out of the window.
    "latency: idle, restarted, recovered": case((
        [
            *(series("kvh_free_to_clean_seconds_bucket", "5x60", le=le, instance="idle", job="kvh")
              for le in ("0.1", "0.25", "0.5", "1", "+Inf")),
            *(series("kvh_free_to_clean_seconds_bucket", "0+100x20 0+100x40", le=le, instance="restarted", job="kvh")
              for le in ("0.1", "0.25", "0.5", "1", "+Inf")),
            # Slow until 30m, then every free under 0.1 s.
            *(series("kvh_free_to_clean_seconds_bucket",
                     "0x30 0+100x30" if float(le) < 1 else "0+100x30 3000+100x30",
                     le=le, instance="recovered", job="kvh")
              for le in ("0.1", "0.25", "0.5", "1", "+Inf")),
        ],
        [
            alert("KvhScrubLatencyHigh", "20m", warning(instance="recovered", job="kvh")),
            alert("KvhScrubLatencyHigh", "42m"),
            alert("KvhScrubLatencyHigh", "55m"),
        ],
    )),
}


def promtool_test(promtool: str, tmp_path, rules: dict, tests=None) -> subprocess.CompletedProcess:
    tests = list(TESTS.values()) if tests is None else tests
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules_without_annotations(rules)))
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests})
    )
    return run(promtool, "test", "rules", str(tmp_path / "tests.yaml"))


@pytest.mark.parametrize("name", TESTS)
def test_alerts_fire_when_they_must(promtool, tmp_path, name):
    r = promtool_test(promtool, tmp_path, yaml.safe_load(RULES.read_text()), [TESTS[name]])
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_evaluated_firing_and_silent():
    rules = yaml.safe_load(RULES.read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    fires, silent = set(), set()
    for c in TESTS.values():
        for t in c["alert_rule_test"]:
            (fires if t["exp_alerts"] else silent).add(t["alertname"])
    assert names - fires == set(), "alerts never expected to fire"
    assert names - silent == set(), "alerts never expected to stay silent"
    assert set(COUNTERS) == {n for n in names if "last_over_time(" in next(
        r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == n)}


def test_the_alert_tests_catch_a_wrong_threshold(promtool, tmp_path):
    rules = yaml.safe_load(RULES.read_text())
    (latency,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "KvhScrubLatencyHigh"]
    assert "> 0.25" in latency["expr"]
    latency["expr"] = latency["expr"].replace("> 0.25", "> 2.5")
    cases = [c for c in TESTS.values() if any(t["alertname"] == "KvhScrubLatencyHigh" and t["exp_alerts"]
                                              for t in c["alert_rule_test"])]
    r = promtool_test(promtool, tmp_path, rules, cases)
    assert r.returncode != 0 and "KvhScrubLatencyHigh" in r.stdout + r.stderr, r.stdout + r.stderr


def descriptions_count(promtool: str, tmp_path, labels: dict, values, count, at: str, start_times: str = None):
    """Runs, for every counter alert, `promtool test rules` on one series (`values(threshold)`,
    with the alert's own labels and `labels`) evaluated at `at` every 30 s, expecting the alert
    to fire with its annotations rendered for `count(threshold)` events: the returned process
    failed when some description says another count. `start_times`: the process's
    kvh_process_start_time_seconds beside it (with `labels`), when given."""
    rules = yaml.safe_load(RULES.read_text())
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = []
    for name, (metric, own, window, threshold, severity) in COUNTERS.items():
        every = {**own, **labels}
        n = count(threshold)

        def render(text: str, n=n, every=every) -> str:
            text = re.sub(r"\{\{[^}]*\$value[^}]*\}\}", str(n), text)
            return re.sub(r"\{\{[^}]*\$labels\.(\w+)[^}]*\}\}", lambda m: every[m.group(1)], text)

        tests.append({
            "interval": "1m",
            "input_series": [series(metric, values(threshold), **every)]
            + ([series("kvh_process_start_time_seconds", start_times, **labels)] if start_times else []),
            "alert_rule_test": [{
                "eval_time": at,
                "alertname": name,
                "exp_alerts": [{
                    "exp_labels": {"severity": severity, **every},
                    "exp_annotations": {k: render(v) for k, v in by_name[name]["annotations"].items()},
                }],
            }],
        })
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "30s", "tests": tests})
    )
    return run(promtool, "test", "rules", str(tmp_path / "tests.yaml"))


def test_a_counter_alert_s_description_counts_the_events(promtool, tmp_path):
    """An alert's description says "{{ $value }} ... in N minutes": one event in the window must
    read as one (eleven invalid frees as eleven), not as increase()'s extrapolation. Prometheus
    does not align scrapes with rule evaluations (each target has its own offset): here the
    samples are at whole minutes and the rules are evaluated at half minutes."""
    r = descriptions_count(
        promtool, tmp_path, A11, lambda n: f"0x10 {n + 1}x20", lambda n: n + 1, "12m30s"  # events at 11m
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_log_volume_alert_s_description_says_the_bytes_left(promtool, tmp_path):
    """KvhForensicLogVolumeFilling's description reads "{{ $value | humanize1024 }}B left on the
    log directory's file system": when it fires for the pace (10 GiB left, shrinking by 10 MB a
    minute: full in about 17 hours), the figure is the bytes left at the evaluation, not the
    negative figure predict_linear foresees for a day later."""
    rules = yaml.safe_load(RULES.read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "KvhForensicLogVolumeFilling"]
    left = 10737418240 - 40 * 10000000  # at 40m
    shown = f"{left / 2**30:.4g}Gi"  # humanize1024; the description adds the B
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "t", "rules": [rule]}]}))
    test = case((
        [
            series("kvh_log_free_bytes", "10737418240-10000000x60", **A12),
            series("kvh_snapshot_timestamp_seconds", "0+60x60", **A12),
        ],
        [alert("KvhForensicLogVolumeFilling", "40m", warning(**A12))],
    ))
    (exp,) = test["alert_rule_test"][0]["exp_alerts"]
    exp["exp_annotations"] = {
        k: v.replace("{{ $value | humanize1024 }}", shown).replace("{{ $labels.instance }}", A12["instance"])
        for k, v in rule["annotations"].items()
    }
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [test]})
    )
    r = run(promtool, "test", "rules", str(tmp_path / "tests.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_log_shipper_alert_fires_on_a_restart_of_the_shipped_native_sidecar(promtool, tmp_path):
    # deploy/k8s/deployment.yaml runs kvh-tail as a native sidecar: an init container with
    # restartPolicy Always. kube-state-metrics counts its restarts, as any init container's,
    # in kube_pod_init_container_status_restarts_total (from the pod's initContainerStatuses,
    # where the kubelet reports it). The series below is what it exports after one restart.
    rules = yaml.safe_load(RULES.with_name("kvhygiene-k8s-rules.yaml").read_text())
    pod = {"namespace": "ml", "pod": "inference-server-7d9f-abcde", "uid": "u1", "container": "kvh-tail"}
    test = case(
        (
            [series("kube_pod_init_container_status_restarts_total", "0 0 0 1 1 1 1 1 1 1 1", **pod)],
            [alert("KvhLogShipperRestarting", "8m", critical(**pod))],
        )
    )
    r = promtool_test(promtool, tmp_path, rules, [test])
    assert r.returncode == 0, r.stdout + r.stderr
