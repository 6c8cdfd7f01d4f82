"""What a site may send back after a round: the model's arrays and these scalars only.

Both ends use this list: a site builds its reply from it, and the coordinator drops any
reply that carries anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Status codes (MetricRecord values must be numbers).
TRAINED = 0
BUDGET_EXHAUSTED = 1
STATUS_NAMES = {TRAINED: "trained", BUDGET_EXHAUSTED: "budget_exhausted"}

TRAIN_METRICS = (
    "status", "dp", "examples", "steps", "loss", "epsilon", "delta", "noise-multiplier",
    "seconds-setup", "seconds-train",
)
# Validation of the global model a site received, on the site's own validation split.
VALIDATION_METRICS = (
    "val-examples", "val-loss", "val-accuracy", "val-balanced-accuracy", "val-auroc",
    "val-sensitivity", "val-specificity",
)
REPLY_METRICS = frozenset(TRAIN_METRICS + VALIDATION_METRICS)
# Short text fields, in a ConfigRecord named "site".
REPLY_TEXT = frozenset({"name", "message"})
MAX_TEXT = 500

ARRAYS = "arrays"
METRICS = "metrics"
SITE = "site"
CONFIG = "config"


def finite_or_nan(value: float | None) -> float:
    """A metric value for a MetricRecord (None and infinity travel as NaN)."""
    if value is None or not math.isfinite(value):
        return math.nan
    return float(value)


@dataclass
class SiteReply:
    """A site's answer to one message before it becomes a Flower reply: whitelisted
    scalars, a short message, and the trained model packed as one vector (None when it
    did not train; see ``fedmed.flower.packing``)."""

    site: str
    metrics: dict
    message: str = ""
    model: object = None  # numpy float32 vector
