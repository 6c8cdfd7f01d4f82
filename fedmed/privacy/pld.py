"""Privacy loss distribution (PLD) accounting of a site's history: the ledger's accountant.

Google's ``dp-accounting`` builds the privacy loss distribution of each Poisson-subsampled
Gaussian mechanism and composes them numerically. With a pessimistic discretisation
(``pessimistic_estimate``, the default) every step of that numerical work rounds towards
more privacy loss, so the result is an upper bound on the true epsilon, not an estimate,
and both neighbour directions (adding and removing one record) are composed and the worse
one taken: the same add-or-remove neighbours as the RDP analysis. It is tighter than RDP by
about a tenth on fedmed's histories (BENCHMARKS.md, "Accountant (issue 27)").

Speed: a site's history alternates DP-SGD rounds and releases, hundreds of entries over its
life, but only a few distinct mechanisms. Composition does not depend on order, so the
history is grouped by mechanism first (``fedmed.privacy.history.grouped``) and each group is
one self-composition. Composed prefixes of grouped histories are kept, so the next round (or
a calibration trial, always the last group) is one composition away from one done before.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache
from typing import TYPE_CHECKING

from fedmed.privacy.history import HistoryLike, grouped

if TYPE_CHECKING:
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

NAME = "pld"
DISCRETISATION = 1e-3  # the PLD's grid of privacy-loss values; finer is tighter and slower
# Pessimistic rounding on the grid costs a roughly fixed amount of epsilon (up to about 0.1
# over 10^4 to 10^5 steps at small sample rates), which matters only for small epsilons:
# below this the history is composed again on a ten times finer grid (cheap there, as the
# privacy loss then spans a short range) and the smaller of the two sound bounds is kept.
REFINE_BELOW = 0.5
Groups = tuple[tuple[float, float, int], ...]  # a grouped history, hashable

_PREFIXES: OrderedDict[tuple[float, Groups], PrivacyLossDistribution] = OrderedDict()
PREFIXES_KEPT = 256  # composed prefixes kept, least recently used dropped first (each a few MB at most)


def pld_epsilon(history: HistoryLike, delta: float) -> float:
    """Upper bound on epsilon at ``delta`` of ``history`` (0.0 for an empty one).

    Raises ValueError when dp-accounting cannot evaluate these parameters: a caller must
    never read that as a small epsilon."""
    groups = grouped(history)
    if not groups:
        return 0.0
    return _epsilon(groups, float(delta))


@lru_cache(maxsize=4096)
def _epsilon(groups: Groups, delta: float) -> float:
    try:
        coarse = float(_composed(groups, DISCRETISATION).get_epsilon_for_delta(delta))
        if coarse >= REFINE_BELOW:
            return coarse
        return min(coarse, float(_composed(groups, DISCRETISATION / 10).get_epsilon_for_delta(delta)))
    except (ValueError, RuntimeError, ArithmeticError, OverflowError, MemoryError) as exc:
        raise ValueError(f"the PLD accountant cannot evaluate this history: {exc}") from exc


def _composed(groups: Groups, grid: float) -> PrivacyLossDistribution:
    """The privacy loss distribution of ``groups`` on ``grid``, built on its longest prefix
    composed before."""
    start = next((n for n in range(len(groups), 0, -1) if (grid, groups[:n]) in _PREFIXES), 0)
    composed = _PREFIXES[(grid, groups[:start])] if start else None
    if start:
        _PREFIXES.move_to_end((grid, groups[:start]))
    for n in range(start, len(groups)):
        sigma, rate, steps = groups[n]
        segment = _step_pld(sigma, rate, grid).self_compose(steps)
        composed = segment if composed is None else composed.compose(segment)
        _PREFIXES[(grid, groups[: n + 1])] = composed
    while len(_PREFIXES) > PREFIXES_KEPT:
        _PREFIXES.popitem(last=False)
    if composed is None:  # callers answer an empty history themselves (epsilon 0)
        raise ValueError("an empty history has no privacy loss distribution")
    return composed


@lru_cache(maxsize=64)
def _step_pld(sigma: float, rate: float, grid: float) -> PrivacyLossDistribution:
    """One Poisson-subsampled Gaussian step's privacy loss distribution: add-or-remove-one
    neighbours, pessimistic discretisation, connect-the-dots (dp-accounting's defaults)."""
    from dp_accounting.pld import privacy_loss_distribution  # imported here: it loads scipy

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=rate, value_discretization_interval=grid
    )
