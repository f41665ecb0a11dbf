"""deploy/grafana/kvhygiene-dashboard.json against what the library exports and what the alerts
watch, so that the dashboard cannot drift from either:

- it is a Grafana 10/11 dashboard model (schemaVersion 39, uid "kvhygiene") whose panels all
  query the data source chosen in its `datasource` variable, and whose `job` and `instance`
  variables, listed from a kvh_* series, filter every panel;
- its panels have unique ids and titles, fit the 24-column grid, sit under their row without
  overlapping, and the rows come in the order on-call reads them (Security first);
- every kvh_* metric an expression names is in a snapshot the built library writes (forensic
  log and anomaly detector on; plain and per-process `{pid}` file), every label matched or
  grouped by is one those series carry (or one Prometheus adds at scrape time: job,
  instance), and every fixed label value is one the library writes;
- counters are read only through rate() and increase(), and only counters are: totals over
  the dashboard range (`$__range`) in stat panels, rates over `$__rate_interval` in graphs;
  a stat's total also reads, through min_over_time() and max_over_time() over its range and
  last_over_time() over the day before it, the first value of a series new in the range
  (tests/python/test_promtool_dashboard.py evaluates those expressions);
- the Security row's stat panels turn red at the first event;
- every alert of deploy/prometheus/kvhygiene-rules.yaml fires on a series some panel shows
  (with the alert's label values), and the alerts and runbook sections panel descriptions name
  exist.

Each check returns what is wrong with a dashboard; test_each_check_catches_its_fault breaks a
copy of the dashboard once per check and requires the check to say so. No Grafana or
Prometheus is needed: the expressions are read, not evaluated.
"""

import copy
import json
import re

import pytest

from test_alert_rules import RUNBOOK, alerts, anchors, series, snapshot
from test_c_abi import ROOT, run_child

DASHBOARD = ROOT / "deploy" / "grafana" / "kvhygiene-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ROWS = ["Security", "Scrubbing", "Pool", "Forensic log and exporter"]
GRID_COLUMNS = 24
# Labels of the scrape target, added by Prometheus, not by the library.
TARGET_LABELS = {"job", "instance"}
# The filter each kvh_* selector of a panel carries, from the dashboard's variables.
VARIABLE_MATCHERS = {("job", "=~", "$job"), ("instance", "=~", "$instance")}
SELECTOR = re.compile(r"(kvh_[a-zA-Z0-9_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
COUNTER_FUNCTIONS = re.compile(r"\b(?:rate|irate|increase)\(\s*$")
# A stat panel's total also counts the first value of each series new in its range (a process
# first scraped with events already counted, which increase() starts from): the larger of its
# maximum and its minimum plus its increase over the range, for a series not seen in the day
# before the range (last_over_time over [1d] offset by the range).
STAT_FIRST_VALUE = re.compile(r"\b(?:min_over_time|max_over_time)\(\s*$")
STAT_SEEN_BEFORE = re.compile(r"\blast_over_time\(\s*$")
STAT_RANGE_AFTER = re.compile(r"\{[^}]*\}\[\$__range\]\)")
STAT_BEFORE_AFTER = re.compile(r"\{[^}]*\}\[1d\] offset \$__range\)")
RANGE = re.compile(r"\[([^\]]+)\]")


# ---------------------------------------------------------------------------------------------
# Reading the dashboard


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def rows(dash: dict) -> list:
    """(row panel, its panels) in order; panels of a collapsed row are nested in it."""
    out = []
    for p in dash["panels"]:
        if p["type"] == "row":
            out.append((p, list(p.get("panels", []))))
        else:
            assert out, f"panel {p.get('title')!r} comes before the first row"
            out[-1][1].append(p)
    return out


def panels(dash: dict) -> list:
    """Every panel that is not a row header."""
    return [p for _, members in rows(dash) for p in members]


def targets(dash: dict) -> list:
    """(panel, expression) of every panel query."""
    return [(p, t["expr"]) for p in panels(dash) for t in p.get("targets", []) if t.get("expr")]


def variable_queries(dash: dict) -> list:
    out = []
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            out.append((v["name"], q["query"] if isinstance(q, dict) else q))
    return out


def expressions(dash: dict) -> list:
    """(where, expression) of every query the dashboard sends: panels' and variables'."""
    return [(f"panel {p['title']!r}", e) for p, e in targets(dash)] + [
        (f"variable {name}", q) for name, q in variable_queries(dash)
    ]


def selectors(expr: str) -> list:
    """(metric, [(label, op, value)], start offset) of every kvh_* selector."""
    return [(m.group(1), MATCHER.findall(m.group(2) or ""), m.start()) for m in SELECTOR.finditer(expr)]


def fixed(value: str) -> bool:
    """A matcher value the dashboard fixes, rather than one of its variables."""
    return "$" not in value


# ---------------------------------------------------------------------------------------------
# What the library exports


class Exported:
    """Series (name -> label dicts) and types of one or more snapshots in the text format."""

    def __init__(self, *texts: str):
        self.series = {}
        self.types = {}
        for text in texts:
            for name, labels in series(text).items():
                self.series.setdefault(name, []).extend(labels)
            for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
                self.types[family] = kind
                if kind in ("histogram", "summary"):
                    # Buckets, sums and counts only grow: read through rate(), as counters.
                    for suffix in ("_bucket", "_sum", "_count") if kind == "histogram" else ("_sum", "_count"):
                        self.types[family + suffix] = "counter"

    def labels(self, name: str) -> set:
        return {k for labels in self.series[name] for k in labels}

    def values(self, name: str, label: str) -> set:
        return {labels[label] for labels in self.series[name] if label in labels}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    """A snapshot of a process with the forensic log and the anomaly detector on, and one of
    a process writing its own file (`kvh-{pid}.prom`), whose samples carry a `pid` label."""
    plain = tmp_path_factory.mktemp("plain")
    text = snapshot(plain, KVH_LOG_DIR=str(plain / "log"))
    per_process = tmp_path_factory.mktemp("per-process")
    run_child(
        """
        p = lib.kvh_malloc(4096, 0, STREAM)
        lib.kvh_free(p, 4096, 0, STREAM)
        assert lib.kvh_synchronize() == 0
        lib.kvh_shutdown()
        """,
        KVH_METRICS_FILE=str(per_process / "kvh-{pid}.prom"),
        KVH_LOG_DIR=str(per_process / "log"),
    )
    (prom,) = per_process.glob("kvh-*.prom")
    both = Exported(text, prom.read_text())
    assert "kvh_log_records_written_total" in both.series and "kvh_anomalies_total" in both.series
    assert "pid" in both.labels("kvh_allocations_total")
    return both


# ---------------------------------------------------------------------------------------------
# The checks: each returns what is wrong with `dash` (nothing when it is right)


def model_problems(dash: dict, exported: Exported) -> list:
    out = []
    if dash.get("schemaVersion") != 39:
        out.append(f"schemaVersion {dash.get('schemaVersion')!r}, not 39")
    if dash.get("uid") != "kvhygiene":
        out.append(f"uid {dash.get('uid')!r}")
    if not dash.get("title"):
        out.append("no title")
    if dash.get("id") is not None:
        out.append("an id: an exported model has none (Grafana assigns it on import)")
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        out.append(f"no datasource variable of type datasource over prometheus: {ds}")
    for name in ("job", "instance"):
        if name not in variables:
            out.append(f"no {name} variable")
    for name, q in variable_queries(dash):
        m = re.fullmatch(r"label_values\((kvh_\w+)(\{[^}]*\})?,\s*(\w+)\)", q)
        if not m:
            out.append(f"variable {name}: {q!r} does not list a label of a kvh_* series")
        elif m.group(3) != name:
            out.append(f"variable {name} lists the values of {m.group(3)}")
    return out


def layout_problems(dash: dict, exported: Exported) -> list:
    out = []
    everything = [r for r, _ in rows(dash)] + panels(dash)
    ids = [p.get("id") for p in everything]
    dup = sorted({i for i in ids if ids.count(i) > 1}, key=str)
    if dup or not all(isinstance(i, int) for i in ids):
        out.append(f"panel ids not unique integers: {dup or ids}")
    titles = [p.get("title") for p in panels(dash)]
    if any(not t for t in titles):
        out.append("a panel without a title")
    dup = sorted({t for t in titles if t and titles.count(t) > 1})
    if dup:
        out.append(f"titles used twice: {dup}")
    for p in everything:
        g = p.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "xywh"):
            out.append(f"{p.get('title')!r}: gridPos {g}")
        elif g["x"] < 0 or g["y"] < 0 or g["w"] < 1 or g["h"] < 1 or g["x"] + g["w"] > GRID_COLUMNS:
            out.append(f"{p.get('title')!r}: gridPos {g} outside the {GRID_COLUMNS} columns")
    if out:
        return out
    grouped = rows(dash)
    for i, (row, members) in enumerate(grouped):
        top = row["gridPos"]["y"] + row["gridPos"]["h"]
        bottom = grouped[i + 1][0]["gridPos"]["y"] if i + 1 < len(grouped) else None
        # The panels of a collapsed row are laid out when it opens.
        for p in [] if row.get("collapsed") else members:
            g = p["gridPos"]
            if g["y"] < top or (bottom is not None and g["y"] + g["h"] > bottom):
                out.append(f"{p['title']!r} (y {g['y']}..{g['y'] + g['h']}) is not under row {row['title']!r}")
        laid = [row] + ([] if row.get("collapsed") else members)
        for j, a in enumerate(laid):
            for b in laid[j + 1 :]:
                if overlap(a["gridPos"], b["gridPos"]):
                    out.append(f"{a['title']!r} and {b['title']!r} overlap")
    return out


def overlap(a: dict, b: dict) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def row_problems(dash: dict, exported: Exported) -> list:
    titles = [r["title"] for r, _ in rows(dash)]
    out = [] if titles == ROWS else [f"rows {titles}, not {ROWS}"]
    out += [f"row {r['title']!r} is empty" for r, members in rows(dash) if not members]
    return out


def datasource_problems(dash: dict, exported: Exported) -> list:
    out = []

    def check(where: str, ds) -> None:
        if ds != DATASOURCE and ds != "${datasource}":
            out.append(f"{where}: datasource {ds!r}, not the variable")

    for r, _ in rows(dash):
        if "datasource" in r:
            check(f"row {r['title']!r}", r["datasource"])
    for p in panels(dash):
        check(f"panel {p['title']!r}", p.get("datasource"))
        for t in p.get("targets", []):
            check(f"panel {p['title']!r} query {t.get('refId')}", t.get("datasource"))
    for v in dash["templating"]["list"]:
        if v["type"] != "datasource":
            check(f"variable {v['name']}", v.get("datasource"))
    for a in dash.get("annotations", {}).get("list", []):
        if not a.get("builtIn"):
            check(f"annotation {a.get('name')!r}", a.get("datasource"))
    return out


def metric_problems(dash: dict, exported: Exported) -> list:
    out = []
    for where, expr in expressions(dash):
        for name, _, _ in selectors(expr):
            if name not in exported.series:
                out.append(f"{where}: {name} is not exported")
    if not targets(dash):
        out.append("no panel queries")
    return out


def label_problems(dash: dict, exported: Exported) -> list:
    """Label matchers name labels the series carry; fixed values are values the library writes."""
    out = []
    for where, expr in expressions(dash):
        for name, matchers, _ in selectors(expr):
            if name not in exported.series:
                continue  # metric_problems says so
            have = exported.labels(name)
            for label, op, value in matchers:
                if label in TARGET_LABELS:
                    if fixed(value):
                        out.append(f"{where}: {name}{{{label}{op}{value!r}}} fixes a target label")
                    continue
                if label not in have:
                    out.append(f"{where}: {name} has no label {label} ({sorted(have)})")
                    continue
                values = exported.values(name, label)
                if not fixed(value):
                    continue
                if op == "=" and value not in values:
                    out.append(f"{where}: {name}{{{label}={value!r}}} is never exported ({sorted(values)})")
                if op == "=~" and not any(re.fullmatch(value, v) for v in values):
                    out.append(f"{where}: {name}{{{label}=~{value!r}}} matches no exported value ({sorted(values)})")
        m = re.fullmatch(r"label_values\((kvh_\w+)(\{[^}]*\})?,\s*(\w+)\)", expr)
        if m and m.group(1) in exported.series:
            if m.group(3) not in TARGET_LABELS | exported.labels(m.group(1)):
                out.append(f"{where}: {m.group(1)} has no label {m.group(3)}")
    return out


def grouping_problems(dash: dict, exported: Exported) -> list:
    """Every label of `by (...)` / `without (...)` is one each kvh_* series of the expression
    carries (`pid` where the metrics file name holds {pid}) or a target label."""
    out = []
    for where, expr in expressions(dash):
        names = [n for n, _, _ in selectors(expr) if n in exported.series]
        for group in GROUPING.findall(expr):
            for label in filter(None, (l.strip() for l in group.split(","))):
                if label in TARGET_LABELS:
                    continue
                for name in names:
                    if label not in exported.labels(name):
                        out.append(f"{where}: grouped by {label}, which {name} does not carry")
    return out


def counter_problems(dash: dict, exported: Exported) -> list:
    """Counters are read through rate()/increase() only, and those functions read counters only."""
    out = []
    stats = {f"panel {p['title']!r}" for p in panels(dash) if p["type"] == "stat"}
    for where, expr in expressions(dash):
        if where.startswith("variable"):
            continue  # label_values reads labels, not values
        for name, _, start in selectors(expr):
            kind = exported.types.get(name)
            if kind is None:
                continue  # metric_problems says so
            through_rate = bool(COUNTER_FUNCTIONS.search(expr[:start]))
            end = start + len(name)
            first_value = where in stats and bool(
                (STAT_FIRST_VALUE.search(expr[:start]) and STAT_RANGE_AFTER.match(expr, end))
                or (STAT_SEEN_BEFORE.search(expr[:start]) and STAT_BEFORE_AFTER.match(expr, end))
            )
            if kind == "counter" and not (through_rate or first_value):
                out.append(f"{where}: counter {name} read without rate() or increase()")
            if kind != "counter" and through_rate:
                out.append(f"{where}: rate()/increase() of {name}, a {kind}")
    return out


def range_problems(dash: dict, exported: Exported) -> list:
    """Stat panels total over the dashboard's range; graphs use Grafana's rate interval."""
    want = {"stat": "$__range", "timeseries": "$__rate_interval"}
    out = []
    for p, expr in targets(dash):
        if p["type"] == "stat":
            # The day before the range, where a stat looks whether a series is new.
            expr = expr.replace("[1d] offset $__range", "[$__range] offset $__range")
        for r in RANGE.findall(expr):
            if r != want.get(p["type"]):
                out.append(f"panel {p['title']!r} ({p['type']}): range [{r}], not [{want.get(p['type'])}]")
    return out


def variable_problems(dash: dict, exported: Exported) -> list:
    """Every kvh_* selector of a panel is filtered by the job and instance variables."""
    out = []
    for p, expr in targets(dash):
        for name, matchers, _ in selectors(expr):
            missing = VARIABLE_MATCHERS - set(matchers)
            if missing:
                out.append(f"panel {p['title']!r}: {name} lacks {sorted(missing)}")
    return out


def security_stat_problems(dash: dict, exported: Exported) -> list:
    """The Security row's stat panels total their series over the dashboard range (an instant
    query) and turn red at the first event: green at 0, red from a value in (0, 1]."""
    security = dict((r["title"], members) for r, members in rows(dash)).get("Security", [])
    stats = [p for p in security if p["type"] == "stat"]
    out = [] if len(stats) >= 6 else [f"{len(stats)} stat panels in the Security row"]
    for p in stats:
        steps = p["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
        base = [s for s in steps if s.get("value") is None]
        red = [s["value"] for s in steps if s.get("value") is not None and s["color"] == "red"]
        if [s["color"] for s in base] != ["green"]:
            out.append(f"{p['title']!r}: base colour {base}, not green")
        if not red or not 0 < min(red) <= 1:
            out.append(f"{p['title']!r}: no red threshold at the first event ({steps})")
        if any(s.get("value") is not None and s["value"] <= 0 for s in steps):
            out.append(f"{p['title']!r}: a threshold at or below 0 ({steps})")
        if p["fieldConfig"]["defaults"].get("color", {}).get("mode") != "thresholds":
            out.append(f"{p['title']!r}: not coloured by its thresholds")
        for t in p["targets"]:
            if not t.get("instant"):
                out.append(f"{p['title']!r}: query {t['refId']} is not instant")
    return out


def alert_problems(dash: dict, exported: Exported) -> list:
    """Every alert fires on a series some panel shows: a panel selects the alert's metric with
    no fixed matcher the alert's own selector would fail."""
    shown = [(name, matchers) for _, expr in targets(dash) for name, matchers, _ in selectors(expr)]
    out = []
    for a in alerts():
        seen = [
            (name, m)
            for name, alert_matchers, _ in selectors(a["expr"])
            for n, m in shown
            if n == name and all(satisfied(x, alert_matchers) for x in m if fixed(x[2]))
        ]
        if not seen:
            out.append(f"{a['alert']} ({a['expr']}): no panel shows what it fires on")
    return out


def satisfied(matcher: tuple, alert_matchers: list) -> bool:
    """Whether every sample the alert's matchers select passes the panel's `matcher`."""
    label, op, value = matcher
    equal = [v for l, o, v in alert_matchers if l == label and o == "="]
    if not equal:
        return False
    v = equal[0]
    return {
        "=": v == value,
        "!=": v != value,
        "=~": re.fullmatch(value, v) is not None,
        "!~": re.fullmatch(value, v) is None,
    }[op]


def description_problems(dash: dict, exported: Exported) -> list:
    """Alerts and runbook sections named in panel descriptions exist."""
    names = {a["alert"] for a in alerts()}
    sections = anchors(RUNBOOK.read_text())
    out = []
    for p in panels(dash):
        text = p.get("description", "")
        if not text:
            out.append(f"panel {p['title']!r} has no description")
        for alert in re.findall(r"\bKvh[A-Z]\w+", text):
            if alert not in names:
                out.append(f"panel {p['title']!r} names alert {alert}, which the rules lack")
        for anchor in re.findall(r"docs/operations\.md#([\w-]+)", text):
            if anchor not in sections:
                out.append(f"panel {p['title']!r} names runbook section #{anchor}, which does not exist")
    return out


# ---------------------------------------------------------------------------------------------
# The tests


def test_the_dashboard_is_a_grafana_model_with_a_datasource_variable(exported):
    assert model_problems(load(), exported) == []


def test_panels_have_unique_ids_and_titles_and_fit_the_grid_without_overlapping(exported):
    assert layout_problems(load(), exported) == []


def test_rows_come_in_the_order_on_call_reads_them(exported):
    assert row_problems(load(), exported) == []


def test_every_query_uses_the_datasource_variable(exported):
    assert datasource_problems(load(), exported) == []


def test_every_metric_is_exported_by_the_library(exported):
    assert metric_problems(load(), exported) == []


def test_every_label_matched_is_exported_with_that_value(exported):
    assert label_problems(load(), exported) == []


def test_every_label_grouped_by_is_exported(exported):
    assert grouping_problems(load(), exported) == []


def test_counters_are_read_as_rates_and_totals_only(exported):
    assert counter_problems(load(), exported) == []


def test_stats_total_over_the_dashboard_range_and_graphs_use_the_rate_interval(exported):
    assert range_problems(load(), exported) == []


def test_every_panel_is_filtered_by_the_job_and_instance_variables(exported):
    assert variable_problems(load(), exported) == []


def test_security_stats_turn_red_at_the_first_event(exported):
    assert security_stat_problems(load(), exported) == []


def test_every_alert_fires_on_a_series_a_panel_shows(exported):
    assert alert_problems(load(), exported) == []


def test_every_counter_alert_is_named_by_a_panel_showing_its_counter(exported):
    # On-call reaches a counter's alert from the panels that plot the counter: each alert on
    # a kvh_*_total counter is named in the description of a panel that queries it.
    dash = load()
    missing = []
    for a in alerts():
        counters = {n for n, _, _ in selectors(a["expr"]) if n.endswith("_total")}
        if not counters:
            continue
        naming = [
            p["title"]
            for p, expr in targets(dash)
            if counters & {n for n, _, _ in selectors(expr)} and a["alert"] in p.get("description", "")
        ]
        if not naming:
            missing.append(f"{a['alert']} ({sorted(counters)})")
    assert missing == [], f"alerts no panel showing their counter names: {missing}"


def test_descriptions_name_existing_alerts_and_runbook_sections(exported):
    assert description_problems(load(), exported) == []


def test_every_alert_and_its_runbook_section_are_named_by_a_panel(exported):
    # deploy/README.md: "the panel descriptions name the alert and its runbook section", for
    # every alert of the rules. On-call paged by an alert (KvhMetricsDown among them, which
    # fires on `up`) finds on the dashboard the panel that shows it and the runbook to follow.
    descriptions = [p.get("description", "") for p in panels(load())]
    missing = []
    for a in alerts():
        section = a["annotations"]["runbook_url"].split("#", 1)[1]
        if not any(
            re.search(rf"\b{a['alert']}\b", d) and f"docs/operations.md#{section}" in d for d in descriptions
        ):
            missing.append(f"{a['alert']} (#{section})")
    assert missing == [], f"alerts no panel description names with their runbook section: {missing}"


# ---------------------------------------------------------------------------------------------
# Each check fails on a dashboard broken for it


def edit_exprs(old: str, new: str, count: int = 1):
    """A fault: the first `count` panel queries holding `old` get `new` in its place."""

    def mutate(dash):
        done = 0
        for p in panels(dash):
            for t in p.get("targets", []):
                if done < count and old in t.get("expr", ""):
                    t["expr"] = t["expr"].replace(old, new)
                    done += 1
        assert done == count, f"{old!r}: {done} queries hold it"

    return mutate


def edit_panel(title: str, change):
    def mutate(dash):
        (p,) = [p for p in panels(dash) if p["title"] == title]
        change(p)

    return mutate


def drop_panels_showing(metric: str):
    def mutate(dash):
        before = len(dash["panels"])
        dash["panels"] = [
            p for p in dash["panels"] if not any(metric in t.get("expr", "") for t in p.get("targets", []))
        ]
        assert len(dash["panels"]) < before

    return mutate


def step(title: str, i: int, **change):
    """A fault: threshold step `i` of panel `title` changed."""
    return edit_panel(title, lambda p: p["fieldConfig"]["defaults"]["thresholds"]["steps"][i].update(change))


def reword(title: str, old: str, new: str):
    return edit_panel(title, lambda p: p.update(description=p["description"].replace(old, new)))


def together(*faults):
    def mutate(dash):
        for fault in faults:
            fault(dash)

    return mutate


def set_at(path: list, value):
    def change(obj):
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return change


FAULTS = {
    "misspelt metric": (edit_exprs("kvh_residue_detected_total", "kvh_residue_detect_total"), metric_problems),
    "label value never exported": (edit_exprs('result="failed"', 'result="failure"'), label_problems),
    "label never exported": (edit_exprs('result="failed"', 'outcome="failed"'), label_problems),
    "regex matching no value": (
        edit_exprs("kvh_pool_blocks{job", 'kvh_pool_blocks{state=~"cached",job'),
        label_problems,
    ),
    "target label fixed": (edit_exprs('job=~"$job"', 'job="kvhygiene"'), label_problems),
    "grouped by a label not exported": (edit_exprs("sum by (signal)", "sum by (tenant)"), grouping_problems),
    "rate of a gauge": (
        edit_exprs('sum by (state) (kvh_pool_blocks{job=~"$job",instance=~"$instance"})',
                   'sum by (state) (rate(kvh_pool_blocks{job=~"$job",instance=~"$instance"}[$__rate_interval]))'),
        counter_problems,
    ),
    "a histogram bucket plotted raw": (
        edit_exprs("(rate(kvh_free_to_clean_seconds_bucket{", "((kvh_free_to_clean_seconds_bucket{", count=2),
        counter_problems,
    ),
    "a stat's look before the range read without its offset": (
        edit_exprs("[1d] offset $__range)", "[1d])"),
        counter_problems,
    ),
    "a stat's new-series value read raw": (
        edit_exprs("min_over_time(kvh_residue_detected_total{job=~\"$job\",instance=~\"$instance\"}[$__range])",
                   "kvh_residue_detected_total{job=~\"$job\",instance=~\"$instance\"}"),
        counter_problems,
    ),
    "a counter plotted raw": (
        edit_exprs('rate(kvh_frees_total{job=~"$job",instance=~"$instance"}[$__rate_interval])',
                   'kvh_frees_total{job=~"$job",instance=~"$instance"}'),
        counter_problems,
    ),
    "stat over a fixed range": (edit_exprs("[$__range]", "[5m]"), range_problems),
    "graph over a fixed range": (edit_exprs("[$__rate_interval]", "[1m]"), range_problems),
    "instance variable not applied": (edit_exprs(',instance=~"$instance"', ""), variable_problems),
    "hard-coded datasource": (
        edit_panel("Residue detected", set_at(["targets", 0, "datasource"], {"type": "prometheus", "uid": "P1809F7C"})),
        datasource_problems,
    ),
    "panel without datasource": (edit_panel("Pool bytes by state", lambda p: p.pop("datasource")), datasource_problems),
    "duplicate panel id": (lambda d: d["panels"][2].update(id=d["panels"][1]["id"]), layout_problems),
    "wider than the grid": (edit_panel("Pool hit ratio", set_at(["gridPos", "w"], 13)), layout_problems),
    "overlapping panels": (edit_panel("Residue detected", set_at(["gridPos", "x"], 2)), layout_problems),
    "panel under the wrong row": (edit_panel("Pool hit ratio", set_at(["gridPos", "y"], 2)), layout_problems),
    "panel without title": (edit_panel("Anomalies by signal", set_at(["title"], "")), layout_problems),
    "rows out of order": (
        lambda d: [
            p.update(title={"Security": "Pool", "Pool": "Security"}.get(p["title"], p["title"]))
            for p in d["panels"]
            if p["type"] == "row"
        ],
        row_problems,
    ),
    "old schema": (set_at(["schemaVersion"], 36), model_problems),
    "other uid": (set_at(["uid"], "kvh"), model_problems),
    "variable over another series": (
        lambda d: d["templating"]["list"][1]["query"].update(query="label_values(up, job)"),
        model_problems,
    ),
    "security stat red only from 5": (step("Lost log records", 1, value=5), security_stat_problems),
    "security stat red at zero": (step("Failed verifications", 0, color="red"), security_stat_problems),
    "alert's metric on no panel": (drop_panels_showing("kvh_rescrub_failures_total"), alert_problems),
    "alert's label value on no panel": (
        together(
            edit_exprs('kvh_verifications_total{result="failed"', 'kvh_verifications_total{result="passed"', 2),
            edit_exprs("by (result) (rate(kvh_verifications_total{", 'by (result) (rate(kvh_verifications_total{result="passed",'),
        ),
        alert_problems,
    ),
    "description naming a missing alert": (reword("Anomalies", "KvhAnomaly", "KvhAnomalies"), description_problems),
    "description naming a missing runbook section": (reword("Residue detected", "#residue-detected", "#residue"), description_problems),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_check_catches_its_fault(exported, fault):
    mutate, check = FAULTS[fault]
    dash = load()
    assert check(dash, exported) == [], "the dashboard itself must pass before it is broken"
    broken = copy.deepcopy(dash)
    mutate(broken)
    assert check(broken, exported), f"{check.__name__} missed: {fault}"


def test_the_freed_block_scrubs_panel_counts_no_kv_batches():
    """kvh_scrub_batches_total counts the batches of freed blocks and of paged KV blocks (its
    help: "those in kvh_kv_scrub_batches_total"). The panel "Scrubs of freed blocks" graphs
    the batches of freed blocks, as `kvh demo`'s bytes-scrubbed row prints them: its batch
    series is expected to leave the KV batches out (kvh_scrub_batches_total minus
    kvh_kv_scrub_batches_total), not to add the kvh_scrub_blocks launches to the freed
    blocks' batches."""
    dash = load()
    wrong = [
        expr
        for p, expr in targets(dash)
        if p.get("title") == "Scrubs of freed blocks"
        and "kvh_scrub_batches_total" in expr
        and "kvh_kv_scrub_batches_total" not in expr
    ]
    assert not wrong, f"freed blocks' batches counted with the KV batches: {wrong}"
