"""Feature schema: what is learned from training columns, and how events are encoded and validated."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.errors import BundleError, ConfigError
from training.features import (
    CLIP,
    UNKNOWN,
    CategoricalField,
    FeatureSchema,
    NumericField,
    fit_categorical,
    fit_numeric,
    fit_schema,
)


def _objects(*values: object) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


@pytest.fixture()
def columns() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    n = 500
    return {
        "amount": rng.lognormal(3.0, 1.5, n),
        "latency": rng.normal(100.0, 10.0, n),
        "method": _objects(*rng.choice(["GET", "POST", "PUT"], n, p=[0.6, 0.3, 0.1])),
    }


@pytest.fixture()
def schema(columns: dict[str, np.ndarray]) -> FeatureSchema:
    return fit_schema(columns, categorical=["method"])


# --- numeric ---------------------------------------------------------------------------------

def test_heavy_tailed_column_gets_signed_log_and_symmetric_one_does_not(columns: dict[str, np.ndarray]) -> None:
    heavy = fit_numeric("amount", columns["amount"])
    normal = fit_numeric("latency", columns["latency"])
    assert heavy.log and not normal.log
    # After the transform, training values are z-scores.
    encoded, _ = heavy.encode(columns["amount"])
    assert abs(encoded.mean()) < 1e-9 and encoded.std() == pytest.approx(1.0)


def test_signed_log_keeps_sign_of_negative_heavy_tail() -> None:
    values = np.r_[-np.random.default_rng(0).lognormal(3.0, 1.5, 300), 0.0]
    field = fit_numeric("delta", -values)  # mirrored: positive skew
    assert field.log
    assert field.decode(field.encode(np.array([0.0, 5.0, 50.0]))[0]) == pytest.approx([0.0, 5.0, 50.0])
    # Expected values are reported within the range seen in training (no negative byte counts).
    assert field.decode(field.encode(np.array([-5.0]))[0]) == pytest.approx([0.0])


def test_decode_inverts_encode_in_original_units(columns: dict[str, np.ndarray]) -> None:
    for name in ("amount", "latency"):
        field = fit_numeric(name, columns[name])
        raw = columns[name][:50]
        np.testing.assert_allclose(field.decode(field.encode(raw)[0]), raw, rtol=1e-9)


def test_constant_column_encodes_to_zero_and_flags_a_new_value_finitely() -> None:
    field = fit_numeric("version", np.full(100, 7.0))
    assert field.constant and field.impute == 7.0
    encoded, _ = field.encode(np.array([7.0, 8.0, 1e300, np.nan]))
    assert encoded[0] == 0.0 and encoded[3] == 0.0  # missing takes the constant
    assert encoded[1] != 0.0
    assert np.all(np.isfinite(encoded)) and np.all(np.abs(encoded) <= CLIP)
    assert field.decode(np.array([0.0]))[0] == pytest.approx(7.0)


def test_column_never_seen_in_training_is_constant_zero() -> None:
    field = fit_numeric("empty", np.full(10, np.nan))
    assert field.constant and field.impute == 0.0
    assert field.encode(np.array([np.nan]))[0][0] == 0.0


def test_missing_numeric_takes_training_median_and_is_counted() -> None:
    field = fit_numeric("x", np.array([1.0, 2.0, np.nan, 3.0, 100.0]))
    assert field.impute == 2.5  # median of the present values
    encoded, n_missing = field.encode(np.array([np.nan, 2.5, np.nan]))
    assert n_missing == 2
    assert encoded[0] == encoded[1] == encoded[2]


def test_schema_encode_counts_missing_per_field(schema: FeatureSchema) -> None:
    encoded = schema.encode({"amount": [np.nan, 1.0], "latency": [None, np.nan], "method": _objects(None, "GET")})
    assert encoded.missing == {"amount": 1, "latency": 2, "method": 1}
    assert encoded.matrix.dtype == np.float32 and encoded.matrix.shape == (2, schema.width)


# --- categorical -----------------------------------------------------------------------------

def test_categorical_one_hot_with_unknown_bucket() -> None:
    field = fit_categorical("method", _objects("GET", "GET", "GET", "POST", "POST", "TRACE"))
    assert field.vocabulary == ("GET", "POST")  # TRACE seen once: not its own column
    assert field.encoded_names == ["method=GET", "method=POST", f"method={UNKNOWN}"]
    block, n_missing = field.encode(_objects("POST", "DELETE", "TRACE", 80))
    assert n_missing == 0
    np.testing.assert_array_equal(block, [[0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    assert field.decode(block) == ["POST", UNKNOWN, UNKNOWN, UNKNOWN]


def test_unseen_category_at_scoring_lands_in_unknown(schema: FeatureSchema) -> None:
    encoded = schema.encode({"amount": [10.0], "latency": [100.0], "method": _objects("BREW")}).matrix
    unknown_col = schema.encoded_names.index(f"method={UNKNOWN}")
    assert encoded[0, unknown_col] == 1.0
    method = schema.slices()[schema.names.index("method")]
    assert encoded[0, method].sum() == 1.0


def test_missing_categorical_takes_the_mode_and_is_counted() -> None:
    field = fit_categorical("method", _objects("POST", "GET", None, "POST", "GET", float("nan"), "GET"))
    assert field.impute == "GET"
    block, n_missing = field.encode(_objects(None, float("nan"), "POST"))
    assert n_missing == 2
    assert field.decode(block) == ["GET", "GET", "POST"]



@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.sampled_from(["GET", "POST", "TRACE", "", "80", "nan", "None"]),
                          st.text(max_size=3), st.integers(0, 99), st.floats(),
                          st.sampled_from([np.str_("GET"), np.float64("nan")])), max_size=12),
       st.sampled_from(["GET", "POST", "TRACE", UNKNOWN]))
def test_one_hot_of_a_column_is_the_one_hot_of_each_value(values: list[object], impute: str) -> None:
    # The column is encoded in one pass (each distinct text looked up once); every row must be what its value alone
    # gives: missing (None, NaN) takes the imputed category, otherwise the text of the value, unknown if unseen.
    field = CategoricalField(name="method", vocabulary=("GET", "POST", "80"), impute=impute)
    block, n_missing = field.encode(_objects(*values))
    expected = np.zeros((len(values), field.width))
    missing = 0
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            missing, value = missing + 1, impute
        expected[row, {"GET": 0, "POST": 1, "80": 2}.get(str(value), 3)] = 1.0
    assert n_missing == missing
    np.testing.assert_array_equal(block, expected)


# --- schema ----------------------------------------------------------------------------------

def test_schema_round_trips_through_json(schema: FeatureSchema, columns: dict[str, np.ndarray]) -> None:
    data = json.loads(json.dumps(schema.to_dict()))
    assert data["encoded_columns"] == schema.encoded_names
    again = FeatureSchema.from_dict(data)
    assert again == schema
    np.testing.assert_array_equal(again.encode(columns).matrix, schema.encode(columns).matrix)


def test_schema_hash_is_stable_and_ignores_statistics(schema: FeatureSchema) -> None:
    again = FeatureSchema.from_dict(json.loads(json.dumps(schema.to_dict())))
    assert again.schema_hash() == schema.schema_hash()
    restated = FeatureSchema(fields=tuple(
        NumericField(f.name, f.log, f.center + 1.0, f.scale * 2.0, f.impute) if isinstance(f, NumericField) else f
        for f in schema.fields))
    assert restated.schema_hash() == schema.schema_hash()


def test_schema_hash_changes_with_vocabulary_order_and_kind(schema: FeatureSchema) -> None:
    method = schema.fields[schema.names.index("method")]
    assert isinstance(method, CategoricalField)

    def replaced(new: CategoricalField | NumericField) -> FeatureSchema:
        return FeatureSchema(fields=tuple(new if f.name == new.name else f for f in schema.fields))

    hashes = {
        schema.schema_hash(),
        replaced(CategoricalField("method", (*method.vocabulary, "DELETE"), method.impute)).schema_hash(),
        replaced(CategoricalField("method", tuple(reversed(method.vocabulary)), method.impute)).schema_hash(),
        replaced(NumericField("method", False, 0.0, 1.0, 0.0)).schema_hash(),
        FeatureSchema(fields=tuple(reversed(schema.fields))).schema_hash(),
    }
    assert len(hashes) == 5


def test_malformed_schema_is_a_bundle_error(schema: FeatureSchema) -> None:
    data = schema.to_dict()
    del data["fields"][0]["scale"]
    with pytest.raises(BundleError, match="retrain"):
        FeatureSchema.from_dict(data)
    with pytest.raises(BundleError, match="unknown field kind 'text'"):
        FeatureSchema.from_dict({"fields": [{"name": "x", "kind": "text"}]})


def test_schema_refuses_duplicate_or_no_fields() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        FeatureSchema(fields=(NumericField("x", False, 0, 1, 0), NumericField("x", False, 0, 1, 0)))
    with pytest.raises(ConfigError, match="at least one field"):
        FeatureSchema(fields=())


def test_encode_needs_every_schema_column_with_equal_lengths(schema: FeatureSchema) -> None:
    with pytest.raises(ConfigError, match="'latency' is required"):
        schema.encode({"amount": [1.0], "method": _objects("GET")})
    with pytest.raises(ConfigError, match="'latency' has 2 rows, expected 1"):
        schema.encode({"amount": [1.0], "latency": [1.0, 2.0], "method": _objects("GET")})


def test_absurd_value_is_clipped_not_overflowed(schema: FeatureSchema) -> None:
    matrix = schema.encode({"amount": [1e308], "latency": [-1e308], "method": _objects("GET")}).matrix
    assert np.all(np.isfinite(matrix)) and np.abs(matrix).max() <= CLIP
    assert np.all(np.isfinite(matrix.astype(np.float32) ** 2))


_RAW_NUMBER = st.one_of(st.floats(allow_infinity=False), st.sampled_from([np.nan, 0.0, -0.0, 1e308, -1e308, 5e-324]))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 1e308 / scale: clipped, on both paths
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(-1e3, 1e3), st.floats(1e-3, 1e3), st.floats(-1e3, 1e3)),
                min_size=1, max_size=6),
       st.integers(min_value=0, max_value=37), st.data())
def test_schema_encode_equals_each_field_encoded_alone(params: list[tuple[bool, float, float, float]], rows: int,
                                                       data: st.DataObject) -> None:
    # The numeric fields are scaled as one array; every value must come out as its own field's encode gives it,
    # to the last bit (log and no log, missing values, huge values, any number of rows).
    numeric = [NumericField(name=f"n{i}", log=log, center=center, scale=scale, impute=impute)
               for i, (log, center, scale, impute) in enumerate(params)]
    fields = [*numeric[:1], CategoricalField(name="c", vocabulary=("a", "b"), impute="a"), *numeric[1:]]
    schema = FeatureSchema(fields=tuple(fields))
    columns: dict[str, np.ndarray] = {
        f.name: np.array(data.draw(st.lists(_RAW_NUMBER, min_size=rows, max_size=rows)), dtype=np.float64)
        for f in numeric}
    columns["c"] = _objects(*data.draw(st.lists(st.sampled_from(["a", "b", "z", None]), min_size=rows,
                                                max_size=rows)))
    encoded = schema.encode(columns)
    alone = [f.encode(columns[f.name]) for f in fields]
    reference = np.concatenate([block.reshape(rows, f.width) for f, (block, _) in zip(fields, alone, strict=True)],
                               axis=1).astype(np.float32)
    assert encoded.matrix.tobytes() == reference.tobytes() and encoded.matrix.shape == reference.shape
    assert list(encoded.missing.items()) == [(f.name, n) for f, (_, n) in zip(fields, alone, strict=True)]
