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

from fedmed.privacy.accounting import History

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
def _pld_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """What dp-accounting's ``PLDAccountant`` gives for these Poisson-subsampled Gaussian
    steps, composed the same way, with each step's distribution built once per (noise,
    rate) instead of once per report row (a report asks for every round's prefix)."""
    try:
        composed = None
        for sigma, rate, steps in history:
            segment = _step_pld(sigma, rate).self_compose(steps)
            composed = segment if composed is None else composed.compose(segment)
        return float(composed.get_epsilon_for_delta(delta))
    except (ValueError, RuntimeError, ArithmeticError, OverflowError) as exc:
        raise ValueError(f"the PLD accountant cannot evaluate this history: {exc}") from exc


@lru_cache(maxsize=64)
def _step_pld(sigma: float, rate: float):
    """One Poisson-subsampled Gaussian step's privacy loss distribution (add-or-remove-one
    neighbours, pessimistic discretisation: the PLDAccountant's defaults)."""
    from dp_accounting.pld import privacy_loss_distribution  # imported here: it loads scipy

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=rate, value_discretization_interval=DISCRETISATION)
