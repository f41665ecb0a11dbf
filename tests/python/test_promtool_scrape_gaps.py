"""The alerting rules evaluated by promtool on synthetic series, for what happens around gaps
in the scrapes and around the counts an alert's description gives (tests/python/test_promtool.py
holds the main cases and the helpers used here).

- A counter that grows while its target's scrapes fail (a target down, Prometheus restarted)
  is an event: it fires once the scrapes resume.
- A counter that did not move does not fire again after a gap in the scrapes, also when the
  gap is longer than an hour (KvhMetricsDown keeps firing for a day of failed scrapes, so gaps
  that long are expected).
- A counter alert's description counts the events in its window as whole events.
- KvhMetricsDown concerns a target that exported kvhygiene metrics: a new pod that happens to
  get the address of a pod deleted earlier in the day is not that target.
"""

import re

import pytest
import yaml

from test_alert_rules import RULES
from test_promtool import (  # noqa: F401  (promtool is a fixture)
    A11,
    COUNTERS,
    alert,
    case,
    counters,
    critical,
    promtool,
    promtool_test,
    run,
    series,
)


def rules() -> dict:
    return yaml.safe_load(RULES.read_text())


# --- Scrape gaps ------------------------------------------------------------------------------

GAP_TESTS = {
    # The count is 0 up to 10m; the scrapes fail from 11m to 30m (the series is stale); events
    # happened meanwhile, and the first scrape after the gap, at 31m, shows them. increase()
    # sees no increase within the window after the gap: the alert must still fire.
    "counter: events while the scrapes failed fire once they resume": counters(
        lambda name, counter, w, n, expected: (
            [counter(f"0x10 stale _x19 {n + 1}x30", A11)],
            [
                alert(name, "31m", expected(A11)),
                alert(name, "33m", expected(A11)),
            ],
        )
    ),
    # The event at 6m; the scrapes fail from 17m for two hours; the same count from 137m. The
    # count did not move: nothing fires again (as for the half-hour gap of test_promtool.py).
    "counter: a count seen before a two-hour scrape gap does not fire again": counters(
        lambda name, counter, w, n, expected: (
            [counter(f"0x5 {n + 1}x10 stale _x119 {n + 1}x20", A11)],
            [
                alert(name, "6m", expected(A11)),
                alert(name, "137m"),
                alert(name, "140m"),
            ],
        )
    ),
}


@pytest.mark.parametrize("name", GAP_TESTS)
def test_counter_alerts_around_scrape_gaps(promtool, tmp_path, name):
    r = promtool_test(promtool, tmp_path, rules(), [GAP_TESTS[name]])
    assert r.returncode == 0, r.stdout + r.stderr


# --- KvhMetricsDown ---------------------------------------------------------------------------

# Labels as the ServiceMonitor of deploy/prometheus-operator scrapes them: the Prometheus
# Operator adds namespace and pod; instance is the pod's address.
OLD_POD = {"instance": "10.0.0.5:9464", "job": "kvh", "namespace": "ns", "pod": "server-old"}
NEW_POD = {"instance": "10.0.0.5:9464", "job": "kvh", "namespace": "ns", "pod": "server-new"}


def test_metrics_down_is_not_raised_by_a_new_pod_at_a_reused_address(promtool, tmp_path):
    """Pod server-old exported kvhygiene metrics, then was deleted at 30m (its series end).
    Hours later, pod server-new gets the same address (pod IPs are reused) and loads its model:
    until kvhygiene starts, its sidecar answers 503 (no metrics file), so its scrapes fail.
    That is a target that never exported (docs/operations.md, "Metrics down": it "does not
    raise this alert"; the startup probe covers it), not a target that stopped."""
    test = case((
        [
            series("up", "1x30 stale", **OLD_POD),
            series("kvh_snapshot_timestamp_seconds", "0+60x30 stale", pid="11", **OLD_POD),
            series("up", "_x150 0x30", **NEW_POD),  # from 150m, model loading
        ],
        [
            alert("KvhMetricsDown", "160m"),
            alert("KvhMetricsDown", "175m"),
        ],
    ))
    r = promtool_test(promtool, tmp_path, rules(), [test])
    assert r.returncode == 0, r.stdout + r.stderr


def test_metrics_down_description_names_the_lookback_of_its_expression():
    """KvhMetricsDown looks back a day for the target's kvhygiene series (`[1d]`); its
    description, which on-call reads, must not say an hour."""
    by_name = {r["alert"]: r for g in rules()["groups"] for r in g["rules"] if "alert" in r}
    rule = by_name["KvhMetricsDown"]
    lookback = re.search(r"max_over_time\(kvh_snapshot_timestamp_seconds\[(\w+)\]\)", rule["expr"])
    assert lookback, rule["expr"]
    words = {"1h": "within the hour", "1d": "within the day"}
    assert lookback.group(1) in words, lookback.group(1)
    description = rule["annotations"]["description"]
    for window, text in words.items():
        if window != lookback.group(1):
            assert text not in description, (
                f"the expression looks back {lookback.group(1)}, the description says "
                f"{text!r}: {description}"
            )


# --- Descriptions -----------------------------------------------------------------------------


def test_a_counter_alert_s_description_counts_several_events_as_they_are(promtool, tmp_path):
    """A long-running process (its counter already at 5 from older events) has a few more
    events within the window. The description says "{{ $value }} ... in N minutes": it must
    give the number of events, not increase()'s extrapolation to the window's edges (7 events
    in a 5-minute window of samples a minute apart read as 8.75). Samples at whole minutes,
    rules evaluated at half minutes, as Prometheus does not align the two."""
    by_name = {r["alert"]: r for g in rules()["groups"] for r in g["rules"] if "alert" in r}
    tests = []
    for name, (metric, own, window, threshold, severity) in COUNTERS.items():
        labels = {**own, **A11}
        count = threshold + 7
        base = 5

        def render(text: str, count=count, labels=labels) -> str:
            text = re.sub(r"\{\{[^}]*\$value[^}]*\}\}", str(count), text)
            return re.sub(r"\{\{[^}]*\$labels\.(\w+)[^}]*\}\}", lambda m: labels[m.group(1)], text)

        tests.append({
            "interval": "1m",
            "input_series": [series(metric, f"{base}x30 {base + count}x20", **labels)],  # at 31m
            "alert_rule_test": [{
                "eval_time": "33m30s",
                "alertname": name,
                "exp_alerts": [{
                    "exp_labels": {"severity": severity, **labels},
                    "exp_annotations": {k: render(v) for k, v in by_name[name]["annotations"].items()},
                }],
            }],
        })
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules()))
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "30s", "tests": tests})
    )
    r = run(promtool, "test", "rules", str(tmp_path / "tests.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr
