"""The worker runs numpy's BLAS on one thread unless the environment chooses (worker/threads.py)."""

from __future__ import annotations

from threadpoolctl import threadpool_info, threadpool_limits

from worker.threads import single_threaded_blas


def blas_threads() -> list[int]:
    return [int(pool["num_threads"]) for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_blas_runs_on_one_thread_until_restored() -> None:
    assert blas_threads(), "numpy's BLAS is loaded"
    with threadpool_limits(limits=2, user_api="blas"):  # as on a 2-core machine, whatever this one has
        assert set(blas_threads()) == {2}
        limit = single_threaded_blas(environ={})
        assert limit is not None
        assert set(blas_threads()) == {1}


def test_a_thread_count_set_in_the_environment_is_left_alone() -> None:
    before = blas_threads()
    assert single_threaded_blas(environ={"OPENBLAS_NUM_THREADS": "4"}) is None
    assert single_threaded_blas(environ={"OMP_NUM_THREADS": "2"}) is None
    assert blas_threads() == before
