"""The dashboard and the alert rules work against a real Prometheus scraping a real worker.

One module-scoped run: train a small bundle with the real `anomaly-train`, start `worker.main` on a
real broker, start the Debian `prometheus` server scraping it every second with the repository's
rules, feed a few thousand events (anomalous and malformed included), then evaluate every dashboard
query and every rule expression through the HTTP API.

Set RENDER_DASHBOARD=1 to also redraw docs/dashboard.png from the run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
import yaml
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from tests.certs import bcrypt_hash, make_pki
from tests.kafka_broker import create_topics, unique_topic, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus server not on PATH; install it with scripts/install-prometheus.sh (CI does)",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample" / "nsl-kdd-sample.csv"
RULES_GLOB = ROOT / "deploy" / "prometheus" / "rules" / "*.rules.yml"
JOB = "anomaly-worker"  # the rules select up{job="anomaly-worker"}
METRIC_NAME = re.compile(r"(?<![\w:$])(?:anomaly_[a-z0-9_]+|up)(?![\w(])")
TRAIN_ROWS = 1500
CHUNKS = 10
MAX_EVENT_BYTES = 4096

# Malformed records, by the dead-letter reason the worker must give them.
MALFORMED: dict[str, list[bytes]] = {
    "invalid_json": [b'{"duration": 1,'] * 12,
    "invalid_utf8": [b'{"service": "\xff\xfe"}'] * 6,
    "not_an_object": [b"[1, 2, 3]"] * 8,
    "oversized": [orjson.dumps({"padding": "x" * (MAX_EVENT_BYTES + 100)})] * 4,
    "no_features": [b'{"unrelated": 1}'] * 5,
    "wrong_type": [b'{"src_bytes": [1, 2], "service": "http"}'] * 7,
}


def _load_renderer() -> Any:
    spec = importlib.util.spec_from_file_location("render_dashboard", ROOT / "scripts" / "render_dashboard.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("render_dashboard", module)
    spec.loader.exec_module(module)
    return module


render = _load_renderer()
VARIABLES = {**render.DEFAULT_VARIABLES, "$__rate_interval": "30s", "$__interval": "1s", "$__range": "5m",
             "$job": JOB, "$instance": ".*"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, context: ssl.SSLContext | None = None) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@dataclass
class Run:
    prometheus: str
    worker_metrics: str
    input_topic: str
    start: float
    end: float
    events: int
    dead_letters: Counter[str]
    worker_log: Path

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        data = render.prometheus_get(self.prometheus, "/api/v1/query", {"query": expr, "time": at or self.end})
        result: list[dict[str, Any]] = data["result"]
        return result

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr, at=time.time())
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle from the real CLI, on a small subset of the sample (normal and attack rows)."""
    work = tmp_path_factory.mktemp("bundle")
    subset = work / "train.csv"
    pd.read_csv(SAMPLE).head(TRAIN_ROWS).to_csv(subset, index=False)
    out = work / "model"
    train = Path(sys.executable).with_name("anomaly-train")
    command = [str(train)] if train.exists() else [sys.executable, "-c", "from training.cli import train_main; "
                                                                          "raise SystemExit(train_main())"]
    result = subprocess.run(
        [*command, "--data", str(subset), "--out", str(out), "--epochs", "5", "--drop", "difficulty",
         "--label-column", "label", "--normal-value", "normal", "--seed", "7"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "manifest.json").is_file()
    return out


def stop(process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def worker_counters(metrics_url: str) -> dict[str, float]:
    """Sum each worker sample name over its labels, read straight from /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    totals: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return dict(totals)


def events(rows: pd.DataFrame) -> Iterator[bytes]:
    """Sample rows as the worker receives them, stamped now (send time); every 50th has a null field."""
    for i, row in zip(rows.index, rows.drop(columns=["difficulty"]).to_dict(orient="records"), strict=True):
        row["id"] = int(i)
        row["timestamp"] = int(time.time() * 1000)
        if i % 50 == 0:
            row["src_bytes"] = None
        yield orjson.dumps(row)


@pytest.fixture(scope="module")
def run(bundle: Path, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    work = tmp_path_factory.mktemp("prometheus-run")
    input_topic, alert_topic, dead_topic = (unique_topic(f"prom-{kind}") for kind in ("events", "alerts", "dead"))
    feedback_topic = unique_topic("prom-feedback")
    create_topics(kafka_bootstrap, [input_topic, alert_topic, dead_topic, feedback_topic], partitions=3)

    worker_port, prometheus_port = free_port(), free_port()
    worker_log = work / "worker.log"
    prometheus_log = work / "prometheus.log"
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_GLOB)],
        "scrape_configs": [{"job_name": JOB, "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]}],
    }))

    processes: list[subprocess.Popen[bytes]] = []
    with worker_log.open("wb") as wlog, prometheus_log.open("wb") as plog:
        try:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "worker.main", "--model", str(bundle), "--bootstrap-servers", kafka_bootstrap,
                 "--input-topic", input_topic, "--alert-topic", alert_topic, "--dead-letter-topic", dead_topic,
                 "--group-id", unique_topic("prom-group"), "--metrics-host", "127.0.0.1",
                 "--metrics-port", str(worker_port), "--max-event-bytes", str(MAX_EVENT_BYTES),
                 "--max-wait-ms", "100", "--max-batch", "200",
                 # The lifecycle panels need their series: the bundle shadows itself, and flood control
                 # runs with a budget high enough to suppress nothing (the counts below stay exact).
                 "--shadow-model", str(bundle), "--alert-key-field", "protocol_type",
                 "--max-alerts-per-s", "100000", "--feedback-topic", feedback_topic,
                 # Exactly-once, so the transaction panels have data (at-least-once is the default elsewhere).
                 "--delivery", "exactly-once", "--transactional-id", unique_topic("prom-worker")],
                cwd=ROOT, stdout=wlog, stderr=subprocess.STDOUT,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"},
            ))
            worker = processes[0]
            processes.append(subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prometheus_port}", "--storage.tsdb.retention.time=1h"],
                cwd=work, stdout=plog, stderr=subprocess.STDOUT,
            ))
            prometheus_process = processes[1]
            prometheus = f"http://127.0.0.1:{prometheus_port}"
            worker_url = f"http://127.0.0.1:{worker_port}"

            def worker_ready() -> bool:
                assert worker.poll() is None, f"worker exited {worker.returncode}:\n{log_tail(worker_log)}"
                return http_status(f"{worker_url}/readyz") == 200

            def prometheus_ready() -> bool:
                assert prometheus_process.poll() is None, f"prometheus exited:\n{log_tail(prometheus_log)}"
                return http_status(f"{prometheus}/-/ready") == 200

            wait_for(worker_ready, 180, "worker /readyz 200 (model loaded, partitions assigned)", interval=0.5)
            wait_for(prometheus_ready, 60, "prometheus /-/ready", interval=0.2)

            def target_up() -> bool:
                result = render.prometheus_get(prometheus, "/api/v1/query", {"query": f'up{{job="{JOB}"}} == 1'})
                return bool(result["result"])

            wait_for(target_up, 30, "prometheus scraping the worker (up == 1)", interval=0.5)
            start = time.time()

            # Produce in chunks and let the worker drain each before the next, so the counters rise over
            # several scrapes and the rate() windows see a real slope rather than one step.
            # The whole sample: the 1500 rows trained on plus 2500 the model has not seen.
            rows = pd.read_csv(SAMPLE)
            assert (rows["label"] != "normal").sum() > 100, "the feed must contain attacks"
            malformed = [(reason, value) for reason, values in MALFORMED.items() for value in values]
            producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=10)
            sent = 0
            try:
                for chunk in range(CHUNKS):
                    batch = list(events(rows.iloc[chunk::CHUNKS])) + [v for _, v in malformed[chunk::CHUNKS]]
                    for i, value in enumerate(batch):
                        producer.send(input_topic, key=str(i).encode(), value=value)
                    producer.flush(timeout=30)
                    sent += len(batch)
                    wait_for(lambda n=sent: worker_counters(f"{worker_url}/metrics")
                             .get("anomaly_events_consumed_total", 0) >= n,
                             120, f"worker consuming {sent} events", interval=0.2)
                    wait_for(lambda n=sent: render.prometheus_get(prometheus, "/api/v1/query", {
                        "query": f'sum(anomaly_events_consumed_total{{job="{JOB}"}}) >= {n}'})["result"],
                        30, f"prometheus scraping {sent} consumed events", interval=0.2)
                # Analyst verdicts on alerts of this model (3 of 4 true): the precision panel and rule need data.
                version = json.loads((bundle / "manifest.json").read_text())["model_version"]
                for offset, verdict in enumerate(["true_positive"] * 3 + ["false_positive"]):
                    producer.send(feedback_topic, value=orjson.dumps(
                        {"alert_id": f"{version}/{input_topic}/0/{offset}", "verdict": verdict}))
                producer.flush(timeout=30)
                wait_for(lambda: worker_counters(f"{worker_url}/metrics").get("anomaly_alert_precision_ratio") == 0.75,
                         60, "the worker's precision from 4 verdicts", interval=0.2)
            finally:
                producer.close(timeout=10)

            assert sent > 4000
            # Let a few more scrapes land after the last event so 30 s rate windows have both ends.
            wait_for(lambda: time.time() - start > 15, 30, "at least 15 s of samples", interval=0.5)
            end = time.time()

            def rules_evaluated() -> bool:
                groups = render.prometheus_get(prometheus, "/api/v1/rules", {})["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                return bool(rules) and all(r.get("health") == "ok" and
                                           not r.get("lastEvaluation", "").startswith("0001") for r in rules)

            wait_for(rules_evaluated, 30, "every rule evaluated at least once", interval=0.5)
            yield Run(prometheus=prometheus, worker_metrics=f"{worker_url}/metrics", input_topic=input_topic,
                      start=start, end=end, events=sent,
                      dead_letters=Counter({reason: len(values) for reason, values in MALFORMED.items()}),
                      worker_log=worker_log)
        finally:
            for process in reversed(processes):
                stop(process)


def test_prometheus_scraped_the_worker_counts(run: Run) -> None:
    consumed = run.query(f'sum(anomaly_events_consumed_total{{job="{JOB}"}})')
    assert float(consumed[0]["value"][1]) == run.events
    by_reason = {r["metric"]["reason"]: float(r["value"][1])
                 for r in run.query(f'sum by (reason) (anomaly_dead_letters_total{{job="{JOB}"}})')}
    assert {k: v for k, v in by_reason.items() if v} == run.dead_letters, log_tail(run.worker_log)
    scored = float(run.query(f'sum(anomaly_events_scored_total{{job="{JOB}"}})')[0]["value"][1])
    assert scored == run.events - sum(run.dead_letters.values())
    alerts = float(run.query(f'sum(anomaly_alerts_published_total{{job="{JOB}"}})')[0]["value"][1])
    assert 0 < alerts < scored, "attacks in the feed should alert, and not every event"


def dashboard_queries() -> list[tuple[str, str]]:
    return [(panel.title, query.expr) for panel in render.panels(render.load_dashboard(), VARIABLES)
            for query in panel.queries]


def test_the_dashboard_has_queries_with_variables_filled_in() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    assert not [expr for _, expr in queries if "$" in expr]


@pytest.mark.parametrize(("title", "expr"), dashboard_queries(), ids=[f"{t}: {e[:60]}" for t, e in dashboard_queries()])
def test_every_dashboard_query_returns_data(run: Run, title: str, expr: str) -> None:
    result = run.query(expr)
    assert result, f"panel {title!r}: no data for {expr}"
    values = [float(sample["value"][1]) for sample in result]
    assert any(math.isfinite(v) for v in values), f"panel {title!r}: only NaN/Inf for {expr}: {values}"


def rules() -> list[dict[str, Any]]:
    rules_file = Path(str(RULES_GLOB)).parent / "anomaly-worker.rules.yml"
    return [rule for group in yaml.safe_load(rules_file.read_text())["groups"] for rule in group["rules"]]


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r.get("alert") or r.get("record"))
def test_every_rule_expression_is_valid_and_its_metrics_have_data(run: Run, rule: dict[str, Any]) -> None:
    run.query(rule["expr"])  # raises with Prometheus' error unless the query is valid
    names = set(METRIC_NAME.findall(rule["expr"]))
    assert names, rule["expr"]
    for name in names:
        result = run.query(f'count({name}{{job="{JOB}"}})')
        assert result and float(result[0]["value"][1]) > 0, f"{rule.get('alert')}: no series for {name}"


def test_prometheus_loaded_every_rule_healthy(run: Run) -> None:
    groups = render.prometheus_get(run.prometheus, "/api/v1/rules", {})["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    expected = {rule.get("alert") or rule.get("record") for rule in rules()}
    assert set(loaded) == expected
    unhealthy = {name: rule.get("lastError") for name, rule in loaded.items() if rule["health"] != "ok"}
    assert not unhealthy


def test_dead_letter_alert_goes_pending_on_malformed_input(run: Run) -> None:
    """Over 1% of this feed is malformed: the alert's condition must hold (it fires only after `for`)."""
    share = sum(run.dead_letters.values()) / run.events
    assert share > 0.01

    def pending() -> list[dict[str, Any]]:
        alerts = render.prometheus_get(run.prometheus, "/api/v1/alerts", {})["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "AnomalyDeadLetterRateHigh"
                and a["labels"].get("topic") == run.input_topic and a["state"] in ("pending", "firing")]

    assert wait_for(pending, 20, "AnomalyDeadLetterRateHigh pending", interval=0.5)


@pytest.mark.skipif(os.environ.get("RENDER_DASHBOARD") != "1", reason="set RENDER_DASHBOARD=1 to redraw docs/")
def test_render_dashboard_png(run: Run) -> None:
    out = render.render_dashboard(run.prometheus, run.start - 5, time.time(), ROOT / "docs" / "dashboard.png",
                                  step=1, variables=VARIABLES)
    assert out.stat().st_size > 20_000
    assert json.loads((ROOT / "deploy/grafana/dashboards/anomaly-worker.json").read_text())["panels"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command makes the test certificates")
def test_prometheus_scrapes_the_worker_over_tls_with_basic_auth(bundle: Path, kafka_bootstrap: str,
                                                                 tmp_path: Path) -> None:
    """A real Prometheus scrapes `--metrics-web-config` TLS + basic auth: up with the password, down without."""
    pki = make_pki(tmp_path / "pki")
    input_topic, alert_topic, dead_topic = (unique_topic(f"prom-tls-{kind}") for kind in ("events", "alerts", "dead"))
    create_topics(kafka_bootstrap, [input_topic, alert_topic, dead_topic], partitions=1)
    web_config = tmp_path / "web.yml"
    web_config.write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
        "basic_auth_users": {"prometheus": bcrypt_hash("scrape-password")}}))
    (tmp_path / "password").write_text("scrape-password\n")
    (tmp_path / "wrong-password").write_text("guess\n")
    worker_port, prometheus_port = free_port(), free_port()

    def job(name: str, password_file: str) -> dict[str, Any]:
        return {"job_name": name, "scheme": "https", "tls_config": {"ca_file": str(pki.ca_cert)},
                "basic_auth": {"username": "prometheus", "password_file": str(tmp_path / password_file)},
                "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]}

    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"},
                                      "scrape_configs": [job("tls-auth", "password"),
                                                         job("tls-wrong-password", "wrong-password")]}))
    worker_log, prometheus_log = tmp_path / "worker.log", tmp_path / "prometheus.log"
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    worker_url, prometheus = f"https://127.0.0.1:{worker_port}", f"http://127.0.0.1:{prometheus_port}"
    processes: list[subprocess.Popen[bytes]] = []
    with worker_log.open("wb") as wlog, prometheus_log.open("wb") as plog:
        try:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "worker.main", "--model", str(bundle), "--bootstrap-servers", kafka_bootstrap,
                 "--input-topic", input_topic, "--alert-topic", alert_topic, "--dead-letter-topic", dead_topic,
                 "--group-id", unique_topic("prom-tls-group"), "--metrics-host", "127.0.0.1",
                 "--metrics-port", str(worker_port), "--metrics-web-config", str(web_config)],
                cwd=ROOT, stdout=wlog, stderr=subprocess.STDOUT,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}))
            processes.append(subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                cwd=tmp_path, stdout=plog, stderr=subprocess.STDOUT))
            worker, prometheus_process = processes

            def worker_ready() -> bool:  # the probe path needs TLS but no password
                assert worker.poll() is None, f"worker exited {worker.returncode}:\n{log_tail(worker_log)}"
                return http_status(f"{worker_url}/readyz", context) == 200

            wait_for(worker_ready, 180, "worker /readyz 200 over TLS", interval=0.5)
            assert http_status(f"{worker_url}/metrics", context) == 401

            def targets() -> dict[str, dict[str, Any]]:
                assert prometheus_process.poll() is None, f"prometheus exited:\n{log_tail(prometheus_log)}"
                try:
                    active = render.prometheus_get(prometheus, "/api/v1/targets", {})["activeTargets"]
                except OSError:
                    return {}
                return {t["labels"]["job"]: t for t in active if t["health"] != "unknown"}

            scraped = wait_for(lambda: len(targets()) == 2 and targets(), 60, "both targets scraped", interval=0.5)
            assert scraped["tls-auth"]["health"] == "up", scraped["tls-auth"].get("lastError")
            assert scraped["tls-wrong-password"]["health"] == "down"
            assert "401" in scraped["tls-wrong-password"]["lastError"]
            query = {"query": 'anomaly_worker_ready{job="tls-auth"}'}
            assert render.prometheus_get(prometheus, "/api/v1/query", query)["result"], "no worker metrics scraped"
        finally:
            for process in reversed(processes):
                stop(process)
    assert "scrape-password" not in worker_log.read_text(errors="replace")
