"""A throwaway certificate authority for TLS tests, made with the `openssl` command at test time."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import bcrypt

HAVE_OPENSSL = shutil.which("openssl") is not None

_CA_EXTENSIONS = ("basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign",
                  "subjectKeyIdentifier=hash")


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


def _leaf(directory: Path, name: str, usage: str, alt_names: str | None) -> tuple[Path, Path]:
    key, csr, cert, ext = (directory / f"{name}.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
    lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
             f"extendedKeyUsage={usage}", "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid"]
    if alt_names:
        lines.append(f"subjectAltName={alt_names}")
    ext.write_text("\n".join(lines) + "\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", csr.name, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", ext.name, "-out", cert.name, cwd=directory)
    return cert, key


def make_pki(directory: Path) -> Pki:
    """Write the CA and both leaf certificates (EC P-256, valid two days) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca",
             *(arg for extension in _CA_EXTENSIONS for arg in ("-addext", extension)), cwd=directory)
    server_cert, server_key = _leaf(directory, "server", "serverAuth", "IP:127.0.0.1,DNS:localhost")
    client_cert, client_key = _leaf(directory, "client", "clientAuth", None)
    return Pki(directory / "ca.crt", server_cert, server_key, client_cert, client_key)


def bcrypt_hash(password: str, rounds: int = 4) -> str:
    """A bcrypt hash in the `$2y$` spelling htpasswd writes (cheap rounds: tests only)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode().replace("$2b$", "$2y$", 1)
