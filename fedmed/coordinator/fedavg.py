"""Checking site updates, averaging them (weighted by each site's example count), and the
server's step from the old global model towards that average (FedAvg, or FedAvgM with
server momentum)."""

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
        averaged[name] = (
            acc.astype(first.dtype) if np.issubdtype(first.dtype, np.floating) else np.rint(acc).astype(first.dtype)
        )
    return averaged


def server_step(
    current: dict[str, np.ndarray],
    averaged: dict[str, np.ndarray],
    velocity: dict[str, np.ndarray] | None,
    learning_rate: float = 1.0,
    momentum: float = 0.0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The next global model and server velocity.

    The sites' average move ``averaged - current`` is treated as a pseudo-gradient step:
    ``velocity = momentum * velocity + move`` and ``next = current + learning_rate * velocity``.
    With learning rate 1 and momentum 0 this is plain FedAvg (``next = averaged``); the
    velocity is then None. Integer arrays always take the average.
    """
    if learning_rate == 1.0 and momentum == 0.0:
        return averaged, None
    step_state, new_velocity = {}, {}
    for name, target in averaged.items():
        if not np.issubdtype(target.dtype, np.floating):
            step_state[name] = target
            continue
        move = target.astype(np.float64) - current[name].astype(np.float64)
        if velocity is not None and name in velocity:
            move = momentum * velocity[name].astype(np.float64) + move
        new_velocity[name] = move.astype(np.float32)
        step_state[name] = (current[name].astype(np.float64) + learning_rate * move).astype(target.dtype)
    return step_state, new_velocity
