"""The soak report's stall measure: the longest time with lag and no alert published."""

from __future__ import annotations

from benchmarks.soak import longest_stall


def sample(t: float, lag: int, alerts: int) -> dict[str, float]:
    return {"t_s": t, "lag": lag, "alerts": alerts}


def test_longest_stall_counts_only_time_with_lag_and_no_new_alerts() -> None:
    samples = [sample(0, 0, 10), sample(10, 5, 20), sample(20, 50, 20), sample(30, 90, 20), sample(40, 0, 90),
               sample(50, 0, 90), sample(60, 3, 90), sample(70, 0, 95)]
    assert longest_stall(samples) == 20  # 10 s -> 30 s; idle with no lag (40-50) is not a stall
    assert longest_stall([sample(0, 0, 1)]) == 0
