"""ops/alerts.yml, ops/prometheus*.yml and the Grafana dashboard, checked against the code.

Every metric an alert or a panel queries must be one that ``gateway/metrics.py`` or
``workers/metrics.py`` declares (with the labels it declares), every alert needs a threshold,
a ``for:`` duration and a summary. ``promtool check rules`` and ``promtool check config`` run
too where promtool is installed (Debian: ``apt-get install prometheus``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gateway import metrics as gateway_metrics
from tests.conftest import declared
from workers import metrics as worker_metrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "ops" / "alerts.yml"
PROMETHEUS_CONFIGS = [ROOT / "ops" / "prometheus.yml", ROOT / "ops" / "prometheus.local.yml"]
GRAFANA = ROOT / "ops" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

# Series Prometheus itself makes for every target, and the labels it adds to every series.
BUILTIN = {"up": set()}
TARGET_LABELS = {"job", "instance"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
DURATION = re.compile(r"^\d+[smhd]$")
METRIC = re.compile(r"\b(lookalike_[a-z0-9_]+|up)\b(?:\{([^}]*)\})?")
LABEL_MATCHER = re.compile(r"\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"[^\"]*\"\s*")
BY_CLAUSE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def series_names() -> dict[str, set[str]]:
    """Every series name the code can expose (``_total``, ``_bucket``... included) -> label names."""
    names = dict(BUILTIN)
    for module in (gateway_metrics, worker_metrics):
        for family, (kind, labels) in declared(module).items():
            for suffix in SUFFIXES[kind]:
                names[family + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


SERIES = series_names()


def check_expr(expr: str) -> list[str]:
    """What is wrong with a PromQL expression's metric names and label matchers (empty: nothing)."""
    problems = []
    used = METRIC.findall(expr)
    if not used:
        problems.append("queries no Lookalike metric")
    for name, matchers in used:
        if name not in SERIES:
            problems.append(f"{name} is not declared in gateway/metrics.py or workers/metrics.py")
            continue
        for matcher in filter(str.strip, matchers.split(",")):
            match = LABEL_MATCHER.fullmatch(matcher)
            if match is None:
                problems.append(f"{name}: cannot read matcher {matcher!r}")
            elif match.group(1) not in SERIES[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {match.group(1)!r}")
    labels = set().union(*(SERIES.get(name, set()) for name, _ in used)) | TARGET_LABELS
    for group in BY_CLAUSE.findall(expr):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in labels:
                problems.append(f"groups by {label!r}, a label of none of {sorted({n for n, _ in used})}")
    return problems


def test_declared_metrics_follow_the_naming_rules():
    for module in (gateway_metrics, worker_metrics):
        for name, (_, labels) in declared(module).items():
            assert name.startswith("lookalike_"), name
            assert not labels & {"job_id", "product_id", "id", "worker"}, f"{name}: high-cardinality label {labels}"
    counters = [name for name in SERIES if name.endswith("_total")]
    assert counters and all(name.startswith(("lookalike_",)) for name in counters)


def test_the_checker_finds_what_is_wrong():
    assert check_expr('rate(lookalike_indexer_events_total{outcome="dead_letter"}[5m]) > 0.1') == []
    assert check_expr("rate(lookalike_indexer_event_total[5m]) > 1")  # a typo in the name
    assert check_expr('lookalike_indexer_lag_events{shard="1"} > 1')  # a label it does not have
    assert check_expr("sum by (route) (lookalike_indexer_lag_events) > 1")
    assert check_expr("vector(1) > 0")


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert groups
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_queries_declared_metrics_with_a_threshold_and_a_duration(rules):
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"Lookalike[A-Z][A-Za-z]+", name), name
        expr = " ".join(rule["expr"].split())
        assert check_expr(expr) == [], f"{name}: {check_expr(expr)}"
        assert re.search(r"(>|<|>=|<=|==)\s*[0-9.]+\s*$", expr) or expr.startswith("absent("), \
            f"{name}: no threshold at the end of {expr!r}"
        assert DURATION.match(str(rule.get("for", ""))), f"{name}: `for:` missing or not a duration"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_the_alerts_cover_what_an_operator_must_hear_about(rules):
    expected = {"LookalikeIndexerLagGrowing", "LookalikeDeadLetters", "LookalikeJobsFailing",
                "LookalikeJobLatencyHigh", "LookalikeWorkerDown", "LookalikeNoWorker", "LookalikeReplicaBehind",
                "LookalikeQueueBacklog"}
    assert expected <= {rule["alert"] for rule in rules}


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_accepts_the_rules_and_both_configs():
    done = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    for config in PROMETHEUS_CONFIGS:
        done = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def dashboard() -> dict:
    assert [path.name for path in DASHBOARDS] == ["lookalike.json"]
    return json.loads(DASHBOARDS[0].read_text())


def panel_exprs(dashboard: dict) -> dict[str, list[str]]:
    return {panel["title"]: [target["expr"] for target in panel.get("targets", [])]
            for panel in dashboard["panels"] if panel["type"] != "row"}


def test_every_panel_queries_declared_metrics_from_the_provisioned_datasource(dashboard):
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasources["datasources"][0]["uid"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] and dashboard["title"]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
            assert check_expr(target["expr"]) == [], f"{panel['title']}: {check_expr(target['expr'])}"


def test_the_dashboard_shows_every_declared_metric(dashboard):
    shown = {name for exprs in panel_exprs(dashboard).values() for expr in exprs
             for name, _ in METRIC.findall(expr)}
    for module in (gateway_metrics, worker_metrics):
        for family, (kind, _) in declared(module).items():
            assert shown & {family + suffix for suffix in SUFFIXES[kind]}, f"no panel shows {family}"
