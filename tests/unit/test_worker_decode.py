"""decode: record bytes -> event dict, or the reason code a dead letter carries."""

from __future__ import annotations

import pytest

from training.contract import Invalid, Reason
from worker.decode import decode

INVALID_JSON, INVALID_UTF8, NOT_AN_OBJECT = Reason.INVALID_JSON, Reason.INVALID_UTF8, Reason.NOT_AN_OBJECT
OVERSIZED, NON_FINITE = Reason.OVERSIZED, Reason.NON_FINITE


@pytest.mark.parametrize("value, expected", [
    (b'{"a": 1, "b": "x"}', {"a": 1, "b": "x"}),
    ('{"caf\u00e9": "\u00fcber", "n": null}'.encode(), {"caf\u00e9": "\u00fcber", "n": None}),
    (b"{}", {}),
    (b'  {"nested": {"k": [1, 2]}}\n', {"nested": {"k": [1, 2]}}),
    (b'\xef\xbb\xbf{"a": 1}', {"a": 1}),  # a UTF-8 byte-order mark some producers write
])
def test_json_objects_decode_to_dicts(value: bytes, expected: dict) -> None:
    assert decode(value, 1024) == expected


@pytest.mark.parametrize("value, reason", [
    (None, Reason.TOMBSTONE),
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
