"""Where Kafka is, which client talks to it and how to log in: what the side paths (the feedback reader,
anomaly-replay, anomaly-train --from-kafka) take, from the worker's settings or the same flags."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from training.errors import ConfigError
from worker.config import KAFKA_CLIENTS, KafkaSecurity, Settings, security_from_args


@dataclass(frozen=True)
class Connection:
    """One Kafka connection's settings; `client` picks the adapter (`--kafka-client`)."""

    bootstrap_servers: str
    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    client: str = "confluent"
    client_id: str = "anomaly-worker"
    timeout_s: float = 30.0  # each blocking call

    def __post_init__(self) -> None:
        if self.client not in KAFKA_CLIENTS:
            raise ConfigError(f"--kafka-client must be one of {', '.join(KAFKA_CLIENTS)}, got {self.client!r}")

    @classmethod
    def of(cls, settings: Settings) -> Connection:
        """The worker's own connection."""
        return cls(settings.bootstrap_servers, settings.security, settings.kafka_client, settings.client_id,
                   settings.kafka_timeout_s)

    @classmethod
    def from_args(cls, get: Callable[[str], Any], client_id: str, servers: str | None = None) -> Connection:
        """A side command's connection from `worker.config.add_security_arguments`' flags (`get`: `env_fallback`);
        `servers` when `--bootstrap-servers` is not given."""
        return cls(get("bootstrap_servers") or servers or "", security_from_args(get),
                   get("kafka_client") or "confluent", client_id)
