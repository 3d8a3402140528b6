"""Kafka access problems phrased once for both clients: a failed SASL authentication, a missing ACL.

Both are the broker's configuration, not a record's fault: the batch is not delivered (or the consumer
does not join), readiness fails, nothing is committed, and the worker retries with backoff, so an ACL
added later is picked up without a restart. Each message names the principal, the operation and the
resource as docs/security.md lists them, and never holds the password. No Kafka imports here: each edge
(`worker/kafka_io.py`, `worker/kafka_confluent.py`) maps its client's error codes to these messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from worker.config import KafkaSecurity

DOC = "docs/security.md"


def principal(security: KafkaSecurity) -> str:
    """The broker's name for this client: `User:<sasl user>`, or a description without SASL."""
    return f"User:{security.sasl_username}" if security.sasl_username else "this client (no SASL user)"


def denied(security: KafkaSecurity, operation: str, resource_type: str, name: str, *more: str) -> str:
    """`not authorized: User:w needs WRITE on TOPIC 'alerts' ...` for a missing ACL (or several: `more` names)."""
    resources = " and ".join(f"{resource_type} {n!r}" for n in (name, *more))
    return (f"not authorized: {principal(security)} needs {operation} on {resources}; "
            f"add {'those ACLs' if more else 'that ACL'} ({DOC} lists what each component needs)")


def authentication_failed(security: KafkaSecurity, bootstrap_servers: str, detail: str) -> str:
    """The message for a refused SASL login; `detail` is the client's own (password-free) reason."""
    return (f"authentication failed: {security.sasl_mechanism} login as {security.sasl_username!r} at "
            f"{bootstrap_servers} was refused ({detail}); check --sasl-username and the password "
            f"(--sasl-password-file or ANOMALY_SASL_PASSWORD)")


class Throttled:
    """Logs each distinct message at most once per `interval_s`: a missing ACL fails every retry."""

    def __init__(self, logger: logging.Logger, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.interval_s, self._clock = logger, interval_s, clock
        self._last: dict[str, float] = {}

    def error(self, message: str, key: str | None = None) -> None:
        """Log `message` unless one with the same `key` (default: the message) was logged within the interval."""
        now, key = self._clock(), key or message
        last = self._last.get(key)
        if last is None or now - last >= self.interval_s:
            self._last[key] = now
            self.logger.error("%s", message)
