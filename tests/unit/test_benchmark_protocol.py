"""The one-class split of benchmarks.quality: sizes, caps, disjointness, train-only normals, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.quality import one_class_split


def labels(normals: int, anomalies: int, seed: int = 1) -> np.ndarray:
    y = np.r_[np.zeros(normals, bool), np.ones(anomalies, bool)]
    return np.random.default_rng(seed).permutation(y)


def test_sizes_follow_the_protocol() -> None:
    y = labels(1_000, 50)
    split = one_class_split(y)
    assert split.train.size == 600
    assert (~split.y_test).sum() == 400
    assert split.y_test.sum() == 50
    assert split.test.size == 450


def test_caps_on_train_test_normals_and_anomalies() -> None:
    y = labels(100_000, 8_000)
    split = one_class_split(y)
    assert split.train.size == 20_000
    assert (~split.y_test).sum() == 20_000
    assert split.y_test.sum() == 5_000


def test_train_is_normal_only_and_disjoint_from_test() -> None:
    y = labels(2_000, 300)
    split = one_class_split(y)
    assert not y[split.train].any()
    assert np.intersect1d(split.train, split.test).size == 0
    assert np.unique(split.test).size == split.test.size
    assert np.unique(split.train).size == split.train.size
    np.testing.assert_array_equal(split.y_test, y[split.test])


def test_test_rows_are_shuffled_not_normals_then_anomalies() -> None:
    split = one_class_split(labels(1_000, 200))
    first_anomaly = int(np.argmax(split.y_test))
    assert first_anomaly < (~split.y_test).sum()  # anomalies are interleaved with the normals


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    y = labels(5_000, 400)
    a, b, c = one_class_split(y), one_class_split(y), one_class_split(y, seed=1)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.test, b.test)
    assert not np.array_equal(a.train, c.train)


def test_uses_default_rng_zero_normals_then_anomalies() -> None:
    y = labels(500, 40)
    rng = np.random.default_rng(0)
    normals = rng.permutation(np.flatnonzero(~y))
    rng.permutation(np.flatnonzero(y))
    np.testing.assert_array_equal(one_class_split(y).train, normals[:300])


def test_rejects_a_bad_fraction() -> None:
    with pytest.raises(ValueError, match="train_fraction"):
        one_class_split(labels(100, 10), train_fraction=1.5)
