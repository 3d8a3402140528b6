"""Keep TensorFlow's native log lines off the user's terminal unless asked for.

TensorFlow's C++ runtime writes straight to file descriptor 2, around Python's `sys.stderr`: when it
loads (`WARNING: All log messages before absl::InitializeLog() ...`, `I0000 ... oneDNN custom
operations are on ...`) and when it builds graphs (`E0000 ... NodeDef mentions attribute ...`).
`TF_CPP_MIN_LOG_LEVEL` does not silence them all, and to a new user they look like errors.

`quiet_native_stderr()` points descriptor 2 at a temporary file around the calls that print them
(the import, fitting, SavedModel loading), then restores it. What was captured is dropped, or written
to stderr after all if an exception escapes, so a failure keeps its context; an interruption (Ctrl-C,
or SIGTERM as the CLIs raise it) is no failure, and its captured lines are dropped too, so the CLI's
one line is all that reaches the terminal. Everything written to
stderr inside the window is captured, Python's output included, so windows stay around TensorFlow
calls only; a native crash inside a window loses its message (rerun verbose to see it).

Verbose (nothing captured): `ANOMALY_TF_LOG=1`, or this module's logger enabled for DEBUG (the
worker's `--log-level DEBUG`).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from worker.config import TF_LOG

ENV_VERBOSE = TF_LOG.env  # declared with the other settings (docs/settings.md)

log = logging.getLogger(__name__)

# Windows swap a process-wide descriptor: one thread at a time; nesting restores in order.
_lock = threading.RLock()


def verbose() -> bool:
    """Whether TensorFlow's native lines should reach stderr."""
    return bool(TF_LOG.from_env(os.environ)) or log.isEnabledFor(logging.DEBUG)


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Capture file descriptor 2 for the block (also usable as a decorator); replay it if the block raises
    (not if it is interrupted)."""
    if verbose():
        yield
        return
    with _lock, tempfile.TemporaryFile() as capture:
        _flush_python_stderr()
        try:
            saved = os.dup(2)
        except OSError:  # no descriptor 2 to protect
            yield
            return
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except KeyboardInterrupt:
            _restore(saved)
            raise
        except BaseException:
            _restore(saved)
            capture.seek(0)
            captured = capture.read()
            while captured:
                captured = captured[os.write(2, captured):]
            raise
        else:
            _restore(saved)


def _restore(saved: int) -> None:
    _flush_python_stderr()  # what Python buffered inside the window belongs to the window
    os.dup2(saved, 2)
    os.close(saved)


def _flush_python_stderr() -> None:
    if sys.stderr is not None:
        sys.stderr.flush()
