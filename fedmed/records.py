"""The records of a run directory's ``metrics.jsonl`` (``fedmed.rundir``): one line per
round the coordinator ran (``RoundRecord``) and one per validation of a global model by the
sites (``ValidationRecord``). The coordinator writes them (``fedmed.coordinator.recorder``);
``metrics.csv`` and TensorBoard, live progress, the simulation's summary and the privacy
report read them.

``to_json`` is the line as fedmed has always written it: the same keys, values and order.
``from_json`` reads a line of any fedmed version: a key an older coordinator did not write
takes the value its readers have always assumed (an empty list or mapping, None, False),
and a key it does not know is ignored. Values are taken as written, never converted, so a
record read back writes the same JSON again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from fedmed.protocol import ReplyMetrics


class SiteRoundFields(ReplyMetrics, total=False):
    """What a round record keeps of one site's reply: its metrics without the validation
    scores (those are the validation record's), and its status as a word."""

    status_name: str  # RoundStatus.label_of(status): "trained", "budget_exhausted" or "unknown"


@dataclass(frozen=True)
class RoundRecord:
    """One round: which sites trained, which did not and why, and what the round produced.
    The fields are in the order of the JSON line."""

    EVENT: ClassVar[str] = "round"

    round: int
    rounds: int | None = None  # the run's planned rounds
    seconds: float | None = None  # the round's wall time
    aggregated: bool = False  # False: fewer valid updates than min_sites, the model is unchanged
    min_sites: int | None = None
    trained: list[str] = field(default_factory=list)  # the sites whose updates are in the aggregate
    budget_exhausted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # site -> why its reply was refused
    clipped: dict[str, str] = field(default_factory=dict)  # site -> how its update was bounded
    norm_bound: float | None = None  # the bound on one update's norm; None: unbounded
    aggregation: str | None = None  # the run's aggregation rule
    secure_aggregation: dict[str, Any] | None = None  # threshold, sites summed, dropouts, failure; None: in clear
    failed: dict[str, str] = field(default_factory=dict)  # site -> the error it sent
    missing: list[str] = field(default_factory=list)  # asked, no reply in time
    examples: float | None = None  # the trained sites' summed record counts
    train_loss: float | None = None  # NaN when no site released its loss
    slowest_site_train_seconds: float | None = None
    sites: dict[str, SiteRoundFields] = field(default_factory=dict)  # every site that replied
    reply_seconds: dict[str, float] = field(default_factory=dict)  # site -> from sending to its reply
    server_validation: dict[str, float] | None = None  # the new model on the coordinator's held-out set
    note: str | None = None  # why the model is unchanged, when it is

    def to_json(self) -> dict[str, Any]:
        record = {"event": self.EVENT, **asdict(self)}
        for key in ("server_validation", "note"):  # written only when there is one
            if record[key] is None:
                del record[key]
        return record

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRecord:
        """The record of a JSON line; KeyError without its round."""
        return cls(
            round=data["round"], **{f.name: data[f.name] for f in fields(cls) if f.name != "round" and f.name in data}
        )


@dataclass(frozen=True)
class ValidationRecord:
    """The sites' validation of the global model after ``round`` (0: the initial model):
    each site's scores, the combined scores and, for scores from noisy counts, their
    standard errors (``"errors"`` in JSON: ``{"sites": ..., "weighted": ...}``)."""

    EVENT: ClassVar[str] = "validation"

    round: int
    sites: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> "val-..." scores
    weighted: dict[str, float] = field(default_factory=dict)  # the sites' combined scores
    site_errors: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> "val-...-se"
    weighted_errors: dict[str, float] = field(default_factory=dict)  # of the combined scores

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {
            "event": self.EVENT,
            "round": data["round"],
            "sites": data["sites"],
            "weighted": data["weighted"],
            "errors": {"sites": data["site_errors"], "weighted": data["weighted_errors"]},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ValidationRecord:
        """The record of a JSON line; KeyError without its round."""
        errors = data.get("errors", {})  # written since the scores from noisy counts carry error bars
        return cls(
            round=data["round"],
            sites=data.get("sites", {}),
            weighted=data.get("weighted", {}),
            site_errors=errors.get("sites", {}),
            weighted_errors=errors.get("weighted", {}),
        )


Record = RoundRecord | ValidationRecord


def read_record(data: object) -> Record | None:
    """The record of one line of ``metrics.jsonl``; None for another event or a line
    without its round."""
    if not isinstance(data, Mapping) or "round" not in data:
        return None
    if data.get("event") == RoundRecord.EVENT:
        return RoundRecord.from_json(data)
    if data.get("event") == ValidationRecord.EVENT:
        return ValidationRecord.from_json(data)
    return None
