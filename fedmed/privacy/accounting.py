"""Privacy accounting for a site: the ledger's accountant, noise calibration and delta.

A site's whole privacy history is a list of mechanism runs ``(noise_multiplier,
sample_rate, steps)`` (``fedmed.privacy.history``): its DP-SGD rounds and its Gaussian
releases, over every round and run it joined. The ledger's accountant composes them all and
converts the total to (epsilon, delta). Since issue 27 that accountant is the PLD accountant
(``fedmed.privacy.pld``): the tightest sound bound measured (BENCHMARKS.md, "Accountant
(issue 27)"); RDP (``fedmed.privacy.rdp``), the ledger's accountant before, is the report's
second opinion. Ledger lines keep the name of the accountant that produced their epsilon,
and a ledger begun with RDP continues soundly: see ``PrivacyLedger.epsilon``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fedmed.privacy.history import History, HistoryLike, extend
from fedmed.privacy.pld import NAME as PLD
from fedmed.privacy.pld import pld_epsilon
from fedmed.privacy.rdp import GUESS_ORDERS, RDP_ORDERS, rdp_epsilon
from fedmed.privacy.rdp import NAME as RDP

__all__ = [
    "ACCOUNTANT",
    "ACCOUNTANTS",
    "RDP_ORDERS",
    "History",
    "HistoryLike",
    "accountant_epsilon",
    "calibrate_noise",
    "check_delta",
    "default_delta",
    "epsilon",
    "extend",
    "round_plan",
]

ACCOUNTANT = PLD  # the name every new ledger line records
ACCOUNTANTS: dict[str, Callable[[HistoryLike, float], float]] = {PLD: pld_epsilon, RDP: rdp_epsilon}
# Calibration never tries noise below this: a sample rate and budget that would allow less
# are far outside DP-SGD's use, and the PLD of such weak noise is huge and slow to compose.
# Returning this floor instead of a smaller multiplier only adds noise (sound, not tight).
MIN_NOISE = 0.25
MAX_NOISE = 1e4


def epsilon(history: HistoryLike, delta: float) -> float:
    """Epsilon spent by ``history`` at ``delta`` by the ledger's accountant (0.0 when empty)."""
    return pld_epsilon(history, delta)


def accountant_epsilon(name: str, history: HistoryLike, delta: float) -> float:
    """Epsilon of ``history`` by the accountant a ledger line names (to recheck old lines)."""
    try:
        return ACCOUNTANTS[name](history, delta)
    except KeyError:
        raise ValueError(f"unknown accountant {name!r}; fedmed knows {', '.join(sorted(ACCOUNTANTS))}") from None


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
    floor: float = 0.0,
    tolerance: float = 0.005,
) -> float:
    """The smallest noise multiplier (to ``tolerance`` relative) for which ``spent`` plus
    ``steps`` steps at ``sample_rate`` stays at or below ``target_epsilon`` by the ledger's
    accountant. ``floor`` is the largest epsilon the site's ledger already recorded (an
    older accountant's, perhaps): a site that recorded the target has nothing left."""
    spent = list(spent)
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be positive, got {target_epsilon}")
    already = max(epsilon(spent, delta), floor)
    if already >= target_epsilon:
        raise ValueError(
            f"the site has already spent epsilon={already:.3f} at delta={delta:g}, "
            f"which reaches its target {target_epsilon:g}; no noise level fits"
        )

    def fits(sigma: float) -> bool:
        return epsilon(extend(spent, sigma, sample_rate, steps), delta) <= target_epsilon

    low, high = _bracket(fits, _rdp_guess(target_epsilon, delta, sample_rate, steps, spent))
    while (high - low) / high > tolerance:
        middle = (low + high) / 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _bracket(fits: Callable[[float], bool], guess: float) -> tuple[float, float]:
    """(low, high) with ``fits(high)`` and not ``fits(low)``, searched from ``guess``; low is
    MIN_NOISE itself when even that fits (then MIN_NOISE is returned: more noise than needed)."""
    high = max(guess, MIN_NOISE)
    while not fits(high):
        high *= 1.5
        if high > MAX_NOISE:
            raise ValueError("no noise multiplier reaches this epsilon with these settings")
    low = high / 1.25
    while low > MIN_NOISE and fits(low):
        high, low = low, low / 1.25
    if low > MIN_NOISE:
        return low, high
    return (MIN_NOISE, MIN_NOISE) if fits(MIN_NOISE) else (MIN_NOISE, high)


def _rdp_guess(target_epsilon: float, delta: float, sample_rate: float, steps: int, spent: History) -> float:
    """RDP's noise multiplier for the same target: cheap to find, and close above the ledger
    accountant's (RDP is the looser bound), so the search starts next to its answer."""

    def rdp(history: History) -> float:
        return rdp_epsilon(history, delta, GUESS_ORDERS)

    if rdp(spent) >= target_epsilon:
        return 1.0  # RDP sees no room where the tighter accountant does: search from a typical value
    low, high = MIN_NOISE, 1.0
    while rdp(extend(spent, high, sample_rate, steps)) > target_epsilon and high < MAX_NOISE:
        low, high = high, high * 2
    for _ in range(20):  # to 1e-6 of the bracket: RDP is cheap, and a close start saves PLD work
        middle = (low + high) / 2
        if rdp(extend(spent, middle, sample_rate, steps)) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high
