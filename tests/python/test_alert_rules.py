"""deploy/prometheus/kvhygiene-rules.yaml against what the library exports and what the runbook
says: every metric and label an alert's expression uses is in a snapshot the library writes
(with the forensic log and the anomaly detector on, and off), every alert has a severity, a
summary and a runbook section of docs/operations.md that exists, and every runbook section is
some alert's. No Prometheus is needed: the expressions are read, not evaluated here
(tests/python/test_promtool.py evaluates them with promtool).
"""

import re
from pathlib import Path

import pytest
import yaml

from test_c_abi import ROOT, run_child

RULES = ROOT / "deploy" / "prometheus" / "kvhygiene-rules.yaml"
RUNBOOK = ROOT / "docs" / "operations.md"
SEVERITIES = {"critical", "warning"}
# Labels Prometheus adds at scrape time (the target's; namespace through Kubernetes service
# discovery), not the library.
SCRAPE_LABELS = {"instance", "job", "namespace"}
# Sections of the runbook that are not an alert's.
GENERAL_SECTIONS = {
    "signals",
    "a-pod-that-does-not-start",
    "the-log-shipper-reports-tampering",
    "during-an-incident-in-this-order",
}


def alerts():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for g in groups for rule in g["rules"]]


#: Rules over kube-state-metrics' series for the example deployment (deploy/k8s).
K8S_RULES = ROOT / "deploy" / "prometheus" / "kvhygiene-k8s-rules.yaml"


def k8s_alerts():
    groups = yaml.safe_load(K8S_RULES.read_text())["groups"]
    return [rule for g in groups for rule in g["rules"]]


def snapshot(tmp_path, **env) -> str:
    prom = tmp_path / "kvh.prom"
    run_child(
        """
        for _ in range(3):
            p = lib.kvh_malloc(4096, 0, STREAM)
            lib.kvh_free(p, 4096, 0, STREAM)
        assert lib.kvh_synchronize() == 0
        lib.kvh_shutdown()
        """,
        KVH_METRICS_FILE=str(prom),
        **env,
    )
    return prom.read_text()


def series(text: str) -> dict:
    """metric name -> list of label dicts, from the Prometheus text format."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})? ", line)
        assert m, line
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        out.setdefault(m.group(1), []).append(labels)
    return out


def anchors(markdown: str) -> set:
    """GitHub's anchors of the `##` headings: lower case, punctuation dropped, spaces to '-'."""
    heads = re.findall(r"^## (.+)$", markdown, re.M)
    return {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in heads}


def test_every_alert_is_complete_and_named_once():
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)), names
    assert len(names) >= 10
    for a in alerts():
        assert a["labels"]["severity"] in SEVERITIES, a
        assert a["annotations"]["summary"] and a["annotations"]["description"], a
        assert a["annotations"]["runbook_url"].startswith("docs/operations.md#"), a
        assert a["expr"].count("(") == a["expr"].count(")"), a
        if "for" in a:
            assert re.fullmatch(r"\d+[smh]", a["for"]), a


@pytest.mark.parametrize(
    "env",
    [
        {"KVH_LOG_DIR": "{tmp}/log"},
        {"KVH_ANOMALY": "off"},
    ],
    ids=["log-and-anomaly-on", "anomaly-off"],
)
def test_every_metric_and_label_an_alert_uses_is_exported(tmp_path, env):
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    exported = series(snapshot(tmp_path, **env))
    anomaly_off = env.get("KVH_ANOMALY") == "off"
    log_off = "KVH_LOG_DIR" not in env
    for a in alerts():
        for name, _, matchers in re.findall(r"(kvh_[a-z0-9_]+)(\{([^}]*)\})?", a["expr"]):
            if anomaly_off and name == "kvh_anomalies_total":
                # Not exported when the detector is off; kvh_anomaly_enabled says so, and
                # KvhAnomalyDetectorOff alerts on it.
                assert "kvh_anomaly_enabled" in exported
                continue
            if log_off and name == "kvh_log_free_bytes":
                # No log, no volume to measure; kvh_log_enabled says so, and
                # KvhForensicLogOff alerts on it.
                assert "kvh_log_enabled" in exported
                continue
            assert name in exported, f"{a['alert']}: {name} is not exported"
            for key, value in re.findall(r'(\w+)="([^"]*)"', matchers):
                values = {labels.get(key) for labels in exported[name]}
                assert value in values, f"{a['alert']}: {name}{{{key}={value!r}}} is not exported ({values})"
        metric = re.search(r"kvh_[a-z0-9_]+", a["expr"]).group(0)
        if anomaly_off and metric == "kvh_anomalies_total" or log_off and metric == "kvh_log_free_bytes":
            continue
        grouped = [g.strip() for by in re.findall(r"\bby\s*\(([^)]*)\)", a["expr"]) for g in by.split(",")]
        for label in re.findall(r"\$labels\.(\w+)", str(a["annotations"])) + grouped:
            if label in SCRAPE_LABELS:
                continue
            assert all(label in labels for labels in exported[metric]), f"{a['alert']}: no label {label}"


def test_a_counter_alert_also_fires_for_a_series_first_seen_above_its_threshold():
    # Prometheus counts no increase from a series' first sample: a process whose first scrubs
    # failed before its first scrape shows a counter already at 1, and only the
    # `x > N unless last_over_time(x[1d] offset W)` clause raises the alert for it
    # (tests/python/test_promtool*.py evaluate the whole expression).
    counted = [a for a in alerts() if "last_over_time(" in a["expr"] and " unless " in a["expr"]]
    assert len(counted) >= 10
    for a in counted:
        m = re.fullmatch(
            r"\((kvh_[a-z0-9_]+(?:\{[^}]*\})?) > (\d+) and on \(job, instance, pid\) \(kvh_process_start_time_seconds"
            r" != last_over_time\(kvh_process_start_time_seconds\[1d\] offset (\w+)\)\) unless resets\(\1\[\3\]\) > 0\)"
            r" or \(\(\1 - last_over_time\(\1\[1d\] offset \3\)\) > \2"
            r" unless resets\(\1\[\3\]\) > 0\) or \(floor\(increase\(\1\[\3\]\)\) > \2 and resets\(\1\[\3\]\) > 0\)"
            r" or \(\1 < last_over_time\(\1\[1d\] offset \3\)\) > \2 or \((.*)\)",
            a["expr"],
        )
        assert m, a["expr"]
        metric, threshold, window, new_series = m.groups()
        assert new_series == f"{metric} > {threshold} unless last_over_time({metric}[1d] offset {window})", a["expr"]

def test_each_runbook_link_has_a_section_and_each_section_an_alert():
    sections = anchors(RUNBOOK.read_text())
    linked = {a["annotations"]["runbook_url"].split("#", 1)[1] for a in alerts() + k8s_alerts()}
    assert linked <= sections, linked - sections
    assert sections - GENERAL_SECTIONS <= linked, (sections - GENERAL_SECTIONS) - linked


def test_a_process_that_stops_exporting_through_the_shipped_sidecar_raises_an_alert():
    """The shipped sidecar (deploy/k8s) runs `kvh serve-metrics --max-age 60`, which answers
    /metrics with 503 as soon as the snapshot is 60 s old, and when the file is missing or
    malformed. A failed scrape makes Prometheus mark every series of the target stale, so
    `time() - kvh_snapshot_timestamp_seconds > 120` (KvhMetricsStale) has no sample to fire on;
    the in-process exporter (KVH_METRICS_ADDR) serves snapshots at most 1 s old. Either the
    stale threshold is below what the sidecar still serves, or a rule watches the target that
    stopped answering (`up`), restricted to targets that exported kvhygiene metrics."""
    docs = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    sidecar_max_age = None
    for d in docs:
        if not d or d.get("kind") != "Deployment":
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            args = c.get("args") or []
            if "serve-metrics" in args and "--max-age" in args:
                sidecar_max_age = int(args[args.index("--max-age") + 1])
    assert sidecar_max_age is not None, "the shipped sidecar has no --max-age"
    rules = {a["alert"]: a for a in alerts()}
    m = re.fullmatch(
        r"time\(\) - kvh_snapshot_timestamp_seconds > (\d+)", rules["KvhMetricsStale"]["expr"]
    )
    assert m, rules["KvhMetricsStale"]["expr"]
    stale_after = int(m.group(1))
    watches_the_target = any(
        re.search(r"\bup\b|absent(_over_time)?\(", a["expr"]) for a in alerts()
    )
    down = rules.get("KvhMetricsDown")
    assert down is None or "kvh_snapshot_timestamp_seconds" in down["expr"], (
        "KvhMetricsDown must be limited to targets that exported kvhygiene metrics"
    )
    assert stale_after < sidecar_max_age or watches_the_target, (
        f"KvhMetricsStale fires on snapshots over {stale_after} s old, but the shipped sidecar "
        f"answers 503 past {sidecar_max_age} s, and no rule watches `up` or absent series"
    )


def test_the_deployment_alerts_are_complete_and_select_what_the_manifests_name():
    # Each selects a Job, container or init container of deploy/k8s by its name there: a
    # renamed one would leave the alert watching nothing.
    k8s = (ROOT / "deploy" / "k8s").glob("*.yaml")
    manifests = "\n".join(p.read_text() for p in k8s)
    names = set(alert["alert"] for alert in alerts())
    for a in k8s_alerts():
        assert a["alert"] not in names, a
        assert a["labels"]["severity"] in SEVERITIES, a
        assert a["annotations"]["summary"] and a["annotations"]["description"], a
        assert a["annotations"]["runbook_url"].startswith("docs/operations.md#"), a
        containers = re.findall(r'container="([^"]+)"', a["expr"])
        assert containers or "job_name" in a["expr"], a["expr"]
        for name in containers:
            assert f"- name: {name}\n" in manifests, (a["alert"], name)
    verify_prune = next(a for a in k8s_alerts() if "job_name" in a["expr"])
    for job in ("kvhygiene-verify-log", "kvhygiene-prune-log"):
        assert f"name: {job}" in manifests
        kind = job.split("-")[1]
        assert kind in verify_prune["expr"], verify_prune["expr"]


def test_the_deployment_alerts_read_each_container_from_the_series_of_its_kind():
    # kube-state-metrics exports a container's restarts and waiting reason from the pod's
    # containerStatuses (kube_pod_container_*) and an init container's, a native sidecar
    # (restartPolicy: Always) included, from initContainerStatuses (kube_pod_init_container_*,
    # docs/metrics/workload/pod-metrics.md): a selector on the other family matches no series.
    spec = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    init = {c["name"] for c in spec.get("initContainers", [])}
    regular = {c["name"] for c in spec["containers"]}
    wrong = []
    for a in k8s_alerts():
        for metric, name in re.findall(r'(kube_pod_\w+)\{[^}]*container="([^"]+)"', a["expr"]):
            is_init_series = metric.startswith("kube_pod_init_container_")
            if (name in init and not is_init_series) or (name in regular and is_init_series):
                kind = "init container" if name in init else "container"
                wrong.append(f"{a['alert']}: {metric} for {name}, an {kind} of deployment.yaml")
    assert not wrong, wrong
