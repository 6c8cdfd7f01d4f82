"""Reading the settings' declarations (``fedmed.config``): their keys and option names, the
range checks, and converting a value read from a file, a message or the command line to
the declared type, with an error naming the key."""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import fields
from functools import cache
from typing import Any


def options(cls: type) -> list:
    """The fields of ``cls`` that users set (not the internal ones)."""
    return [f for f in fields(cls) if not f.metadata.get("internal")]


def key(f) -> str:
    """A setting's name in files and messages: ``section.name``."""
    return f"{f.metadata['section']}.{f.name}"


def flag(f) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


@cache
def types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def allowed_values(meta: Mapping) -> str:
    """The allowed values of a setting, in words."""
    if meta.get("choices"):
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    low, high, above, below = meta.get("low"), meta.get("high"), meta.get("above"), meta.get("below")
    if above == 0 and high is None and below is None:
        return "positive (> 0)"
    left = f"[{low:g}" if low is not None else (f"({above:g}" if above is not None else None)
    right = f"{high:g}]" if high is not None else (f"{below:g})" if below is not None else None)
    if left and right:
        rule = f"in {left}, {right}"
    elif left:
        rule = f"{'>=' if low is not None else '>'} {left[1:]}"
    elif right:
        rule = f"{'<=' if high is not None else '<'} {right[:-1]}"
    else:
        rule = ""
    if meta.get("multiple_of"):
        rule += f"{', ' if rule else ''}a multiple of {meta['multiple_of']}"
    return rule


def check_ranges(settings: Any) -> None:
    """Raise ValueError naming the first setting outside its allowed range."""
    for f in options(type(settings)):
        value, meta = getattr(settings, f.name), f.metadata
        if value is None or isinstance(value, (str, tuple)) and not meta.get("choices"):
            continue
        bad = (
            meta["choices"]
            and value not in meta["choices"]
            or meta["low"] is not None
            and value < meta["low"]
            or meta["high"] is not None
            and value > meta["high"]
            or meta["above"] is not None
            and value <= meta["above"]
            or meta["below"] is not None
            and value >= meta["below"]
        )
        if bad:
            raise ValueError(f"{key(f)} must be {allowed_values(meta)}, got {value!r}")
        if meta["multiple_of"] and value % meta["multiple_of"]:
            raise ValueError(f"{key(f)} must be a multiple of {meta['multiple_of']}, got {value!r}")


def coerce(cls: type, name: str, value: Any) -> Any:
    """``value`` as the declared type of ``cls.name`` (TOML and Flower give ints for floats,
    lists for tuples, and "none" for an absent number); raises ValueError naming the key."""
    f = next(f for f in fields(cls) if f.name == name)
    kind = types(cls)[name]
    label = key(f) if f.metadata.get("section") else name
    optional = type(None) in typing.get_args(kind)
    if optional:
        if value is None or isinstance(value, str) and value.strip().lower() == "none":
            return None
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{label} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{label} must be a whole number, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ValueError(f"{label} must be a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        items = f.metadata.get("items")
        if items is not None and isinstance(value, (list, tuple)):
            return _joined(label, value, items)
        raise ValueError(f"{label} must be text, got {value!r}")
    if typing.get_origin(kind) is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError(f"{label} must be a list of text, got {value!r}")
    raise TypeError(f"{label}: fedmed.config has no reader for type {kind}")


def build(cls: type, values: Mapping[str, Any], origin: str = "") -> Any:
    """``cls`` from values by field name (checked and converted); errors start with ``origin``."""
    prefix = f"{origin}: " if origin else ""
    try:
        settings = cls(**{name: coerce(cls, name, value) for name, value in values.items()})
    except ValueError as error:
        raise ValueError(f"{prefix}{error}") from error
    missing = [flag(f) for f in options(cls) if f.metadata.get("required") and not getattr(settings, f.name)]
    if missing:
        raise ValueError(f"{prefix}{', '.join(missing)} must be given (on the command line or in a --config file)")
    return settings


def _joined(label: str, values: list | tuple, items: type) -> str:
    """A list setting given as a TOML array, as the comma-separated text fedmed keeps."""
    if items is float and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        return ",".join(str(v) for v in values)
    if items is str and all(isinstance(v, str) and "," not in v for v in values):
        return ",".join(values)
    kind = "numbers" if items is float else "names without commas"
    raise ValueError(f"{label} must be a list of {kind}, got {values!r}")
