"""Decode throughput per value format, and the scoring path with each, one run (issue 22: "decode throughput per
format in the throughput benchmark; Avro should not be slower than JSON").

Run::

    .venv/bin/python -m benchmarks.value_formats [--events 20000] [--passes 7] --out DIR

1. The rows of benchmarks/throughput.py (`sample_rows`: the NSL-KDD sample's 41 feature fields, repeated, each
   with a distinct `id`) written five ways: `json` (the `make_events` bytes), `json-nested` (the same fields one
   object down, ``{"conn": {...}}``, so the fields are the paths ``conn.<name>``), and `avro`, `protobuf`,
   `json-schema` written by confluent-kafka's own serializers against its `MockSchemaRegistryClient` (the
   registry is in memory: decoding is measured, not the registry; each writer schema is fetched once).
2. The bundle: throughput.py's `cached_bundle` for the flat formats; for `json-nested`, one trained with the same
   arguments on the same rows nested (JSON Lines), since its fields have other names. (`--train-args`, for tests:
   both trained here from JSON Lines with those arguments added.)
3. `--passes` passes; in each, every format in turn (the order rotated pass after pass, so drift on the shared
   machine hits every format alike): (1) decode only, the format's `Decoder.decode` on batches of 1000; (2) the
   scoring path, `Pipeline.process` (decode -> validate -> features -> model) on the same batches as in-memory
   records, as throughput.py's (d) measures it. A format's figure is its best pass; ratios are against `json`.
4. cProfile of one Avro decode pass, for where its time goes.
5. Write value-formats.json and value-formats.md into `--out`.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks.throughput import (
    MAX_BATCH,
    PARTITIONS,
    SAMPLE,
    TRAIN_ARGS,
    _bin,
    cached_bundle,
    make_events,
    sample_rows,
)
from benchmarks.throughput_windows import commit_measured, load_text, write_report
from training.value_formats import Decoder, JsonDecoder, RegistryDecoder, ValueFormat

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("json", "json-nested", "avro", "protobuf", "json-schema")
NEST = "conn"
MAX_EVENT_BYTES = 1_048_576


# --- the same rows in every format ------------------------------------------------------------------------


def avro_schema(row: dict[str, Any]) -> str:
    """A flat Avro record with `row`'s fields (int -> long, float -> double, str -> string)."""
    kinds = {int: "long", float: "double", str: "string"}
    return json.dumps({"type": "record", "name": "Connection", "namespace": "bench",
                       "fields": [{"name": name, "type": kinds[type(value)]} for name, value in row.items()]})


def json_schema(row: dict[str, Any]) -> str:
    """A closed JSON Schema (draft 2020-12) requiring `row`'s fields, typed as they are."""
    kinds = {int: "integer", float: "number", str: "string"}
    return json.dumps({"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "Connection",
                       "type": "object",
                       "properties": {name: {"type": kinds[type(value)]} for name, value in row.items()},
                       "required": list(row), "additionalProperties": False})


def protobuf_class(row: dict[str, Any]) -> Any:
    """A proto3 message with `row`'s fields (int64, double, string), built at run time in a pool of its own."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    from google.protobuf.message_factory import GetMessageClass

    field = descriptor_pb2.FieldDescriptorProto
    kinds = {int: field.TYPE_INT64, float: field.TYPE_DOUBLE, str: field.TYPE_STRING}
    proto = descriptor_pb2.FileDescriptorProto(name="connection.proto", package="bench", syntax="proto3")
    message = proto.message_type.add(name="Connection")
    for number, (name, value) in enumerate(row.items(), 1):
        message.field.add(name=name, number=number, type=kinds[type(value)],
                          label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return GetMessageClass(pool.FindMessageTypeByName("bench.Connection"))


def encode_all(rows: Sequence[dict[str, Any]], n: int, client: Any) -> dict[str, list[bytes]]:
    """`n` events (throughput.py's `make_events`: the rows repeated, a distinct `id`) written in every format;
    the registry formats by confluent-kafka's serializers, which register their schemas with `client`."""
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.schema_registry.json_schema import JSONSerializer
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    flat = make_events(rows, n)
    events = [orjson.loads(value) for value in flat]
    cls = protobuf_class(events[0])
    avro = AvroSerializer(client, avro_schema(events[0]))
    protobuf = ProtobufSerializer(cls, client, {"use.deprecated.format": False})
    checked = JSONSerializer(json_schema(events[0]), client)

    def context(fmt: str) -> Any:
        return SerializationContext(f"bench-{fmt}", MessageField.VALUE)

    return {"json": flat,
            "json-nested": [orjson.dumps({NEST: event}) for event in events],
            "avro": [avro(event, context("avro")) for event in events],
            "protobuf": [protobuf(cls(**event), context("protobuf")) for event in events],
            "json-schema": [checked(event, context("json-schema")) for event in events]}


def decoders(client: Any) -> dict[str, Decoder]:
    """The product's decoder of each format (training/schema_registry.py's edge over `client`)."""
    from training.schema_registry import RegistrySchemas

    schemas = RegistrySchemas(client)
    return {"json": JsonDecoder(), "json-nested": JsonDecoder(),
            **{fmt: RegistryDecoder(ValueFormat(fmt), schemas) for fmt in ("avro", "protobuf", "json-schema")}}


# --- bundles ----------------------------------------------------------------------------------------------


def rows_bundle(cache_root: Path, nest: str | None, train_args: Sequence[str] = ()) -> Path:
    """A bundle trained as `cached_bundle`'s (throughput.py's arguments, plus `train_args`) on the sample's rows as
    JSON Lines, their feature fields under `nest` if given (so its fields are ``<nest>.<name>``); cached per data
    and arguments."""
    from training.model import default_hidden
    from training.train import TrainConfig
    from worker.replay import events

    lines = []
    for _key, value in events(SAMPLE, None, None):
        row = orjson.loads(value)
        kept = {name: row.pop(name) for name in ("label", "difficulty")}
        row.pop("id", None)
        lines.append(orjson.dumps({**kept, nest: row} if nest else {**kept, **row}))
    data = b"\n".join(lines) + b"\n"
    args = (*TRAIN_ARGS, *train_args)
    defaults = f"{TrainConfig()!r} {default_hidden(0)!r}"  # a change of defaults retrains
    key = hashlib.sha256(data + " ".join(args).encode() + defaults.encode()).hexdigest()[:16]
    bundle = cache_root / f"anomaly-value-formats-bundle-{key}"
    if not (bundle / "manifest.json").exists():
        print(f"training a bundle into {bundle}", file=sys.stderr)
        source = cache_root / f"anomaly-value-formats-rows-{key}.jsonl"
        source.write_bytes(data)
        subprocess.run([_bin("anomaly-train"), "--data", str(source), "--out",
                        str(bundle), *args], check=True, stdout=subprocess.DEVNULL)
    return bundle


# --- measurement ------------------------------------------------------------------------------------------


def _rate(n: int, run: Callable[..., object], *args: Any) -> float:
    started = time.perf_counter()
    run(*args)
    return n / (time.perf_counter() - started)


def _decode_all(decoder: Decoder, batches: Sequence[Sequence[bytes]]) -> None:
    for batch in batches:
        decoder.decode(batch, MAX_EVENT_BYTES)


def _process_all(pipeline: Any, batches: Sequence[Sequence[Any]]) -> None:
    for batch in batches:
        pipeline.process(batch)


def measure(values: dict[str, list[bytes]], coders: dict[str, Decoder], bundles: dict[str, Path],
            passes: int) -> dict[str, Any]:
    """Best-of-`passes` events/s per format of decode alone and of `Pipeline.process`, formats alternating."""
    from training.bundle import load_bundle
    from worker.pipeline import Pipeline
    from worker.records import Record
    from worker.threads import single_threaded_blas

    single_threaded_blas()  # as the worker runs (worker.wiring.build_runtime)
    loaded = {path: load_bundle(path, None) for path in set(bundles.values())}
    formats = list(values)
    pipelines: dict[str, Pipeline] = {}
    batches: dict[str, list[list[Record]]] = {}
    checks: dict[str, tuple[int, np.ndarray]] = {}
    for fmt in formats:
        pipelines[fmt] = Pipeline(loaded[bundles[fmt]], max_event_bytes=MAX_EVENT_BYTES, decoder=coders[fmt])
        pipelines[fmt].warm_up()
        records = [Record("memory", i % PARTITIONS, i, None, v) for i, v in enumerate(values[fmt])]
        batches[fmt] = [records[i:i + MAX_BATCH] for i in range(0, len(records), MAX_BATCH)]
        # Unmeasured: fetches the writer schema, and checks every record scores (none is a dead letter).
        results = [pipelines[fmt].process(batch) for batch in batches[fmt]]
        checks[fmt] = (sum(len(r.dead_letters) for r in results), np.concatenate([r.scores for r in results]))
    n = len(values["json"])
    rates: dict[str, dict[str, list[float]]] = {fmt: {"decode": [], "scoring": []} for fmt in formats}
    for index in range(passes):
        for fmt in formats[index % len(formats):] + formats[:index % len(formats)]:
            value_batches = [[r.value for r in batch] for batch in batches[fmt]]
            rates[fmt]["decode"].append(_rate(n, _decode_all, coders[fmt], value_batches))
            rates[fmt]["scoring"].append(_rate(n, _process_all, pipelines[fmt], batches[fmt]))
        print(f"pass {index + 1}: " + ", ".join(f"{fmt} {r['decode'][-1]:,.0f}/{r['scoring'][-1]:,.0f}"
                                                 for fmt, r in rates.items()), file=sys.stderr)
    json_scores = checks["json"][1]
    out: dict[str, Any] = {}
    for fmt in formats:
        best = {kind: max(r) for kind, r in rates[fmt].items()}
        same_bundle = bundles[fmt] == bundles["json"]
        out[fmt] = {"decode_events_per_s": best["decode"], "scoring_events_per_s": best["scoring"],
                    "decode_ratio": best["decode"] / max(rates["json"]["decode"]),
                    "scoring_ratio": best["scoring"] / max(rates["json"]["scoring"]),
                    "bytes_per_record": sum(map(len, values[fmt])) / n,
                    "decode_passes": rates[fmt]["decode"], "scoring_passes": rates[fmt]["scoring"],
                    "dead_letters": checks[fmt][0], "bundle": "flat" if same_bundle else "nested",
                    "scores_equal_json": bool(same_bundle and np.allclose(checks[fmt][1], json_scores))}
    return out


def profile_decode(decoder: Decoder, values: Sequence[bytes], top: int = 12) -> list[dict[str, Any]]:
    """cProfile of one decode pass (batches of 1000): the `top` functions by own time."""
    profiler = cProfile.Profile()
    batches = [values[i:i + MAX_BATCH] for i in range(0, len(values), MAX_BATCH)]
    profiler.enable()
    for batch in batches:
        decoder.decode(batch, MAX_EVENT_BYTES)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    total = sum(entry[2] for entry in stats.stats.values())  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls": calls, "own_s": own, "cumulative_s": cum,
             "own_share": own / total} for (file, line, name), (_, calls, own, cum, _) in rows]


def floors(values: dict[str, list[bytes]], client: Any, passes: int) -> dict[str, float]:
    """Best-of-`passes` events/s of the libraries alone: orjson.loads of the json values, fastavro's
    schemaless_reader of the avro payloads (framing cut off beforehand), one call per record."""
    import fastavro

    from training.schema_registry import RegistrySchemas

    schema_id = int.from_bytes(values["avro"][0][1:5], "big")
    writer = RegistrySchemas(client).writer_schema(schema_id, ValueFormat.AVRO)
    assert writer is not None
    parsed = fastavro.parse_schema(json.loads(writer.text))
    payloads = [value[5:] for value in values["avro"]]
    n = len(payloads)
    best = {"orjson.loads (json)": 0.0, "fastavro.schemaless_reader (avro payload)": 0.0}
    for _ in range(passes):
        best["orjson.loads (json)"] = max(best["orjson.loads (json)"],
                                          _rate(n, lambda: list(map(orjson.loads, values["json"]))))
        best["fastavro.schemaless_reader (avro payload)"] = max(
            best["fastavro.schemaless_reader (avro payload)"],
            _rate(n, lambda: [fastavro.schemaless_reader(io.BytesIO(p), parsed, None) for p in payloads]))
    return best


# --- report -----------------------------------------------------------------------------------------------


def render_markdown(report: dict[str, Any]) -> str:
    m, s = report["formats"], report["settings"]
    avro = m["avro"]["decode_ratio"]
    out = ["# Value formats: decode and scoring-path throughput, one run (issue 22)", "",
           f"Run {report['date']} on {report['machine']}, commit {report['commit']}; `{report['command']}`.", "",
           f"{s['events']:,} events (the NSL-KDD sample's 41 feature fields and an `id`, rows repeated, as "
           "benchmarks/throughput.py's (d)), written in each format; the registry formats by confluent-kafka's own "
           "serializers against its in-memory `MockSchemaRegistryClient` (decoding is measured, not the registry). "
           f"Best of {s['passes']} passes, every format in each pass, the order rotated pass after pass; batches of "
           f"{MAX_BATCH}. Decode = the format's `Decoder.decode` alone; scoring path = `Pipeline.process` "
           "(decode -> validate -> features -> model) on in-memory records. Ratios against `json`.", "",
           "| format | decode events/s | vs json | scoring path events/s | vs json | bytes per record |",
           "|---|---:|---:|---:|---:|---:|"]
    for fmt, r in m.items():
        out.append(f"| {fmt} | **{r['decode_events_per_s']:,.0f}** | {r['decode_ratio']:.2f} | "
                   f"**{r['scoring_events_per_s']:,.0f}** | {r['scoring_ratio']:.2f} | {r['bytes_per_record']:.0f} |")
    verdict = "met" if avro >= 1.0 else "NOT met"
    out += ["", f"- Avro decode / JSON decode = **{avro:.2f}**: \"Avro should not be slower than JSON\" **{verdict}**; "
                f"on the scoring path {m['avro']['scoring_ratio']:.2f}.",
            "- Every record of every format scored, none a dead letter ("
            + ", ".join(f"{fmt} {r['dead_letters']}" for fmt, r in m.items()) + "); the flat formats' scores equal "
            "json's: " + ", ".join(f"{fmt} {r['scores_equal_json']}" for fmt, r in m.items()
                                   if r["bundle"] == "flat") + ".",
            "- `json-nested` is scored by a bundle trained with the same arguments on the same rows nested (its "
            "fields are `conn.<name>`); every other format by throughput.py's `cached_bundle`.",
            "- Passes (decode / scoring events/s): " + "; ".join(
                f"{fmt} " + ", ".join(f"{d:,.0f}/{p:,.0f}" for d, p in zip(r["decode_passes"], r["scoring_passes"],
                                                                          strict=True)) for fmt, r in m.items()) + ".",
            "", "## Where Avro decode's time goes", "",
            "The libraries alone on the same values, one call per record, best of as many passes, run after the "
            "passes above (so within the machine's noise of them): " + ", ".join(
                f"{name} {rate:,.0f} events/s" for name, rate in report["floors"].items()) + ".", "",
            "cProfile of one pass of the product's Avro decoder (fastavro's reader is compiled: its time is the own "
            "time of `read`, the closure of training/value_formats.py that calls it):", "",
            "| function | calls | own s | own share |", "|---|---:|---:|---:|"]
    out += [f"| `{p['function']}` | {p['calls']:,} | {p['own_s']:.3f} | {p['own_share']:.0%} |"
            for p in report["profiles"]["avro"]]
    fastavro_alone = report["floors"]["fastavro.schemaless_reader (avro payload)"]
    orjson_alone = report["floors"]["orjson.loads (json)"]
    out += ["", f"- fastavro alone reads {fastavro_alone / orjson_alone:.2f}x as many records a second as orjson alone "
                f"(one call per record, {s['fields per record']} fields, in compiled code either way): with fastavro, "
                "Avro decode cannot reach JSON's on these records however little the decoder adds around it.",
            f"- The product's Avro decoder reaches {m['avro']['decode_events_per_s'] / fastavro_alone:.2f} of fastavro "
            "alone; the rest is per-record bookkeeping around it (`_decode`: the framing, read in place, and the "
            "batch's reader).",
            f"- On the scoring path Avro runs {m['avro']['scoring_ratio']:.2f} of JSON (features and the model "
            f"dominate), with records {m['avro']['bytes_per_record'] / m['json']['bytes_per_record']:.2f} the size "
            "of JSON's (the writer schema holds the names), which the broker, the network and the consumer's "
            "fetches gain from and this benchmark does not measure.",
            "- The other decoders' three largest own times (cProfile, one pass): " + "; ".join(
                f"{fmt}: " + ", ".join(f"`{p['function']}` {p['own_share']:.0%}" for p in rows[:3])
                for fmt, rows in report["profiles"].items() if fmt != "avro") + "."]
    out += ["", "## Settings", ""]
    out += [f"- {k}: {v}" for k, v in s.items()]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.value_formats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--passes", type=int, default=7)
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()), help="where the bundles are cached")
    p.add_argument("--train-args", default="", help="extra anomaly-train arguments for both bundles (tests: a "
                                                    "tiny model); the flat bundle is then trained here too")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if min(args.events, args.passes) < 1:
        p.error("--events and --passes must be positive")
    import logging

    import confluent_kafka
    import fastavro
    from confluent_kafka.schema_registry._sync.mock_schema_registry_client import MockSchemaRegistryClient
    from google.protobuf import __version__ as protobuf_version
    from google.protobuf.internal import api_implementation

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    load_before = os.getloadavg()
    commit = commit_measured()
    extra = args.train_args.split()
    bundles = {"flat": rows_bundle(args.cache_dir, None, extra) if extra else cached_bundle(args.cache_dir),
               "nested": rows_bundle(args.cache_dir, NEST, extra)}
    client = MockSchemaRegistryClient({"url": "mock://"})
    values = encode_all(sample_rows(), args.events, client)
    coders = decoders(client)
    measured = measure(values, coders, {fmt: bundles["nested" if fmt == "json-nested" else "flat"]
                                        for fmt in values}, args.passes)
    profiles = {fmt: profile_decode(coders[fmt], values[fmt]) for fmt in FORMATS if fmt != "json"}
    library = floors(values, client, args.passes)
    load_after = os.getloadavg()
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} Linux, nproc {os.cpu_count()}, shared with other work",
        "command": " ".join(["python -m benchmarks.value_formats", *(sys.argv[1:] if argv is None else argv)]),
        "commit": commit, "formats": measured, "profiles": profiles, "floors": library,
        "settings": {
            "events": args.events, "passes": args.passes, "batch": MAX_BATCH,
            "fields per record": len(orjson.loads(values["json"][0])), "python": platform.python_version(),
            "confluent-kafka": confluent_kafka.__version__, "fastavro": fastavro.__version__,
            "protobuf": f"{protobuf_version} ({api_implementation.Type()})",
            "orjson": orjson.__version__,
            "load average (1, 5, 15 min) before / after": load_text(load_before, load_after),
        },
    }
    write_report(args.out, "value-formats", report, render_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
