"""decode: record bytes -> event dict, or the reason code a dead letter carries."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import contract
from training.contract import Invalid, Reason
from worker.decode import decode, decode_events

INVALID_JSON, INVALID_UTF8, NOT_AN_OBJECT = Reason.INVALID_JSON, Reason.INVALID_UTF8, Reason.NOT_AN_OBJECT
OVERSIZED, NON_FINITE = Reason.OVERSIZED, Reason.NON_FINITE


@pytest.mark.parametrize("value, expected", [
    (b'{"a": 1, "b": "x"}', {"a": 1, "b": "x"}),
    ('{"caf\u00e9": "\u00fcber", "n": null}'.encode(), {"caf\u00e9": "\u00fcber", "n": None}),
    (b"{}", {}),
    (b'  {"nested": {"k": [1, 2]}}\n', {"nested.k": [1, 2]}),  # nested objects are paths (training/nested.py)
    (b'{"flow": {"pkts": 3, "tcp": {"syn": true}}, "id.orig_h": "10.0.0.1", "e": {}}',
     {"flow.pkts": 3, "flow.tcp.syn": True, "id.orig_h": "10.0.0.1"}),
    (b'\xef\xbb\xbf{"a": 1}', {"a": 1}),  # a UTF-8 byte-order mark some producers write
])
def test_json_objects_decode_to_dicts(value: bytes, expected: dict) -> None:
    assert decode(value, 1024) == expected


@pytest.mark.parametrize("value, reason", [
    (None, Reason.TOMBSTONE),
    (b'{"id": {"orig_h": "a"}, "id.orig_h": "b"}', Reason.FIELD_CLASH),  # one field reached twice
    (b'{"a.b": 1, "a": {"b": 1}}', Reason.FIELD_CLASH),
    (b"[1, 2]", NOT_AN_OBJECT),
    (b'"text"', NOT_AN_OBJECT),
    (b"42", NOT_AN_OBJECT),
    (b"null", NOT_AN_OBJECT),
    (b'{"a": 1', INVALID_JSON),
    (b"", INVALID_JSON),
    (b"not json", INVALID_JSON),
    (b'{"a": NaN}', NON_FINITE),           # JSON has no NaN literal, but some producers write it
    (b'{"a": -Infinity, "b": 1}', NON_FINITE),
    (b'{"a": NaNx}', INVALID_JSON),
    (b'{"a": "NaN" x}', INVALID_JSON),
    (b"\xff\xfe{}", INVALID_UTF8),
    (b'{"a": "\xc3\x28"}', INVALID_UTF8),  # invalid continuation byte inside a string
    (b'{"a": 1e999}', NON_FINITE),
    (b'{"a": -1e400}', NON_FINITE),
])
def test_bad_values_name_their_reason(value: bytes | None, reason: str) -> None:
    result = decode(value, 1024)
    assert isinstance(result, Invalid), result
    assert result.reason == reason, result.message
    assert result.message


def test_invalid_utf8_message_names_the_byte() -> None:
    result = decode(b'{"a": "ok\xff"}', 1024)
    assert isinstance(result, Invalid) and result.reason == INVALID_UTF8
    assert "byte 9" in result.message


def test_size_limit_is_inclusive_and_checked_before_parsing() -> None:
    value = b'{"pad": "' + b"x" * 50 + b'"}'
    assert decode(value, len(value)) == {"pad": "x" * 50}
    too_big = decode(value, len(value) - 1)
    assert isinstance(too_big, Invalid) and too_big.reason == OVERSIZED
    assert str(len(value)) in too_big.message and str(len(value) - 1) in too_big.message
    # Oversized wins even when the bytes are garbage: no parse work on huge values.
    assert decode(b"\xff" * 100, 10) == Invalid(OVERSIZED, "record value is 100 bytes, the limit is 10")


# decode_events parses chunks of plain JSON objects in one pass; whatever a batch mixes, each record must get
# exactly what decode gives it alone (the same object, or the same reason and message, or the same exception).
_OBJECT = st.dictionaries(st.text(max_size=3), st.one_of(st.none(), st.integers(), st.floats(allow_nan=False,
                                                                                             allow_infinity=False),
                                                        st.text(max_size=3)), max_size=3)
_RECORD = st.one_of(_OBJECT.map(lambda o: json.dumps(o).encode()), _OBJECT.map(lambda o: json.dumps(o).encode()),
                    st.sampled_from([None, b"", b"[1]", b"42", b'{"a": NaN}', b'{"a": 1e999}', b"\xff{}",
                                     b'\xef\xbb\xbf{"a": 1}', b'{"a": 1} x', b'{"pad": "' + b"x" * 40 + b'"}',
                                     bytearray(b'{"a": 2}'), '{"a": 3}', memoryview(b'{"a": 4}')]),
                    st.binary(max_size=8))


def _outcome(decoder: Callable[[], object]) -> object:
    try:
        return decoder()
    except Exception as exc:  # noqa: BLE001 - a record decode refuses must be refused in a batch too
        return type(exc)


@settings(max_examples=300, deadline=None)
@given(st.lists(_RECORD, max_size=14), st.integers(min_value=1, max_value=5))
def test_a_batch_decodes_exactly_as_its_records_one_by_one(values: list[bytes | None], chunk: int) -> None:
    alone = [_outcome(partial(decode, value, 32)) for value in values]
    with mock.patch.object(contract, "_CHUNK", chunk):
        batch = _outcome(partial(decode_events, values, 32))
    refused = [a for a in alone if isinstance(a, type)]
    if refused:  # a record that raises alone raises in the batch too (and the pipeline bisects to it)
        assert batch == refused[0]
    else:
        assert isinstance(batch, list) and batch == alone and list(map(type, batch)) == list(map(type, alone))
