"""Which connections the metrics endpoint holds, and for how long (policy in docs/metrics-endpoint.md).

Every connection is in one phase, each with a deadline measured on an injected clock:

- `RECEIVING`: a new connection (its TLS handshake included) or a request whose first byte has arrived;
  the request line, the headers and any body must arrive within `request_timeout_s`.
- `RESPONDING`: the request is complete; the response must be taken by the client within `request_timeout_s`.
- `IDLE`: a kept-alive connection between requests, closed after `idle_timeout_s`.

A connection past its deadline is shut down by `sweep()` (the server's accept loop calls it every
0.1 s): its thread's blocked read or write then fails at once, so no phase can be stretched by
trickling bytes, and a TLS handshake never runs on the accept loop's time.

When all `max_connections` slots are taken, a new connection evicts one that is not responding: of the
peer (client host) holding the most connections, the one longest in its phase. Only a table full of
responses in progress refuses a newcomer. So idle or slow-header connections cannot starve the probes,
and a single flooding peer evicts its own connections first. Evicted connections leave the table at
once, but their threads take a moment to end: at most `max_connections` of them may be ending, which
bounds the threads at twice `max_connections`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    RECEIVING = "receiving"
    RESPONDING = "responding"
    IDLE = "idle"


@dataclass(eq=False)
class Connection:
    """One accepted connection; `sock` becomes its TLS wrapper once the handshake starts."""

    peer: str
    sock: socket.socket
    phase: Phase
    since: float
    deadline: float
    closed: bool = False  # shut down by the table (deadline or eviction): its thread is ending


def _shut(sock: socket.socket) -> None:
    """End both directions, waking the thread blocked on it; the socket's own thread closes it."""
    # socket.socket's method, not SSLSocket's: no TLS state is touched from this thread. OSError: already
    # closed by its thread, or reset by the client.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class ConnectionTable:
    """The slots of the metrics endpoint: admission, phases with deadlines, and eviction. Thread-safe."""

    def __init__(self, max_connections: int, request_timeout_s: float, idle_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections must be a positive integer, got {max_connections!r}")
        for name, value in (("request_timeout_s", request_timeout_s), ("idle_timeout_s", idle_timeout_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._open: list[Connection] = []  # oldest admitted first
        self._ending: set[Connection] = set()  # shut down, thread not yet released
        self._evicting = False  # a warning was logged for the current episode of a full table

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def admit(self, sock: socket.socket, peer: str) -> Connection | None:
        """A slot for a new connection, receiving its first request; None when every slot is responding."""
        now = self._clock()
        with self._lock:
            if len(self._open) >= self.max_connections:
                if len(self._ending) >= self.max_connections:
                    return None
                victim = self._victim()
                if victim is None:
                    return None
                if not self._evicting:
                    log.warning("HTTP: all %d connections taken; closing the oldest that is not being answered "
                                "(a slow or idle client) for each new one", self.max_connections)
                    self._evicting = True
                log.debug("HTTP: evicting a %s connection from %s for a new one from %s",
                          victim.phase.value, victim.peer, peer)
                self._close(victim)
            else:
                self._evicting = False
            conn = Connection(peer, sock, Phase.RECEIVING, now, now + self.request_timeout_s)
            self._open.append(conn)
            return conn

    def _victim(self) -> Connection | None:
        """The connection a newcomer replaces: not responding; of the busiest peer; longest in its phase."""
        candidates = [c for c in self._open if c.phase is not Phase.RESPONDING]
        if not candidates:
            return None
        per_peer = Counter(c.peer for c in self._open)
        return min(candidates, key=lambda c: (-per_peer[c.peer], c.since))

    def _close(self, conn: Connection) -> None:
        conn.closed = True
        self._open.remove(conn)
        self._ending.add(conn)
        _shut(conn.sock)

    def attach(self, conn: Connection, sock: socket.socket) -> None:
        """The connection's socket is now `sock` (its TLS wrapper); shut at once if the table closed it."""
        with self._lock:
            conn.sock = sock
            if conn.closed:
                _shut(sock)

    def _enter(self, conn: Connection, phase: Phase, timeout_s: float) -> bool:
        now = self._clock()
        with self._lock:
            if conn.closed:
                return False
            conn.phase, conn.since, conn.deadline = phase, now, now + timeout_s
            return True

    def receiving(self, conn: Connection) -> bool:
        """The first byte of a request arrived; False when the table already closed the connection."""
        return self._enter(conn, Phase.RECEIVING, self.request_timeout_s)

    def responding(self, conn: Connection) -> bool:
        """The request is complete and will be answered; False when the table already closed the connection."""
        return self._enter(conn, Phase.RESPONDING, self.request_timeout_s)

    def idle(self, conn: Connection) -> bool:
        """The response is sent; the connection waits for another request."""
        return self._enter(conn, Phase.IDLE, self.idle_timeout_s)

    def release(self, conn: Connection) -> None:
        """The connection's thread is done with it: its slot is free."""
        with self._lock:
            conn.closed = True
            if conn in self._open:
                self._open.remove(conn)
            self._ending.discard(conn)

    def sweep(self) -> int:
        """Shut down every connection past its deadline; the number shut."""
        now = self._clock()
        with self._lock:
            expired = [c for c in self._open if now >= c.deadline]
            for conn in expired:
                log.debug("HTTP: closing a connection from %s, %s for longer than allowed", conn.peer,
                          conn.phase.value)
                self._close(conn)
            return len(expired)

    def close_all(self) -> None:
        """Shut down every connection (the server is stopping)."""
        with self._lock:
            for conn in list(self._open):
                self._close(conn)
