"""The counter alerts evaluated by promtool around a counter reset that falls within a gap in
the scrapes, and around a threshold above 0 (tests/python/test_promtool.py holds the helpers).

- One metrics file without `{pid}` (ONE_FILE): a restarted process writes the same series, its
  counter back at 0. When the restart happens while the scrapes fail (a container restart that
  loads its model for longer than the window), the new process's events are events: they fire
  once the scrapes resume, whatever the old process's total was, and the description counts
  the new process's events.
- KvhInvalidFrees fires above 10 frees in its window: exactly 10 does not fire.
"""

import re

import pytest
import yaml

from test_alert_rules import RULES
from test_promtool import (  # noqa: F401  (promtool is a fixture)
    descriptions_count,
    A11,
    ONE_FILE,
    alert,
    counters,
    promtool,
    promtool_test,
    run,
    series,
)


def rules() -> dict:
    return yaml.safe_load(RULES.read_text())


def test_a_restart_within_a_scrape_gap_fires_for_the_new_process_s_events(promtool, tmp_path):
    """The old process counts n + 3 events (at 6m); the scrapes fail from 17m to 36m, and the
    process restarts meanwhile; the new process's first scrape, at 37m, shows n + 1 events of
    its own (its counter restarted at 0). Those events are above the threshold: the alert
    fires, though the new total is below the old one."""
    test = counters(
        lambda name, counter, w, n, expected: (
            [counter(f"0x5 {n + 3}x10 stale _x19 {n + 1}x20", ONE_FILE)],
            [
                alert(name, "6m", expected(ONE_FILE)),
                alert(name, "37m", expected(ONE_FILE)),
                alert(name, "39m", expected(ONE_FILE)),
            ],
        )
    )
    r = promtool_test(promtool, tmp_path, rules(), [test])
    assert r.returncode == 0, r.stdout + r.stderr


# The process's start time, one value per life: the old process's until the gap (17m), the new
# process's from its first scrape (37m), as the counters' series in these tests.
START_TIMES_ACROSS_THE_GAP = "1000x16 stale _x19 3000x20"


def test_a_restart_within_a_scrape_gap_counts_the_new_process_s_events_by_its_start_time(promtool, tmp_path):
    """As below, with the start time the library exports (kvh_process_start_time_seconds): the
    new value tells the restart, and the description gives the new process's threshold + 7
    events, not their difference with the old process's total."""
    r = descriptions_count(
        promtool,
        tmp_path,
        ONE_FILE,
        lambda n: f"0x5 1x10 stale _x19 {n + 7}x20",
        lambda n: n + 7,
        "38m30s",
        START_TIMES_ACROSS_THE_GAP,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "start_times",
    [START_TIMES_ACROSS_THE_GAP, "3000x16 stale _x19 1000x20"],
    ids=["later", "earlier (the clock stepped back between the two lives)"],
)
def test_a_restart_within_a_scrape_gap_whose_new_total_equals_the_old_one_fires(promtool, tmp_path, start_times):
    """The old process counts threshold + 1 events (at 6m); the scrapes fail from 17m to 36m
    and the process restarts meanwhile; the new process's first scrape shows threshold + 1
    events of its own, the same total. No difference, no reset and no lower total show it:
    its start time does, whichever way it moved (a VM restored, an RTC corrected by NTP after
    boot), and the alert fires for the new process's events."""
    r = descriptions_count(
        promtool,
        tmp_path,
        ONE_FILE,
        lambda n: f"0x5 {n + 1}x10 stale _x19 {n + 1}x20",
        lambda n: n + 1,
        "37m30s",
        start_times,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.xfail(
    strict=True,
    reason="without kvh_process_start_time_seconds (a library before it), a restart hidden in a "
    "scrape gap whose new total passes the old one reads as the difference of the two totals: "
    "the series shows no reset to tell (deploy/prometheus/kvhygiene-rules.yaml's header says so)",
)
def test_a_restart_within_a_scrape_gap_counts_the_new_process_s_events(promtool, tmp_path):
    """The old process counts 1 event (at 6m); the scrapes fail from 17m to 36m and the process restarts meanwhile; the new process's first
    scrape shows threshold + 7 events of its own. The description gives those events, not their
    difference with the old process's total."""
    r = descriptions_count(
        promtool, tmp_path, ONE_FILE, lambda n: f"0x5 1x10 stale _x19 {n + 7}x20", lambda n: n + 7, "38m30s"
    )
    assert r.returncode == 0, r.stdout + r.stderr

def test_invalid_frees_at_exactly_the_threshold_do_not_fire(promtool, tmp_path):
    """A long-running process (5 refused frees from before) refuses exactly 10 more frees, one
    a minute from 20m30s to 29m30s, within the 15-minute window: the count is 10, not above 10.
    Samples every 30 s, rules evaluated at quarter minutes (not aligned with the scrapes)."""
    values = "5x40 " + " ".join(f"{5 + i}x1" for i in range(1, 11)) + " 15x40"
    test = {
        "interval": "30s",
        "input_series": [series("kvh_invalid_frees_total", values, **A11)],
        "alert_rule_test": [
            alert("KvhInvalidFrees", at) for at in ("30m15s", "31m15s", "32m15s", "33m15s", "34m15s")
        ],
    }
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules()))
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "15s", "tests": [test]})
    )
    r = run(promtool, "test", "rules", str(tmp_path / "tests.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr
