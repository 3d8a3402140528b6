"""deploy/ stays consistent with the code: files parse, PromQL names real metrics, promtool agrees."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from worker.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "rules" / "anomaly-worker.rules.yml"
RULE_TESTS = PROMETHEUS / "rules" / "anomaly-worker.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "anomaly-worker.json"
IGNORED = (DEPLOY / "kafka" / "libs",)

METRIC_NAME = re.compile(r"(?<![\w:$])anomaly_[a-z0-9_]+")
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$job": ".*", "$instance": ".*"}

requires_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not on PATH; install it with scripts/install-prometheus.sh",
)


def deploy_files(*suffixes: str) -> list[Path]:
    return sorted(
        path
        for path in DEPLOY.rglob("*")
        if path.is_file() and path.suffix in suffixes and not any(path.is_relative_to(i) for i in IGNORED)
    )


def exported_series_names() -> set[str]:
    """Series names a scrape of WorkerMetrics can produce, including label-less-yet families."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    for family in registry.collect():
        for suffix in suffixes[family.type]:
            names.add(family.name + suffix)
    return names


def dashboard_exprs() -> list[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    return list(walk(json.loads(DASHBOARD.read_text())))


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def rule_test_series() -> list[str]:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    return [series["series"] for test in tests for series in test.get("input_series", [])]


@pytest.mark.parametrize("path", deploy_files(".yml", ".yaml"), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert any(doc is not None for doc in documents), f"{path} is empty"


@pytest.mark.parametrize("path", deploy_files(".json"), ids=lambda p: str(p.relative_to(ROOT)))
def test_json_parses(path: Path) -> None:
    json.loads(path.read_text())


def test_dashboard_and_alerts_watch_the_worker_s_vital_series() -> None:
    # What an operator needs to see and be paged on; this also keeps the name scan below from finding nothing.
    charted = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    alerted = {name for expr in rule_exprs() for name in METRIC_NAME.findall(expr)}
    assert {"anomaly_events_consumed_total", "anomaly_alerts_published_total", "anomaly_dead_letters_total",
            "anomaly_consumer_lag_events", "anomaly_score_ratio_bucket", "anomaly_score_drift_psi",
            "anomaly_worker_ready", "anomaly_last_commit_timestamp_seconds"} <= charted
    assert {"anomaly_worker_ready", "anomaly_consumer_lag_events", "anomaly_dead_letters_total",
            "anomaly_last_commit_timestamp_seconds", "anomaly_score_drift_psi"} <= alerted


@pytest.mark.parametrize(
    ("source", "texts"),
    [("dashboard", dashboard_exprs), ("rules", rule_exprs), ("rule tests", rule_test_series)],
)
def test_promql_uses_only_exported_metrics(source: str, texts: Callable[[], list[str]]) -> None:
    used = {name for text in texts() for name in METRIC_NAME.findall(text)}
    unknown = used - exported_series_names()
    assert used, f"no anomaly_* metric found in the {source}"
    assert not unknown, f"{source} uses metrics worker/metrics.py does not export: {sorted(unknown)}"


def test_dashboard_identity_and_panel_ids() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "anomaly-worker"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "prometheus", panel["title"]


def test_every_alert_has_a_promtool_test() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert alerts >= {
        "AnomalyWorkerDown", "AnomalyWorkerNotReady", "AnomalyConsumerLagGrowing", "AnomalyDeadLetterRateHigh",
        "AnomalyAlertRateSpike", "AnomalyNoRecentCommit", "AnomalyScoreDrift",
    }
    assert alerts - firing == set(), "alerts without a firing test"
    assert alerts - quiet == set(), "alerts without a not-firing test"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


@requires_promtool
@pytest.mark.parametrize("config", sorted(PROMETHEUS.glob("prometheus*.yml")), ids=lambda p: p.name)
def test_promtool_check_config(config: Path) -> None:
    result = promtool("check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


@requires_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@requires_promtool
def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


@requires_promtool
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Feed every dashboard query to promtool as a recording rule, with Grafana variables filled in."""
    rules = []
    for index, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue  # Grafana templating function, not PromQL
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    rules_file = tmp_path / "dashboard.rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr
