"""What happened to every site asked to take part in one round: filled by the round's
replies, read by the aggregation step and the round's record."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedmed.coordinator.fedavg import SiteUpdate


@dataclass
class RoundOutcome:
    updates: list[SiteUpdate] = field(default_factory=list)
    budget_exhausted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)  # the sites whose updates are in the aggregate
    examples: float = 0.0  # their summed (capped, under secure aggregation) record counts
    masked: dict[int, np.ndarray] = field(default_factory=dict)  # secure aggregation: node -> masked vector
    secure: dict | None = None  # secure aggregation: threshold, sites summed, dropouts, failure
    clipped: dict[str, str] = field(default_factory=dict)  # updates bounded before aggregation, with why
    norm_bound: float = math.inf  # the round's bound on one update's norm
    site_metrics: dict[str, dict] = field(default_factory=dict)
    reply_seconds: dict[str, float] = field(default_factory=dict)  # from sending to the reply's arrival
