"""HTTP side channel: `/metrics`, `/healthz` (liveness) and `/readyz` (readiness).

Runs the standard library's ThreadingHTTPServer in a daemon thread so a slow scrape never blocks
the consume loop; the loop only touches `HealthState`, which is thread-safe.

Each connection gets a thread, so connections are bounded: at most `max_connections` are served at
once (a connection beyond that gets a 503 and is closed at once), and a connection that sends nothing
for `idle_timeout_s` (an idle keep-alive socket, a stalled client) is closed, ending its thread.
A client that goes away mid-response is routine for probes and scrapers: it is logged at debug.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)


class HealthState:
    """What the probes report, set by the worker loop and read by HTTP threads.

    Liveness: the loop called `heartbeat()` within `stale_after_seconds` (the clock starts at
    construction, so startup gets one full period). Readiness: model loaded, at least one
    partition assigned, the broker reachable, and no partition held at a record batch the Kafka
    client cannot decode (see `worker/edge.py`).
    """

    def __init__(
        self, stale_after_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (math.isfinite(stale_after_seconds) and stale_after_seconds > 0):
            raise ValueError(f"stale_after_seconds must be a positive number, got {stale_after_seconds}")
        self._lock = threading.Lock()
        self._clock = clock
        self._stale_after = stale_after_seconds
        self._last_heartbeat = clock()
        self._model_loaded = False
        self._assigned_partitions = 0
        self._broker_ok = False
        self._undecodable_partitions = 0

    @property
    def model_loaded(self) -> bool:
        """Whether a verified model bundle is loaded."""
        with self._lock:
            return self._model_loaded

    @model_loaded.setter
    def model_loaded(self, value: bool) -> None:
        with self._lock:
            self._model_loaded = bool(value)

    @property
    def assigned_partitions(self) -> int:
        """Number of input partitions currently assigned to this consumer."""
        with self._lock:
            return self._assigned_partitions

    @assigned_partitions.setter
    def assigned_partitions(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"assigned_partitions must be >= 0, got {value}")
        with self._lock:
            self._assigned_partitions = int(value)

    @property
    def broker_ok(self) -> bool:
        """Whether the last broker interaction succeeded."""
        with self._lock:
            return self._broker_ok

    @broker_ok.setter
    def broker_ok(self, value: bool) -> None:
        with self._lock:
            self._broker_ok = bool(value)

    @property
    def undecodable_partitions(self) -> int:
        """Number of partitions held at a record batch the Kafka client cannot decode."""
        with self._lock:
            return self._undecodable_partitions

    @undecodable_partitions.setter
    def undecodable_partitions(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"undecodable_partitions must be >= 0, got {value}")
        with self._lock:
            self._undecodable_partitions = int(value)

    def heartbeat(self) -> None:
        """Record that the loop made progress (call once per poll iteration)."""
        now = self._clock()
        with self._lock:
            self._last_heartbeat = now

    def heartbeat_age_seconds(self) -> float:
        """Seconds since the last heartbeat (or since construction)."""
        now = self._clock()
        with self._lock:
            return max(0.0, now - self._last_heartbeat)

    def is_alive(self) -> bool:
        """True while the last heartbeat is younger than the staleness limit."""
        return self.heartbeat_age_seconds() <= self._stale_after

    def failing_readiness(self) -> list[str]:
        """Names of the readiness conditions that do not hold; empty when ready."""
        with self._lock:
            checks = {
                "model_loaded": self._model_loaded,
                "partitions_assigned": self._assigned_partitions > 0,
                "broker_ok": self._broker_ok,
                "batches_decodable": self._undecodable_partitions == 0,
            }
        return [name for name, ok in checks.items() if not ok]

    def is_ready(self) -> bool:
        """True when every readiness condition holds."""
        return not self.failing_readiness()


class MetricsServer:
    """A running probe/metrics server; `port` is the bound port (useful when asked for port 0)."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        address = httpd.server_address
        self.host: str = str(address[0])
        self.port: int = int(address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:8000`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and join the server thread."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)


_BUSY_BODY = b"too many connections, try again later\n"
#: What a connection beyond `max_connections` gets before it is closed; sent without reading its request.
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: "
                  + str(len(_BUSY_BODY)).encode() + b"\r\nConnection: close\r\nRetry-After: 1\r\n\r\n" + _BUSY_BODY)

#: Errors that only mean the client went away (or stalled past the idle timeout) before the exchange ended.
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class _Server(ThreadingHTTPServer):
    """One daemon thread per connection, at most `max_connections` of them; client hang-ups logged at debug."""

    daemon_threads = True
    registry: CollectorRegistry
    health: HealthState

    def __init__(self, address: tuple[str, int], max_connections: int, idle_timeout_s: float) -> None:
        super().__init__(address, _Handler)
        self.idle_timeout_s = idle_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max_connections = max_connections
        self._saturated = False

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a new thread if a slot is free; otherwise answer 503 and close it."""
        if not self._slots.acquire(blocking=False):
            self._refuse(request, client_address)
            return
        self._saturated = False
        thread = threading.Thread(target=self._serve_connection, args=(request, client_address),
                                  name=f"http-{self.server_address[1]}-conn", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._slots.release()
            raise

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        if not self._saturated:
            log.warning("HTTP: %d connections open (the maximum); refusing new ones until one closes",
                        self._max_connections)
            self._saturated = True
        log.debug("HTTP: refused connection from %s", client_address)
        try:
            request.setblocking(False)  # the reply fits in the socket buffer; never wait on this client
            request.send(_BUSY_RESPONSE)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log instead of printing a traceback; a client that left early is not an error of ours."""
        error = sys.exc_info()[1]
        if isinstance(error, _CLIENT_GONE):
            log.debug("HTTP: client %s went away: %s", client_address, error)
        else:
            log.exception("HTTP: error while serving %s", client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # A read or write that waits longer ends the connection: BaseHTTPRequestHandler closes an idle
        # keep-alive connection on the timeout, and a stalled write reaches `_Server.handle_error`.
        self.connection.settimeout(self.server.idle_timeout_s)

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, content_type, encoder(self.server.registry))
        elif path == "/healthz":
            health = self.server.health
            age = round(health.heartbeat_age_seconds(), 3)
            if health.is_alive():
                self._send_json(200, {"status": "ok", "heartbeat_age_seconds": age})
            else:
                self._send_json(503, {"status": "stale", "heartbeat_age_seconds": age})
        elif path == "/readyz":
            failing = self.server.health.failing_readiness()
            if failing:
                self._send_json(503, {"status": "not ready", "failing": failing})
            else:
                self._send_json(200, {"status": "ready"})
        else:
            self._send_json(404, {"status": "not found", "endpoints": ["/metrics", "/healthz", "/readyz"]})

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, "application/json", json.dumps(body).encode() + b"\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by base class
        log.debug("%s - " + format, self.address_string(), *args)


def start_http_server(
    host: str,
    port: int,
    registry: CollectorRegistry,
    health: HealthState,
    *,
    max_connections: int = 32,
    idle_timeout_s: float = 30.0,
) -> MetricsServer:
    """Serve `/metrics`, `/healthz` and `/readyz` on `host:port` from a daemon thread.

    `port=0` binds a free port; read it back from the returned server's `port`. At most
    `max_connections` connections are served at once; one silent for `idle_timeout_s` is closed.
    """
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise ValueError(f"max_connections must be a positive integer, got {max_connections!r}")
    if not (math.isfinite(idle_timeout_s) and idle_timeout_s > 0):
        raise ValueError(f"idle_timeout_s must be a positive number of seconds, got {idle_timeout_s}")
    server_class = _Server6 if ":" in host else _Server
    httpd = server_class((host, port), max_connections, idle_timeout_s)
    httpd.registry = registry
    httpd.health = health
    thread = threading.Thread(
        target=httpd.serve_forever,
        kwargs={"poll_interval": 0.1},  # bounds how long shutdown() waits
        name=f"http-{httpd.server_address[1]}",
        daemon=True,
    )
    thread.start()
    log.info("serving /metrics, /healthz, /readyz on %s:%s", host, httpd.server_address[1])
    return MetricsServer(httpd, thread)
