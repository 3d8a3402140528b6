"""The fault suite's history checker on hand-made histories: a checker bug must not let the suite pass."""

from __future__ import annotations

import orjson
import pytest

from tests.faults.history import (
    AT_LEAST_ONCE,
    EXACTLY_ONCE,
    InputRecord,
    Output,
    alert_output,
    check,
    dead_letter_output,
    input_record,
)
from training.contract import Reason
from worker.alerts import build_alert
from worker.records import DeadLetter, Record

TOPIC = "events"


def record(partition: int, offset: int, event_id: str | None = None) -> Record:
    value = orjson.dumps({"id": event_id or f"e-{partition}-{offset}", "duration": 1})
    return Record(TOPIC, partition, offset, key=None, value=value)


def published_alert(r: Record, model_version: str = "v1") -> Output:
    """The alert the worker would publish for `r`, read back as the checker reads the alert topic."""
    alert = build_alert(r, orjson.loads(r.value or b""), 2.0, 1.0, model_version, [], detected_at=0.0)
    return alert_output(orjson.dumps(alert.document), f"alerts[{r.partition}]@{r.offset}")


def published_dead_letter(r: Record) -> Output:
    letter = DeadLetter(r, Reason.WRONG_TYPE, "duration is text")
    return dead_letter_output(letter.kafka_headers(), f"dlq[{r.partition}]@{r.offset}")


def inputs_of(records: list[Record]) -> list[InputRecord]:
    return [input_record(r.topic, r.partition, r.offset, r.value) for r in records]


RECORDS = [record(p, o) for p in range(3) for o in range(4)]


def test_one_output_per_input_is_clean_for_both_modes() -> None:
    alerts = [published_alert(r) for r in RECORDS[1:]]
    verdict = check(inputs_of(RECORDS), alerts, [published_dead_letter(RECORDS[0])])
    assert (verdict.inputs, verdict.outputs) == (12, 12)
    assert not verdict.lost and not verdict.duplicated and not verdict.conflicting and not verdict.unexpected
    assert verdict.problems(EXACTLY_ONCE) == [] and verdict.problems(AT_LEAST_ONCE) == []


def test_an_input_without_output_is_lost_in_both_modes() -> None:
    verdict = check(inputs_of(RECORDS), [published_alert(r) for r in RECORDS if r.offset != 2], [])
    assert verdict.lost == [(TOPIC, p, 2) for p in range(3)]
    assert "3 input records lost" in verdict.problems(AT_LEAST_ONCE)[0]
    assert verdict.problems(EXACTLY_ONCE)


def test_an_empty_output_history_loses_everything() -> None:
    verdict = check(inputs_of(RECORDS), [], [])
    assert len(verdict.lost) == len(RECORDS) and verdict.problems(AT_LEAST_ONCE)


def test_the_same_alert_twice_is_a_duplicate_only_exactly_once_forbids() -> None:
    alerts = [published_alert(r) for r in RECORDS] + [published_alert(RECORDS[5]), published_alert(RECORDS[5])]
    verdict = check(inputs_of(RECORDS), alerts, [])
    assert list(verdict.duplicated) == [(TOPIC, 1, 1)] and verdict.extra_outputs == 2
    assert not verdict.conflicting
    assert verdict.problems(AT_LEAST_ONCE) == []
    assert "published more than once" in verdict.problems(EXACTLY_ONCE)[0]


def test_a_duplicate_dead_letter_counts_too() -> None:
    letters = [published_dead_letter(RECORDS[0])] * 2
    verdict = check(inputs_of(RECORDS), [published_alert(r) for r in RECORDS[1:]], letters)
    assert list(verdict.duplicated) == [(TOPIC, 0, 0)]
    assert verdict.problems(AT_LEAST_ONCE) == [] and verdict.problems(EXACTLY_ONCE)


def test_duplicates_under_different_ids_break_at_least_once_too() -> None:
    # The same record alerted by two model versions: a consumer de-duplicating by id would page twice.
    alerts = [published_alert(r) for r in RECORDS] + [published_alert(RECORDS[3], model_version="v2")]
    verdict = check(inputs_of(RECORDS), alerts, [])
    assert list(verdict.conflicting) == [(TOPIC, 0, 3)]
    assert "differing outputs" in verdict.problems(AT_LEAST_ONCE)[0]


def test_an_alert_and_a_dead_letter_for_one_record_conflict() -> None:
    alerts = [published_alert(r) for r in RECORDS]
    verdict = check(inputs_of(RECORDS), alerts, [published_dead_letter(RECORDS[7])])
    assert list(verdict.conflicting) == [(TOPIC, 1, 3)] and verdict.problems(AT_LEAST_ONCE)


def test_outputs_naming_no_input_record_are_unexpected() -> None:
    stranger = record(1, 99)
    alerts = [published_alert(r) for r in RECORDS] + [published_alert(stranger)]
    letters = [published_dead_letter(record(2, 50))]
    verdict = check(inputs_of(RECORDS), alerts, letters)
    assert [o.where for o, _why in verdict.unexpected] == ["alerts[1]@99", "dlq[2]@50"]
    assert not verdict.lost and verdict.problems(AT_LEAST_ONCE)


def test_an_alert_from_another_topic_is_unexpected_even_at_the_same_partition_and_offset() -> None:
    other = Record("other-events", 0, 0, key=None, value=RECORDS[0].value)
    verdict = check(inputs_of(RECORDS), [published_alert(r) for r in RECORDS] + [published_alert(other)], [])
    assert len(verdict.unexpected) == 1 and "is no input record" in verdict.unexpected[0][1]


def test_an_alert_carrying_another_event_id_is_unexpected_and_its_source_still_lost() -> None:
    impostor = published_alert(record(0, 1, event_id="someone-else"))
    alerts = [published_alert(r) for r in RECORDS if (r.partition, r.offset) != (0, 1)] + [impostor]
    verdict = check(inputs_of(RECORDS), alerts, [])
    assert "event id 'someone-else'" in verdict.unexpected[0][1]
    assert verdict.lost == [(TOPIC, 0, 1)]


def test_an_alert_id_not_of_its_source_is_unexpected() -> None:
    good = published_alert(RECORDS[0])
    forged = Output("alert", "alerts[0]@0", good.source, f"v1/{TOPIC}/0/7", good.event_id)
    verdict = check(inputs_of(RECORDS), [forged] + [published_alert(r) for r in RECORDS[1:]], [])
    assert "is not that of its source" in verdict.unexpected[0][1] and verdict.lost == [(TOPIC, 0, 0)]


def test_unreadable_outputs_are_unexpected() -> None:
    broken = alert_output(b"{not json", "alerts[0]@5")
    headless = dead_letter_output([("dlq.reason", b"wrong_type")], "dlq[0]@6")
    verdict = check(inputs_of(RECORDS), [published_alert(r) for r in RECORDS] + [broken], [headless])
    assert {o.where for o, _ in verdict.unexpected} == {"alerts[0]@5", "dlq[0]@6"}
    assert all(why == "names no source record" for _, why in verdict.unexpected)


def test_dead_letter_headers_later_values_win_like_the_worker_writes_them() -> None:
    # The input's own headers come first; the worker's dlq.* headers follow and win.
    r = Record(TOPIC, 2, 3, key=None, value=b"x", headers=(("dlq.source.offset", b"999"),))
    output = dead_letter_output(DeadLetter(r, Reason.INVALID_JSON, "bad").kafka_headers(), "dlq[0]@0")
    assert output.source == (TOPIC, 2, 3) and output.output_id == "dead_letter:invalid_json"


def test_input_ids_come_from_json_objects_only() -> None:
    assert input_record(TOPIC, 0, 1, b'{"id": 7}').event_id == "7"
    assert input_record(TOPIC, 0, 1, b"[1, 2]").event_id is None
    assert input_record(TOPIC, 0, 1, b"\xff").event_id is None
    assert input_record(TOPIC, 0, 1, None).event_id is None


def test_an_input_record_given_twice_is_a_harness_error() -> None:
    with pytest.raises(ValueError, match="given twice"):
        check(inputs_of(RECORDS + RECORDS[:1]), [], [])


def test_an_unknown_delivery_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="delivery must be one of"):
        check([], [], []).problems("at-most-once")
