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
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from training.errors import ConfigError
from worker.config import from_args
from worker.health import Health
from worker.http import MetricsServer, start_http_server
from worker.http_connections import Connection, ConnectionTable, Phase
from worker.metrics import WorkerMetrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


class Facts:
    """What the readiness checks read, as their owners (bundle, source, loop, quarantine) would hold it."""

    def __init__(self) -> None:
        self.model_loaded, self.assigned_partitions, self.broker_ok, self.undecodable_partitions = False, 0, False, 0


@pytest.fixture()
def facts() -> Facts:
    return Facts()


@pytest.fixture()
def health(clock: FakeClock, facts: Facts) -> Health:
    health = Health(stale_after_seconds=60.0, clock=clock)
    health.check("model_loaded", lambda: facts.model_loaded)
    health.check("partitions_assigned", lambda: facts.assigned_partitions > 0)
    health.check("broker_ok", lambda: facts.broker_ok)
    health.check("batches_decodable", lambda: facts.undecodable_partitions == 0)
    return health


@pytest.fixture()
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture()
def server(registry: CollectorRegistry, health: Health) -> Iterator[MetricsServer]:
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
    WorkerMetrics(registry).follow_readiness(lambda: True)
    status, content_type, body = get(server, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert "anomaly_worker_ready 1.0" in body
    assert body.rstrip().endswith("# EOF")


def test_healthz_follows_the_heartbeat(server: MetricsServer, health: Health, clock: FakeClock) -> None:
    status, content_type, body = get(server, "/healthz")
    assert (status, content_type, json.loads(body)["status"]) == (200, "application/json", "ok")

    clock.now += 61.0
    status, _, body = get(server, "/healthz")
    assert status == 503
    assert json.loads(body) == {"status": "stale", "heartbeat_age_seconds": 61.0}

    health.heartbeat()
    status, _, _ = get(server, "/healthz")
    assert status == 200


def test_readyz_names_each_failing_condition(server: MetricsServer, facts: Facts) -> None:
    # Each probe reads the checks' sources now: nothing is pushed into the health object.
    status, _, body = get(server, "/readyz")
    assert status == 503
    assert json.loads(body)["failing"] == ["model_loaded", "partitions_assigned", "broker_ok"]

    facts.model_loaded = True
    facts.assigned_partitions = 3
    status, _, body = get(server, "/readyz")
    assert status == 503
    assert json.loads(body)["failing"] == ["broker_ok"]

    facts.broker_ok = True
    status, _, body = get(server, "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready"})

    facts.assigned_partitions = 0  # all partitions revoked during a rebalance
    status, _, body = get(server, "/readyz")
    assert (status, json.loads(body)["failing"]) == (503, ["partitions_assigned"])

    facts.assigned_partitions = 3
    facts.undecodable_partitions = 1  # a partition held at a batch the client cannot decode
    status, _, body = get(server, "/readyz")
    assert (status, json.loads(body)["failing"]) == (503, ["batches_decodable"])


def test_unknown_paths_are_404(server: MetricsServer) -> None:
    status, _, _ = get(server, "/")
    assert status == 404
    status, _, _ = get(server, "/metrics/extra")
    assert status == 404


def test_shutdown_releases_the_port(registry: CollectorRegistry, health: Health) -> None:
    srv = start_http_server("127.0.0.1", 0, registry, health)
    srv.shutdown()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(srv.url + "/healthz", timeout=2)


def test_health_validates_its_inputs_and_counts_a_raising_check_as_failing() -> None:
    with pytest.raises(ValueError, match="stale_after_seconds must be a positive number"):
        Health(stale_after_seconds=0)
    health = Health()
    assert health.failing_readiness() == ["checks_registered"], "a health object nobody wired is not ready"
    health.check("broker_ok", lambda: True)
    health.check("partitions_assigned", lambda: 1 / 0 > 0)  # e.g. a source asked after it was closed
    assert health.failing_readiness() == ["partitions_assigned"] and not health.is_ready()
    health.check("broker_ok", lambda: False)  # registered again: takes the new check, keeps its place
    health.check("partitions_assigned", lambda: True)
    assert health.failing_readiness() == ["broker_ok"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_connections": 0}, "max_connections must be a positive integer, got 0"),
    ({"idle_timeout_s": 0.0}, "idle_timeout_s must be a positive number of seconds, got 0.0"),
    ({"idle_timeout_s": float("nan")}, "idle_timeout_s must be a positive number of seconds, got nan"),
    ({"request_timeout_s": -1.0}, "request_timeout_s must be a positive number of seconds, got -1.0"),
])
def test_connection_limits_are_validated(registry: CollectorRegistry, health: Health, kwargs: dict,
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
        registry: CollectorRegistry, health: Health) -> None:
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


class BlockingCollector:
    """A collector whose scrape waits until the test says go, so the client can leave mid-request."""

    def __init__(self) -> None:
        self.scraping = threading.Event()
        self.go = threading.Event()
        self.inside = 0  # scrapes waiting in collect() now
        self._lock = threading.Lock()

    def collect(self) -> list:
        with self._lock:
            self.inside += 1
        self.scraping.set()
        self.go.wait(DEADLINE_S)
        with self._lock:
            self.inside -= 1
        return []


def test_a_client_that_leaves_early_is_logged_at_debug_without_a_traceback(
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, health: Health) -> None:
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


# -- deadlines and the connection cap: slow clients cannot take the probes' slots (issue 19 row 1) ----------


def ready(health: Health, facts: Facts) -> Health:
    facts.model_loaded, facts.assigned_partitions, facts.broker_ok = True, 1, True
    return health


class SlowHeaderClients:
    """`count` clients that send a request line, then one header line every `interval_s` and never the blank
    line ending the headers; a client the server answers or cuts off reconnects at once."""

    def __init__(self, server: MetricsServer, count: int, interval_s: float = 0.1) -> None:
        self.server, self.count, self.interval_s = server, count, interval_s
        self.cut_off = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-header-clients", daemon=True)

    def __enter__(self) -> SlowHeaderClients:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(DEADLINE_S)

    def _open(self) -> socket.socket:
        client = connect(self.server)
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\n")
        return client

    def _run(self) -> None:
        clients = [self._open() for _ in range(self.count)]
        line = 0
        try:
            while not self._stop.wait(self.interval_s):  # the trickle's pace, not a synchronisation
                line += 1
                for i, client in enumerate(clients):
                    try:
                        if select.select([client], [], [], 0)[0]:
                            raise ConnectionError("answered or closed")  # either way the server is done with it
                        client.sendall(f"X-Slow-{line}: {line}\r\n".encode())
                    except OSError:
                        client.close()
                        self.cut_off += 1
                        clients[i] = self._open()
        finally:
            for client in clients:
                client.close()


def test_slow_header_clients_cannot_starve_the_probes(registry: CollectorRegistry, health: Health,
                                                      facts: Facts) -> None:
    """max_connections clients trickling header lines took every slot, so the probes got 503 for as long as
    the clients kept at it; now each is cut off at its deadline and a newcomer evicts the slowest."""
    srv = start_http_server("127.0.0.1", 0, registry, ready(health, facts), max_connections=8, request_timeout_s=0.5)
    try:
        with SlowHeaderClients(srv, 8) as attack:
            wait_until(lambda: srv.open_connections == 8, "the slow clients hold every slot")
            attack_ends = time.monotonic() + 1.5  # three request timeouts: the clients are cut off and reconnect
            rounds = 0
            while time.monotonic() < attack_ends or rounds < 3:
                for path in ("/healthz", "/readyz", "/metrics"):
                    started = time.monotonic()
                    status, _, body = get(srv, path)
                    assert status == 200, f"{path} answered {status} under slow-header load: {body!r}"
                    assert time.monotonic() - started < 1.0, f"{path} took {time.monotonic() - started:.2f} s"
                rounds += 1
            assert attack.cut_off >= 8, "each slow client should have been cut off at least once"
        wait_until(lambda: srv.open_connections == 0, "every connection closed after the clients left")
    finally:
        srv.shutdown()


def read_until_closed(client: socket.socket) -> bytes:
    return b"".join(iter(lambda: client.recv(65536), b""))


@pytest.mark.parametrize("trickle", [b"", b"X-Slow: 1\r\n"], ids=["silent", "one-header-line-at-a-time"])
def test_a_request_must_arrive_whole_within_the_request_timeout(
        registry: CollectorRegistry, health: Health, trickle: bytes) -> None:
    srv = start_http_server("127.0.0.1", 0, registry, health, request_timeout_s=0.5, idle_timeout_s=60.0)
    try:
        with connect(srv) as client:
            started = time.monotonic()
            if trickle:
                client.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
            while not select.select([client], [], [], 0.1)[0]:  # until the server hangs up
                assert time.monotonic() - started < DEADLINE_S, "the server never closed the slow connection"
                if trickle:
                    client.sendall(trickle)
            assert read_until_closed(client) == b"", "an incomplete request is dropped, not answered"
            assert 0.5 <= time.monotonic() - started < 3.0
        wait_until(lambda: srv.open_connections == 0, "the slot was given back")
        assert get(srv, "/healthz")[0] == 200
    finally:
        srv.shutdown()


def test_a_client_that_never_reads_the_response_is_cut_off(health: Health) -> None:
    registry = CollectorRegistry()
    registry.register(HugeCollector())  # type: ignore[arg-type]
    srv = start_http_server("127.0.0.1", 0, registry, health, request_timeout_s=0.5, idle_timeout_s=60.0)
    try:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect((srv.host, srv.port))
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")  # and never reads the 8 MB answer
        wait_until(lambda: srv.open_connections == 1, "the response is being sent")
        started = time.monotonic()
        assert get(srv, "/healthz")[0] == 200  # another slot answers meanwhile
        wait_until(lambda: srv.open_connections == 0, "the stalled response was cut off")
        assert time.monotonic() - started < 3.0
        client.close()
    finally:
        srv.shutdown()


class HugeCollector:
    """One gauge whose label value is 8 MB: more than every socket buffer between server and client."""

    def collect(self) -> list[GaugeMetricFamily]:
        family = GaugeMetricFamily("huge", "a response too large for the socket buffers", labels=["pad"])
        family.add_metric(["x" * 8_000_000], 1.0)
        return [family]


def test_a_request_body_is_never_read_nor_taken_for_the_next_request(server: MetricsServer) -> None:
    with connect(server) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000\r\n\r\npartial body")
        reply = read_until_closed(client)  # answered, then closed at once: no waiting for the body
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nConnection: close\r\n" in reply
    with connect(server) as client:
        client.sendall(b"POST /metrics HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000000\r\n\r\n")
        reply = read_until_closed(client)
    assert reply.startswith(b"HTTP/1.1 501 ")
    assert b"\r\nConnection: close\r\n" in reply


# -- the connection table on a fake clock --------------------------------------------------------------------


@pytest.fixture()
def socket_pairs() -> Iterator[Callable[[], tuple[socket.socket, socket.socket]]]:
    made: list[socket.socket] = []

    def make() -> tuple[socket.socket, socket.socket]:
        server_end, client_end = socket.socketpair()
        client_end.setblocking(False)
        made.extend((server_end, client_end))
        return server_end, client_end

    yield make
    for sock in made:
        sock.close()


def shut(client_end: socket.socket) -> bool:
    """Whether the server end was shut down (the client end reads end-of-file)."""
    try:
        return client_end.recv(1) == b""
    except BlockingIOError:
        return False


def test_each_phase_has_its_deadline(clock: FakeClock, socket_pairs: Callable[[], tuple[socket.socket, socket.socket]]
                                     ) -> None:
    table = ConnectionTable(4, request_timeout_s=5.0, idle_timeout_s=30.0, clock=clock)
    server_end, client_end = socket_pairs()
    conn = table.admit(server_end, "10.0.0.1")
    assert conn is not None and conn.phase is Phase.RECEIVING
    for enter, allowed in ((lambda: True, 5.0), (lambda: table.responding(conn), 5.0), (lambda: table.idle(conn), 30.0),
                           (lambda: table.receiving(conn), 5.0)):
        assert enter()
        clock.now += allowed - 0.01
        assert table.sweep() == 0 and not shut(client_end)
    clock.now += 0.01
    assert table.sweep() == 1
    assert shut(client_end) and conn.closed and len(table) == 0
    assert not table.responding(conn), "a closed connection is never revived"
    table.release(conn)


def test_a_full_table_evicts_the_busiest_peers_oldest_connection_not_being_answered(
        clock: FakeClock, socket_pairs: Callable[[], tuple[socket.socket, socket.socket]]) -> None:
    table = ConnectionTable(3, request_timeout_s=5.0, idle_timeout_s=30.0, clock=clock)
    ends: dict[str, socket.socket] = {}

    def admit(name: str, peer: str) -> Connection | None:
        server_end, ends[name] = socket_pairs()
        clock.now += 0.1
        return table.admit(server_end, peer)

    a1, b1, a2 = admit("a1", "10.0.0.1"), admit("b1", "10.0.0.2"), admit("a2", "10.0.0.1")
    assert a1 and b1 and a2
    assert admit("c1", "10.0.0.3") is not None
    assert [name for name in ends if shut(ends[name])] == ["a1"]  # 10.0.0.1 held two: its oldest went
    assert table.responding(a2)  # being answered: never evicted
    d1 = admit("d1", "10.0.0.4")
    assert d1 is not None and shut(ends["b1"])  # one each now: the oldest not being answered
    c1 = next(c for c in table._open if c.peer == "10.0.0.3")
    assert table.responding(c1) and table.responding(d1)
    assert admit("e1", "10.0.0.5") is None, "every slot is answering a request: refuse"
    assert len(table) == 3


def test_threads_of_evicted_connections_are_bounded(
        clock: FakeClock, socket_pairs: Callable[[], tuple[socket.socket, socket.socket]]) -> None:
    table = ConnectionTable(1, request_timeout_s=5.0, idle_timeout_s=30.0, clock=clock)
    first = table.admit(socket_pairs()[0], "10.0.0.1")
    second = table.admit(socket_pairs()[0], "10.0.0.1")  # evicts the first, whose thread has not ended yet
    assert first and first.closed and second
    assert table.admit(socket_pairs()[0], "10.0.0.1") is None, "one slot, one ending: wait for the thread"
    table.release(first)
    assert table.admit(socket_pairs()[0], "10.0.0.1") is not None and second.closed


def test_http_settings_come_from_flags_and_environment(tmp_path: Path) -> None:
    required = ["--model", "m", "--bootstrap-servers", "b:9092", "--input-topic", "in", "--alert-topic", "a",
                "--dead-letter-topic", "d", "--group-id", "g"]
    defaults = from_args(required, environ={})
    assert (defaults.http_request_timeout_s, defaults.metrics_web_config) == (5.0, None)
    settings = from_args([*required, "--http-request-timeout-s", "0.5"],
                         environ={"ANOMALY_METRICS_WEB_CONFIG": str(tmp_path / "web.yml")})
    assert (settings.http_request_timeout_s, settings.metrics_web_config) == (0.5, tmp_path / "web.yml")
    with pytest.raises(ConfigError, match="--http-request-timeout-s must be a positive number of seconds, got 0.0"):
        from_args([*required, "--http-request-timeout-s", "0"], environ={})


def test_idle_connections_beyond_the_cap_make_way_for_new_ones(
        registry: CollectorRegistry, health: Health) -> None:
    srv = start_http_server("127.0.0.1", 0, registry, health, max_connections=3, idle_timeout_s=60.0,
                            request_timeout_s=60.0)
    baseline = set(threading.enumerate())
    clients = []
    try:
        for _ in range(8):  # all silent: each would hold its slot for a minute
            clients.append(connect(srv))
            # Admitted, and the thread of the connection it evicted has ended (until then it counts against a
            # second bound, and a newcomer would be refused).
            wait_until(lambda: srv.open_connections == len(threads_since(baseline)) == min(len(clients), 3),
                       "the new connection was admitted")
        for client in clients[:5]:  # the oldest were closed for the newer, unanswered
            assert read_until_closed(client) == b""
        assert select.select(clients[5:], [], [], 0)[0] == []  # the newest three are still open
        wait_until(lambda: len(threads_since(baseline)) == 3, "the evicted connections' threads ended")
        assert exchange(clients[-1], "/healthz").startswith(b"HTTP/1.1 200")
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: not threads_since(baseline), "the held connections' threads ended")
    srv.shutdown()


def test_a_connection_is_refused_only_when_every_slot_is_answering_a_request(health: Health) -> None:
    registry = CollectorRegistry()
    collector = BlockingCollector()
    registry.register(collector)  # type: ignore[arg-type]
    srv = start_http_server("127.0.0.1", 0, registry, health, max_connections=2)
    baseline = set(threading.enumerate())
    scrapers = [connect(srv) for _ in range(2)]
    try:
        for scraper in scrapers:  # two scrapes held inside the collector: both slots are answering
            scraper.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        # Both requests inside the collector (one scraping and the other still being read would be evictable).
        wait_until(lambda: len(threads_since(baseline)) == 2 and collector.inside == 2, "both scraping")
        with connect(srv) as refused:
            reply = read_until_closed(refused)
        assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"Connection: close" in reply
        assert len(threads_since(baseline)) == 2, "a refused connection gets no thread"
        collector.go.set()
        for scraper in scrapers:
            assert scraper.recv(65536).startswith(b"HTTP/1.1 200")  # kept alive: read the start only
        assert get(srv, "/healthz")[0] == 200  # the scrapes are idle now: a newcomer evicts one
    finally:
        collector.go.set()
        for scraper in scrapers:
            scraper.close()
        srv.shutdown()
