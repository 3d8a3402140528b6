"""Worker settings: flags beat environment, required settings are named, secrets never print, each declared once."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from training.errors import AnomalyError, ConfigError
from worker.config import (
    ALL,
    ENV_PREFIX,
    KAFKA_CONNECTION,
    SECURITY,
    TF_LOG,
    VALUES,
    WORKER,
    KafkaSecurity,
    Secret,
    Settings,
    ValueSettings,
    env_fallback,
    from_args,
    markdown,
    parser,
    security_from_args,
)

REQUIRED_FLAGS = ["--model", "/models/m1", "--bootstrap-servers", "k1:9092,k2:9092", "--input-topic", "events",
                  "--alert-topic", "alerts", "--dead-letter-topic", "dlq", "--group-id", "scorers"]
REQUIRED_ENV = {"ANOMALY_MODEL": "/env/model", "ANOMALY_BOOTSTRAP_SERVERS": "env:9092",
                "ANOMALY_INPUT_TOPIC": "env-events", "ANOMALY_ALERT_TOPIC": "env-alerts",
                "ANOMALY_DEAD_LETTER_TOPIC": "env-dlq", "ANOMALY_GROUP_ID": "env-group"}
PASSWORD = "hunter2-very-secret"


def test_flags_alone() -> None:
    s = from_args([*REQUIRED_FLAGS, "--max-batch", "50", "--metrics-port", "0"], environ={})
    assert s.model == Path("/models/m1")
    assert (s.bootstrap_servers, s.input_topic, s.alert_topic, s.dead_letter_topic, s.group_id) == (
        "k1:9092,k2:9092", "events", "alerts", "dlq", "scorers")
    assert s.max_batch == 50 and s.metrics_port == 0
    assert s.max_wait_ms == 200 and s.security == KafkaSecurity()  # defaults


def test_environment_alone() -> None:
    env = {**REQUIRED_ENV, "ANOMALY_MAX_WAIT_MS": "75", "ANOMALY_SHUTDOWN_TIMEOUT_S": "2.5",
           "ANOMALY_CLIENT_ID": "pod-3"}
    s = from_args([], environ=env)
    assert s.model == Path("/env/model") and s.input_topic == "env-events" and s.group_id == "env-group"
    assert s.max_wait_ms == 75 and s.shutdown_timeout_s == 2.5 and s.client_id == "pod-3"


def test_flag_wins_over_environment() -> None:
    env = {**REQUIRED_ENV, "ANOMALY_MAX_BATCH": "999", "ANOMALY_LOG_LEVEL": "DEBUG"}
    s = from_args(["--input-topic", "flag-events", "--max-batch", "7"], environ=env)
    assert s.input_topic == "flag-events" and s.max_batch == 7
    assert s.alert_topic == "env-alerts" and s.log_level == "DEBUG"  # not overridden: env still applies


def test_empty_environment_value_counts_as_unset() -> None:
    s = from_args(REQUIRED_FLAGS, environ={"ANOMALY_MAX_BATCH": "", "ANOMALY_CLIENT_ID": ""})
    assert s.max_batch == 1000 and s.client_id == "anomaly-worker"


def test_missing_required_settings_are_all_named_with_flag_and_variable() -> None:
    with pytest.raises(ConfigError) as info:
        from_args(["--model", "/m", "--input-topic", "events"], environ={"ANOMALY_ALERT_TOPIC": "alerts"})
    message = str(info.value)
    assert message.startswith("missing required setting(s): ")
    for flag, var in [("--bootstrap-servers", "ANOMALY_BOOTSTRAP_SERVERS"),
                      ("--dead-letter-topic", "ANOMALY_DEAD_LETTER_TOPIC"), ("--group-id", "ANOMALY_GROUP_ID")]:
        assert f"{flag} (or {var})" in message
    for present in ("--model", "--input-topic", "--alert-topic"):
        assert present not in message
    assert isinstance(info.value, AnomalyError)  # main() prints it in one line, exit 2


def test_malformed_environment_number_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"ANOMALY_MAX_BATCH: expected int, got 'lots'"):
        from_args(REQUIRED_FLAGS, environ={"ANOMALY_MAX_BATCH": "lots"})


@pytest.mark.parametrize("extra, match", [
    (["--max-batch", "0"], r"--max-batch must be in \[1, 100000\] records, got 0"),
    (["--max-wait-ms", "-1"], r"--max-wait-ms must be in \[0, 60000\] ms, got -1"),
    (["--max-event-bytes", "10"], "--max-event-bytes must be at least 64 bytes, got 10"),
    (["--metrics-port", "70000"], r"--metrics-port must be in \[0, 65535\], got 70000"),
    (["--shutdown-timeout-s", "0"], "--shutdown-timeout-s must be a positive number"),
    (["--alert-topic", "events"], "three different"),
])
def test_out_of_range_settings_are_refused(extra: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        from_args([*REQUIRED_FLAGS, *extra], environ={})


def test_sasl_from_environment_password() -> None:
    env = {"ANOMALY_SASL_PASSWORD": PASSWORD}
    s = from_args([*REQUIRED_FLAGS, "--security-protocol", "sasl_ssl", "--sasl-mechanism", "SCRAM-SHA-512",
                   "--sasl-username", "svc", "--ssl-cafile", "/ca.pem"], environ=env)
    assert s.security.protocol == "SASL_SSL"
    assert s.security.sasl_password == Secret(PASSWORD)
    opts = s.security.client_options()
    assert opts["sasl_plain_password"] == PASSWORD  # revealed only where the client needs it
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512" and opts["sasl_plain_username"] == "svc"
    assert opts["ssl_cafile"] == "/ca.pem"


def test_password_file_wins_over_environment_password(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text(PASSWORD + "\n")
    s = from_args([*REQUIRED_FLAGS, "--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "PLAIN",
                   "--sasl-username", "svc", "--sasl-password-file", str(secret_file)],
                  environ={"ANOMALY_SASL_PASSWORD": "from-env"})
    assert s.security.sasl_password is not None and s.security.sasl_password.reveal() == PASSWORD
    assert "ssl_cafile" not in s.security.client_options()


def test_unreadable_password_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read SASL password file .*nope"):
        from_args([*REQUIRED_FLAGS, "--sasl-password-file", str(tmp_path / "nope")], environ={})


def test_secret_never_appears_in_settings_repr_or_str(tmp_path: Path) -> None:
    s = from_args([*REQUIRED_FLAGS, "--security-protocol", "SASL_SSL", "--sasl-mechanism", "PLAIN",
                   "--sasl-username", "svc"], environ={"ANOMALY_SASL_PASSWORD": PASSWORD})
    for text in (repr(s), str(s), repr(s.security), str(s.security), repr(s.security.sasl_password),
                 str(s.security.sasl_password), f"{s.security.sasl_password}", f"{s!r}"):
        assert PASSWORD not in text
    assert "********" in repr(s)
    with pytest.raises(ConfigError) as info:  # also not in an error raised while it is in scope
        Settings(**{**s.__dict__, "max_batch": 0})
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize("security, match", [
    (dict(protocol="TLS"), "--security-protocol must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL, got 'TLS'"),
    (dict(protocol="SASL_SSL", sasl_username="u", sasl_password=Secret("p")), "SASL_SSL needs --sasl-mechanism"),
    (dict(protocol="SASL_SSL", sasl_mechanism="GSSAPI", sasl_username="u", sasl_password=Secret("p")),
     "needs --sasl-mechanism, one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
    (dict(protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_password=Secret("p")),
     "SASL_PLAINTEXT needs --sasl-username and a password"),
    (dict(protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u"),
     r"ANOMALY_SASL_PASSWORD or --sasl-password-file"),
])
def test_sasl_validation(security: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        KafkaSecurity(**security)


def test_sasl_validation_through_flags() -> None:
    with pytest.raises(ConfigError, match="needs --sasl-username and a password"):
        from_args([*REQUIRED_FLAGS, "--security-protocol", "SASL_SSL", "--sasl-mechanism", "PLAIN"], environ={})


def test_plaintext_ignores_sasl_credentials_in_client_options() -> None:
    opts = KafkaSecurity(sasl_username="u", sasl_password=Secret("p")).client_options()
    assert opts == {"security_protocol": "PLAINTEXT"}


def test_settings_are_frozen() -> None:
    s = from_args(REQUIRED_FLAGS, environ={})
    with pytest.raises(AttributeError):
        s.max_batch = 5  # type: ignore[misc]


# -- the declaration: each setting written once, everything else derived ----------------------------------------

ENV_ONLY = {"sasl_password", "schema_registry_password", "tf_log"}  # a secret is never argv; TF's switch: every command


def test_every_field_is_declared_with_a_flag_a_variable_and_help() -> None:
    declared = {option.attr for option in (*WORKER, *SECURITY, *VALUES)}
    assert declared == {f.name for f in fields(Settings)} - {"security", "values"} | (
        {f.name for f in fields(KafkaSecurity)} - {"ssl_check_hostname"}) | {f.name for f in fields(ValueSettings)}
    for option in ALL:
        assert option.decl.help and option.env.startswith(ENV_PREFIX), option.attr
        assert option.decl.flag == (option.attr not in ENV_ONLY), option.attr
        assert "default" not in option.decl.help.lower(), f"{option.attr}: the default is generated, not written"
    assert len({o.flag for o in ALL}) == len({o.env for o in ALL}) == len(ALL)


def test_help_shows_each_default_once_and_names_each_variable() -> None:
    text = " ".join(parser().format_help().split())
    for option in ALL:
        assert (f"[env {option.env}]" if option.decl.flag else f"{option.env} (") in text, option.env
    assert text.count("(default 1000)") == 1 and "records (default 1000) [env ANOMALY_MAX_BATCH]" in text
    assert "(one of at-least-once, exactly-once; default at-least-once)" in text
    assert "Required: --model, --bootstrap-servers, --input-topic" in text


def test_settings_doc_is_what_the_generator_writes() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "settings.md"
    assert doc.read_text() == markdown(), "regenerate: .venv/bin/python -m worker.config --markdown > docs/settings.md"
    for option in ALL:
        assert f"`{option.env}`" in doc.read_text()


def test_choices_are_case_insensitive_and_stored_normalised() -> None:
    s = from_args([*REQUIRED_FLAGS, "--kafka-client", "Kafka-Python", "--log-level", "debug"],
                  environ={"ANOMALY_SECURITY_PROTOCOL": "ssl", "ANOMALY_DELIVERY": "AT-LEAST-ONCE"})
    assert (s.kafka_client, s.log_level, s.security.protocol, s.delivery) == (
        "kafka-python", "DEBUG", "SSL", "at-least-once")
    assert Settings(**{**s.__dict__, "log_level": "warning"}).log_level == "WARNING"


def test_the_side_commands_take_the_same_kafka_flags_and_variables(capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import train_parser
    from worker.replay import main as replay_main

    with pytest.raises(SystemExit):
        replay_main(["--help"])
    replay_help, train_help = capsys.readouterr().out, train_parser().format_help()
    for option in KAFKA_CONNECTION:
        assert option.flag in replay_help and option.flag in train_help
    args = train_parser().parse_args(["--from-kafka", "--topic", "t", "--out", "/b", "--ssl-cafile", "/flag.pem"])
    get = env_fallback(args, {"ANOMALY_BOOTSTRAP_SERVERS": "env:9092", "ANOMALY_SSL_CAFILE": "/env.pem"})
    assert (get("bootstrap_servers"), security_from_args(get).ssl_cafile) == ("env:9092", "/flag.pem")


@pytest.mark.parametrize("value, verbose", [("1", True), ("yes", True), ("0", False), ("off", False), ("", None)])
def test_tensorflow_log_switch_is_read_through_its_declaration(value: str, verbose: bool | None) -> None:
    assert TF_LOG.env == "ANOMALY_TF_LOG"
    assert TF_LOG.from_env({"ANOMALY_TF_LOG": value}) is verbose


def test_no_module_reads_an_anomaly_variable_beside_the_declaration() -> None:
    root = Path(__file__).resolve().parents[2]
    reads = re.compile(r"""(environ\.get\(|environ\[|getenv\()\s*f?["']ANOMALY_""")
    sources = [path for package in ("worker", "training") for path in (root / package).rglob("*.py")]
    found = [str(path.relative_to(root)) for path in sources if reads.search(path.read_text())]
    assert found == [], "read it through a declaration in worker/config.py (docs/settings.md lists them all)"


# -- value formats and the schema registry --------------------------------------------------------------------

def test_a_registry_format_needs_a_url_and_the_password_never_leaves_its_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--value-format avro needs --schema-registry-url"):
        from_args([*REQUIRED_FLAGS, "--value-format", "avro"], {})
    with pytest.raises(ConfigError, match="must not hold credentials"):
        from_args([*REQUIRED_FLAGS, "--value-format", "avro", "--schema-registry-url", "http://u:p@sr:8081"], {})
    with pytest.raises(ConfigError, match="needs both --schema-registry-user and a password"):
        from_args([*REQUIRED_FLAGS, "--value-format", "avro", "--schema-registry-url", "http://sr:8081",
                   "--schema-registry-user", "svc"], {})
    assert not any("password" in option.flag and option.attr == "schema_registry_password" and option.decl.flag
                   for option in ALL)
    secret_file = tmp_path / "sr-password"
    secret_file.write_text(f"  {PASSWORD}\n")
    settings = from_args([*REQUIRED_FLAGS, "--value-format", "PROTOBUF", "--schema-registry-url", "https://sr:8081",
                          "--schema-registry-user", "svc", "--schema-registry-password-file", str(secret_file),
                          "--schema-registry-cafile", "/ca.pem"], {"ANOMALY_SCHEMA_REGISTRY_PASSWORD": "loses"})
    values = settings.values
    assert values.value_format == "protobuf"
    assert values.registry_config() == {"url": "https://sr:8081", "timeout": 10.0, "max.retries": 0,
                                        "basic.auth.user.info": f"svc:{PASSWORD}", "ssl.ca.location": "/ca.pem"}
    assert PASSWORD not in repr(settings) and PASSWORD not in str(values)
    from_env = from_args(REQUIRED_FLAGS, {"ANOMALY_VALUE_FORMAT": "json-schema", "ANOMALY_SCHEMA_REGISTRY_URL":
                                          "http://sr:8081", "ANOMALY_SCHEMA_REGISTRY_USER": "svc",
                                          "ANOMALY_SCHEMA_REGISTRY_PASSWORD": PASSWORD}).values
    assert from_env.schema_registry_password == Secret(PASSWORD) and ValueSettings().value_format == "json"
