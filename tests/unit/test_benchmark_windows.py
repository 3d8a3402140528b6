"""The window benchmark's parts on tiny sizes: the network scenario, the handbook features, the metric code and
the state measurements (no model is trained here)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmarks import netscenario
from benchmarks.windows import handbook_features, metrics, run_memory, run_speed, window_columns


@pytest.fixture(scope="module")
def scenario() -> pd.DataFrame:
    return netscenario.scenario(hosts=40, seconds=600.0, seed=3)


def test_scenario_is_time_ordered_labelled_and_reproducible(scenario: pd.DataFrame) -> None:
    assert scenario["ts"].is_monotonic_increasing
    assert list(scenario.columns[:len(netscenario.FIELDS)]) == list(netscenario.FIELDS)
    assert set(scenario["label"]) == {"normal", "portscan", "flood", "bruteforce"}
    assert scenario["uid"].is_unique
    attacks = scenario[scenario["label"] != "normal"]
    assert (attacks["ts"] >= netscenario.START + 300).all()  # the first half is clean, for training
    spans = attacks.groupby("attack_id")["ts"].agg(lambda t: t.max() - t.min())
    assert spans.max() <= 60.0
    assert (attacks.groupby("attack_id")["id.orig_h"].nunique() == 1).all()
    pd.testing.assert_frame_equal(scenario, netscenario.scenario(hosts=40, seconds=600.0, seed=3))


def test_each_attack_event_looks_like_normal_traffic(scenario: pd.DataFrame) -> None:
    """Every attack event's protocol, service and state occur in normal traffic, and the median of each of its
    numbers lies inside the central 90 % of normal events of the same kind: only the number of such events per
    host in a short time is unusual."""
    key = ["proto", "service", "conn_state"]
    normal = scenario[scenario["label"] == "normal"].groupby(key)
    for kind, attacks in scenario[scenario["label"] != "normal"].groupby(key):
        same = normal.get_group(kind)  # KeyError: an attack kind normal traffic never has
        assert len(same) >= 20, kind
        for field in ("duration", "orig_bytes", "resp_bytes", "orig_pkts", "resp_pkts"):
            low, high = same[field].quantile([0.05, 0.95])
            assert low <= attacks[field].median() <= high, (kind, field)
    ports = scenario.loc[scenario["label"] == "portscan", "id.resp_p"]
    assert ports.between(1, 1024).all()  # the range of normal rejected connections' ports
    assert (scenario[scenario["label"] == "portscan"].groupby("attack_id")["id.resp_p"].nunique() >= 300).all()


def test_scan_events_stand_out_in_their_hosts_two_second_window(scenario: pd.DataFrame) -> None:
    columns, facts = window_columns(scenario, ["id.orig_h"], ["2s", "60s"], "ts", ["duration"])
    assert facts["columns"] == 2 * 4  # count + mean/max/ratio of duration per window
    count = columns["w.id.orig_h:2s:count"].to_numpy()
    label = scenario["label"].to_numpy()
    assert np.median(count[label == "portscan"]) > 50 * np.median(count[label == "normal"])
    assert count.min() >= 1  # every event counts itself


def test_entity_events_have_the_asked_entities_and_events() -> None:
    frame = netscenario.entity_events(entities=300, per_entity=4, seconds=50.0)
    assert len(frame) == 1200 and frame["id.orig_h"].nunique() == 300
    assert (frame.groupby("id.orig_h").size() == 4).all()
    assert frame["ts"].is_monotonic_increasing and frame["ts"].max() - frame["ts"].min() <= 50.0


def test_handbook_features_count_and_average_the_customers_recent_amounts() -> None:
    day = pd.Timedelta(days=1)
    t0 = pd.Timestamp("2018-04-01")
    frame = pd.DataFrame({"CUSTOMER_ID": [1, 2, 1, 1, 2],
                          "TX_DATETIME": [t0, t0, t0 + 0.5 * day, t0 + 3 * day, t0 + 40 * day],
                          "TX_AMOUNT": [10.0, 7.0, 20.0, 60.0, 9.0]})
    got = handbook_features(frame)
    assert got["CUSTOMER_NB_TX_1DAY"].tolist() == [1, 1, 2, 1, 1]
    assert got["CUSTOMER_AVG_AMOUNT_1DAY"].tolist() == [10.0, 7.0, 15.0, 60.0, 9.0]
    assert got["CUSTOMER_NB_TX_7DAY"].tolist() == [1, 1, 2, 3, 1]
    assert got["CUSTOMER_AVG_AMOUNT_30DAY"].tolist() == [10.0, 7.0, 15.0, 30.0, 9.0]


def test_metrics_rank_the_positives() -> None:
    y = np.array([False, False, True, True])
    assert metrics(y, np.array([0.1, 0.2, 0.3, 0.4])) == {"roc_auc": 1.0, "pr_auc": 1.0, "positives": 2,
                                                         "negatives": 2}
    assert metrics(y, np.array([0.4, 0.3, 0.2, 0.1]))["roc_auc"] == 0.0


def test_memory_and_speed_measurements_on_small_states() -> None:
    memory = run_memory(2_000, log=lambda _: None)
    assert [r["entities"] for r in memory["rows"]] == [2_000, 2_000]
    assert [r["entries"] for r in memory["rows"]] == [2_000, 10_000]
    assert 100 < memory["entry_bytes"] < 5_000 and 100 < memory["entity_bytes"] < 20_000
    speed = run_speed(hosts=20, seconds=120.0, seed=1, log=lambda _: None, repeats=1)
    assert speed["results"]["normal only"]["features"]["events_per_s"] > 0
    assert speed["results"]["normal only"]["replay"]["events_per_s"] > 0
    assert speed["results"]["scenario"]["mean_events_in_window"]["60s"] >= 1
    assert any("advance" in line or "window" in line for line in speed["profile"])
