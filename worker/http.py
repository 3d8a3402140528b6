"""HTTP side channel: `/metrics`, `/healthz` (liveness) and `/readyz` (readiness).

Runs the standard library's ThreadingHTTPServer in a daemon thread so a slow scrape never blocks
the consume loop; the probes read `worker.health.Health`, which derives liveness and readiness when asked.

Each connection gets a thread, so connections are bounded, and bounded in time: a request must arrive
whole (request line, headers, body) within `request_timeout_s` of its first byte (of accepting the
connection, TLS handshake included, for the first request), its response must be taken within as long
again, and a kept-alive connection idle for `idle_timeout_s` is closed (`worker/http_connections.py`
enforces these). When all `max_connections` slots are taken, a new connection replaces the oldest one
that is idle or still sending its request, preferring the peer that holds the most; only a table full
of responses in progress refuses it (503). Why not just refuse when full, or reserve slots for probes:
refusing let 32 clients trickling header lines take every slot for good, so the liveness probe failed
and Kubernetes restarted a healthy pod; a reservation cannot tell a probe from an attacker before the
request line is read. Eviction needs no such knowledge: a probe sends its request in one packet and is
answered in milliseconds, so it is hardly ever the oldest connection not being answered; a trickling
client soon is.

With a `WebConfig` (`--metrics-web-config`, `worker/web_config.py`) the server speaks TLS, the handshake
done on the connection's own thread under the same deadline, and asks for basic auth on every path
but `/healthz` and `/readyz`: kubelet probes cannot send credentials, and those two reveal only status.
A client that goes away mid-exchange is routine for probes and scrapers: it is logged at debug.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from worker.health import Health
from worker.http_connections import Connection, ConnectionTable
from worker.web_config import WebConfig

log = logging.getLogger(__name__)


class MetricsServer:
    """A running probe/metrics server; `port` is the bound port (useful when asked for port 0)."""

    def __init__(self, httpd: _Server, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        address = httpd.server_address
        self.host: str = str(address[0])
        self.port: int = int(address[1])
        self.scheme = "http" if httpd.web.tls is None else "https"

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:8000` (`https://` with TLS)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def open_connections(self) -> int:
        """Connections holding a slot now (those being closed excluded)."""
        return len(self._httpd.connections)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop serving, close the listening socket and every open connection, and join the server thread."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.connections.close_all()
        self._thread.join(timeout)


_BUSY_BODY = b"too many connections, try again later\n"
#: What a connection gets when every slot is answering a request; sent without reading its request.
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: "
                  + str(len(_BUSY_BODY)).encode() + b"\r\nConnection: close\r\nRetry-After: 1\r\n\r\n" + _BUSY_BODY)
#: Paths served without basic auth: kubelet probes cannot send credentials, and these reveal only status.
PROBE_PATHS = ("/healthz", "/readyz")


class _Server(ThreadingHTTPServer):
    """One daemon thread per admitted connection (see `ConnectionTable`); socket errors logged at debug."""

    daemon_threads = True
    # The listen backlog (socketserver's default is 5): a connection beyond it is dropped by the kernel and
    # retried by the client a second later, as long as a probe's whole timeout, so a burst must queue instead.
    request_queue_size = 128
    registry: CollectorRegistry
    health: Health

    def __init__(self, address: tuple[str, int], connections: ConnectionTable, web: WebConfig) -> None:
        super().__init__(address, _Handler)  # type: ignore[arg-type]  # built by _serve_connection, with its conn
        self.connections = connections
        self.web = web
        # A backstop under the table's deadlines, in case the accept loop that sweeps them stalls.
        self.socket_timeout_s = 2 * max(connections.request_timeout_s, connections.idle_timeout_s)
        self._refusing = False

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a new thread if the table admits it; otherwise answer 503 and close it."""
        conn = self.connections.admit(request, peer=str(client_address[0]))
        if conn is None:
            self._refuse(request, client_address)
            return
        self._refusing = False
        thread = threading.Thread(target=self._serve_connection, args=(request, client_address, conn),
                                  name=f"http-{self.server_address[1]}-conn", daemon=True)
        try:
            thread.start()
        except BaseException:
            self.connections.release(conn)
            raise

    def service_actions(self) -> None:
        """Called by `serve_forever` at least every poll interval: close connections past their deadline."""
        self.connections.sweep()

    def _serve_connection(self, request: socket.socket, client_address: Any, conn: Connection) -> None:
        try:
            _Handler(request, client_address, self, conn)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.connections.release(conn)
            self.shutdown_request(conn.sock)  # the TLS wrapper when there is one

    def _refuse(self, request: socket.socket, client_address: Any) -> None:
        if not self._refusing:
            log.warning("HTTP: all %d connections are being answered; refusing new ones until one is done",
                        self.connections.max_connections)
            self._refusing = True
        log.debug("HTTP: refused connection from %s", client_address)
        if self.web.tls is None:  # a TLS client would read plain text as a broken handshake
            try:
                request.setblocking(False)  # the reply fits in the socket buffer; never wait on this client
                request.send(_BUSY_RESPONSE)
            except OSError:
                pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log instead of printing a traceback; a socket error (a client that left or stalled, a failed TLS
        handshake, a connection closed at its deadline) is not an error of ours."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("HTTP: client %s went away or was cut off: %s", client_address, error)
        else:
            log.exception("HTTP: error while serving %s", client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """Serves one connection, telling the connection table which phase it is in."""

    server: _Server
    protocol_version = "HTTP/1.1"

    def __init__(self, request: socket.socket, client_address: Any, server: _Server, conn: Connection) -> None:
        self.conn = conn
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        # A read or write that waits this long fails even if the deadline sweep stalled.
        self.request.settimeout(self.server.socket_timeout_s)
        context = self.server.web.tls
        if context is not None:
            tls = context.wrap_socket(self.request, server_side=True, do_handshake_on_connect=False)
            self.server.connections.attach(self.conn, tls)
            self.request = tls
            tls.do_handshake()  # bounded by the connection's deadline: the table shuts the socket
        super().setup()

    def handle(self) -> None:
        """Serve requests until the client, a deadline or an eviction ends the connection."""
        connections = self.server.connections
        self.close_connection = True
        self.handle_one_request()  # the first request's deadline runs from the connection's admission
        while not self.close_connection:
            if not connections.idle(self.conn) or not cast(io.BufferedReader, self.rfile).peek(1):
                return  # closed by the table, or by the client
            if not connections.receiving(self.conn):
                return
            self.handle_one_request()

    def parse_request(self) -> bool:
        """Read the headers; a request cut short by its deadline is dropped, not answered."""
        if not super().parse_request():
            return False
        if not self.server.connections.responding(self.conn):
            self.close_connection = True
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        path = self.path.split("?", 1)[0]
        auth = self.server.web.auth
        if auth is not None and path not in PROBE_PATHS and not auth.check(self.headers.get("Authorization")):
            log.debug("HTTP: %s sent no valid credentials for %s", self.client_address[0], path)
            self._send_json(401, {"status": "unauthorized"},
                            extra={"WWW-Authenticate": 'Basic realm="anomaly-worker", charset="UTF-8"'})
        elif path == "/metrics":
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
            self._send_json(404, {"status": "not found", "endpoints": ["/metrics", *PROBE_PATHS]})

    def _send_json(self, status: int, body: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        self._send(status, "application/json", json.dumps(body).encode() + b"\n", extra)

    def _send(self, status: int, content_type: str, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers:
            # A GET's body is never read: what is left of it must not be taken for the next request.
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by base class
        log.debug("%s - " + format, self.address_string(), *args)


def start_http_server(
    host: str,
    port: int,
    registry: CollectorRegistry,
    health: Health,
    *,
    max_connections: int = 32,
    idle_timeout_s: float = 30.0,
    request_timeout_s: float = 5.0,
    web: WebConfig | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> MetricsServer:
    """Serve `/metrics`, `/healthz` and `/readyz` on `host:port` from a daemon thread.

    `port=0` binds a free port; read it back from the returned server's `port`. Connections are
    bounded in number and time as the module docstring says; `web` adds TLS and basic auth.
    """
    connections = ConnectionTable(max_connections, request_timeout_s, idle_timeout_s, clock)
    server_class = _Server6 if ":" in host else _Server
    httpd = server_class((host, port), connections, web or WebConfig())
    httpd.registry = registry
    httpd.health = health
    thread = threading.Thread(
        target=httpd.serve_forever,
        kwargs={"poll_interval": 0.1},  # bounds how long shutdown() waits and how late a deadline is enforced
        name=f"http-{httpd.server_address[1]}",
        daemon=True,
    )
    thread.start()
    server = MetricsServer(httpd, thread)
    log.info("serving /metrics, /healthz, /readyz on %s:%s (%s)", host, server.port, httpd.web.describe())
    return server
