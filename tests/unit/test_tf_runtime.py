"""TensorFlow's native stderr lines stay off the terminal by default; verbose shows them; errors keep them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.conftest import TRAIN_ARGS, synthetic_events
from training.tf_runtime import ENV_VERBOSE, quiet_native_stderr

ROOT = Path(__file__).resolve().parents[2]
#: Lines TensorFlow 2.21 writes to descriptor 2 on import, on the first fit and on SavedModel loads.
NATIVE_MARKERS = ("absl::InitializeLog", "oneDNN custom operations", "E0000", "I0000", "W0000")


def native_write(text: str) -> None:
    """Write to descriptor 2 directly, as C++ code does (around Python's sys.stderr)."""
    os.write(2, text.encode())


@pytest.fixture()
def quiet(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(ENV_VERBOSE, raising=False)
    caplog.set_level(logging.INFO, logger="training.tf_runtime")


@pytest.mark.usefixtures("quiet")
def test_native_lines_are_dropped_and_stderr_is_restored(capfd: pytest.CaptureFixture[str]) -> None:
    native_write("before\n")
    with quiet_native_stderr():
        native_write("E0000 native noise\n")
    native_write("after\n")
    assert capfd.readouterr().err == "before\nafter\n"


@pytest.mark.usefixtures("quiet")
def test_as_a_decorator_it_quiets_each_call_and_returns_the_result(capfd: pytest.CaptureFixture[str]) -> None:
    @quiet_native_stderr()
    def noisy(x: int) -> int:
        native_write("I0000 noise\n")
        return x + 1

    assert (noisy(1), noisy(2)) == (2, 3)
    native_write("after\n")
    assert capfd.readouterr().err == "after\n"


@pytest.mark.usefixtures("quiet")
def test_an_escaping_exception_surfaces_with_the_captured_lines(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="boom"), quiet_native_stderr():
        native_write("E0000 what the runtime said before failing\n")
        raise ValueError("boom")
    native_write("after\n")
    assert capfd.readouterr().err == "E0000 what the runtime said before failing\nafter\n"


@pytest.mark.usefixtures("quiet")
def test_nested_windows_restore_in_order(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(KeyError), quiet_native_stderr():
        native_write("outer\n")
        with quiet_native_stderr():
            native_write("inner dropped\n")
        native_write("outer again\n")
        raise KeyError("x")
    assert capfd.readouterr().err == "outer\nouter again\n"


def test_env_variable_shows_native_lines(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO, logger="training.tf_runtime")
    monkeypatch.setenv(ENV_VERBOSE, "1")
    with quiet_native_stderr():
        native_write("I0000 shown\n")
    assert capfd.readouterr().err == "I0000 shown\n"


def test_debug_logging_shows_native_lines(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    # The worker's --log-level DEBUG configures the root logger before TensorFlow is loaded.
    monkeypatch.delenv(ENV_VERBOSE, raising=False)
    caplog.set_level(logging.DEBUG, logger="training.tf_runtime")
    with quiet_native_stderr():
        native_write("I0000 shown\n")
    assert capfd.readouterr().err == "I0000 shown\n"


# -- real TensorFlow, in fresh processes (the lines are printed once per process) ------------------------


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != ENV_VERBOSE} | {"PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=600)


def native_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(marker in line for marker in NATIVE_MARKERS)]


def test_verbose_import_shows_tensorflow_native_lines(tmp_path: Path) -> None:
    # Guards the quiet test below: these lines really are printed here when nobody hides them.
    result = run_python("import logging; logging.basicConfig(level='DEBUG'); import training.model", tmp_path)
    assert result.returncode == 0, result.stderr
    assert native_lines(result.stderr), result.stderr


def test_train_and_score_clis_print_no_native_lines_by_default(tmp_path: Path) -> None:
    synthetic_events(200).to_csv(tmp_path / "events.csv", index=False)
    train = ["--data", "events.csv", "--out", "bundle", "--label-column", "label", "--normal-value", "normal",
             "--drop", "event_id", *TRAIN_ARGS, "--ensemble", "1"]
    score = ["--model", "bundle", "--data", "events.csv", "--out", "scores.csv", "--passthrough", "event_id"]
    code = ("import sys; from training.cli import score_main, train_main; "
            f"assert train_main({train!r}) == 0; assert score_main({score!r}) == 0")
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "scores.csv").is_file()
    assert native_lines(result.stderr) == [], result.stderr


@pytest.mark.usefixtures("quiet")
def test_an_interruption_drops_the_captured_lines(capfd: pytest.CaptureFixture[str]) -> None:
    # Ctrl-C is no failure: the CLI prints its one line, the runtime's captured noise stays off the terminal.
    with pytest.raises(KeyboardInterrupt), quiet_native_stderr():
        native_write("E0000 NodeDef mentions attribute use_unbounded_threadpool\n")
        raise KeyboardInterrupt
    native_write("after\n")
    assert capfd.readouterr().err == "after\n"


def test_sigint_during_training_prints_only_the_one_line(tmp_path: Path) -> None:
    """Issue 19 row 13: Ctrl-C once the epochs run leaves exactly the CLI's line on stderr (no native E0000)."""
    import signal
    import threading

    from tests.kafka_broker import wait_for

    synthetic_events(3000, seed=2).to_csv(tmp_path / "events.csv", index=False)
    code = "import sys; from training.cli import train_main; sys.exit(train_main(sys.argv[1:]))"
    environ = {k: v for k, v in os.environ.items() if k != ENV_VERBOSE} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--data", "events.csv", "--out", "bundle", "--label-column", "label",
         "--normal-value", "normal", "--drop", "event_id", "--epochs", "200", "--hidden", "8,3", "--ensemble", "1"],
        cwd=tmp_path, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True),
               threading.Thread(target=lambda: err.extend(proc.stderr or []), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        # The first epoch line: fitting has begun, and the runtime has written its E0000 line into the window.
        wait_for(lambda: any(line.startswith("epoch") for line in out) or proc.poll() is not None, timeout=300,
                 what="the first epoch", interval=0.05)
        assert proc.poll() is None, "training finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    for reader in readers:
        reader.join(timeout=10)
    assert proc.returncode == 130, err
    assert "".join(err) == "anomaly-train: interrupted; nothing was written\n"
    assert not (tmp_path / "bundle").exists()
