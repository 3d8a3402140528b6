"""Real HTTP against start_http_server on 127.0.0.1, port 0; time is a fake clock, never a sleep."""

from __future__ import annotations

import json
import logging
import select
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

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


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_connections": 0}, "max_connections must be a positive integer, got 0"),
    ({"idle_timeout_s": 0.0}, "idle_timeout_s must be a positive number of seconds, got 0.0"),
    ({"idle_timeout_s": float("nan")}, "idle_timeout_s must be a positive number of seconds, got nan"),
])
def test_connection_limits_are_validated(registry: CollectorRegistry, health: HealthState, kwargs: dict,
                                         match: str) -> None:
    with pytest.raises(ValueError, match=match):
        start_http_server("127.0.0.1", 0, registry, health, **kwargs)


# -- connections: bounded threads, idle timeout, clients that leave early ------------------------------

DEADLINE_S = 10.0


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {DEADLINE_S} s waiting until {what}"
        threading.Event().wait(0.01)


def threads_since(baseline: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started after `baseline` was taken that are still running (the connection handlers)."""
    return [t for t in threading.enumerate() if t not in baseline]


def connect(server: MetricsServer) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=DEADLINE_S)


def exchange(client: socket.socket, path: str) -> bytes:
    """Send one keep-alive GET and read exactly its response (headers and Content-Length body)."""
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(4096)
        assert chunk, f"connection closed before the response headers: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = client.recv(4096)
        assert chunk, "connection closed mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_idle_keep_alive_connection_is_closed_after_the_timeout_and_its_thread_ends(
        registry: CollectorRegistry, health: HealthState) -> None:
    srv = start_http_server("127.0.0.1", 0, registry, health, idle_timeout_s=0.3)
    baseline = set(threading.enumerate())
    try:
        with connect(srv) as client:
            assert exchange(client, "/healthz").startswith(b"HTTP/1.1 200")
            last_request = time.monotonic()
            assert exchange(client, "/readyz").startswith(b"HTTP/1.1 503")  # kept alive between requests
            assert len(threads_since(baseline)) == 1
            assert client.recv(1) == b"", "the server should close the idle connection"  # EOF, not a timeout
            assert time.monotonic() - last_request >= 0.3  # closed by the idle timeout, not after the response
        wait_until(lambda: not threads_since(baseline), "the connection's thread ended")
    finally:
        srv.shutdown()


def test_connections_beyond_the_cap_are_refused_without_new_threads(
        registry: CollectorRegistry, health: HealthState) -> None:
    srv = start_http_server("127.0.0.1", 0, registry, health, max_connections=3, idle_timeout_s=60.0)
    baseline = set(threading.enumerate())
    clients = [connect(srv) for _ in range(8)]  # all idle: each would hold a thread for a minute
    try:
        refused: set[socket.socket] = set()
        deadline = time.monotonic() + DEADLINE_S
        while len(refused) < 5 and time.monotonic() < deadline:
            readable, _, _ = select.select([c for c in clients if c not in refused], [], [],
                                           deadline - time.monotonic())
            refused.update(readable)
        assert len(refused) == 5, "connections beyond max_connections=3 should be answered and closed at once"
        for client in refused:
            reply = b"".join(iter(lambda c=client: c.recv(4096), b""))
            assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert b"Connection: close" in reply
        assert len(threads_since(baseline)) == 3
        held = [c for c in clients if c not in refused]
        assert select.select(held, [], [], 0)[0] == []  # the first three are still open and served
        assert exchange(held[0], "/healthz").startswith(b"HTTP/1.1 200")
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: not threads_since(baseline), "the held connections' threads ended")
    assert get(srv, "/healthz")[0] == 200  # the slots were given back
    srv.shutdown()


class BlockingCollector:
    """A collector whose scrape waits until the test says go, so the client can leave mid-request."""

    def __init__(self) -> None:
        self.scraping = threading.Event()
        self.go = threading.Event()

    def collect(self) -> list:
        self.scraping.set()
        self.go.wait(DEADLINE_S)
        return []


def test_a_client_that_leaves_early_is_logged_at_debug_without_a_traceback(
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, health: HealthState) -> None:
    caplog.set_level(logging.DEBUG, logger="worker.http")
    registry = CollectorRegistry()
    collector = BlockingCollector()
    registry.register(collector)  # type: ignore[arg-type]
    srv = start_http_server("127.0.0.1", 0, registry, health)
    baseline = set(threading.enumerate())
    try:
        client = connect(srv)
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        assert collector.scraping.wait(DEADLINE_S)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # linger 0: a reset, so the server's reply fails with a broken pipe / reset
        collector.go.set()
        wait_until(lambda: not threads_since(baseline), "the server finished with the departed client")
        assert get(srv, "/healthz")[0] == 200  # and keeps serving
    finally:
        collector.go.set()
        srv.shutdown()
    stderr = capfd.readouterr().err
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    assert any("went away" in record.getMessage() and record.levelno == logging.DEBUG
               for record in caplog.records), [r.getMessage() for r in caplog.records]
