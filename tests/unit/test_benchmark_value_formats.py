"""The value-format benchmark (benchmarks/value_formats.py) at a tiny size: every format's records, written by
confluent-kafka's serializers, decode and score like the JSON ones, and the report has every format's figures."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
from confluent_kafka.schema_registry._sync.mock_schema_registry_client import MockSchemaRegistryClient

from benchmarks.throughput import sample_rows
from benchmarks.value_formats import FORMATS, NEST, decoders, encode_all, main

#: A tiny model: the benchmark's bundles only have to exist, not to be good.
TINY = "--epochs 1 --hidden 8,3 --batch-size 256 --seed 7"


def test_every_format_decodes_to_the_json_events() -> None:
    client = MockSchemaRegistryClient({"url": "mock://"})
    values = encode_all(sample_rows(), 30, client)
    assert set(values) == set(FORMATS) and all(len(v) == 30 for v in values.values())
    coders = decoders(client)
    expected = [orjson.loads(v) for v in values["json"]]
    assert coders["json"].decode(values["json"], 1 << 20) == expected
    assert coders["json-nested"].decode(values["json-nested"], 1 << 20) == [
        {f"{NEST}.{name}": value for name, value in event.items()} for event in expected]
    assert coders["avro"].decode(values["avro"], 1 << 20) == expected
    assert coders["json-schema"].decode(values["json-schema"], 1 << 20) == expected
    protobuf = coders["protobuf"].decode(values["protobuf"], 1 << 20)
    assert all(set(p) == set(e) for p, e in zip(protobuf, expected, strict=True))  # int64 is text in its JSON form
    assert len(values["avro"][0]) < len(values["json"][0]) / 3  # the writer schema holds the names, not the record


def test_benchmark_writes_every_formats_figures(tmp_path: Path) -> None:
    assert main(["--events", "300", "--passes", "1", "--cache-dir", str(tmp_path), "--train-args", TINY,
                 "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "value-formats.json").read_text())
    assert list(report["formats"]) == list(FORMATS)
    for fmt, figures in report["formats"].items():
        assert figures["decode_events_per_s"] > 0 and figures["scoring_events_per_s"] > 0, fmt
        assert figures["dead_letters"] == 0, fmt
        assert figures["scores_equal_json"] is (fmt != "json-nested"), fmt
    assert report["formats"]["json"]["decode_ratio"] == 1.0
    assert set(report["profiles"]) == set(FORMATS) - {"json"} and report["floors"]
    table = (tmp_path / "out" / "value-formats.md").read_text()
    assert all(f"| {fmt} |" in table for fmt in FORMATS)
