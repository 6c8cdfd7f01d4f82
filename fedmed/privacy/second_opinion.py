"""A second, independent epsilon for a site's history: the PLD accountant.

The ledger's RDP accountant (Opacus's analysis) gives an upper bound that is known to be
loose. The privacy loss distribution (PLD) accountant of Google's ``dp-accounting``
library, a separate implementation of a different method, composes the same
Poisson-subsampled Gaussian steps numerically and gives a tighter upper bound
(pessimistic discretisation, add-or-remove-one neighbours as in the RDP analysis). Both
read the same ``(noise_multiplier, sample_rate, steps)`` history, so a report can show
how conservative the ledger is.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from fedmed.privacy.accounting import History

if TYPE_CHECKING:
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

Segments = tuple[tuple[float, float, int], ...]  # a History as a hashable key

SECOND_OPINION = "pld"
DISCRETISATION = 1e-3  # the PLD's grid of privacy-loss values; finer is tighter and slower


def second_opinion_epsilon(history: History, delta: float) -> float:
    """Upper bound on epsilon at ``delta`` by the PLD accountant (0.0 for an empty history).

    Raises ValueError when the accountant cannot evaluate these parameters.
    """
    if not history:
        return 0.0
    return _pld_epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))


@lru_cache(maxsize=1024)
def _pld_epsilon(history: Segments, delta: float) -> float:
    """What dp-accounting's ``PLDAccountant`` gives for these Poisson-subsampled Gaussian
    steps, composed the same way."""
    try:
        return float(_composed(history).get_epsilon_for_delta(delta))
    except (ValueError, RuntimeError, ArithmeticError, OverflowError) as exc:
        raise ValueError(f"the PLD accountant cannot evaluate this history: {exc}") from exc


# Composed distributions of history prefixes: a report asks for every round's prefix of a
# site's history, and each prefix extends the one before by one segment, so each is one
# composition away from a prefix already composed (releases between rounds make many segments).
_PREFIXES: dict[Segments, PrivacyLossDistribution] = {}
PREFIXES_KEPT = 2048


def _composed(history: Segments) -> PrivacyLossDistribution:
    """The privacy loss distribution of ``history``, built on its longest prefix composed
    before (each segment's step distribution built once per (noise, rate))."""
    if len(_PREFIXES) > PREFIXES_KEPT:
        _PREFIXES.clear()
    start = next((n for n in range(len(history), 0, -1) if history[:n] in _PREFIXES), 0)
    composed = _PREFIXES[history[:start]] if start else None
    for n in range(start, len(history)):
        sigma, rate, steps = history[n]
        segment = _step_pld(sigma, rate).self_compose(steps)
        composed = segment if composed is None else composed.compose(segment)
        _PREFIXES[history[: n + 1]] = composed
    if composed is None:  # callers answer an empty history themselves (epsilon 0)
        raise ValueError("an empty history has no privacy loss distribution")
    return composed


@lru_cache(maxsize=64)
def _step_pld(sigma: float, rate: float) -> PrivacyLossDistribution:
    """One Poisson-subsampled Gaussian step's privacy loss distribution (add-or-remove-one
    neighbours, pessimistic discretisation: the PLDAccountant's defaults)."""
    from dp_accounting.pld import privacy_loss_distribution  # imported here: it loads scipy

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=rate, value_discretization_interval=DISCRETISATION
    )
