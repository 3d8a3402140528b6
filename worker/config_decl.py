"""How a setting is declared once and everything else is derived from that declaration.

A setting is a field of a frozen dataclass whose `dataclasses.field(metadata=...)` holds a `Decl` (help,
check, choices, case); the field gives its name, type and default. From these `Option`s come the argparse
flags (`--max-batch`), the environment names (`ANOMALY_MAX_BATCH`), parsing of both, the `--help` text
with the default shown once, the per-field checks run at construction, and the docs/settings.md table.

Why not pydantic-settings: the rules here (a flag wins over the environment, an empty variable counts as
unset, a password comes only from a file or the environment, one-line errors that name the flag or the
variable, argparse flags shared with `anomaly-replay` and `anomaly-train`) each need a custom source or
error formatter there, which comes to more code than this table, plus a second validation dialect and a
dependency; a dataclass field already holds name, type and default, so only the rest is declared.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass
from typing import Any

from training.errors import ConfigError

ENV_PREFIX = "ANOMALY_"
_KEY = "setting"

#: A field check: returns what is wrong with the value ("must be ..., got ..."), or None.
Check = Callable[[Any], "str | None"]


def within(low: float, high: float, unit: str = "") -> Check:
    suffix = f" {unit}" if unit else ""
    return lambda v: None if low <= v <= high else f"must be in [{low}, {high}]{suffix}, got {v}"


def at_least(low: float, unit: str = "") -> Check:
    suffix = f" {unit}" if unit else ""
    return lambda v: None if v >= low else f"must be at least {low}{suffix}, got {v}"


def positive_seconds(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else f"must be a positive number of seconds, got {value}"


def off_or_positive(value: float) -> str | None:
    return None if math.isfinite(value) and value >= 0 else f"must be >= 0 (0 turns it off), got {value}"


def not_blank(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


@dataclass(frozen=True)
class Decl:
    """What a dataclass field cannot say about itself."""

    help: str
    check: Check | None = None
    choices: tuple[str, ...] = ()
    case: Callable[[str], str] | None = None  # str.lower / str.upper, applied to flag and env values
    shown: str | None = None  # the default as --help and the docs say it, where the value says too little
    name: str | None = None  # flag and env stem, where it differs from the field name
    flag: bool = True  # False: environment only (a secret must not be in argv, visible in /proc)


def setting(help: str, default: Any = MISSING, **decl: Any) -> Any:
    """A dataclass field declared as a setting (keywords: those of `Decl`)."""
    return dataclasses.field(default=default, metadata={_KEY: Decl(help, **decl)})


def _boolean(text: str) -> bool:
    return text.strip().lower() not in ("", "0", "false", "no", "off")


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


#: Conversions that are not the type itself (`int("3")`, `Path("x")`), and the type's name in errors.
_SPECIAL: dict[type, tuple[Callable[[str], Any], str]] = {bool: (_boolean, "bool"), tuple: (_comma_list, "list")}


@dataclass(frozen=True)
class Option:
    """One declared setting, resolved: names, type, default and declaration."""

    attr: str
    kind: type
    default: Any
    decl: Decl

    @property
    def name(self) -> str:
        return self.decl.name or self.attr

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def label(self) -> str:
        """How errors name it: the flag, or the variable where there is no flag."""
        return self.flag if self.decl.flag else self.env

    def convert(self, text: str) -> Any:
        """The value of a flag or variable's text; ValueError names the expected type."""
        kind = _SPECIAL.get(self.kind, (self.kind, ""))[0]
        if self.decl.case is not None:
            text = self.decl.case(text)
        return kind(text)

    def converter(self) -> Callable[[str], Any]:
        convert = self.convert
        wrapped = lambda text: convert(text)  # noqa: E731 - argparse names the type by __name__
        wrapped.__name__ = _SPECIAL.get(self.kind, (self.kind, self.kind.__name__))[1]
        return wrapped

    def from_env(self, environ: Mapping[str, str]) -> Any:
        """The variable's value; None when unset or empty."""
        text = environ.get(self.env) or None
        if text is None:
            return None
        try:
            return self.convert(text)
        except ValueError as exc:
            raise ConfigError(f"{self.env}: expected {self.converter().__name__}, got {text!r}") from exc

    def validate(self, value: Any) -> None:
        if value is None:
            return
        problem = self.decl.check(value) if self.decl.check else None
        if problem is None and self.decl.choices and value not in self.decl.choices:
            problem = f"must be one of {', '.join(self.decl.choices)}, got {value!r}"
        if problem:
            raise ConfigError(f"{self.label} {problem}")

    def default_text(self) -> str | None:
        if self.decl.shown is not None:
            return self.decl.shown
        if self.required:
            return "required"
        if self.default is None or self.default == ():
            return None
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    def help_text(self) -> str:
        """The help, then the choices and the default (generated, so said once)."""
        notes = [f"one of {', '.join(self.decl.choices)}"] if self.decl.choices else []
        if not self.required and (default := self.default_text()) is not None:
            notes.append(f"default {default}")
        return self.decl.help + (f" ({'; '.join(notes)})" if notes else "")


def options(cls: type) -> tuple[Option, ...]:
    """The declared settings among the fields of dataclass `cls`, in field order."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        if _KEY in f.metadata:
            kind = hints[f.name]
            if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
                kind = next(k for k in typing.get_args(kind) if k is not type(None))
            found.append(Option(f.name, typing.get_origin(kind) or kind, f.default, f.metadata[_KEY]))
    return tuple(found)


def validate_fields(instance: object) -> None:
    """Normalise the case of declared string fields, then run each field's check (from `__post_init__`)."""
    for option in options(type(instance)):
        value = getattr(instance, option.attr)
        if isinstance(value, str) and option.decl.case is not None and value != option.decl.case(value):
            value = option.decl.case(value)
            object.__setattr__(instance, option.attr, value)  # frozen: normalised once, at construction
        option.validate(value)


def add_arguments(add: Callable[..., object], declared: Iterable[Option]) -> None:
    """`add(flag, type=..., help=...)` for each option that has a flag; the help names its variable."""
    for option in declared:
        if option.decl.flag:
            metavar = "{" + ",".join(option.decl.choices) + "}" if option.decl.choices else None
            add(option.flag, type=option.converter(), metavar=metavar,
                help=f"{option.help_text()} [env {option.env}]")


def reader(declared: Iterable[Option], args: argparse.Namespace, environ: Mapping[str, str]) -> Callable[[str], Any]:
    """`get(name)`: the flag's value, else the variable's (converted), else None."""
    by_name = {option.name: option for option in declared}
    flags = vars(args)

    def get(name: str) -> Any:
        value = flags.get(name)
        return by_name[name].from_env(environ) if value is None else value

    return get


def markdown_table(declared: Iterable[Option]) -> str:
    rows = ["| Flag | Environment | Default | Meaning |", "|---|---|---|---|"]
    for option in declared:
        flag = f"`{option.flag}`" if option.decl.flag else "(none)"
        default = option.default_text()
        cells = (flag, f"`{option.env}`", "" if default is None else default, _meaning(option))
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def _meaning(option: Option) -> str:
    return option.decl.help + (f"; one of {', '.join(option.decl.choices)}" if option.decl.choices else "")
