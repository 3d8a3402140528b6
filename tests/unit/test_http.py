"""Real HTTP against start_http_server on 127.0.0.1, port 0; time is a fake clock, never a sleep."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from worker.http import HealthState, MetricsServer, start_http_server
from worker.metrics import WorkerMetrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def health(clock: FakeClock) -> HealthState:
    return HealthState(stale_after_seconds=60.0, clock=clock)


@pytest.fixture()
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture()
def server(registry: CollectorRegistry, health: HealthState) -> Iterator[MetricsServer]:
    srv = start_http_server("127.0.0.1", 0, registry, health)
    yield srv
    srv.shutdown()


def get(server: MetricsServer, path: str, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(server.url + path, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_port_zero_reports_the_bound_port(server: MetricsServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


def test_metrics_serves_the_injected_registry(server: MetricsServer, registry: CollectorRegistry) -> None:
    metrics = WorkerMetrics(registry)
    metrics.record_consumed("events", 3)
    metrics.set_model("v7", threshold=1.5)
    status, content_type, body = get(server, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert 'anomaly_events_consumed_total{topic="events"} 3.0' in body
    assert 'anomaly_model_info{version="v7"} 1.0' in body


def test_metrics_negotiates_openmetrics(server: MetricsServer, registry: CollectorRegistry) -> None:
    WorkerMetrics(registry).set_ready(True)
    status, content_type, body = get(server, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert "anomaly_worker_ready 1.0" in body
    assert body.rstrip().endswith("# EOF")


def test_healthz_follows_the_heartbeat(server: MetricsServer, health: HealthState, clock: FakeClock) -> None:
    status, content_type, body = get(server, "/healthz")
    assert (status, content_type, json.loads(body)["status"]) == (200, "application/json", "ok")

    clock.now += 61.0
    status, _, body = get(server, "/healthz")
    assert status == 503
    assert json.loads(body) == {"status": "stale", "heartbeat_age_seconds": 61.0}

    health.heartbeat()
    status, _, _ = get(server, "/healthz")
    assert status == 200


def test_readyz_names_each_failing_condition(server: MetricsServer, health: HealthState) -> None:
    status, _, body = get(server, "/readyz")
    assert status == 503
    assert json.loads(body)["failing"] == ["model_loaded", "partitions_assigned", "broker_ok"]

    health.model_loaded = True
    health.assigned_partitions = 3
    status, _, body = get(server, "/readyz")
    assert status == 503
    assert json.loads(body)["failing"] == ["broker_ok"]

    health.broker_ok = True
    status, _, body = get(server, "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready"})

    health.assigned_partitions = 0  # all partitions revoked during a rebalance
    status, _, body = get(server, "/readyz")
    assert (status, json.loads(body)["failing"]) == (503, ["partitions_assigned"])

    health.assigned_partitions = 3
    health.undecodable_partitions = 1  # a partition held at a batch the client cannot decode
    status, _, body = get(server, "/readyz")
    assert (status, json.loads(body)["failing"]) == (503, ["batches_decodable"])


def test_unknown_paths_are_404(server: MetricsServer) -> None:
    status, _, _ = get(server, "/")
    assert status == 404
    status, _, _ = get(server, "/metrics/extra")
    assert status == 404


def test_shutdown_releases_the_port(registry: CollectorRegistry, health: HealthState) -> None:
    srv = start_http_server("127.0.0.1", 0, registry, health)
    srv.shutdown()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(srv.url + "/healthz", timeout=2)


def test_health_state_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="stale_after_seconds must be a positive number"):
        HealthState(stale_after_seconds=0)
    with pytest.raises(ValueError, match="assigned_partitions must be >= 0"):
        HealthState().assigned_partitions = -1
