"""The exposition and the alerting rules checked by Prometheus's own tool, promtool (Debian's
`prometheus` package; .ci/run installs it and sets KVH_REQUIRE_PROMTOOL, so there a missing
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
        if os.environ.get("KVH_REQUIRE_PROMTOOL"):
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
    r = run(promtool, "check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr


def rules_without_annotations(rules: dict) -> dict:
    out = copy.deepcopy(rules)
    for group in out["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return out


def alert(name: str, at: str, *firing: dict) -> dict:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": labels} for labels in firing]}


# Series every minute; `_xN` is N missing samples, `AxN` A then N repeats of it, `A+BxN` a
# ramp of N steps after A.
TESTS = [
    {
        # A counter that grows fires; so does one first seen above zero (a process whose
        # scrubs failed before its first scrape), which increase() alone cannot see; neither
        # fires once the failures are older than the window.
        "interval": "1m",
        "input_series": [
            {"series": 'kvh_verifications_total{result="failed",instance="a",job="kvh"}', "values": "0x10 1x20"},
            {"series": 'kvh_verifications_total{result="failed",instance="b",job="kvh"}', "values": "_x5 2x20"},  # from 5m
        ],
        "alert_rule_test": [
            alert("KvhScrubVerificationFailed", "4m"),
            alert("KvhScrubVerificationFailed", "7m",
                  {"severity": "critical", "result": "failed", "instance": "b", "job": "kvh"}),
            alert("KvhScrubVerificationFailed", "12m",
                  {"severity": "critical", "result": "failed", "instance": "a", "job": "kvh"}),
            alert("KvhScrubVerificationFailed", "25m"),
        ],
    },
    {
        # p99 over 10 minutes from the histogram: the slow instance's scrubs take 0.5-1 s, the
        # fast one's under 0.1 s; the alert waits its 15 minutes.
        "interval": "1m",
        "input_series": [
            *({"series": f'kvh_free_to_clean_seconds_bucket{{le="{le}",instance="slow",job="kvh"}}',
               "values": "0x40" if float(le) < 1 else "0+100x40"}
              for le in ("0.1", "0.25", "0.5", "1", "+Inf")),
            *({"series": f'kvh_free_to_clean_seconds_bucket{{le="{le}",instance="fast",job="kvh"}}',
               "values": "0+100x40"}
              for le in ("0.1", "0.25", "0.5", "1", "+Inf")),
        ],
        "alert_rule_test": [
            alert("KvhScrubLatencyHigh", "10m"),
            alert("KvhScrubLatencyHigh", "25m", {"severity": "warning", "instance": "slow"}),
        ],
    },
    {
        # A snapshot that stops being rewritten is stale after 120 s.
        "interval": "1m",
        "input_series": [
            {"series": 'kvh_snapshot_timestamp_seconds{instance="a",job="kvh"}', "values": "0+60x5 300x10"},
        ],
        "alert_rule_test": [
            alert("KvhMetricsStale", "6m"),
            alert("KvhMetricsStale", "8m", {"severity": "warning", "instance": "a", "job": "kvh"}),
        ],
    },
    {
        # Two live processes of one job with different policies, for longer than 30 minutes;
        # another job whose processes agree does not fire.
        "interval": "1m",
        "input_series": [
            *({"series": f'kvh_build_info{{instance="{i}",job="{job}",namespace="ns",config_digest="{d}"}}',
               "values": "1x50"}
              for i, job, d in (("a", "kvh", "d1"), ("b", "kvh", "d2"), ("c", "other", "d1"), ("d", "other", "d1"))),
            *({"series": f'kvh_snapshot_timestamp_seconds{{instance="{i}",job="{job}",namespace="ns"}}',
               "values": "0+60x50"}
              for i, job in (("a", "kvh"), ("b", "kvh"), ("c", "other"), ("d", "other"))),
        ],
        "alert_rule_test": [
            alert("KvhPolicyDrift", "20m"),
            alert("KvhPolicyDrift", "40m", {"severity": "warning", "namespace": "ns", "job": "kvh"}),
        ],
    },
    {
        # More than 10 invalid frees in 15 minutes; 7.5 is not.
        "interval": "1m",
        "input_series": [
            {"series": 'kvh_invalid_frees_total{instance="noisy",job="kvh"}', "values": "0+1x30"},
            {"series": 'kvh_invalid_frees_total{instance="quiet",job="kvh"}', "values": "0+0.5x30"},
        ],
        "alert_rule_test": [
            alert("KvhInvalidFrees", "20m", {"severity": "warning", "instance": "noisy", "job": "kvh"}),
        ],
    },
    {
        # No forensic log for 10 minutes.
        "interval": "1m",
        "input_series": [{"series": 'kvh_log_enabled{instance="a",job="kvh"}', "values": "0x30"}],
        "alert_rule_test": [
            alert("KvhForensicLogOff", "5m"),
            alert("KvhForensicLogOff", "15m", {"severity": "warning", "instance": "a", "job": "kvh"}),
        ],
    },
]


def promtool_test(promtool: str, tmp_path, rules: dict) -> subprocess.CompletedProcess:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules_without_annotations(rules)))
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": TESTS})
    )
    return run(promtool, "test", "rules", str(tmp_path / "tests.yaml"))


def test_alerts_fire_when_they_must(promtool, tmp_path):
    r = promtool_test(promtool, tmp_path, yaml.safe_load(RULES.read_text()))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_alert_tests_catch_a_wrong_threshold(promtool, tmp_path):
    rules = yaml.safe_load(RULES.read_text())
    (latency,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "KvhScrubLatencyHigh"]
    assert "> 0.25" in latency["expr"]
    latency["expr"] = latency["expr"].replace("> 0.25", "> 2.5")
    r = promtool_test(promtool, tmp_path, rules)
    assert r.returncode != 0 and "KvhScrubLatencyHigh" in r.stdout + r.stderr, r.stdout + r.stderr
