"""Native thread pools of the worker's process: numpy's BLAS runs on the loop's thread.

numpy's OpenBLAS starts one thread per core and lets idle ones spin while they wait for work. The
worker's matrix products are small (a batch's per-column errors folded into per-field errors), and its
loop is one thread: on the 2-core benchmark machine the second BLAS thread burned most of a core
spinning, for no gain in events/s (docs/results.md, benchmarks/results/throughput.md). The worker runs BLAS
single-threaded unless the environment asks otherwise (`OPENBLAS_NUM_THREADS`, `OMP_NUM_THREADS`,
`MKL_NUM_THREADS`). TensorFlow's own thread pools are not affected.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

#: Variables a user sets to choose BLAS threads themselves; any of them turns the limit off.
USER_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def single_threaded_blas(environ: Mapping[str, str] = os.environ) -> threadpool_limits | None:
    """Limit BLAS to one thread (returned, so a caller can restore it), unless the environment sets threads."""
    chosen = [name for name in USER_VARIABLES if environ.get(name, "").strip()]
    if chosen:
        log.debug("BLAS threads left as %s chooses", ", ".join(chosen))
        return None
    return threadpool_limits(limits=1, user_api="blas")
