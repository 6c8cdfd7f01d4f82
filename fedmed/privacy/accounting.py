"""Privacy accounting for DP-SGD at one site, with Opacus's RDP accountant.

A site's whole privacy history is a list of mechanism runs ``(noise_multiplier,
sample_rate, steps)``; RDP composes them all, over every round and run the site joined,
and converts the total to (epsilon, delta).
"""

from __future__ import annotations

import math

from opacus.accountants import RDPAccountant

ACCOUNTANT = "rdp"
# RDP orders searched for the tightest conversion: Opacus's defaults plus finer orders
# near 1 (where large epsilons are decided) and larger ones (where small epsilons are).
RDP_ORDERS = sorted({1 + x / 100 for x in range(1, 10)} | set(RDPAccountant.DEFAULT_ALPHAS) | set(range(64, 257, 8)))
History = list[tuple[float, float, int]]


def epsilon(history: History, delta: float) -> float:
    """Epsilon spent by ``history`` at ``delta`` (0.0 for an empty history)."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(accountant.get_epsilon(delta=delta, alphas=RDP_ORDERS))


def extend(history: History, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """``history`` plus ``steps`` more steps, merged into the last run when it matches."""
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        return [*history[:-1], (noise_multiplier, sample_rate, history[-1][2] + steps)]
    return [*history, (noise_multiplier, sample_rate, steps)]


def round_plan(examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(Poisson sample rate, steps) of one round of ``epochs`` local epochs."""
    if examples < 1:
        raise ValueError("a site needs at least one training example")
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch size and epochs must be positive, got {batch_size} and {epochs}")
    sample_rate = min(1.0, batch_size / examples)
    return sample_rate, epochs * max(1, round(examples / batch_size))


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
    spent: History = (),
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
