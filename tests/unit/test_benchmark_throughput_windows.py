"""The worker-on-broker window benchmark's events (benchmarks/throughput_windows.py) on a tiny scenario; the
broker runs themselves are the benchmark's, not a test's."""

from __future__ import annotations

import orjson

from benchmarks import netscenario
from benchmarks.throughput_windows import keyed_events


def test_keyed_events_repeat_the_scenario_with_event_time_increasing_and_the_entity_as_key() -> None:
    frame = netscenario.scenario(hosts=40, seconds=600.0, seed=3)
    n = 2 * len(frame) + 3  # two copies and the start of a third
    events = keyed_events(frame, n, 600.0)
    assert len(events) == n
    decoded = [orjson.loads(value) for _, value in events]
    times = [e["ts"] for e in decoded]
    assert times == sorted(times)
    assert times[len(frame)] == frame["ts"].iloc[0] + 600.0  # the second copy, shifted by the scenario's length
    assert all(key == e["id.orig_h"].encode() for (key, _), e in zip(events, decoded, strict=True))
    assert set(decoded[0]) == {"ts", "id.orig_h", *[f for f in netscenario.FIELDS if f not in
                                                   ("uid", "id.orig_p", "id.resp_h", "ts", "id.orig_h")]}
