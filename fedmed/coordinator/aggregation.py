"""Robust aggregation: how far one site may move the global model in a round.

A site's update is its move from the global model it received (``delta``). Before any
rule combines them, the coordinator

- bounds each update's L2 norm (``federation.max_update_norm``; by default the norm an
  honest DP-SGD update reaches, ``honest_norm_bound``) and scales a longer one down, and
- caps each site's weight, its claimed record count, at ``federation.max_site_examples``
  (by default ``WEIGHT_CAP_MEDIANS`` times the round's median claim).

Then ``federation.aggregation`` combines the bounded moves: ``mean`` (FedAvg's weighted
mean), or the coordinate-wise ``median`` or ``trimmed-mean`` (unweighted; they ignore an
outlier however it was weighted). Under the weighted mean one site moves the aggregate by
at most its weight share times twice the bound; the aggregate itself is never longer than
the bound, because every bounded move is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedmed.config import AGGREGATIONS, RunSettings
from fedmed.coordinator.fedavg import SiteUpdate

WEIGHT_CAP_MEDIANS = 10.0  # default weight cap: this many times the round's median record count
SECURE_WEIGHT_CAP = 1_000_000  # default weight cap under secure aggregation, where no claim is seen
# Sites' noise multipliers differ with their sizes and budgets: the default bound follows
# the largest reported within this factor of the lower median.
REPORT_SPREAD = 2.0
NOISE_MARGIN = 1.25  # the noise's norm concentrates within a few percent of its expectation; room to spare


@dataclass
class BoundedRound:
    """The round's moves after bounding, and what was changed, by site."""

    moves: dict[str, np.ndarray]  # site -> its (possibly scaled) move, one flat float64 vector
    weights: dict[str, float]  # site -> its (possibly capped) weight
    norm_bound: float  # math.inf: none applied
    clipped: dict[str, str] = field(default_factory=dict)  # site -> what was changed and why


def weight_cap(run: RunSettings) -> int:
    """The record count a weight share of 1 stands for under secure aggregation."""
    return run.max_site_examples or SECURE_WEIGHT_CAP


def momentum_sums(steps: int, momentum: float) -> np.ndarray:
    """How often each step's gradient is counted in a round of SGD with momentum: the
    gradient of step s (of S) moves the model by lr times ``1 + m + ... + m^(S-s)``."""
    return np.array([sum(momentum**j for j in range(k)) for k in range(steps, 0, -1)], dtype=np.float64)


def honest_norm_bound(
    run: RunSettings,
    round_number: int,
    *,
    steps: float,
    noise_multiplier: float,
    trained_parameters: int,
    model_norm: float,
) -> float:
    """The longest move an honest DP-SGD site makes in ``round_number``: the clipped signal
    at most (each step's mean clipped gradient is at most ``max_grad_norm`` long) and the
    Gaussian noise at ``NOISE_MARGIN`` times its expected norm, plus weight decay's pull."""
    if run.local_steps:
        steps = min(steps, run.local_steps)
    sums = momentum_sums(max(1, int(round(steps))), run.momentum)
    rate = run.round_learning_rate(round_number)
    signal = run.max_grad_norm * sums.sum()
    noise = (
        noise_multiplier
        * run.max_grad_norm
        * math.sqrt(trained_parameters)
        / run.batch_size
        * math.sqrt(float((sums**2).sum()))
    )
    decay = run.weight_decay * model_norm * sums.sum()
    # the noise is independent of the signal, so in many dimensions nearly orthogonal to it
    return rate * (math.hypot(signal, NOISE_MARGIN * noise) + decay)


def round_norm_bound(
    run: RunSettings, round_number: int, reports: list[dict], trained_parameters: int, model_norm: float
) -> float:
    """The round's norm bound: the fixed setting, or the honest bound for the trained sites'
    reported steps and noise multipliers: the largest reported value within
    ``REPORT_SPREAD`` times the lower median, so that with an honest majority an honest
    site's figure sets it, and a site claiming more widens it no further. None applies
    (inf) where most sites train without DP: their gradients are not clipped, so nothing
    bounds an honest move."""
    if run.max_update_norm > 0:
        return run.max_update_norm
    if not reports or _lower_median([float(r.get("dp", 0)) for r in reports]) < 1:
        return math.inf
    steps = _largest_within_spread([float(r.get("steps", 1)) for r in reports])
    noise = _largest_within_spread([float(r.get("noise-multiplier", 0.0)) for r in reports])
    return honest_norm_bound(
        run,
        round_number,
        steps=steps,
        noise_multiplier=noise,
        trained_parameters=trained_parameters,
        model_norm=model_norm,
    )


def bound_updates(
    updates: list[SiteUpdate], current: dict[str, np.ndarray], norm_bound: float, max_examples: int
) -> BoundedRound:
    """Each update as a move from ``current``, scaled to at most ``norm_bound`` long, with its
    weight capped at ``max_examples`` (0: ``WEIGHT_CAP_MEDIANS`` x the median claim)."""
    base = _flat(current)
    claims = [float(u.examples) for u in updates]
    cap = float(max_examples) if max_examples > 0 else WEIGHT_CAP_MEDIANS * float(np.median(claims or [1.0]))
    bounded = BoundedRound({}, {}, norm_bound)
    for update in updates:
        move = _flat(update.state) - base
        reasons = []
        norm = scale_to_bound(move, norm_bound)
        if norm is not None:
            reasons.append(f"update norm {norm:.4g} above the bound {norm_bound:.4g}: scaled down to it")
        weight = float(update.examples)
        if weight > cap:
            reasons.append(f"claimed {weight:.0f} records, above the cap of {cap:.0f}: weighted as {cap:.0f}")
            weight = cap
        bounded.moves[update.site] = move
        bounded.weights[update.site] = weight
        if reasons:
            bounded.clipped[update.site] = "; ".join(reasons)
    return bounded


def scale_to_bound(move: np.ndarray, bound: float) -> float | None:
    """Scale ``move`` in place to at most ``bound`` long; its norm before, when it was longer."""
    norm = float(np.linalg.norm(move))
    if norm <= bound:
        return None
    move *= bound / norm
    return norm


def state_norm(state: dict[str, np.ndarray]) -> float:
    """The L2 norm of a model's weights, all tensors together."""
    return float(np.linalg.norm(_flat(state)))


def combine(bounded: BoundedRound, rule: str, trim_fraction: float) -> np.ndarray:
    """The round's aggregate move under ``rule`` (see ``AGGREGATIONS``)."""
    if not bounded.moves:
        raise ValueError("nothing to aggregate: no valid site updates")
    moves = np.stack(list(bounded.moves.values()))
    if rule == "mean":
        weights = np.array(list(bounded.weights.values()), dtype=np.float64)
        return weights @ moves / weights.sum()
    if rule == "median":
        return np.median(moves, axis=0)
    if rule == "trimmed-mean":
        trim = trimmed_count(len(moves), trim_fraction)
        return np.sort(moves, axis=0)[trim : len(moves) - trim].mean(axis=0)
    raise ValueError(f"unknown aggregation {rule!r}; choose from {', '.join(AGGREGATIONS)}")


def trimmed_count(sites: int, trim_fraction: float) -> int:
    """Updates dropped at each end of every coordinate: at least one once the fraction
    asks for any, and never so many that nothing is left."""
    if trim_fraction <= 0:
        return 0
    return min(max(1, math.floor(trim_fraction * sites)), (sites - 1) // 2)


def apply_move(current: dict[str, np.ndarray], move: np.ndarray) -> dict[str, np.ndarray]:
    """``current`` moved by the flat ``move`` (in ``current``'s tensor order)."""
    moved, start = {}, 0
    for name, array in current.items():
        part = move[start : start + array.size].reshape(array.shape)
        moved[name] = (array.astype(np.float64) + part).astype(array.dtype)
        start += array.size
    return moved


def _flat(state: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(a).astype(np.float64) for a in state.values()])


def _largest_within_spread(values: list[float]) -> float:
    limit = REPORT_SPREAD * _lower_median(values)
    return max(v for v in values if v <= limit)


def _lower_median(values: list[float]) -> float:
    return float(np.quantile(values, 0.5, method="lower"))


def aggregate_round(
    run: RunSettings,
    round_number: int,
    current: dict[str, np.ndarray],
    updates: list[SiteUpdate],
    *,
    reports: list[dict],
    trained_parameters: int,
) -> tuple[dict[str, np.ndarray], BoundedRound]:
    """The round's combined model under the run's settings: each update bounded (the
    round's norm bound from ``reports``, the sites' metrics, and the weight cap), then
    combined by ``run.aggregation``; with what was bounded."""
    norm_bound = round_norm_bound(run, round_number, reports, trained_parameters, state_norm(current))
    bounded = bound_updates(updates, current, norm_bound, run.max_site_examples)
    return apply_move(current, combine(bounded, run.aggregation, run.trim_fraction)), bounded
