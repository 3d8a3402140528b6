"""The realistic-feed and scaling benchmarks (benchmarks/throughput_feeds.py, scoring_stages.py, scaling.py) at a
tiny size: the feed's rows, the scoring path's passes and stages, CPU time and efficiency; the broker runs
themselves are the benchmarks', not a test's."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from benchmarks import scoring_stages
from benchmarks.quality import one_class_split
from benchmarks.scaling import broker_pid, cpu_seconds, efficiency, render_markdown, summarise
from benchmarks.throughput_feeds import realistic_rows, scoring_pinned
from tests.unit.conftest import TrainedBundle


def _nsl_like(path: Path, normals: int, attacks: int) -> list[str]:
    """A CSV shaped like NSL-KDD (features, then label and difficulty); `a` is the row number."""
    lines = [f"{i},{'tcp' if i % 2 else 'udp'},{'normal' if i < normals else 'neptune'},{i % 21}"
             for i in range(normals + attacks)]
    path.write_text("a,proto,label,difficulty\n" + "\n".join(lines) + "\n")
    return lines


def test_realistic_rows_are_test_normals_outside_the_training_sample_with_a_few_attacks(tmp_path: Path) -> None:
    lines = _nsl_like(tmp_path / "kdd.csv", normals=1000, attacks=300)
    is_attack = [line.split(",")[2] != "normal" for line in lines]
    split = one_class_split(np.array(is_attack), seed=0)
    test_normals = set(split.test[~split.y_test].tolist())
    sample = [lines[i] for i in sorted(test_normals)[:50]] + [lines[i] for i in split.train[:50].tolist()]
    (tmp_path / "sample.csv").write_text("a,proto,label,difficulty\n" + "\n".join(sample) + "\n")

    rows, taken = realistic_rows(tmp_path / "kdd.csv", tmp_path / "sample.csv", attack_share=0.03)

    chosen = [row["a"] for row in rows]
    assert all(set(row) == {"a", "proto"} for row in rows)  # label, difficulty and id are not features
    assert len(set(chosen)) == len(chosen)
    normals = [a for a in chosen if not is_attack[a]]
    assert set(normals) == test_normals - {int(line.split(",")[0]) for line in sample}
    attacks = len(chosen) - len(normals)
    assert attacks == taken["attacks"] == round(len(normals) * 0.03 / 0.97) and attacks > 0
    assert taken["left_out_in_training_sample"] == 50 and taken["attack_labels"] == {"neptune": attacks}
    assert chosen != sorted(chosen)  # shuffled, not in file order
    with pytest.raises(ValueError, match="attack share"):
        realistic_rows(tmp_path / "kdd.csv", tmp_path / "sample.csv", attack_share=1.0)


def _values(trained: TrainedBundle, n: int) -> list[bytes]:
    rows = trained.features.to_dict("records")
    return [orjson.dumps(rows[i % len(rows)]) for i in range(n)]


def test_scoring_stages_account_for_the_pipelines_time_and_alerts(trained_bundle: TrainedBundle) -> None:
    values = _values(trained_bundle, 1500)  # a full batch and a part one
    passes = scoring_stages.scoring_passes(trained_bundle.path, values, passes=2)
    assert len(passes["passes"]) == 2 and passes["best_events_per_s"] >= passes["median_events_per_s"] > 0
    stages = scoring_stages.stage_times(trained_bundle.path, values, passes=1)
    per_k = stages["seconds_per_1000_events"]
    assert all(per_k[s] > 0 for s in (*scoring_stages.STAGES, "process"))
    assert stages["alerts_per_1000_events"] == pytest.approx(1000 * passes["alert_share"])
    assert sum(stages["share_of_process"].values()) >= 0.99  # "other" fills the stages' gap
    profile = scoring_stages.profile_process(trained_bundle.path, values, top=5)
    assert len(profile) == 5 and all(row["own_s"] >= 0 for row in profile)


def test_scoring_pinned_runs_in_a_child_on_one_cpu(trained_bundle: TrainedBundle, tmp_path: Path) -> None:
    child = scoring_pinned(trained_bundle.path, _values(trained_bundle, 300), 1, tmp_path)
    result = child["scoring"]
    assert result["affinity"] == [min(os.sched_getaffinity(0))]
    assert result["events"] == 300 and result["best_events_per_s"] > 0
    assert child["stages"]["seconds_per_1000_events"]["process"] > 0 and child["profile"]
    assert not list(tmp_path.glob("*.jsonl"))  # the events file is removed


def test_cpu_seconds_counts_this_process_work() -> None:
    before = cpu_seconds(os.getpid())
    deadline = time.monotonic() + 10
    while cpu_seconds(os.getpid()) < before + 0.05:  # busy until the kernel has counted some ticks
        assert time.monotonic() < deadline, "no CPU time counted in 10 s"
    after = cpu_seconds(os.getpid())
    times = os.times()
    assert before < after <= times.user + times.system + 0.05


def test_efficiency_and_summary() -> None:
    assert efficiency({1: 100.0, 2: 150.0}) == {1: 1.0, 2: 0.75}
    with pytest.raises(ValueError, match="one process"):
        efficiency({2: 150.0})
    run = {"events": 1000, "seconds": 1.0, "produce_seconds": 0.1, "events_per_s_after_produce": 1100.0,
           "bench_process_cores": 0.2}
    runs = [{**run, "processes": 1, "events_per_s": 1000.0, "worker_cores": [0.9], "broker_cores": 0.3,
             "broker_cpu_seconds": 0.3},
            {**run, "processes": 1, "events_per_s": 1200.0, "worker_cores": [1.0], "broker_cores": 0.4,
             "broker_cpu_seconds": 0.4},
            {**run, "processes": 2, "events_per_s": 1650.0, "worker_cores": [0.7, 0.8], "broker_cores": 0.5,
             "broker_cpu_seconds": 0.5}]
    one, two = summarise(runs)
    assert one["events_per_s"] == 1100.0 and one["efficiency"] == 1.0 and one["runs"] == 2
    assert two["events_per_s_per_process"] == 825.0 and two["efficiency"] == pytest.approx(0.75)
    assert one["broker_cpu_seconds_per_100k_events"] == pytest.approx(35.0)
    report = {"date": "d", "machine": "m", "commit": "c", "command": "python -m benchmarks.scaling",
              "runs": [{"repeat": 1, **r} for r in runs], "summary": [one, two], "settings": {"nproc": 2}}
    table = render_markdown(report)
    assert "| 2 | 1,650 | **825** | **0.75** | 0.75 | 0.50 |" in table


def test_broker_pid_reads_the_launchers_pid_file(tmp_path: Path) -> None:
    (tmp_path / "node-1").mkdir()
    (tmp_path / "node-1" / "kafka.pid").write_text("4242\n")
    assert broker_pid(tmp_path) == 4242
