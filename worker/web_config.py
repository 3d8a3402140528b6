"""TLS and basic auth for the metrics endpoint, from a Prometheus `web.config` file (`--metrics-web-config`).

The format is the exporter toolkit's (docs/metrics-endpoint.md has an example); this module reads the part
of it a Python server can honour and refuses the rest with a one-line error, so a file written for a Go
exporter never silently loses a setting:

    tls_server_config:
      cert_file: server.crt            # relative paths are relative to the web.config file
      key_file: server.key
      client_ca_file: ca.crt           # optional: with client_auth_type below
      client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven, NoClientCert (default)
      min_version: TLS12               # optional: TLS10 .. TLS13 (default TLS12), max_version likewise
    basic_auth_users:
      prometheus: $2y$10$...           # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from training.errors import ConfigError

CLIENT_AUTH_TYPES = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                     "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1, "TLS12": ssl.TLSVersion.TLSv1_2,
                "TLS13": ssl.TLSVersion.TLSv1_3}
TLS_KEYS = ("cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version")
TOP_KEYS = ("tls_server_config", "basic_auth_users")
_BCRYPT_HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
_CACHE_SIZE = 64  # verified credentials kept (as SHA-256 digests), so a scrape costs one bcrypt per user


class BasicAuth:
    """Checks an `Authorization: Basic` header against bcrypt hashes; bcrypt compares in constant time.

    A verified user and password is remembered as a SHA-256 digest (the exporter toolkit caches likewise),
    so Prometheus' scrapes cost one bcrypt per credential, not one each. An unknown user is checked
    against a known user's hash anyway, so the reply time does not tell which user names exist. One
    bcrypt runs at a time: clients guessing passwords on every connection take one core at most, not
    all of them from the worker's loop.
    """

    def __init__(self, users: Mapping[str, bytes]) -> None:
        if not users:
            raise ValueError("basic auth needs at least one user")
        self._users = dict(users)
        self._decoy = next(iter(self._users.values()))
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()
        self._bcrypt = threading.Lock()

    def check(self, authorization: str | None) -> bool:
        """True when the header names a configured user with the right password."""
        credentials = _basic_credentials(authorization)
        if credentials is None:
            return False
        user, password = credentials
        digest = hashlib.sha256(user + b":" + password).digest()
        with self._lock:
            if digest in self._verified:
                return True
        try:
            hashed = self._users.get(user.decode())
        except UnicodeDecodeError:
            hashed = None
        try:
            with self._bcrypt:
                matches = bcrypt.checkpw(password, hashed or self._decoy)
        except ValueError:  # a password longer than bcrypt's 72 bytes
            return False
        if not (matches and hashed):
            return False
        with self._lock:
            if len(self._verified) >= _CACHE_SIZE:
                self._verified.clear()
            self._verified.add(digest)
        return True


def _basic_credentials(authorization: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) from `Basic base64(user:password)`; None for anything else."""
    scheme, _, encoded = (authorization or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


@dataclass(frozen=True)
class WebConfig:
    """What the endpoint enforces: TLS when `tls` is set, basic auth (off the probe paths) when `auth` is."""

    tls: ssl.SSLContext | None = None
    auth: BasicAuth | None = None
    client_auth_type: str = "NoClientCert"

    def describe(self) -> str:
        """One line for the start-up log (no secrets)."""
        tls = "off" if self.tls is None else f"on (client certificates: {self.client_auth_type})"
        auth = "off" if self.auth is None else "on for every path but /healthz and /readyz"
        return f"TLS {tls}, basic auth {auth}"


def load_web_config(path: Path) -> WebConfig:
    """Read and check a web.config file; every problem is a `ConfigError` of one line naming the file."""

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"--metrics-web-config {path}: {problem}")

    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise fail(f"cannot read it ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise fail(f"not valid YAML{where}") from exc
    if document is None:
        return WebConfig()
    _mapping(document, "the file", TOP_KEYS, fail)
    tls_section = document.get("tls_server_config")
    users_section = document.get("basic_auth_users")
    tls, client_auth = (None, "NoClientCert") if tls_section is None else _tls_context(
        _mapping(tls_section, "tls_server_config", TLS_KEYS, fail), path.parent, fail)
    auth = None if not users_section else BasicAuth(_users(users_section, fail))
    return WebConfig(tls=tls, auth=auth, client_auth_type=client_auth)


def _mapping(value: Any, where: str, allowed: tuple[str, ...], fail: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(f"{where} must be a mapping, got {type(value).__name__}")
    unknown = [str(key) for key in value if key not in allowed]
    if unknown:
        raise fail(f"{where}: unsupported key(s) {', '.join(sorted(unknown))} (supported: {', '.join(allowed)})")
    return value


def _tls_context(section: dict[str, Any], base: Path, fail: Any) -> tuple[ssl.SSLContext, str]:
    def file(key: str) -> str | None:
        value = section.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise fail(f"tls_server_config.{key} must be a file name")
        return str(base / value)

    cert, key, client_ca = file("cert_file"), file("key_file"), file("client_ca_file")
    if cert is None or key is None:
        raise fail("tls_server_config needs cert_file and key_file")
    client_auth = section.get("client_auth_type", "NoClientCert")
    if client_auth not in CLIENT_AUTH_TYPES:
        raise fail(f"tls_server_config.client_auth_type must be one of {', '.join(CLIENT_AUTH_TYPES)}, got "
                   f"{client_auth!r} (RequestClientCert and RequireAnyClientCert do not verify the certificate)")
    if (client_ca is None) != (client_auth == "NoClientCert"):
        raise fail("tls_server_config: client_ca_file and a client_auth_type other than NoClientCert go together")
    versions = {}
    for bound, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = section.get(bound, default)
        if name not in TLS_VERSIONS:
            raise fail(f"tls_server_config.{bound} must be one of {', '.join(TLS_VERSIONS)}, got {name!r}")
        versions[bound] = TLS_VERSIONS[name]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.minimum_version, context.maximum_version = versions["min_version"], versions["max_version"]
    except (ValueError, ssl.SSLError) as exc:
        raise fail(f"this Python's OpenSSL refuses the TLS versions asked for ({exc})") from exc
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise fail(f"cannot load cert_file {cert} with key_file {key} ({_reason(exc)})") from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise fail(f"cannot load client_ca_file {client_ca} ({_reason(exc)})") from exc
    context.verify_mode = CLIENT_AUTH_TYPES[client_auth]
    return context, client_auth


def _reason(exc: OSError) -> str:
    return str(getattr(exc, "reason", None) or exc.strerror or exc)


def _users(section: Any, fail: Any) -> dict[str, bytes]:
    if not isinstance(section, dict):
        raise fail(f"basic_auth_users must be a mapping of user name to bcrypt hash, got {type(section).__name__}")
    users = {}
    for user, hashed in section.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise fail(f"basic_auth_users: user name {user!r} must be a non-empty string without ':'")
        if not isinstance(hashed, str) or not _BCRYPT_HASH.fullmatch(hashed):
            raise fail(f"basic_auth_users.{user} must be a bcrypt hash ($2y$10$ and 53 characters; "
                       f"htpasswd -nBC 10 \"\" | tr -d ':\\n' makes one)")
        users[user] = hashed.encode()
    return users
