"""Scoring through the SavedModel signature, and per-field explanations in original units."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.unit.conftest import TrainedBundle
from training.bundle import load_bundle
from training.features import FeatureSchema, NumericField
from training.scoring import Scorer, Scores, round_significant


def raw(frame: pd.DataFrame, schema: FeatureSchema) -> dict[str, np.ndarray]:
    return {name: frame[name].to_numpy(dtype=np.float64 if name in schema.numeric_names else object)
            for name in schema.names}


@pytest.fixture(scope="module")
def scorer(trained_bundle: TrainedBundle) -> Scorer:
    return load_bundle(trained_bundle.path).scorer


@pytest.fixture(scope="module")
def scored(trained_bundle: TrainedBundle, scorer: Scorer) -> tuple[np.ndarray, Scores]:
    matrix = scorer.schema.encode(raw(trained_bundle.frame, scorer.schema)).matrix
    return matrix, scorer.score(matrix)


def test_score_is_mean_of_field_errors_over_model_inputs(scorer: Scorer, scored: tuple[np.ndarray, Scores]) -> None:
    matrix, scores = scored
    assert len(scores) == len(matrix)
    assert scores.field_errors.shape == (len(matrix), len(scorer.schema.fields))
    assert scores.reconstruction.shape == matrix.shape
    assert np.all(scores.field_errors >= 0)
    np.testing.assert_allclose(scores.field_errors.sum(axis=1) / scorer.schema.width, scores.score, rtol=1e-5)


def test_batches_do_not_change_scores(trained_bundle: TrainedBundle, scored: tuple[np.ndarray, Scores]) -> None:
    matrix, scores = scored
    bundle = load_bundle(trained_bundle.path)
    small = Scorer(bundle.path / "saved_model", bundle.schema, max_batch_rows=7).score(matrix)
    np.testing.assert_allclose(small.score, scores.score, rtol=1e-6)
    assert len(Scorer(bundle.path / "saved_model", bundle.schema).score(matrix[:0])) == 0


def test_wrong_width_is_refused(scorer: Scorer) -> None:
    with pytest.raises(ValueError, match=rf"expected an \(n, {scorer.schema.width}\) matrix"):
        scorer.score(np.zeros((2, scorer.schema.width + 1), dtype=np.float32))


def test_anomalies_score_higher(trained_bundle: TrainedBundle, scored: tuple[np.ndarray, Scores]) -> None:
    _, scores = scored
    attack = (trained_bundle.frame["label"] == "attack").to_numpy()
    assert np.median(scores.score[attack]) > np.quantile(scores.score[~attack], 0.9)


def test_explain_gives_sorted_shares_by_field_name(trained_bundle: TrainedBundle, scorer: Scorer,
                                                   scored: tuple[np.ndarray, Scores]) -> None:
    _, scores = scored
    records = trained_bundle.features.to_dict(orient="records")
    for row in range(0, len(records), 37):
        contributions = scorer.explain(scores, row, records[row], top_k=3)
        assert len(contributions) == 3
        shares = [c.share for c in contributions]
        assert shares == sorted(shares, reverse=True)
        assert all(s >= 0 for s in shares) and sum(shares) <= 1.0 + 1e-6
        assert {c.field for c in contributions} <= set(scorer.schema.names)  # "method", never "method=GET"
        for c in contributions:
            if c.field == "method":
                assert c.observed == records[row]["method"]
            else:
                assert c.observed == pytest.approx(records[row][c.field])
    every = scorer.explain(scores, 0, records[0], top_k=len(scorer.schema.fields))
    assert sum(c.share for c in every) == pytest.approx(1.0, rel=1e-5)


def test_explain_of_attack_blames_latency(trained_bundle: TrainedBundle, scorer: Scorer,
                                          scored: tuple[np.ndarray, Scores]) -> None:
    _, scores = scored
    row = int(np.flatnonzero(trained_bundle.frame["label"] == "attack")[0])
    top = scorer.explain(scores, row, trained_bundle.features.iloc[row].to_dict(), top_k=1)[0]
    assert top.field == "latency"
    assert top.observed > top.expected  # the attack's latency is above what normal rows look like


def test_expected_values_are_in_original_units(trained_bundle: TrainedBundle, scorer: Scorer,
                                               scored: tuple[np.ndarray, Scores]) -> None:
    # With a perfect reconstruction, "expected" must equal the observed value in raw units,
    # including through the signed log1p of the heavy-tailed field and the one-hot of the categorical one.
    matrix, scores = scored
    amount = scorer.schema.fields[scorer.schema.names.index("amount")]
    assert isinstance(amount, NumericField) and amount.log
    perfect = Scores(score=scores.score, field_errors=scores.field_errors, reconstruction=matrix)
    record = trained_bundle.features.iloc[5].to_dict()
    for c in scorer.explain(perfect, 5, record, top_k=len(scorer.schema.fields)):
        if c.field == "method":
            assert c.expected == record["method"]
        else:
            assert c.expected == pytest.approx(record[c.field], rel=1e-5)


def test_explanations_are_plain_json(trained_bundle: TrainedBundle, scorer: Scorer,
                                     scored: tuple[np.ndarray, Scores]) -> None:
    # Alerts embed these dicts as they are: numpy scalars or NaN would not survive JSON.
    _, scores = scored
    record = trained_bundle.features.iloc[3].to_dict()
    record["amount"] = np.float32(record["amount"])
    record["latency"] = float("nan")  # a missing value
    contributions = scorer.explain(scores, 3, record, top_k=len(scorer.schema.fields))
    documents = [c.to_dict() for c in contributions]
    assert json.loads(json.dumps(documents, allow_nan=False)) == documents
    by_field = {d["field"]: d for d in documents}
    assert set(by_field) == set(scorer.schema.names)
    assert by_field["latency"]["observed"] is None
    assert type(by_field["amount"]["observed"]) is float and type(by_field["amount"]["expected"]) is float
    assert by_field["method"]["observed"] == record["method"]
    for document, contribution in zip(documents, contributions, strict=True):
        assert document["share"] == round(contribution.share, 6)


def test_top_field_names_the_field_with_the_largest_error(scorer: Scorer) -> None:
    names = scorer.schema.names
    errors = np.full((len(names), len(names)), 0.1)
    np.fill_diagonal(errors, 5.0)  # row i: field i is the worst
    made_up = Scores(score=errors.mean(axis=1), field_errors=errors,
                     reconstruction=np.zeros((len(names), scorer.schema.width), dtype=np.float32))
    assert scorer.top_fields(made_up) == names


def test_top_field_agrees_with_the_explanation_and_blames_latency_for_attacks(
        trained_bundle: TrainedBundle, scorer: Scorer, scored: tuple[np.ndarray, Scores]) -> None:
    _, scores = scored
    top = scorer.top_fields(scores)
    assert len(top) == len(scores)
    records = trained_bundle.features.to_dict(orient="records")
    for row in range(0, len(records), 23):
        assert top[row] == scorer.explain(scores, row, records[row], top_k=1)[0].field
    attack = np.flatnonzero(trained_bundle.frame["label"] == "attack")
    assert np.mean([top[row] == "latency" for row in attack]) > 0.5  # the shifted field of the synthetic attacks


def _explain_one_by_one(scorer: Scorer, scores: Scores, row: int, observed: dict, top_k: int) -> list[tuple]:
    """The explanation of one row computed with scalars, the definition the batch path must reproduce."""
    errors = scores.field_errors[row]
    total = errors.sum() or errors.dtype.type(1.0)
    order = sorted(range(len(errors)), key=lambda j: -errors[j])[:top_k]  # stable: ties keep field order
    out = []
    for j in order:
        f = scorer.schema.fields[j]
        block = scores.reconstruction[row:row + 1, scorer.schema.slices()[j]]
        expected = (round_significant(f.decode(block[:, 0])).tolist()[0] if isinstance(f, NumericField)
                    else f.decode(block)[0])
        value = observed.get(f.name)
        out.append((f.name, float(errors[j] / total), None if isinstance(value, float) and np.isnan(value) else value,
                    None if isinstance(expected, float) and np.isnan(expected) else expected))
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3, 10])
def test_batch_explanations_equal_row_by_row_ones(trained_bundle: TrainedBundle, scorer: Scorer,
                                                  scored: tuple[np.ndarray, Scores], top_k: int) -> None:
    # Exact equality (shares to the last bit), also for tied and all-zero errors, where ranking is the hard part.
    _, scores = scored
    errors = scores.field_errors.copy()
    ties = [[0, 0, 0, 0], [0.7, 0.7, 0.7, 0.7], [1, 3, 3, 2], [2, 1, 2, 2], [0, 0, 5, 0], [4, 1, 1, 1], [1, 1, 4, 4]]
    for row, pattern in enumerate(ties, start=1):
        errors[row] = np.resize(np.asarray(pattern, dtype=errors.dtype), errors.shape[1])
    tricky = Scores(score=scores.score, field_errors=errors, reconstruction=scores.reconstruction)
    records = trained_bundle.features.to_dict(orient="records")
    rows = [*range(len(ties) + 1), *range(len(ties) + 1, len(records), 11), 2]
    batch = scorer.explain_rows(tricky, rows, [records[r] for r in rows], top_k)
    for row, contributions in zip(rows, batch, strict=True):
        got = [(c.field, c.share, c.observed, c.expected) for c in contributions]
        assert got == _explain_one_by_one(scorer, tricky, row, records[row], top_k)
        assert [type(c.share) for c in contributions] == [float] * len(contributions)
    # The worker's alert documents are these contributions, serialised the one way.
    documents = scorer.explain_documents(tricky, rows, [records[r] for r in rows], top_k)
    assert documents == [[c.to_dict() for c in contributions] for contributions in batch]
    assert scorer.explain_documents(tricky, [], [], top_k) == []
