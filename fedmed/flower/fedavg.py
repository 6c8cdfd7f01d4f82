"""Checking site updates and averaging them, weighted by each site's example count."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmed.weights import check_state


@dataclass
class SiteUpdate:
    site: str
    examples: int
    state: dict[str, np.ndarray]


def validate_update(state: dict[str, np.ndarray], examples: float, reference: dict[str, np.ndarray]) -> list[str]:
    """Reasons to drop an update: wrong keys, shapes, dtypes, non-finite values or a bad count."""
    problems = check_state(state, reference)
    if not (np.isfinite(examples) and examples >= 1 and float(examples).is_integer()):
        problems.append(f"example count {examples!r} is not a positive whole number")
    return problems


def weighted_average(updates: list[SiteUpdate]) -> dict[str, np.ndarray]:
    """FedAvg: each array averaged over sites, weighted by the site's training examples."""
    if not updates:
        raise ValueError("nothing to average: no valid site updates")
    total = float(sum(u.examples for u in updates))
    averaged = {}
    for name, first in updates[0].state.items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for update in updates:
            acc += update.state[name].astype(np.float64) * (update.examples / total)
        averaged[name] = acc.astype(first.dtype) if np.issubdtype(first.dtype, np.floating) \
            else np.rint(acc).astype(first.dtype)
    return averaged
