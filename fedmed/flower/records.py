"""Typed reads of what a Flower message carries.

Flower types a message's records as any of its three kinds, and a ConfigRecord's values as
any of the scalars and lists it may hold. The other end chooses what arrives, so each read
here checks the kind it expects and refuses anything else with a ValueError that names
the key; a missing key is a KeyError, as with a plain lookup. Imports no torch and none of
secure aggregation's code, so every part of the ClientApp may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeGuard, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

R = TypeVar("R", ArrayRecord, ConfigRecord, MetricRecord)
T = TypeVar("T", int, float, str, bytes, bool)


def record(content: RecordDict, key: str, kind: type[R]) -> R:
    """The record ``key`` of a message's content, which must be a ``kind``."""
    found = content[key]
    if not isinstance(found, kind):
        raise ValueError(f"the record {key!r} is {type(found).__name__}, expected {kind.__name__}")
    return found


def value(fields: Mapping[str, object], key: str, kind: type[T]) -> T:
    """The value ``key`` of a record (or of a dict of record values), which must be a
    ``kind`` (a bool is no int here, though Python counts it as one)."""
    found = fields[key]
    if not _is(found, kind):
        raise ValueError(f"{key!r} holds {type(found).__name__}, expected {kind.__name__}")
    return found


def values(fields: Mapping[str, object], key: str, kind: type[T]) -> list[T]:
    """The list ``key`` of a record (or of a dict of record values), every item a ``kind``;
    a new list."""
    found = fields[key]
    if not isinstance(found, list) or not all(_is(item, kind) for item in found):
        raise ValueError(f"{key!r} holds {type(found).__name__}, expected a list of {kind.__name__}")
    return list(found)


def _is(item: object, kind: type[T]) -> TypeGuard[T]:
    """``isinstance(item, kind)``, except that a bool is no number here."""
    return isinstance(item, kind) and (kind is bool or not isinstance(item, bool))
