"""Per-entity window features: what they are (the spec kept in the bundle), their names, and how they are read.

A spec names the entities (each one or more key fields), the windows (durations) and the event-time field,
and which fields the windows summarise. For every entity and window an event gets, over the events of the
same entity in the window ending at its own time (itself included):

- `count`: how many events;
- `distinct:F`: how many distinct values of categorical field F;
- `mean:F`, `max:F`: mean and maximum of numeric field F (missing values left out);
- `ratio:F`: (F + 1) / (mean of F over the entity's *earlier* events in the window + 1); 1 with no earlier
  event (the +1 keeps zeros defined).

They are ordinary numeric columns named `win:<entity>:<window>:<statistic>[:<field>]`, so the feature
schema scales them, the model learns them and explanations name them like any other field. How they are
computed, the same for a file and for a partition of a topic, is `training.window_state`; the rules for
time and bad input are in docs/windows.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from training.errors import BundleError, ConfigError

PREFIX = "win:"
#: Fields of a compound entity are joined with this in its name ("src+dst").
JOIN = "+"
#: The reserved time field name meaning "the Kafka record's timestamp" (stream only).
RECORD_TIME = "@record"
#: How late an event may arrive (event time behind the latest seen) and still be windowed at its own time.
DEFAULT_GRACE_S = 10.0
#: At most this many events per entity are kept; beyond it the oldest leave early (counted as truncated).
DEFAULT_MAX_EVENTS = 10_000
#: An entity value is shown in explanations up to this many characters.
MAX_SHOWN_KEY = 64
STATISTICS = ("count", "distinct", "mean", "max", "ratio")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


@dataclass(frozen=True)
class Window:
    """A window length: `label` as the user wrote it ("2s", "7d"), `ms` the length in milliseconds."""

    label: str
    ms: int

    @property
    def seconds(self) -> float:
        return self.ms / 1000.0


def parse_window(text: str) -> Window:
    """ "2s", "90s", "5m", "1h", "7d", "500ms" -> Window; anything else is a ConfigError naming the forms."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"window {text!r} is not a duration; write e.g. 500ms, 2s, 5m, 1h or 7d")
    ms = round(float(match.group(1)) * _UNITS[match.group(2)] * 1000)
    if ms <= 0:
        raise ConfigError(f"window {text!r} must be longer than 0")
    return Window(label=text.strip().replace(" ", ""), ms=ms)


@dataclass(frozen=True)
class WindowSpec:
    """Which windows a bundle's model was trained with; the worker computes exactly these."""

    entities: tuple[tuple[str, ...], ...]
    windows: tuple[Window, ...]
    time_field: str
    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    grace_s: float = DEFAULT_GRACE_S
    max_events: int = DEFAULT_MAX_EVENTS
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.entities or any(not entity for entity in self.entities):
            raise ConfigError("window features need at least one entity field (--entity FIELD)")
        if not self.windows:
            raise ConfigError("window features need at least one window (--window 2s)")
        if len({w.ms for w in self.windows}) != len(self.windows):
            raise ConfigError(f"windows repeat a length: {', '.join(w.label for w in self.windows)}")
        if not self.time_field:
            raise ConfigError("window features need event time: name its field with --event-time FIELD")
        if not 0 <= self.grace_s <= 86_400:
            raise ConfigError(f"window grace must be between 0 and 86400 seconds, got {self.grace_s}")
        if self.max_events < 1:
            raise ConfigError(f"window max events per entity must be at least 1, got {self.max_events}")
        keys = {name for entity in self.entities for name in entity} | {self.time_field}
        if clash := keys & set(self.numeric + self.categorical):
            raise ConfigError(f"{', '.join(sorted(clash))}: an entity or time field cannot also be summarised")
        object.__setattr__(self, "names", tuple(self._names()))

    @property
    def longest_ms(self) -> int:
        return max(w.ms for w in self.windows)

    @property
    def key_fields(self) -> tuple[str, ...]:
        """Entity fields, then the time field unless it is the record's: what the windows read besides values."""
        fields = [name for entity in self.entities for name in entity]
        if self.time_field != RECORD_TIME:
            fields.append(self.time_field)
        return tuple(dict.fromkeys(fields))

    def per_window(self) -> list[str]:
        """The statistics one entity and window produce, in column order (`count`, `distinct:F`, ...)."""
        return (["count"] + [f"distinct:{f}" for f in self.categorical]
                + [f"{s}:{f}" for f in self.numeric for s in ("mean", "max", "ratio")])

    def _names(self) -> list[str]:
        stats = self.per_window()
        return [f"{PREFIX}{entity_name(entity)}:{w.label}:{s}" for entity in self.entities for w in self.windows
                for s in stats]

    def to_dict(self) -> dict[str, Any]:
        return {"entities": [list(e) for e in self.entities], "windows": [w.label for w in self.windows],
                "time_field": self.time_field, "numeric": list(self.numeric), "categorical": list(self.categorical),
                "grace_s": self.grace_s, "max_events": self.max_events}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WindowSpec:
        """The bundle's `windows.json`; anything malformed is a BundleError."""
        try:
            return cls(entities=tuple(tuple(str(f) for f in e) for e in data["entities"]),
                       windows=tuple(parse_window(str(w)) for w in data["windows"]),
                       time_field=str(data["time_field"]),
                       numeric=tuple(str(f) for f in data.get("numeric", ())),
                       categorical=tuple(str(f) for f in data.get("categorical", ())),
                       grace_s=float(data.get("grace_s", DEFAULT_GRACE_S)),
                       max_events=int(data.get("max_events", DEFAULT_MAX_EVENTS)))
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise BundleError(f"windows.json is not a window spec ({exc}); retrain the bundle") from exc


def entity_name(fields: Sequence[str]) -> str:
    return JOIN.join(fields)


def parse_entity(text: str) -> tuple[str, ...]:
    """`--entity` value -> key fields: "customer_id" or a compound "id.orig_h+id.resp_h"."""
    fields = tuple(part.strip() for part in text.split(JOIN))
    if not all(fields):
        raise ConfigError(f"entity {text!r} names an empty field; write FIELD or FIELD+FIELD")
    return fields


def build_spec(entities: Sequence[str], windows: Sequence[str], time_field: str | None,
               kinds: Mapping[str, str], fields: Sequence[str] = (), grace_s: float = DEFAULT_GRACE_S,
               max_events: int = DEFAULT_MAX_EVENTS) -> WindowSpec:
    """The spec from command-line values and the data's field kinds.

    By default every numeric field is summarised by mean, max and ratio and every categorical one by its
    distinct count (entity and time fields excepted); `fields` narrows that to the named ones.
    """
    if not time_field:
        raise ConfigError("window features need event time: name its field with --event-time FIELD "
                          f"(or {RECORD_TIME} for the Kafka record's timestamp with --from-kafka)")
    parsed = tuple(parse_entity(e) for e in entities)
    keys = {name for entity in parsed for name in entity} | {time_field}
    chosen = list(fields) or [name for name in kinds if name not in keys]
    if unknown := [name for name in chosen if name not in kinds]:
        raise ConfigError(f"--window-field {', '.join(unknown)}: no such field in the data")
    from training.contract import NUMERIC  # noqa: PLC0415 - contract imports nothing from here; keep it so

    return WindowSpec(entities=parsed, windows=tuple(parse_window(w) for w in windows), time_field=time_field,
                      numeric=tuple(n for n in chosen if kinds[n] == NUMERIC and n not in keys),
                      categorical=tuple(n for n in chosen if kinds[n] != NUMERIC and n not in keys),
                      grace_s=grace_s, max_events=max_events)


def is_window_feature(name: str) -> bool:
    return name.startswith(PREFIX)


def explain(name: str, observed: float | None, expected: float | None, entity: str | None = None) -> str:
    """A window feature in words and original units: "events from 10.0.0.5 in the last 2s: 47, expected 3"."""
    parts = name[len(PREFIX):].split(":", 3)
    if len(parts) < 3:
        return name
    entity_fields, window, stat = parts[0], parts[1], parts[2]
    target = parts[3] if len(parts) > 3 else ""
    if entity is not None and len(entity) > MAX_SHOWN_KEY:
        entity = entity[:MAX_SHOWN_KEY] + "..."  # an alert stays small whatever key a producer sends
    who = f"{entity_fields} {entity}" if entity is not None else entity_fields
    shown, wanted = _number(observed), _number(expected)
    text = {
        "count": f"events from {who} in the last {window}",
        "distinct": f"distinct {target} of {who} in the last {window}",
        "mean": f"mean {target} of {who} in the last {window}",
        "max": f"largest {target} of {who} in the last {window}",
        "ratio": f"{target} against {who}'s mean of the last {window} (x)",
    }.get(stat, name)
    return f"{text}: {shown}, expected {wanted}"


def _number(value: float | None) -> str:
    if value is None or value != value:
        return "missing"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


def window_inputs(spec: WindowSpec, raw: Mapping[str, Any], parsed: Mapping[str, Any], rows: int,
                  record_times_s: Any = None) -> Any:
    """What the windows read of `rows` events, under the data contract (one meaning in files and events).

    `parsed` holds already parsed columns (the model's fields); other fields are parsed here from `raw`
    (field -> raw values). A value of an entity or time field that breaks the contract counts as missing:
    it never makes the row a dead letter, it only takes the event out of that window (docs/windows.md).
    `record_times_s` are the Kafka records' timestamps, used when the time field is `@record`.
    """
    import numpy as np  # noqa: PLC0415 - kept local so the spec imports light

    from training.contract import CATEGORICAL, NUMERIC, parse_column
    from training.window_state import WindowInputs

    def column(name: str, kind: str) -> Any:
        if name in parsed:
            values = parsed[name]
            if (kind == NUMERIC) == (values.dtype == np.float64):
                return values
            return parse_column(values, name, kind).values  # e.g. a numeric model field used as an entity key
        if name not in raw:
            return np.full(rows, np.nan) if kind == NUMERIC else np.full(rows, None, dtype=object)
        return parse_column(raw[name], name, kind).values  # problems are already None/NaN in values

    if spec.time_field == RECORD_TIME:
        times = (np.full(rows, np.nan) if record_times_s is None
                 else np.asarray(record_times_s, dtype=np.float64))
    else:
        times = np.asarray(column(spec.time_field, NUMERIC), dtype=np.float64)
    keys: list[list[str | None]] = []
    for entity in spec.entities:
        parts = [column(name, CATEGORICAL).tolist() for name in entity]
        if len(parts) == 1:
            keys.append(parts[0])
        else:
            keys.append([None if None in values else "\x1f".join(values) for values in zip(*parts, strict=True)])
    numeric = (np.column_stack([np.asarray(column(n, NUMERIC), dtype=np.float64) for n in spec.numeric])
               if spec.numeric else np.empty((rows, 0)))
    categorical = [column(n, CATEGORICAL).tolist() for n in spec.categorical]
    return WindowInputs(times=times, keys=keys, numeric=numeric, categorical=categorical)
