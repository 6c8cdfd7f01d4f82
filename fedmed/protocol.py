"""What travels between the coordinator and a site, and the words both ends use for it.

A site may send back the model's arrays and the whitelisted scalars below only: a site
builds its reply from these lists, and the coordinator drops any reply that carries
anything else. ``RoundStatus`` is the one vocabulary for how a site's round ended, in
training, in a site's reply and in the coordinator's records.

This module imports no torch, so the ClientApp process stays light.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import SupportsIndex, SupportsInt, TypedDict

import numpy as np

from fedmed.config import RunSettings
from fedmed.numbers import finite_or_none


class RoundStatus(enum.IntEnum):
    """How a site's round ended. A whole number on the wire (MetricRecord values are
    numbers); ``label`` is its name in records and reports."""

    TRAINED = 0
    BUDGET_EXHAUSTED = 1

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def label_of(cls, value: object) -> str:
        """The label of a status received from elsewhere ("unknown" when it is none)."""
        if not isinstance(value, (str, bytes, bytearray, SupportsInt, SupportsIndex)):
            return "unknown"  # what int() refuses
        try:
            return cls(int(value)).label
        except (TypeError, ValueError):
            return "unknown"


# The public description of a site's guarantee for its round (see fedmed.privacy.release).
# "privacy-unit" is the index of the unit in fedmed.config.PRIVACY_UNITS.
GUARANTEE_METRICS = ("status", "dp", "steps", "epsilon", "delta", "noise-multiplier", "privacy-unit")
# The record count (noisy by default), then what a site sends only when it releases it exactly.
TRAIN_METRICS = GUARANTEE_METRICS + ("examples", "loss", "seconds-setup", "seconds-train")
# Validation of the global model a site received, on the site's own validation split: the
# noisy counts the scores follow from (a list of numbers; the default), or the scores
# themselves when the site releases them exactly.
VALIDATION_COUNTS = "val-counts"
VALIDATION_NOISE = "val-noise"  # the std of the noise on each count: a mechanism parameter, for error bars
VALIDATION_METRICS = (
    "val-examples",
    "val-loss",
    "val-accuracy",
    "val-balanced-accuracy",
    "val-auroc",
    "val-sensitivity",
    "val-specificity",
)
REPLY_METRICS = frozenset(TRAIN_METRICS + VALIDATION_METRICS + (VALIDATION_COUNTS, VALIDATION_NOISE))

# The metrics of a site's reply as a fedmed site sends them: the whitelist above with each
# value's type (a MetricRecord holds numbers and lists of numbers; whole numbers travel as
# int). Every key is optional: a reply carries the guarantee, a training reply the record
# count unless secure aggregation sums it, a site releases loss and timing only exactly,
# and validation as noisy counts (with their noise) or as exact scores. What arrives is not
# trusted to fit: ``fedmed.coordinator.replies`` reads a reply as plain values and checks
# them. Functional syntax: the keys are not identifiers.
ReplyMetrics = TypedDict(
    "ReplyMetrics",
    {
        "status": int,  # a RoundStatus
        "dp": int,  # 1: differentially private training, 0: not
        "steps": int,
        "epsilon": float,  # NaN when unbounded (metric_value)
        "delta": float,
        "noise-multiplier": float,
        "privacy-unit": int,  # the index of the unit in fedmed.config.PRIVACY_UNITS
        "examples": int,  # the record count, noisy unless released exactly
        "loss": float,
        "seconds-setup": float,
        "seconds-train": float,
        "val-examples": float,
        "val-loss": float,
        "val-accuracy": float,
        "val-balanced-accuracy": float,
        "val-auroc": float,
        "val-sensitivity": float,
        "val-specificity": float,
        "val-counts": list[float],  # VALIDATION_COUNTS
        "val-noise": float,  # VALIDATION_NOISE
    },
    total=False,
)
# Short text fields, in a ConfigRecord named "site".
REPLY_TEXT = frozenset({"name", "message"})
MAX_TEXT = 500

ARRAYS = "arrays"
SECURE = "secagg"  # the record of a secure-aggregation message (see fedmed.flower.secagg)
MASKED = "masked"  # the record, and its one array, of a masked update under secure aggregation
METRICS = "metrics"
SITE = "site"
CONFIG = "config"


def metric_value(value: float | None) -> float:
    """A value for a MetricRecord: missing and infinite values travel as NaN."""
    value = finite_or_none(value)
    return math.nan if value is None else value


@dataclass(frozen=True)
class TrainRequest:
    """Validate the received global model, then train one private round from it."""

    run: RunSettings
    model: np.ndarray  # packed float32 vector (see fedmed.flower.packing)
    round: int


@dataclass(frozen=True)
class EvaluateRequest:
    """Validate the received global model on the site's validation split."""

    run: RunSettings
    model: np.ndarray


SiteRequest = TrainRequest | EvaluateRequest


@dataclass
class SiteReply:
    """A site's answer to one message before it becomes a Flower reply: whitelisted
    scalars, a short message, and the trained model packed as one vector (None when it
    did not train; see ``fedmed.flower.packing``)."""

    site: str
    # What ReplyMetrics describes, annotated as a plain dict: the site builds it as one
    # (fedmed.site.work, fedmed.site.resend) and Flower's MetricRecord takes one, which a
    # TypedDict is not to a type checker.
    metrics: dict
    message: str = ""
    model: np.ndarray | None = None
