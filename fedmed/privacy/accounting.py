"""Privacy accounting for DP-SGD at one site, with Opacus's RDP accountant.

A site's whole privacy history is a list of mechanism runs ``(noise_multiplier,
sample_rate, steps)``; RDP composes them all, over every round and run the site joined,
and converts the total to (epsilon, delta).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants.analysis import rdp as opacus_rdp

ACCOUNTANT = "rdp"
# RDP orders searched for the tightest conversion to (epsilon, delta): fine steps near 1,
# where large epsilons are decided, integers up to 64 and coarser ones up to 256, where
# small epsilons are. (Fractional orders are costly to evaluate, so they are few.)
RDP_ORDERS = tuple(
    [1.05, *np.round(np.arange(1.1, 2.0, 0.1), 2), *np.arange(2.0, 10.0, 0.5), *range(10, 65), *range(72, 257, 8)]
)
History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps), oldest first
HistoryLike = Sequence[tuple[float, float, int]]  # a History or any read-only sequence of its entries


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at every order (Opacus's analysis)."""
    return np.asarray(
        opacus_rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS)
    )


def epsilon(history: HistoryLike, delta: float) -> float:
    """Epsilon spent by ``history`` at ``delta`` (0.0 for an empty history).

    RDP adds up over steps and mechanisms; the total is converted once, at the best order.
    """
    if not history:
        return 0.0
    total = sum(steps * _rdp_per_step(float(sigma), float(rate)) for sigma, rate, steps in history)
    with warnings.catch_warnings():
        # Opacus warns when the smallest order is the best one, which happens for the very
        # large epsilons tried while calibrating noise; the result is still a valid bound.
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        eps, _ = opacus_rdp.get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=delta)
    return float(eps)


def extend(history: HistoryLike, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """``history`` plus ``steps`` more steps, merged into the last run when it matches."""
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        return [*history[:-1], (noise_multiplier, sample_rate, history[-1][2] + steps)]
    return [*history, (noise_multiplier, sample_rate, steps)]


def round_plan(examples: int, batch_size: float, epochs: int, steps: int = 0) -> tuple[float, int]:
    """(Poisson sample rate, steps) of one round: ``steps`` steps if given, else ``epochs``
    local epochs."""
    if examples < 1:
        raise ValueError("a site needs at least one training example")
    if batch_size <= 0 or epochs < 1 or steps < 0:
        raise ValueError(
            f"batch size and epochs must be positive and steps not negative, got {batch_size}, {epochs} and {steps}"
        )
    sample_rate = min(1.0, batch_size / examples)
    return sample_rate, steps or epochs * max(1, round(examples / batch_size))


def default_delta(examples: int) -> float:
    """A delta well below 1/n: the largest power of ten not above 1/(10 n), at most 1e-5."""
    return min(1e-5, 10.0 ** math.floor(math.log10(1.0 / (10 * examples))))


def check_delta(delta: float, examples: int) -> None:
    """Refuse a delta that would allow the mechanism to reveal a whole record."""
    if not 0.0 < delta < 1.0 / examples:
        raise ValueError(
            f"delta={delta:g} must be positive and below 1/n = {1.0 / examples:.3g} for this site's "
            f"n={examples} training examples (a delta of 1/n or more permits leaking a whole record); "
            f"use e.g. delta={default_delta(examples):g}"
        )


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    spent: HistoryLike = (),
    tolerance: float = 0.005,
) -> float:
    """The smallest noise multiplier (to ``tolerance`` relative) for which ``spent`` plus
    ``steps`` steps at ``sample_rate`` stays at or below ``target_epsilon``."""
    spent = list(spent)
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be positive, got {target_epsilon}")
    already = epsilon(spent, delta)
    if already >= target_epsilon:
        raise ValueError(
            f"the site has already spent epsilon={already:.3f} at delta={delta:g}, "
            f"which reaches its target {target_epsilon:g}; no noise level fits"
        )

    def total(sigma: float) -> float:
        return epsilon(extend(spent, sigma, sample_rate, steps), delta)

    low, high = 0.1, 1.0
    while total(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon:g} with these settings")
    while total(low) <= target_epsilon and low > 1e-3:
        low /= 2
    while (high - low) / high > tolerance:
        middle = (low + high) / 2
        low, high = (low, middle) if total(middle) <= target_epsilon else (middle, high)
    return high
