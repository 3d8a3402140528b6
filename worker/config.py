"""Worker settings: built once from command-line flags and environment variables, then passed down frozen.

Every flag has an environment variable (`ANOMALY_` + flag name in upper case with underscores), so a
Kubernetes ConfigMap/Secret can configure the worker; a flag given on the command line wins.
Secrets (SASL password) may also come from a file (`--sasl-password-file`) and never print themselves.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.errors import ConfigError

ENV_PREFIX = "ANOMALY_"
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
KAFKA_CLIENTS = ("confluent", "kafka-python")
ISOLATION_LEVELS = ("read_committed", "read_uncommitted")
COMPRESSION_CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
DELIVERY_MODES = ("at-least-once", "exactly-once")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class Secret:
    """A string that does not reveal itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class KafkaSecurity:
    """Client security: TLS files and SASL credentials (PLAIN / SCRAM)."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True

    def __post_init__(self) -> None:
        if self.protocol not in SECURITY_PROTOCOLS:
            raise ConfigError(f"security protocol must be one of {', '.join(SECURITY_PROTOCOLS)}, "
                              f"got {self.protocol!r}")
        if self.protocol.startswith("SASL"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ConfigError(f"{self.protocol} needs --sasl-mechanism, one of {', '.join(SASL_MECHANISMS)}")
            if not self.sasl_username or self.sasl_password is None:
                raise ConfigError(f"{self.protocol} needs --sasl-username and a password "
                                  f"(ANOMALY_SASL_PASSWORD or --sasl-password-file)")

    def client_options(self) -> dict[str, Any]:
        """kafka-python keyword arguments for consumer, producer and admin client."""
        opts: dict[str, Any] = {"security_protocol": self.protocol}
        if self.protocol.startswith("SASL"):
            opts.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                        sasl_plain_password=self.sasl_password.reveal() if self.sasl_password else None)
        if self.protocol in ("SSL", "SASL_SSL"):
            opts.update(ssl_cafile=self.ssl_cafile, ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
                        ssl_check_hostname=self.ssl_check_hostname)
        return opts

    def librdkafka_config(self) -> dict[str, Any]:
        """The same settings as librdkafka (confluent-kafka) configuration properties."""
        conf: dict[str, Any] = {"security.protocol": self.protocol}
        if self.protocol.startswith("SASL"):
            conf.update({"sasl.mechanism": self.sasl_mechanism, "sasl.username": self.sasl_username,
                         "sasl.password": self.sasl_password.reveal() if self.sasl_password else None})
        if self.protocol in ("SSL", "SASL_SSL"):
            for key, value in (("ssl.ca.location", self.ssl_cafile), ("ssl.certificate.location", self.ssl_certfile),
                               ("ssl.key.location", self.ssl_keyfile)):
                if value:
                    conf[key] = value
            conf["ssl.endpoint.identification.algorithm"] = "https" if self.ssl_check_hostname else "none"
        return conf


@dataclass(frozen=True)
class Settings:
    """Everything the worker needs to run; validated at construction."""

    model: Path
    bootstrap_servers: str
    input_topic: str
    alert_topic: str
    dead_letter_topic: str
    group_id: str
    max_batch: int = 1000
    max_wait_ms: int = 200
    max_event_bytes: int = 1_048_576
    top_features: int = 3
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9108
    shutdown_timeout_s: float = 20.0
    kafka_timeout_s: float = 30.0
    retry_backoff_initial_s: float = 0.5
    retry_backoff_max_s: float = 30.0
    rejoin_timeout_s: float = 60.0
    session_timeout_s: float = 15.0
    max_poll_interval_s: float = 300.0
    broker_check_interval_s: float = 2.0
    liveness_timeout_s: float = 60.0
    http_idle_timeout_s: float = 30.0
    http_max_connections: int = 32
    http_request_timeout_s: float = 5.0
    metrics_web_config: Path | None = None  # None: plain HTTP, no auth (worker/web_config.py)
    reload_interval_s: float = 10.0
    heap_trim_interval_s: float = 60.0  # 0: never (worker/heap.py)
    shadow_model: Path | None = None
    feedback_topic: str | None = None
    alert_key_field: str | None = None
    alert_cooldown_s: float = 0.0
    max_alerts_per_s: float = 0.0
    expected_schema_hash: str | None = None
    client_id: str = "anomaly-worker"
    log_level: str = "INFO"
    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    kafka_client: str = "confluent"
    isolation_level: str = "read_committed"
    compression: str | None = None  # None: the client's default, see `output_compression`
    alert_headers: tuple[str, ...] = ()
    delivery: str = "at-least-once"
    transactional_id: str | None = None  # None: see `transactional_id_or_default`
    transaction_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 100_000:
            raise ConfigError(f"max batch must be in [1, 100000] records, got {self.max_batch}")
        if not 0 <= self.max_wait_ms <= 60_000:
            raise ConfigError(f"max wait must be in [0, 60000] ms, got {self.max_wait_ms}")
        if self.max_event_bytes < 64:
            raise ConfigError(f"max event size must be at least 64 bytes, got {self.max_event_bytes}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics port must be in [0, 65535], got {self.metrics_port}")
        for name in ("shutdown_timeout_s", "kafka_timeout_s", "rejoin_timeout_s", "session_timeout_s",
                     "max_poll_interval_s", "broker_check_interval_s", "liveness_timeout_s", "http_idle_timeout_s",
                     "retry_backoff_initial_s", "retry_backoff_max_s", "reload_interval_s", "transaction_timeout_s",
                     "http_request_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {value}")
        if self.retry_backoff_initial_s > self.retry_backoff_max_s:
            raise ConfigError(f"--retry-backoff-initial-s ({self.retry_backoff_initial_s}) must not exceed "
                              f"--retry-backoff-max-s ({self.retry_backoff_max_s})")
        for name in ("alert_cooldown_s", "max_alerts_per_s", "heap_trim_interval_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (0 turns it off), got {value}")
        if self.alert_cooldown_s and not self.alert_key_field:
            raise ConfigError("--alert-cooldown-s needs --alert-key-field: the event field that names the entity "
                              "(host, account) whose alerts it spaces out")
        if self.http_max_connections < 1:
            raise ConfigError(f"--http-max-connections must be at least 1, got {self.http_max_connections}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        topics = {self.input_topic, self.alert_topic, self.dead_letter_topic}
        if len(topics) != 3 or "" in topics:
            raise ConfigError("input, alert and dead-letter topics must be three different, non-empty names")
        if self.feedback_topic is not None and self.feedback_topic in topics:
            raise ConfigError(f"--feedback-topic must differ from the input, alert and dead-letter topics, got "
                              f"{self.feedback_topic!r}")
        if self.kafka_client not in KAFKA_CLIENTS:
            raise ConfigError(f"Kafka client must be one of {', '.join(KAFKA_CLIENTS)}, got {self.kafka_client!r}")
        if self.isolation_level not in ISOLATION_LEVELS:
            raise ConfigError(f"isolation level must be one of {', '.join(ISOLATION_LEVELS)}, "
                              f"got {self.isolation_level!r}")
        if self.compression is not None and self.compression not in COMPRESSION_CODECS:
            raise ConfigError(f"compression must be one of {', '.join(COMPRESSION_CODECS)}, got {self.compression!r}")
        if self.delivery not in DELIVERY_MODES:
            raise ConfigError(f"--delivery must be one of {', '.join(DELIVERY_MODES)}, got {self.delivery!r}")
        if self.delivery == "exactly-once" and self.kafka_client != "confluent":
            raise ConfigError("--delivery exactly-once needs --kafka-client confluent: the worker's transactions "
                              "(offsets committed with the consumer group metadata, KIP-447) use librdkafka")
        if self.transactional_id is not None and not self.transactional_id.strip():
            raise ConfigError("--transactional-id must not be empty")
        if self.delivery == "exactly-once" and self.transaction_timeout_s > 900:
            raise ConfigError(f"--transaction-timeout-s must be at most 900 (the broker's default "
                              f"transaction.max.timeout.ms), got {self.transaction_timeout_s}")

    @property
    def exactly_once(self) -> bool:
        return self.delivery == "exactly-once"

    @property
    def transactional_id_or_default(self) -> str:
        """This worker's transactional id: as set, else `<group id>-<host name>`.

        It must be unique among live workers and stable across restarts of one worker (a StatefulSet pod
        name is both): a restart with the same id aborts its predecessor's open transaction at once, and two
        live workers sharing an id fence each other (docs/exactly-once.md).
        """
        return self.transactional_id or f"{self.group_id}-{socket.gethostname()}"

    @property
    def output_compression(self) -> str:
        """Codec for alerts and dead letters: as set, else zstd with confluent-kafka and none with kafka-python.

        zstd sent the fewest bytes (94 % less than none) and published fastest in
        benchmarks/results/output_compression.md. kafka-python keeps its earlier default (none): its 3.0.12
        consumer group stalls in rebalances now and then, first seen here with a compressing producer, and
        the compressed path was not tested enough to make it the default.
        """
        if self.compression is not None:
            return self.compression
        return "zstd" if self.kafka_client == "confluent" else "none"


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anomaly-worker",
        description="Score Kafka events with an autoencoder bundle; publish alerts and dead letters.",
        epilog=f"Every option can also be set by environment variable {ENV_PREFIX}<OPTION> "
               f"(e.g. {ENV_PREFIX}BOOTSTRAP_SERVERS); the command line wins.")

    def add(flag: str, **kw: Any) -> None:
        kw["help"] = f"{kw.get('help', '')} [env {_env_name(flag)}]".strip()
        p.add_argument(flag, **kw)

    add("--model", type=Path, help="model bundle directory, or a model repository whose current version is "
                                   "followed (anomaly-train --repo, anomaly-promote)")
    add("--reload-interval-s", type=float, help="with a repository: check for a promoted version this often; "
                                                "SIGHUP checks at once (default 10)")
    add("--heap-trim-interval-s", type=float, help="return freed native memory to the system this often "
                                                   "(glibc malloc_trim; default 60, 0 = never)")
    add("--bootstrap-servers", help="Kafka bootstrap servers, host:port[,host:port]")
    add("--input-topic", help="topic of JSON events to score")
    add("--alert-topic", help="topic for alerts")
    add("--dead-letter-topic", help="topic for events that cannot be scored")
    add("--group-id", help="consumer group id")
    add("--max-batch", type=int, help="micro-batch size bound in records (default 1000)")
    add("--max-wait-ms", type=int, help="micro-batch time bound in ms (default 200)")
    add("--max-event-bytes", type=int, help="larger events are dead-lettered as oversized (default 1 MiB)")
    add("--top-features", type=int, help="contributing features listed per alert (default 3)")
    add("--metrics-host", help="address for /metrics, /healthz, /readyz (default 0.0.0.0)")
    add("--metrics-port", type=int, help="port for /metrics, /healthz, /readyz (default 9108; 0 = any)")
    add("--shutdown-timeout-s", type=float, help="deadline for finishing a batch on SIGTERM (default 20)")
    add("--kafka-timeout-s", type=float, help="timeout of each blocking Kafka call (default 30)")
    add("--rejoin-timeout-s", type=float, help="replace the consumer if a group rebalance takes longer (default 60)")
    add("--session-timeout-s", type=float, help="consumer group session timeout (default 15)")
    add("--max-poll-interval-s", type=float, help="consumer max poll interval (default 300)")
    add("--broker-check-interval-s", type=float, help="while idle, check the broker this often (default 2)")
    add("--retry-backoff-initial-s", type=float, help="first wait after a failed delivery or connect (default 0.5)")
    add("--retry-backoff-max-s", type=float, help="longest wait between retries (default 30)")
    add("--liveness-timeout-s", type=float, help="/healthz fails when the loop is stuck this long (default 60)")
    add("--http-idle-timeout-s", type=float, help="close idle HTTP keep-alive connections after (default 30)")
    add("--http-max-connections", type=int, help="concurrent HTTP connections served; when all are taken, a new "
                                                 "one replaces the oldest idle or slow one (default 32)")
    add("--http-request-timeout-s", type=float, help="an HTTP request must arrive whole within this of its first "
                                                     "byte, and its response be taken within as long (default 5)")
    add("--metrics-web-config", type=Path, help="Prometheus web.config file: TLS and basic auth for the metrics "
                                                "endpoint (docs/metrics-endpoint.md; default: plain HTTP)")
    add("--shadow-model", type=Path, help="a candidate bundle that scores every batch too; its alerts are never "
                                          "published, its alert rate and agreement with the live model are metrics")
    add("--feedback-topic", help="topic of analyst verdicts {\"alert_id\": ..., \"verdict\": \"true_positive\" | "
                                 "\"false_positive\"}; exported as precision per model version")
    add("--alert-key-field", help="event field naming the entity an alert is about (host, account); added to "
                                  "alerts as 'entity'")
    add("--alert-cooldown-s", type=float, help="publish at most one alert per entity in this window; the rest "
                                               "are counted into a summary alert (default 0 = off)")
    add("--max-alerts-per-s", type=float, help="global alert budget; alerts beyond it are counted into summaries "
                                               "(default 0 = off)")
    add("--expected-schema-hash", help="refuse a bundle whose schema hash differs")
    add("--client-id", help="Kafka client id (default anomaly-worker)")
    add("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    add_security_arguments(add)
    add("--kafka-client", choices=KAFKA_CLIENTS,
        help="Kafka client library: confluent (librdkafka, default) or kafka-python (pure Python)")
    add("--isolation-level", choices=ISOLATION_LEVELS,
        help="read_committed (default) skips records of aborted upstream transactions")
    add("--compression", choices=COMPRESSION_CODECS,
        help="codec for alerts and dead letters (default zstd with confluent, none with kafka-python)")
    add("--alert-headers", help="comma-separated input record header names copied into each alert document")
    add("--delivery", choices=DELIVERY_MODES,
        help="at-least-once (default): alerts may repeat after a crash, with the same alert_id; exactly-once: "
             "each batch's alerts, dead letters and offsets commit in one Kafka transaction (confluent only)")
    add("--transactional-id", help="exactly-once: this worker's transactional id, unique per replica and stable "
                                   "across its restarts (default <group-id>-<hostname>)")
    add("--transaction-timeout-s", type=float, help="exactly-once: the broker aborts a transaction left open "
                                                    "this long by a dead worker (default 60)")
    return p


def add_security_arguments(add: Callable[..., object]) -> None:
    """The Kafka client security flags, declared once for every command that talks to Kafka.

    `add(flag, **argparse keywords)`; the worker, anomaly-replay and anomaly-train share these. The password
    itself has no flag (argv is visible to every local user in /proc): it comes from a file or the
    environment (`security_from_args`).
    """
    add("--security-protocol", help=f"one of {', '.join(SECURITY_PROTOCOLS)} (default PLAINTEXT)")
    add("--sasl-mechanism", help=f"one of {', '.join(SASL_MECHANISMS)}")
    add("--sasl-username", help="SASL user name")
    add("--sasl-password-file", type=Path, help=f"file holding the SASL password (or env {ENV_PREFIX}SASL_PASSWORD)")
    add("--ssl-cafile", help="CA bundle for TLS")
    add("--ssl-certfile", help="client certificate for mutual TLS")
    add("--ssl-keyfile", help="client key for mutual TLS")


def security_from_args(get: Callable[[str], Any], environ: Mapping[str, str]) -> KafkaSecurity:
    """KafkaSecurity from the flags of `add_security_arguments` (`get(name)`: the flag, else its env variable).

    The password: the file `--sasl-password-file` names (surrounding whitespace stripped), else
    `ANOMALY_SASL_PASSWORD`.
    """
    password = environ.get(ENV_PREFIX + "SASL_PASSWORD")
    password_file = get("sasl_password_file")
    if password_file is not None:
        try:
            password = Path(password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read SASL password file {password_file}: {exc.strerror}") from None
    return KafkaSecurity(
        protocol=(get("security_protocol") or "PLAINTEXT").upper(), sasl_mechanism=get("sasl_mechanism"),
        sasl_username=get("sasl_username"), sasl_password=Secret(password) if password else None,
        ssl_cafile=get("ssl_cafile"), ssl_certfile=get("ssl_certfile"), ssl_keyfile=get("ssl_keyfile"))


def env_fallback(args: argparse.Namespace, environ: Mapping[str, str]) -> Callable[[str], Any]:
    """`get(name)`: the flag's value, else `ANOMALY_<NAME>` from `environ`, else None."""
    values = vars(args)

    def get(name: str) -> Any:
        value = values.get(name)
        if value is None:
            value = environ.get(ENV_PREFIX + name.upper()) or None
        return value

    return get


REQUIRED = ("model", "bootstrap_servers", "input_topic", "alert_topic", "dead_letter_topic", "group_id")


def from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from flags, falling back to environment variables, then defaults."""
    env = os.environ if environ is None else environ
    get = env_fallback(parser().parse_args(argv), env)

    missing = [n for n in REQUIRED if get(n) is None]
    if missing:
        raise ConfigError("missing required setting(s): " + ", ".join(
            f"--{n.replace('_', '-')} (or {ENV_PREFIX}{n.upper()})" for n in missing))

    def typed(name: str, kind: type) -> Any:
        value = get(name)
        if value is None:
            return None
        try:
            return kind(value)
        except ValueError as exc:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}: expected {kind.__name__}, got {value!r}") from exc

    security = security_from_args(get, env)
    overrides = {name: typed(name, kind) for name, kind in (
        ("max_batch", int), ("max_wait_ms", int), ("max_event_bytes", int), ("top_features", int),
        ("metrics_port", int), ("shutdown_timeout_s", float), ("kafka_timeout_s", float),
        ("rejoin_timeout_s", float), ("session_timeout_s", float), ("max_poll_interval_s", float),
        ("broker_check_interval_s", float), ("retry_backoff_initial_s", float), ("retry_backoff_max_s", float),
        ("liveness_timeout_s", float), ("http_idle_timeout_s", float), ("http_max_connections", int),
        ("http_request_timeout_s", float),
        ("reload_interval_s", float), ("alert_cooldown_s", float), ("max_alerts_per_s", float),
        ("transaction_timeout_s", float), ("heap_trim_interval_s", float))}
    for name in ("metrics_host", "expected_schema_hash", "client_id", "log_level", "alert_key_field",
                 "feedback_topic", "transactional_id"):
        overrides[name] = get(name)
    for name in ("kafka_client", "isolation_level", "compression", "delivery"):
        overrides[name] = get(name) and get(name).lower()
    headers = get("alert_headers")
    if headers is not None:
        overrides["alert_headers"] = tuple(h.strip() for h in headers.split(",") if h.strip())
    if get("shadow_model") is not None:
        overrides["shadow_model"] = Path(get("shadow_model"))
    if get("metrics_web_config") is not None:
        overrides["metrics_web_config"] = Path(get("metrics_web_config"))
    return Settings(
        model=Path(get("model")), bootstrap_servers=get("bootstrap_servers"), input_topic=get("input_topic"),
        alert_topic=get("alert_topic"), dead_letter_topic=get("dead_letter_topic"), group_id=get("group_id"),
        security=security, **{k: v for k, v in overrides.items() if v is not None})
