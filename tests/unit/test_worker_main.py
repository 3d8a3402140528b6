"""anomaly-worker start-up: every user error is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest

from tests.unit.conftest import TrainedBundle
from worker.main import main


def worker_args(model: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--bootstrap-servers", "127.0.0.1:1", "--input-topic", "in",
            "--alert-topic", "alerts", "--dead-letter-topic", "dlq", "--group-id", "g", "--metrics-host",
            "127.0.0.1", *extra]


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("anomaly-worker:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_metrics_port_in_use(trained_bundle: TrainedBundle, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(capsys, worker_args(trained_bundle.path, "--metrics-port", str(port)),
                       f"cannot serve metrics on 127.0.0.1:{port}", "--metrics-port")


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--log-level", "LOUD"], "--log-level must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"),
    (["--liveness-timeout-s", "0"], "--liveness-timeout-s must be a positive number"),
    (["--retry-backoff-initial-s", "60"], "must not exceed --retry-backoff-max-s"),
])
def test_bad_settings(trained_bundle: TrainedBundle, capsys: pytest.CaptureFixture[str], extra: list[str],
                      fragment: str) -> None:
    one_line_error(capsys, worker_args(trained_bundle.path, *extra), fragment)


def test_nan_threshold_in_the_bundle(trained_bundle: TrainedBundle, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Issue 7, defect 5: the worker crashed on a NaN threshold.
    bundle = Path(shutil.copytree(trained_bundle.path, tmp_path / "bundle"))
    threshold = json.loads((bundle / "threshold.json").read_text())
    threshold["value"] = float("nan")
    (bundle / "threshold.json").write_text(json.dumps(threshold))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["threshold.json"] = hashlib.sha256((bundle / "threshold.json").read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(capsys, worker_args(bundle), "threshold.json", "finite positive")


def test_missing_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(capsys, worker_args(tmp_path / "none"), "no model bundle here")
