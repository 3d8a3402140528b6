"""Training from Kafka: events that break the data contract are skipped and counted, as the worker dead-letters them."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import orjson
import pytest

from training.contract import decode_event
from training.data import infer_kinds, object_frame, raw_columns
from training.errors import DataError
from training.kafka_window import Window, skip_contract_breaches

GOOD = [{"src_bytes": 100 + i, "protocol": "tcp" if i % 2 else "udp", "label": "normal"} for i in range(8)]


def window(events: list[object], skipped: Counter[str] | None = None) -> Window:
    """A window of partition 0 as `read_window` builds it from these record values."""
    values = [orjson.dumps(e) for e in events]
    decoded = [decode_event(v, 1 << 20) for v in values]
    assert all(isinstance(e, dict) for e in decoded)
    return Window(frame=object_frame(decoded), sha256=sha256(values), skipped=skipped or Counter(), source="kafka:t",
                  values=values, positions=[(0, offset) for offset in range(len(values))], events=decoded)  # type: ignore[arg-type]


def sha256(values: list[bytes]) -> str:
    return hashlib.sha256(b"".join(values)).hexdigest()


def trainable(w: Window) -> None:
    """What `train_frame` checks first: every feature value fits the contract, else a DataError."""
    features = w.frame.drop(columns=["label"])
    raw_columns(features, infer_kinds(features, []), Path(w.source))


def test_an_event_whose_feature_holds_an_array_is_skipped_and_counted() -> None:
    """Issue 19 row 11: one such record stopped the whole training."""
    events = [*GOOD[:3], {"src_bytes": [1, 2], "protocol": "tcp", "label": "normal", "only_here": 1},
              *GOOD[3:6], {"src_bytes": 7, "protocol": ["a"], "label": "normal"}, *GOOD[6:]]
    read = window(events, Counter({"invalid_json": 1}))
    with pytest.raises(DataError, match="src_bytes"):
        trainable(read)  # what anomaly-train --from-kafka met before
    lines: list[str] = []
    kept = skip_contract_breaches(read, ["label"], [], lines.append)
    trainable(kept)
    assert kept.frame.to_dict(orient="records") == GOOD
    assert list(kept.frame.columns) == ["src_bytes", "protocol", "label"]  # the skipped record's own field is gone
    assert kept.skipped == Counter({"invalid_json": 1, "wrong_type": 2})
    assert kept.sha256 == sha256([orjson.dumps(e) for e in GOOD]) and kept.positions[3] == (0, 4)
    assert lines == ["skipped 2 events that break the data contract (wrong_type), as the worker would dead-letter "
                     "them; the first: kafka:t[0]@3: field 'src_bytes' must be a number, got array"]


def test_an_event_with_no_feature_is_skipped_and_columns_not_trained_on_are_not_checked() -> None:
    events = [*GOOD, {"label": ["x"], "comment": ["free", "form"]},
              {"src_bytes": 1, "protocol": "tcp", "label": "normal", "comment": [1]}]  # --drop comment
    kept = skip_contract_breaches(window(events), ["label", "comment"], [], [].append)
    assert kept.skipped == Counter({"no_features": 1}) and len(kept.frame) == len(GOOD) + 1


def test_a_clean_window_is_returned_as_it_is() -> None:
    read = window(GOOD)
    assert skip_contract_breaches(read, ["label"], ["protocol"], [].append) is read


def test_a_window_with_no_event_that_fits_is_refused_in_one_line() -> None:
    with pytest.raises(DataError, match=r"no event of the window fits the data contract .*wrong_type"):
        skip_contract_breaches(window([{"src_bytes": [1]}, {"src_bytes": [2, 3]}]), [], [], [].append)
