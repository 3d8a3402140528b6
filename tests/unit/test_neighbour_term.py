"""The nearest-neighbour term inside the scoring signature: exact kNN, score parts, explanations, defaults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.unit.conftest import TrainedBundle
from training.bundle import load_bundle
from training.errors import ConfigError
from training.features import FeatureSchema, fit_schema
from training.model import Combination, NeighbourTerm, ScoreConfig, build, export_saved_model, neighbour_bank
from training.scoring import Scorer

K = 3


def brute_force(rows: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k nearest bank rows (nearest first) and their mean squared difference per column."""
    distances = ((rows[:, None, :].astype(np.float64) - bank[None, :, :]) ** 2).sum(axis=2)
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
    per_column = ((rows[:, None, :] - bank[nearest]) ** 2).mean(axis=1)
    return nearest, per_column


@pytest.fixture(scope="module")
def schema_and_rows() -> tuple[FeatureSchema, np.ndarray, np.ndarray]:
    """A 3-field schema (2 numeric, 1 categorical), a bank of its encoded normal rows and other normal rows."""
    rng = np.random.default_rng(3)
    n = 300
    columns = {"a": rng.normal(10, 2, n), "b": rng.normal(-5, 1, n),
               "c": rng.choice(["x", "y"], n).astype(object)}
    schema = fit_schema(columns, ["c"])
    matrix = schema.encode(columns).matrix
    return schema, matrix[:200], matrix[200:]


def export(tmp: Path, schema: FeatureSchema, bank: np.ndarray | None, weight: float, name: str,
           k: int = K) -> Scorer:
    import keras

    keras.utils.set_random_seed(0)
    model = build(schema.width, (4, 2))  # untrained: the reconstruction is poor, so the test sees both terms
    path = tmp / name
    export_saved_model([model], np.ones(schema.width, dtype=np.float32), path,
                       NeighbourTerm(bank=bank, k=k) if bank is not None else None,
                       Combination(distance_weight=weight, reconstruction_scale=2.0, distance_scale=0.5))
    return Scorer(path, schema)


@pytest.fixture(scope="module")
def scorers(tmp_path_factory: pytest.TempPathFactory,
            schema_and_rows: tuple[FeatureSchema, np.ndarray, np.ndarray]) -> dict[str, Scorer]:
    schema, bank, _ = schema_and_rows
    tmp = tmp_path_factory.mktemp("neighbours")
    return {"mixed": export(tmp, schema, bank, 0.6, "mixed"), "distance": export(tmp, schema, bank, 1.0, "dist"),
            "nearest": export(tmp, schema, bank, 1.0, "nearest", k=1),
            "reconstruction": export(tmp, schema, None, 0.6, "recon")}


def test_in_graph_knn_equals_numpy_brute_force(scorers: dict[str, Scorer],
                                               schema_and_rows: tuple[FeatureSchema, np.ndarray, np.ndarray]) -> None:
    _, bank, rows = schema_and_rows
    scores = scorers["distance"].score(rows)
    nearest, per_column = brute_force(rows, bank, K)
    # distance weight 1, distance scale 0.5: score = mean over columns of the k-neighbour mean squared difference / 0.5
    np.testing.assert_allclose(scores.score, per_column.mean(axis=1) / 0.5, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scores.parts["score_distance"], scores.score, rtol=1e-6)
    np.testing.assert_allclose(scores.parts["score_reconstruction"], 0.0, atol=1e-7)
    # every column's error comes from the distance term, so the expected values are the nearest bank row
    np.testing.assert_allclose(scores.reconstruction, bank[nearest[:, 0]], atol=1e-6)


def test_single_neighbour_path_equals_numpy_brute_force(
        scorers: dict[str, Scorer], schema_and_rows: tuple[FeatureSchema, np.ndarray, np.ndarray]) -> None:
    _, bank, rows = schema_and_rows
    scores = scorers["nearest"].score(rows)  # k = 1 uses argmin instead of top_k
    nearest, per_column = brute_force(rows, bank, 1)
    np.testing.assert_allclose(scores.score, per_column.mean(axis=1) / 0.5, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scores.reconstruction, bank[nearest[:, 0]], atol=1e-6)
    assert scorers["nearest"].score(bank[:20]).score == pytest.approx(np.zeros(20), abs=1e-5)  # bank rows: 0


def test_parts_add_up_to_the_score_and_to_the_field_errors(scorers: dict[str, Scorer], schema_and_rows: tuple[
        FeatureSchema, np.ndarray, np.ndarray]) -> None:
    schema, _, rows = schema_and_rows
    mixed, alone = scorers["mixed"].score(rows), scorers["reconstruction"].score(rows)
    np.testing.assert_allclose(mixed.parts["score_reconstruction"] + mixed.parts["score_distance"], mixed.score,
                               rtol=1e-5)
    np.testing.assert_allclose(mixed.field_errors.sum(axis=1) / schema.width, mixed.score, rtol=1e-5)
    # the reconstruction part is (1 - w) / reconstruction_scale times the reconstruction-only score
    np.testing.assert_allclose(mixed.parts["score_reconstruction"], alone.score * 2.0 * 0.4 / 2.0, rtol=1e-5)
    assert (mixed.parts["score_distance"] > 0).all()


def test_reconstruction_only_is_the_weighted_mean_squared_error(scorers: dict[str, Scorer], schema_and_rows: tuple[
        FeatureSchema, np.ndarray, np.ndarray]) -> None:
    _, _, rows = schema_and_rows
    alone = scorers["reconstruction"].score(rows)  # no bank: the previous detector, scale 2
    np.testing.assert_allclose(alone.score, ((rows - alone.reconstruction) ** 2).mean(axis=1) / 2.0, rtol=1e-5)
    np.testing.assert_allclose(alone.parts["score_distance"], 0.0)


def test_a_row_far_from_every_bank_row_scores_higher(scorers: dict[str, Scorer], schema_and_rows: tuple[
        FeatureSchema, np.ndarray, np.ndarray]) -> None:
    _, bank, rows = schema_and_rows
    far = rows[:1].copy()
    far[0, 0] += 6.0  # six standard deviations away on field "a"
    normal = scorers["distance"].score(rows).score
    assert scorers["distance"].score(far).score[0] > normal.max()
    assert scorers["mixed"].score(far).parts["score_distance"][0] > scorers["mixed"].score(rows).parts[
        "score_distance"].max()


def test_explanation_of_a_distance_dominated_row_shows_the_nearest_normal_row(
        scorers: dict[str, Scorer], schema_and_rows: tuple[FeatureSchema, np.ndarray, np.ndarray]) -> None:
    schema, bank, rows = schema_and_rows
    far = rows[:1].copy()
    far[0, 1] -= 8.0  # field "b" far below every normal row
    scorer = scorers["mixed"]
    scores = scorer.score(far)
    assert scores.parts["score_distance"][0] > scores.parts["score_reconstruction"][0]
    nearest, _ = brute_force(far, bank, K)
    top = scorer.explain(scores, 0, {"a": 0.0, "b": 0.0, "c": "x"}, top_k=1)[0]
    assert top.field == "b"
    expected_b = schema.fields[1].decode(bank[nearest[0, 0], 1:2])[0]
    assert top.expected == pytest.approx(expected_b, rel=1e-5)


def test_neighbour_bank_is_a_seeded_subsample_of_training_rows() -> None:
    train = np.arange(50, dtype=np.float32).reshape(25, 2)
    term = neighbour_bank(train, ScoreConfig(bank_rows=10, neighbours=4), seed=1)
    assert term is not None and term.bank.shape == (10, 2) and term.k == 4
    assert {tuple(r) for r in term.bank} <= {tuple(r) for r in train}
    again = neighbour_bank(train, ScoreConfig(bank_rows=10, neighbours=4), seed=1)
    assert again is not None
    np.testing.assert_array_equal(term.bank, again.bank)
    small = neighbour_bank(train[:3], ScoreConfig(bank_rows=10, neighbours=5), seed=1)
    assert small is not None and small.k == 3  # never more neighbours than bank rows
    assert neighbour_bank(train, ScoreConfig(distance_weight=0.0), seed=1) is None
    capped = neighbour_bank(train, ScoreConfig(bank_rows=10, bank_cells=8, neighbours=1), seed=1)
    assert capped is not None and capped.bank.shape == (4, 2)  # 8 numbers of a 2-wide schema: 4 rows


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"distance_weight": 1.5}, "distance weight must be in"),
    ({"neighbours": 0}, "neighbours must be >= 1"),
    ({"bank_rows": 2, "neighbours": 5}, "needs at least 5 rows"),
    ({"scale_quantile": 1.0}, "scale quantile"),
])
def test_score_config_says_what_is_wrong(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ScoreConfig(**kwargs)  # type: ignore[arg-type]


def test_trained_bundle_uses_the_neighbour_term_and_reports_its_parts(trained_bundle: TrainedBundle) -> None:
    bundle = load_bundle(trained_bundle.path)
    training = bundle.manifest.training
    assert training["distance_weight"] == ScoreConfig().distance_weight
    assert training["neighbours"] == ScoreConfig().neighbours and training["bank_rows"] > 0
    shares = training["score_part_shares"]["labelled anomalies"]
    assert shares["reconstruction"] + shares["nearest-neighbour distance"] == pytest.approx(1.0)
    page = (trained_bundle.path / "report" / "report.html").read_text()
    assert "score parts, labelled anomalies" in page and "score_parts.png" in page
    rows = bundle.schema.encode({n: trained_bundle.frame[n].to_numpy(
        dtype=np.float64 if n in bundle.schema.numeric_names else object) for n in bundle.schema.names}).matrix
    first, second = bundle.scorer.score(rows), load_bundle(trained_bundle.path).scorer.score(rows)
    np.testing.assert_array_equal(first.score, second.score)
    assert (first.parts["score_distance"] > 0).any()
