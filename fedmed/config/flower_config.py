"""Settings as Flower's run and node config: one dashed key per field (Flower's naming),
converted back and checked on arrival."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from fedmed.config.fields import build
from fedmed.config.files import suggestion


def to_flower(settings: Any) -> dict:
    """Settings as Flower config: one dashed key per field (Flower's own naming)."""
    return {f.name.replace("_", "-"): getattr(settings, f.name) for f in fields(settings)}


def from_flower(cls: type, config: Mapping, what: str) -> Any:
    known = {f.name for f in fields(cls)}
    values = {}
    for name, value in config.items():
        field_name = name.replace("-", "_")
        if field_name not in known:
            raise ValueError(f"{what} has an unknown setting {name!r}{suggestion(field_name, known)}")
        values[field_name] = value
    return build(cls, values, what)
