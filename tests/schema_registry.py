"""A real schema registry for integration tests: Apicurio Registry, Confluent-compatible API.

`deploy/registry/registry-local.sh` builds it from Maven Central jars (`fetch`) and runs it (`start`);
this module runs that launcher as a subprocess on a free loopback port. Its storage is an H2 file in
the registry's data directory, so `stop()` then `start()` brings it back on the SAME port with the same
schemas and ids, as a real registry keeps them (fault tests stop it mid-stream)::

    with SchemaRegistry(tmp_dir) as registry:
        client = SchemaRegistryClient({"url": registry.url, "timeout": 5})
        registry.stop()     # clients now get httpx2.ConnectError (connection refused)
        registry.start()    # same port, same schemas

What confluent-kafka's client sees from it (checked by tests/integration/test_schema_registry.py):
an unknown id is `SchemaRegistryError` 404 / 40403; a stopped registry is `httpx2.ConnectError`; a hung
one (`pause()`) is `httpx2.ReadTimeout` only if the client sets `timeout` (without it a call waits forever).
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = REPO_ROOT / "deploy" / "registry" / "registry-local.sh"
CCOMPAT_PATH = "/apis/ccompat/v7"
# Readiness probes go straight to 127.0.0.1, whatever http_proxy the environment sets.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RegistryError(RuntimeError):
    """The registry could not be built or started; the message carries the end of its log."""


def fetch(timeout: float = 900.0) -> None:
    """Build the registry if it is not built yet (`registry-local.sh fetch`; a no-op afterwards)."""
    result = subprocess.run(["bash", str(LAUNCHER), "fetch"], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RegistryError(f"registry-local.sh fetch exited {result.returncode}:\n{result.stderr[-4000:]}")


def started_registry(data_dir: Path, attempts: int = 3) -> SchemaRegistry:
    """A running `SchemaRegistry` storing in `data_dir`, on a free port (another is tried if one is taken)."""
    for attempt in range(1, attempts + 1):
        registry = SchemaRegistry(data_dir)
        try:
            registry.start()
            return registry
        except RegistryError as e:
            # Another process may take the port between our choosing it and the registry binding it.
            if "in use" not in str(e) or attempt == attempts:
                raise
    raise AssertionError("unreachable")


class SchemaRegistry:
    """One Apicurio Registry process on 127.0.0.1, stoppable and restartable on the same port.

    `data_dir` holds its H2 storage and `log_path` (the output of every start, appended).
    """

    def __init__(self, data_dir: Path, port: int | None = None, start_timeout: float = 90.0) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "registry.log"
        self.port = port if port is not None else free_port_below_ephemeral()
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The Confluent-compatible base URL, for `SchemaRegistryClient({"url": ...})`."""
        return f"http://127.0.0.1:{self.port}{CCOMPAT_PATH}"

    @property
    def pid(self) -> int | None:
        """The JVM's pid while it runs (the launcher execs java, so it is the child's pid)."""
        return self._proc.pid if self._proc is not None and self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the registry on `self.port` and wait until /health/ready answers UP.

        Raises RegistryError, with the log tail, if it exits or is not ready within `start_timeout`.
        """
        if self.running:
            raise RegistryError(f"registry already running on port {self.port}")
        with self.log_path.open("ab") as log:
            log.write(f"=== registry-local.sh start {self.port} ({time.strftime('%H:%M:%S')})\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                ["bash", str(LAUNCHER), "start", str(self.port), "--data", str(self.data_dir / "storage")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline, poll_s = time.monotonic() + self.start_timeout, 0.1
        while not self._ready():
            if self._proc.poll() is not None:
                raise RegistryError(f"registry exited {self._proc.returncode} while starting:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                self.stop()
                raise RegistryError(f"registry not ready after {self.start_timeout:g}s:\n{self.log_tail()}")
            time.sleep(poll_s)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the registry (SIGTERM, then SIGKILL after `timeout` s); a no-op if it is not running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused JVM cannot handle SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def pause(self) -> None:
        """Freeze the JVM (SIGSTOP): connections are accepted, nothing answers, like a hung registry."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo `pause()`."""
        self._signal(signal.SIGCONT)

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the registry's output, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or not self.running:
            raise RegistryError("registry is not running")
        self._proc.send_signal(sig)

    def _ready(self) -> bool:
        url = f"http://127.0.0.1:{self.port}/health/ready"
        try:
            with _NO_PROXY.open(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def __enter__(self) -> SchemaRegistry:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def free_port_below_ephemeral() -> int:
    """A loopback port free right now and below the kernel's ephemeral range.

    Below it on purpose: while the registry is stopped, clients keep connecting to its port, and a connect
    to a loopback port inside the ephemeral range can get that very port as its source and connect to
    itself, holding the port so the registry cannot bind it again when it restarts.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RegistryError(f"no free loopback port below {low}")
