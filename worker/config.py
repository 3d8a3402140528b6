"""Worker settings: declared once, built once from command-line flags and environment variables, passed down frozen.

Each field of `Settings` and `KafkaSecurity` is declared with its help, check and variable
(`worker.config_decl`); flags, environment parsing, `--help` and docs/settings.md are generated from
that (`python -m worker.config --markdown > docs/settings.md`). Every flag has a variable (`ANOMALY_` +
flag name in upper case with underscores), so a Kubernetes ConfigMap/Secret can configure the worker; a
flag given on the command line wins, an empty variable counts as unset. Secrets (the SASL password) come
from a file (`--sasl-password-file`) or the environment, never argv, and never print themselves.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from training.errors import ConfigError
from training.value_formats import VALUE_FORMATS
from training.window_state import DEFAULT_MAX_ENTITIES
from worker.config_decl import (
    ENV_PREFIX,
    Option,
    add_arguments,
    at_least,
    markdown_table,
    not_blank,
    off_or_positive,
    options,
    positive_seconds,
    reader,
    setting,
    validate_fields,
    within,
)

__all__ = [
    "ALL", "AT_LEAST_ONCE", "COMPRESSION_CODECS", "DEFAULT_WINDOW_MAX_BYTES", "DELIVERY_MODES", "ENV_PREFIX",
    "EXACTLY_ONCE", "ISOLATION_LEVELS", "KAFKA_CLIENTS", "KAFKA_CONNECTION", "LOG_LEVELS", "PASSWORD_FILE",
    "SASL_MECHANISMS", "SECURITY", "SECURITY_PROTOCOLS", "TF_LOG", "VALUES", "VALUE_OPTIONS", "WORKER", "KafkaSecurity",
    "Secret", "Settings", "ValueSettings", "add_security_arguments", "add_value_arguments", "env_fallback",
    "from_args", "markdown", "parser", "security_from_args", "values_from_args",
]

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
KAFKA_CLIENTS = ("confluent", "kafka-python")
ISOLATION_LEVELS = ("read_committed", "read_uncommitted")
COMPRESSION_CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
AT_LEAST_ONCE, EXACTLY_ONCE = "at-least-once", "exactly-once"
DELIVERY_MODES = (AT_LEAST_ONCE, EXACTLY_ONCE)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: One partition's window state at most (estimated): four partitions' worth and the model fit the 2 GiB memory
#: limit of deploy/k8s, and it holds the 100,000 default entities with about 20 recent events each.
DEFAULT_WINDOW_MAX_BYTES = 256 * 1024 * 1024


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
    """Client security: TLS files and SASL credentials (PLAIN / SCRAM); shared by every command that talks to Kafka."""

    protocol: str = setting("Kafka security protocol", "PLAINTEXT", name="security_protocol",
                            choices=SECURITY_PROTOCOLS, case=str.upper)
    sasl_mechanism: str | None = setting(f"SASL mechanism, one of {', '.join(SASL_MECHANISMS)}", None)
    sasl_username: str | None = setting("SASL user name", None)
    sasl_password: Secret | None = setting("SASL password; --sasl-password-file wins when both are set", None,
                                           flag=False)
    ssl_cafile: str | None = setting("CA bundle for TLS", None)
    ssl_certfile: str | None = setting("client certificate for mutual TLS", None)
    ssl_keyfile: str | None = setting("client key for mutual TLS", None)
    ssl_check_hostname: bool = True  # Python API only (tests against brokers with made-up certificates)

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.protocol.startswith("SASL"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ConfigError(f"{self.protocol} needs --sasl-mechanism, one of {', '.join(SASL_MECHANISMS)}")
            if not self.sasl_username or self.sasl_password is None:
                raise ConfigError(f"{self.protocol} needs --sasl-username and a password "
                                  f"({ENV_PREFIX}SASL_PASSWORD or --sasl-password-file)")

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
class ValueSettings:
    """How record values are written: a format, and for the registry formats the schema registry to ask
    (docs/value-formats.md); shared by the worker and `anomaly-train --from-kafka`."""

    value_format: str = setting("record value format: json, or avro / protobuf / json-schema in the schema "
                                "registry wire format (magic byte, schema id, payload)", "json",
                                choices=VALUE_FORMATS, case=str.lower)
    schema_registry_url: str | None = setting("schema registry base URL (the Confluent API; Apicurio: "
                                              "http://host:8080/apis/ccompat/v7); needed by avro, protobuf and "
                                              "json-schema; credentials go in the user/password settings, not here",
                                              None)
    schema_registry_user: str | None = setting("schema registry basic-auth user", None)
    schema_registry_password: Secret | None = setting("schema registry basic-auth password; "
                                                      "--schema-registry-password-file wins when both are set", None,
                                                      flag=False)
    schema_registry_cafile: str | None = setting("CA bundle for the schema registry's TLS", None)
    schema_registry_certfile: str | None = setting("client certificate for mutual TLS with the schema registry", None)
    schema_registry_keyfile: str | None = setting("client key for mutual TLS with the schema registry", None)
    schema_registry_timeout_s: float = setting("timeout of one schema registry request; a registry that does not "
                                               "answer within it is down (back off, not ready, nothing committed)",
                                               10.0, check=positive_seconds)

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.value_format != "json" and not self.schema_registry_url:
            raise ConfigError(f"--value-format {self.value_format} needs --schema-registry-url (or "
                              f"{ENV_PREFIX}SCHEMA_REGISTRY_URL)")
        if self.schema_registry_url and urlsplit(self.schema_registry_url).password is not None:
            raise ConfigError("--schema-registry-url must not hold credentials: use --schema-registry-user and "
                              f"{ENV_PREFIX}SCHEMA_REGISTRY_PASSWORD (or --schema-registry-password-file)")
        if bool(self.schema_registry_user) != (self.schema_registry_password is not None):
            raise ConfigError("schema registry basic auth needs both --schema-registry-user and a password "
                              f"({ENV_PREFIX}SCHEMA_REGISTRY_PASSWORD or --schema-registry-password-file)")

    def registry_config(self) -> dict[str, Any]:
        """confluent-kafka `SchemaRegistryClient` settings. No retries inside the client: a failed request
        fails the batch at once and the worker's own backoff retries it (with heartbeats in between)."""
        conf: dict[str, Any] = {"url": self.schema_registry_url, "timeout": self.schema_registry_timeout_s,
                                "max.retries": 0}
        if self.schema_registry_user and self.schema_registry_password is not None:
            conf["basic.auth.user.info"] = f"{self.schema_registry_user}:{self.schema_registry_password.reveal()}"
        for key, value in (("ssl.ca.location", self.schema_registry_cafile),
                           ("ssl.certificate.location", self.schema_registry_certfile),
                           ("ssl.key.location", self.schema_registry_keyfile)):
            if value:
                conf[key] = value
        return conf


@dataclass(frozen=True)
class Settings:
    """Everything the worker needs to run; validated at construction."""

    model: Path = setting("model bundle directory, or a model repository whose current version is followed "
                          "(anomaly-train --repo, anomaly-promote)")
    bootstrap_servers: str = setting("Kafka bootstrap servers, host:port[,host:port]")
    input_topic: str = setting("topic of JSON events to score")
    alert_topic: str = setting("topic for alerts")
    dead_letter_topic: str = setting("topic for events that cannot be scored")
    group_id: str = setting("consumer group id")
    max_batch: int = setting("micro-batch size bound in records", 1000, check=within(1, 100_000, "records"))
    max_wait_ms: int = setting("micro-batch time bound in ms", 200, check=within(0, 60_000, "ms"))
    max_event_bytes: int = setting("larger events are dead-lettered as oversized", 1_048_576,
                                   check=at_least(64, "bytes"), shown="1048576 (1 MiB)")
    top_features: int = setting("contributing features listed per alert", 3)
    metrics_host: str = setting("address for /metrics, /healthz, /readyz", "0.0.0.0")
    metrics_port: int = setting("port for /metrics, /healthz, /readyz (0 = any)", 9108, check=within(0, 65535))
    shutdown_timeout_s: float = setting("deadline for finishing a batch on SIGTERM", 20.0, check=positive_seconds)
    kafka_timeout_s: float = setting("timeout of each blocking Kafka call", 30.0, check=positive_seconds)
    retry_backoff_initial_s: float = setting("first wait after a failed delivery or connect", 0.5,
                                             check=positive_seconds)
    retry_backoff_max_s: float = setting("longest wait between retries", 30.0, check=positive_seconds)
    rejoin_timeout_s: float = setting("replace the consumer if a group rebalance takes longer", 60.0,
                                      check=positive_seconds)
    session_timeout_s: float = setting("consumer group session timeout", 15.0, check=positive_seconds)
    max_poll_interval_s: float = setting("consumer max poll interval", 300.0, check=positive_seconds)
    broker_check_interval_s: float = setting("while idle, check the broker this often", 2.0, check=positive_seconds)
    liveness_timeout_s: float = setting("/healthz fails when the loop is stuck this long", 60.0,
                                        check=positive_seconds)
    http_idle_timeout_s: float = setting("close idle HTTP keep-alive connections after", 30.0, check=positive_seconds)
    http_max_connections: int = setting("concurrent HTTP connections served; when all are taken, a new one "
                                        "replaces the oldest idle or slow one", 32, check=at_least(1))
    http_request_timeout_s: float = setting("an HTTP request must arrive whole within this of its first byte, and "
                                            "its response be taken within as long", 5.0, check=positive_seconds)
    metrics_web_config: Path | None = setting("Prometheus web.config file: TLS and basic auth for the metrics "
                                              "endpoint (docs/metrics-endpoint.md; worker/web_config.py)", None,
                                              shown="plain HTTP, no auth")
    reload_interval_s: float = setting("with a repository: check for a promoted version this often; SIGHUP checks "
                                       "at once", 10.0, check=positive_seconds)
    heap_trim_interval_s: float = setting("return freed native memory to the system this often (glibc malloc_trim, "
                                          "worker/heap.py; 0 = never)", 60.0, check=off_or_positive)
    shadow_model: Path | None = setting("a candidate bundle that scores every batch too; its alerts are never "
                                        "published, its alert rate and agreement with the live model are metrics",
                                        None)
    feedback_topic: str | None = setting("topic of analyst verdicts {\"alert_id\": ..., \"verdict\": "
                                         "\"true_positive\" | \"false_positive\"}; exported as precision per model "
                                         "version", None)
    alert_key_field: str | None = setting("event field naming the entity an alert is about (host, account); added "
                                          "to alerts as 'entity'", None)
    alert_cooldown_s: float = setting("publish at most one alert per entity in this window; the rest are counted "
                                      "into a summary alert (0 = off)", 0.0, check=off_or_positive)
    max_alerts_per_s: float = setting("global alert budget; alerts beyond it are counted into summaries (0 = off)",
                                      0.0, check=off_or_positive)
    expected_schema_hash: str | None = setting("refuse a bundle whose schema hash differs", None)
    window_max_entities: int = setting("window features: entities kept per partition of the input topic (per entity "
                                       "definition); the least recently seen is evicted beyond it",
                                       DEFAULT_MAX_ENTITIES,
                                       check=at_least(1, "entities"))
    window_max_bytes: int = setting("window features: estimated memory of one partition's window state; the least "
                                    "recently seen entities are evicted beyond it", DEFAULT_WINDOW_MAX_BYTES,
                                    check=at_least(1_048_576, "bytes"), shown="268435456 (256 MiB)")
    client_id: str = setting("Kafka client id", "anomaly-worker")
    log_level: str = setting("log level", "INFO", choices=LOG_LEVELS, case=str.upper)
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # declared in KafkaSecurity
    values: ValueSettings = field(default_factory=ValueSettings)  # declared in ValueSettings
    kafka_client: str = setting("Kafka client library: confluent (librdkafka) or kafka-python (pure Python)",
                                "confluent", choices=KAFKA_CLIENTS, case=str.lower)
    isolation_level: str = setting("read_committed skips records of aborted upstream transactions",
                                   "read_committed", choices=ISOLATION_LEVELS, case=str.lower)
    compression: str | None = setting("codec for alerts and dead letters (see `output_compression`)", None,
                                      choices=COMPRESSION_CODECS, case=str.lower,
                                      shown="zstd with confluent, none with kafka-python")
    alert_headers: tuple[str, ...] = setting("comma-separated input record header names copied into each alert "
                                             "document", ())
    delivery: str = setting("at-least-once: alerts may repeat after a crash, with the same alert_id; exactly-once: "
                            "each batch's alerts, dead letters and offsets commit in one Kafka transaction "
                            "(confluent only)", AT_LEAST_ONCE, choices=DELIVERY_MODES, case=str.lower)
    transactional_id: str | None = setting("exactly-once: this worker's transactional id, unique per replica and "
                                           "stable across its restarts", None, check=not_blank,
                                           shown="<group-id>-<hostname>")
    transaction_timeout_s: float = setting("exactly-once: the broker aborts a transaction left open this long by a "
                                           "dead worker", 60.0, check=positive_seconds)

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.retry_backoff_initial_s > self.retry_backoff_max_s:
            raise ConfigError(f"--retry-backoff-initial-s ({self.retry_backoff_initial_s}) must not exceed "
                              f"--retry-backoff-max-s ({self.retry_backoff_max_s})")
        if self.alert_cooldown_s and not self.alert_key_field:
            raise ConfigError("--alert-cooldown-s needs --alert-key-field: the event field that names the entity "
                              "(host, account) whose alerts it spaces out")
        topics = {self.input_topic, self.alert_topic, self.dead_letter_topic}
        if len(topics) != 3 or "" in topics:
            raise ConfigError("input, alert and dead-letter topics must be three different, non-empty names")
        if self.feedback_topic is not None and self.feedback_topic in topics:
            raise ConfigError(f"--feedback-topic must differ from the input, alert and dead-letter topics, got "
                              f"{self.feedback_topic!r}")
        if self.exactly_once and self.kafka_client != "confluent":
            raise ConfigError("--delivery exactly-once needs --kafka-client confluent: the worker's transactions "
                              "(offsets committed with the consumer group metadata, KIP-447) use librdkafka")
        if self.exactly_once and self.transaction_timeout_s > 900:
            raise ConfigError(f"--transaction-timeout-s must be at most 900 (the broker's default "
                              f"transaction.max.timeout.ms), got {self.transaction_timeout_s}")

    @property
    def exactly_once(self) -> bool:
        return self.delivery == EXACTLY_ONCE

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


@dataclass(frozen=True)
class _Process:
    """Settings read outside `Settings`: the password's file, a shared flag's other commands, TensorFlow's switch."""

    sasl_password_file: Path | None = setting("file holding the SASL password (surrounding whitespace stripped); "
                                              "without it, the password comes from the environment", None)
    schema_registry_password_file: Path | None = setting("file holding the schema registry password (surrounding "
                                                         "whitespace stripped); without it, the password comes "
                                                         "from the environment", None)
    tf_log: bool = setting("1: let TensorFlow's native log lines through to stderr, as --log-level DEBUG does "
                           "(every command; training/tf_runtime.py)", False, flag=False)


WORKER = options(Settings)
SECURITY = options(KafkaSecurity)
VALUES = options(ValueSettings)
PASSWORD_FILE, REGISTRY_PASSWORD_FILE, TF_LOG = options(_Process)
#: What `anomaly-replay` and `anomaly-train --from-kafka` share with the worker: where Kafka is, which client
#: talks to it and how to log in (`--bootstrap-servers` first).
KAFKA_CONNECTION = (*(o for o in WORKER if o.attr in ("bootstrap_servers", "kafka_client")), *SECURITY, PASSWORD_FILE)
#: How record values are read (`--value-format` and the schema registry): the worker and `anomaly-train --from-kafka`.
VALUE_OPTIONS = (*VALUES, REGISTRY_PASSWORD_FILE)
ALL = (*WORKER, *SECURITY, PASSWORD_FILE, *VALUE_OPTIONS, TF_LOG)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anomaly-worker",
        description="Score Kafka events with an autoencoder bundle; publish alerts and dead letters.",
        epilog=f"Every option can also be set by environment variable {ENV_PREFIX}<OPTION> "
               f"(e.g. {ENV_PREFIX}BOOTSTRAP_SERVERS); the command line wins. Required: "
               f"{', '.join(o.flag for o in WORKER if o.required)}. Environment only: "
               f"{'; '.join(f'{o.env} ({o.decl.help})' for o in ALL if not o.decl.flag)}. "
               f"All settings: docs/settings.md.")
    add_arguments(p.add_argument, (*WORKER, *SECURITY, PASSWORD_FILE, *VALUE_OPTIONS))
    return p


def add_security_arguments(add: Callable[..., object], *, with_servers: bool = False) -> None:
    """The Kafka client and security flags (and `--bootstrap-servers` when asked), declared once for every command.

    `add(flag, **argparse keywords)`; the worker, anomaly-replay and anomaly-train share these. The password
    itself has no flag (argv is visible to every local user in /proc): it comes from a file or the
    environment (`security_from_args`).
    """
    add_arguments(add, KAFKA_CONNECTION if with_servers else KAFKA_CONNECTION[1:])


def add_value_arguments(add: Callable[..., object]) -> None:
    """`--value-format` and the schema registry flags, declared once for the worker and `anomaly-train`."""
    add_arguments(add, VALUE_OPTIONS)


def values_from_args(get: Callable[[str], Any]) -> ValueSettings:
    """ValueSettings from the flags of `add_value_arguments` (`get`: from `env_fallback`). The password: the file
    `--schema-registry-password-file` names, else `ANOMALY_SCHEMA_REGISTRY_PASSWORD`."""
    return ValueSettings(**_with_password(get, VALUES, "schema_registry_password", REGISTRY_PASSWORD_FILE,
                                          "schema registry"))


def _with_password(get: Callable[[str], Any], declared: Sequence[Option], attr: str, password_file: Option,
                   what: str) -> dict[str, Any]:
    """The values of `declared` options, the password `attr` read from the file `password_file` names when it is
    set (surrounding whitespace stripped; it wins over the variable); an empty password counts as unset."""
    values = {option.attr: value for option in declared if (value := get(option.name)) is not None}
    path = get(password_file.name)
    if path is not None:
        try:
            values[attr] = Secret(Path(path).read_text().strip())
        except OSError as exc:
            raise ConfigError(f"cannot read {what} password file {path}: {exc.strerror}") from None
    if attr in values and not values[attr].reveal():
        del values[attr]
    return values


def env_fallback(args: argparse.Namespace, environ: Mapping[str, str]) -> Callable[[str], Any]:
    """`get(name)`: the flag's value, else `ANOMALY_<NAME>` from `environ` (converted), else None."""
    return reader(ALL, args, environ)


def security_from_args(get: Callable[[str], Any], environ: Mapping[str, str] | None = None) -> KafkaSecurity:
    """KafkaSecurity from the flags of `add_security_arguments` (`get`: from `env_fallback`).

    The password: the file `--sasl-password-file` names (surrounding whitespace stripped), else
    `ANOMALY_SASL_PASSWORD`. (`environ` is unused, kept for callers of the earlier signature.)
    """
    return KafkaSecurity(**_with_password(get, SECURITY, "sasl_password", PASSWORD_FILE, "SASL"))


def from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from flags, falling back to environment variables, then defaults."""
    env = os.environ if environ is None else environ
    get = env_fallback(parser().parse_args(argv), env)
    values = {option.attr: value for option in WORKER if (value := get(option.name)) is not None}
    missing = [option for option in WORKER if option.required and option.attr not in values]
    if missing:
        raise ConfigError("missing required setting(s): " + ", ".join(f"{o.flag} (or {o.env})" for o in missing))
    return Settings(security=security_from_args(get), values=values_from_args(get), **values)


def markdown() -> str:
    """docs/settings.md: every setting, generated from the declarations."""
    sections = [
        ("anomaly-worker", "Flags win over variables; an empty variable counts as unset.", WORKER),
        ("Kafka security", "Shared by `anomaly-worker`, `anomaly-replay` and `anomaly-train --from-kafka` "
                           "(which also take `--bootstrap-servers` and `--kafka-client`).", (*SECURITY, PASSWORD_FILE)),
        ("Value formats and the schema registry", "Shared by `anomaly-worker` and `anomaly-train --from-kafka` "
                                                  "(docs/value-formats.md).", VALUE_OPTIONS),
        ("Every command", "Environment only.", (TF_LOG,)),
    ]
    parts = ["# Settings", "",
             "Generated from the declarations in `worker/config.py`; do not edit by hand. Regenerate with "
             "`.venv/bin/python -m worker.config --markdown > docs/settings.md`."]
    for title, note, declared in sections:
        parts += ["", f"## {title}", "", note, "", markdown_table(declared)]
    return "\n".join(parts) + "\n"


def _main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.config", description="Print the settings reference.")
    p.add_argument("--markdown", action="store_true", required=True, help="docs/settings.md, as Markdown")
    p.parse_args(argv)
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
