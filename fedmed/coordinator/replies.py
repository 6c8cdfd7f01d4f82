"""Checking a site's reply before anything of it is used: only the expected records, only
whitelisted scalars, and arrays with exactly the model's names, shapes and dtypes and finite
values. ``check_reply`` is pure: it reads the reply through ``ReplyView`` (Flower's message
behind it is ``fedmed.flower.replies``) and returns ``Accepted`` or ``Rejected`` with every
reason, which the round's record keeps.

What a trained reply carries depends on how the round aggregates: a model in clear
(``PlainUpdates``) or a masked vector for secure aggregation (``MaskedUpdates``); both are
one ``UpdateFormat``, chosen once per run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedmed import protocol
from fedmed.config import RunSettings
from fedmed.coordinator.fedavg import SiteUpdate, validate_update
from fedmed.coordinator.outcome import RoundOutcome
from fedmed.privacy.release import counts_length
from fedmed.protocol import RoundStatus
from fedmed.vector import unpack

MAX_VALIDATION_NOISE = 1e6  # std per count a site may state; more says nothing but costs the error bars


class ReplyView(Protocol):
    """A received reply as plain values; the arrays are read only when asked for, each
    checked against its expected size before it is deserialised."""

    def records(self) -> set[str]: ...

    def text(self) -> dict[str, object]: ...

    def metrics(self) -> dict[str, object]: ...

    def model_vector(self, size: int) -> np.ndarray:
        """The model in clear as a float32 vector of ``size``; ValueError otherwise."""
        ...

    def masked_vector(self, size: int) -> np.ndarray | None:
        """The masked update as a uint64 vector of ``size``; None when the reply has no
        such record; ValueError when it is not such a vector."""
        ...

    def array_shapes(self) -> dict[str, list]:
        """Each array's name, shape and dtype, as declared: for the record of what arrived."""
        ...


@dataclass(frozen=True)
class Accepted:
    metrics: dict[str, object]
    state: dict[str, np.ndarray]  # the model in clear, or {MASKED: vector}; empty when the budget ran out


@dataclass(frozen=True)
class Rejected:
    problems: list[str]

    @property
    def reason(self) -> str:
        return "; ".join(self.problems)


class UpdateFormat(Protocol):
    """How a trained reply carries the site's update, and where an accepted one goes."""

    records: frozenset[str]

    def read(
        self, reply: ReplyView, metrics: dict, reference: dict[str, np.ndarray]
    ) -> tuple[list[str], dict[str, np.ndarray]]: ...

    def keep(self, outcome: RoundOutcome, node: int, name: str, accepted: Accepted) -> None: ...


class PlainUpdates:
    """FedAvg in clear: the site's model and its record count."""

    records = frozenset({protocol.ARRAYS})

    def read(
        self, reply: ReplyView, metrics: dict, reference: dict[str, np.ndarray]
    ) -> tuple[list[str], dict[str, np.ndarray]]:
        if protocol.ARRAYS not in reply.records():
            return ["a trained reply without model arrays"], {}
        try:
            size = sum(a.size for a in reference.values())  # checked before deserialising
            state = unpack(reply.model_vector(size), reference)
        except Exception as error:  # any undecodable or misshapen array
            return [f"model arrays cannot be used: {error}"], {}
        return validate_update(state, metrics.get("examples", math.nan), reference), state

    def keep(self, outcome: RoundOutcome, node: int, name: str, accepted: Accepted) -> None:
        examples = int(accepted.metrics["examples"])  # type: ignore[call-overload]  # checked: a whole number
        outcome.updates.append(SiteUpdate(name, examples, accepted.state))
        outcome.trained.append(name)
        outcome.examples += examples


class MaskedUpdates:
    """Secure aggregation: one uint64 vector, the model's size plus the weight share, and
    no record count in clear."""

    records = frozenset({protocol.MASKED, protocol.SECURE})

    def read(
        self, reply: ReplyView, metrics: dict, reference: dict[str, np.ndarray]
    ) -> tuple[list[str], dict[str, np.ndarray]]:
        size = sum(a.size for a in reference.values()) + 1
        if "examples" in metrics:
            return ["a secure-aggregation reply must not send its record count in clear"], {}
        try:
            vector = reply.masked_vector(size)
        except ValueError as error:
            return [f"the masked vector cannot be used: {error}"], {}
        if vector is None:
            return ["a trained secure-aggregation reply without its masked vector"], {}
        if vector.dtype != np.uint64 or vector.shape != (size,):
            return [f"the masked vector is {vector.dtype}{list(vector.shape)}, expected uint64[{size}]"], {}
        return [], {protocol.MASKED: vector}

    def keep(self, outcome: RoundOutcome, node: int, name: str, accepted: Accepted) -> None:
        outcome.masked[node] = accepted.state[protocol.MASKED]
        outcome.trained.append(name)


def check_reply(
    run: RunSettings, reference: dict[str, np.ndarray], reply: ReplyView, updates: UpdateFormat
) -> Accepted | Rejected:
    """Check a site's reply to a training request against the protocol."""
    problems = []
    extra = sorted(reply.records() - ({protocol.METRICS, protocol.SITE} | updates.records))
    if extra:
        problems.append(f"unexpected records: {', '.join(extra)}")
    text = reply.text()
    if set(text) - protocol.REPLY_TEXT or any(len(str(v)) > protocol.MAX_TEXT for v in text.values()):
        problems.append("site record has fields or text beyond the protocol")
    metrics = reply.metrics()
    unknown = sorted(set(metrics) - protocol.REPLY_METRICS)
    if unknown:
        problems.append(f"metrics outside the whitelist: {', '.join(unknown)}")
    problems += check_values(run, metrics)
    status = metrics.get("status")
    state: dict[str, np.ndarray] = {}
    if status == RoundStatus.TRAINED:
        more, state = updates.read(reply, metrics, reference)
        problems += more
    elif status == RoundStatus.BUDGET_EXHAUSTED:
        if reply.records() & {protocol.ARRAYS, protocol.MASKED}:
            problems.append("a budget-exhausted reply must not carry arrays")
    else:
        problems.append(f"unknown status {status!r}")
    return Rejected(problems) if problems else Accepted(metrics, state)


def check_evaluation(run: RunSettings, reply: ReplyView) -> Accepted | Rejected:
    """Check a site's reply to an evaluation request: validation metrics only."""
    metrics = reply.metrics()
    problems = check_values(run, metrics)
    if reply.records() - {protocol.METRICS, protocol.SITE}:
        problems.append("an evaluation reply must carry metrics only")
    if set(metrics) - {*protocol.VALIDATION_METRICS, protocol.VALIDATION_COUNTS, protocol.VALIDATION_NOISE}:
        problems.append("metrics outside the whitelist")
    return Rejected(problems) if problems else Accepted(metrics, {})


def check_values(run: RunSettings, metrics: dict) -> list[str]:
    """Single numbers, except the validation counts: a list of the run's length."""
    problems = []
    counts = metrics.get(protocol.VALIDATION_COUNTS)
    expected = counts_length(len(run.class_names))
    if counts is not None and (
        not isinstance(counts, list)
        or len(counts) != expected
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in counts)
    ):
        problems.append(f"validation counts must be {expected} finite numbers")
    noise = metrics.get(protocol.VALIDATION_NOISE)
    if noise is not None and not (isinstance(noise, (int, float)) and 0 <= noise <= MAX_VALIDATION_NOISE):
        problems.append(f"the validation noise must be a number in [0, {MAX_VALIDATION_NOISE:g}]")
    if any(not isinstance(v, (int, float)) for k, v in metrics.items() if k != protocol.VALIDATION_COUNTS):
        problems.append("metrics must be single numbers")
    return problems
