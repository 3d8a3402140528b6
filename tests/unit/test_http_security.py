"""The metrics endpoint with a Prometheus web.config: TLS (certificates made by openssl at test time) and basic auth."""

from __future__ import annotations

import base64
import select
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from prometheus_client import CollectorRegistry

from tests.certs import HAVE_OPENSSL, Pki, bcrypt_hash, make_pki
from training.errors import ConfigError
from worker.health import Health
from worker.http import MetricsServer, start_http_server
from worker.main import main
from worker.metrics import WorkerMetrics
from worker.web_config import BasicAuth, WebConfig, load_web_config

needs_openssl = pytest.mark.skipif(not HAVE_OPENSSL, reason="the openssl command makes the test certificates")
DEADLINE_S = 10.0
USER, PASSWORD = "prometheus", "s3cret pass:word"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not HAVE_OPENSSL:
        pytest.skip("the openssl command makes the test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))


def write_config(directory: Path, document: dict[str, Any]) -> Path:
    path = directory / "web.yml"
    path.write_text(yaml.safe_dump(document))
    return path


def tls_section(pki: Pki, **extra: str) -> dict[str, str]:
    return {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), **extra}


@pytest.fixture()
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    WorkerMetrics(registry).record_consumed("events", 3)
    return registry


def serve(registry: CollectorRegistry, web: WebConfig, **kwargs: Any) -> MetricsServer:
    return start_http_server("127.0.0.1", 0, registry, Health(), web=web, **kwargs)


def client_context(pki: Pki, with_certificate: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if with_certificate:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def get(url: str, context: ssl.SSLContext | None = None, credentials: tuple[str, str] | None = None,
        authorization: str | None = None) -> tuple[int, dict[str, str], str]:
    headers = {}
    if credentials is not None:
        authorization = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
    if authorization is not None:
        headers["Authorization"] = authorization
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5,
                                    context=context) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


# -- TLS ---------------------------------------------------------------------------------------------------


@needs_openssl
def test_tls_serves_every_path_to_a_client_that_verifies_the_server(pki: Pki, tmp_path: Path,
                                                                     registry: CollectorRegistry) -> None:
    web = load_web_config(write_config(tmp_path, {"tls_server_config": tls_section(pki)}))
    srv = serve(registry, web)
    try:
        assert srv.url == f"https://127.0.0.1:{srv.port}"
        status, _, body = get(srv.url + "/metrics", client_context(pki))
        assert status == 200 and 'anomaly_events_consumed_total{topic="events"} 3.0' in body
        assert get(srv.url + "/healthz", client_context(pki))[0] == 200
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            get(srv.url + "/healthz", ssl.create_default_context())  # the system's CAs do not know this server
    finally:
        srv.shutdown()


@needs_openssl
def test_plain_http_to_a_tls_port_is_not_answered_and_the_server_goes_on(pki: Pki, tmp_path: Path,
                                                                         registry: CollectorRegistry) -> None:
    srv = serve(registry, load_web_config(write_config(tmp_path, {"tls_server_config": tls_section(pki)})))
    try:
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            get(f"http://127.0.0.1:{srv.port}/metrics")
        assert get(srv.url + "/healthz", client_context(pki))[0] == 200
    finally:
        srv.shutdown()


@needs_openssl
def test_a_stalled_tls_handshake_holds_neither_the_accept_loop_nor_its_slot(pki: Pki, tmp_path: Path,
                                                                            registry: CollectorRegistry) -> None:
    web = load_web_config(write_config(tmp_path, {"tls_server_config": tls_section(pki)}))
    srv = serve(registry, web, max_connections=2, request_timeout_s=0.5)
    stalled = [socket.create_connection((srv.host, srv.port), timeout=DEADLINE_S) for _ in range(2)]
    try:
        stalled[0].sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        started = time.monotonic()
        assert get(srv.url + "/healthz", client_context(pki))[0] == 200  # the handshake ran on the probe's thread
        for sock in stalled:  # both are cut off at the request deadline
            assert select.select([sock], [], [], DEADLINE_S)[0], "the stalled handshake was never closed"
            assert sock.recv(1) == b""
        assert 0.4 < time.monotonic() - started < 3.0
    finally:
        for sock in stalled:
            sock.close()
        srv.shutdown()


@needs_openssl
def test_client_certificates_are_required_when_configured(pki: Pki, tmp_path: Path,
                                                          registry: CollectorRegistry) -> None:
    web = load_web_config(write_config(tmp_path, {"tls_server_config": tls_section(
        pki, client_ca_file=str(pki.ca_cert), client_auth_type="RequireAndVerifyClientCert")}))
    srv = serve(registry, web)
    try:
        assert get(srv.url + "/metrics", client_context(pki, with_certificate=True))[0] == 200
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            get(srv.url + "/metrics", client_context(pki))  # no client certificate: the handshake fails
        assert get(srv.url + "/healthz", client_context(pki, with_certificate=True))[0] == 200
    finally:
        srv.shutdown()


# -- basic auth --------------------------------------------------------------------------------------------


@pytest.fixture()
def auth_server(tmp_path: Path, registry: CollectorRegistry) -> Iterator[MetricsServer]:
    web = load_web_config(write_config(tmp_path, {"basic_auth_users": {USER: bcrypt_hash(PASSWORD),
                                                                       "other": bcrypt_hash("other")}}))
    srv = serve(registry, web)
    yield srv
    srv.shutdown()


def test_metrics_needs_the_right_user_and_password(auth_server: MetricsServer) -> None:
    status, _, body = get(auth_server.url + "/metrics", credentials=(USER, PASSWORD))
    assert status == 200 and "anomaly_events_consumed_total" in body
    for credentials, authorization in [(None, None), ((USER, "wrong"), None), (("nobody", PASSWORD), None),
                                       (("other", PASSWORD), None), (None, "Basic !!not-base64!!"),
                                       (None, "Bearer " + PASSWORD),
                                       (None, "Basic " + base64.b64encode(PASSWORD.encode()).decode())]:
        status, headers, body = get(auth_server.url + "/metrics", credentials=credentials,
                                    authorization=authorization)
        assert status == 401, (credentials, authorization)
        assert headers["WWW-Authenticate"].startswith("Basic ")
        assert "anomaly_" not in body and PASSWORD not in body


def test_probes_stay_open_and_other_paths_need_auth(auth_server: MetricsServer) -> None:
    assert get(auth_server.url + "/healthz")[0] == 200
    assert get(auth_server.url + "/readyz")[0] == 503  # not ready, but answered without credentials
    assert get(auth_server.url + "/other")[0] == 401
    assert get(auth_server.url + "/other", credentials=(USER, PASSWORD))[0] == 404


def test_a_verified_password_is_remembered_so_scrapes_cost_one_bcrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    checkpw = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda password, hashed: calls.append(password) or checkpw(password, hashed))
    auth = BasicAuth({USER: bcrypt_hash(PASSWORD).encode()})
    header = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert auth.check(header) and auth.check(header)
    assert len(calls) == 1
    assert not auth.check("Basic " + base64.b64encode(f"{USER}:wrong".encode()).decode())
    assert not auth.check("Basic " + base64.b64encode(f"nobody:{PASSWORD}".encode()).decode())
    assert len(calls) == 3, "a wrong password or an unknown user costs a bcrypt too (no timing difference)"
    assert not auth.check("Basic " + base64.b64encode(f"{USER}:{'x' * 100}".encode()).decode())  # > 72 bytes


def test_basic_auth_is_checked_concurrently_without_mixing_users() -> None:
    auth = BasicAuth({USER: bcrypt_hash(PASSWORD).encode(), "other": bcrypt_hash("other").encode()})
    results: list[bool] = []

    def check(user: str, password: str) -> None:
        results.append(auth.check("Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()))

    threads = [threading.Thread(target=check, args=args) for args in [(USER, PASSWORD), ("other", PASSWORD)] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S)
    assert sorted(results) == [False] * 4 + [True] * 4


# -- the web.config file -----------------------------------------------------------------------------------


def test_an_empty_web_config_turns_nothing_on(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("# nothing yet\n")
    assert load_web_config(path) == WebConfig()
    assert WebConfig().describe() == "TLS off, basic auth off"


@needs_openssl
def test_file_names_are_relative_to_the_web_config(pki: Pki, tmp_path: Path) -> None:
    config = write_config(pki.ca_cert.parent, {"tls_server_config": {
        "cert_file": pki.server_cert.name, "key_file": pki.server_key.name, "client_ca_file": pki.ca_cert.name,
        "client_auth_type": "VerifyClientCertIfGiven", "min_version": "TLS13"}})
    web = load_web_config(config)
    assert web.tls is not None and web.tls.verify_mode == ssl.CERT_OPTIONAL
    assert web.tls.minimum_version == ssl.TLSVersion.TLSv1_3
    assert web.describe() == "TLS on (client certificates: VerifyClientCertIfGiven), basic auth off"


BAD_CONFIGS: list[tuple[str, Any, str]] = [
    ("not-yaml", "tls_server_config: [unclosed", "not valid YAML at line 1"),
    ("not-a-mapping", "- a list", "the file must be a mapping, got list"),
    ("unknown-key", {"rate_limit": {"burst": 1}}, "unsupported key(s) rate_limit"),
    ("unknown-tls-key", {"tls_server_config": {"cert": "inline"}}, "tls_server_config: unsupported key(s) cert"),
    ("no-key-file", {"tls_server_config": {"cert_file": "server.crt"}}, "needs cert_file and key_file"),
    ("missing-files", {"tls_server_config": {"cert_file": "nope.crt", "key_file": "nope.key"}},
     "cannot load cert_file"),
    ("insecure-client-auth", {"tls_server_config": {"cert_file": "a", "key_file": "b",
                                                    "client_auth_type": "RequireAnyClientCert"}},
     "client_auth_type must be one of NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"),
    ("auth-type-without-ca", {"tls_server_config": {"cert_file": "a", "key_file": "b",
                                                    "client_auth_type": "RequireAndVerifyClientCert"}},
     "client_ca_file and a client_auth_type other than NoClientCert go together"),
    ("bad-version", {"tls_server_config": {"cert_file": "a", "key_file": "b", "min_version": "TLS14"}},
     "min_version must be one of TLS10, TLS11, TLS12, TLS13"),
    ("plain-password", {"basic_auth_users": {"alice": "hunter2"}}, "basic_auth_users.alice must be a bcrypt hash"),
    ("colon-in-user", {"basic_auth_users": {"a:b": "$2y$10$" + "a" * 53}}, "must be a non-empty string without ':'"),
    ("users-not-a-mapping", {"basic_auth_users": ["alice"]}, "basic_auth_users must be a mapping"),
]


@pytest.mark.parametrize(("document", "message"), [(d, m) for _, d, m in BAD_CONFIGS],
                         ids=[name for name, _, _ in BAD_CONFIGS])
def test_a_bad_web_config_is_one_line_naming_the_file(tmp_path: Path, document: Any, message: str) -> None:
    path = tmp_path / "web.yml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    with pytest.raises(ConfigError) as raised:
        load_web_config(path)
    text = str(raised.value)
    assert text.startswith(f"--metrics-web-config {path}: ") and message in text
    assert "\n" not in text and "hunter2" not in text


def test_a_missing_web_config_stops_the_worker_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    missing = tmp_path / "web.yml"
    code = main(["--model", str(tmp_path / "no-model"), "--bootstrap-servers", "127.0.0.1:1", "--input-topic", "in",
                 "--alert-topic", "a", "--dead-letter-topic", "d", "--group-id", "g",
                 "--metrics-web-config", str(missing)])
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"anomaly-worker: error: --metrics-web-config {missing}: cannot read it (No such file or directory)\n"
