"""Renyi DP (RDP) accounting of a site's history, with Opacus's analysis.

RDP was the ledger's accountant until issue 27 and is now the report's second opinion: a
separate method and implementation (moments of the privacy loss, not its distribution), so
a report can show that the ledger's number is the tighter of two sound bounds. It also
brackets the ledger accountant's noise calibration cheaply (``fedmed.privacy.accounting``).
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np

from fedmed.privacy.history import HistoryLike

NAME = "rdp"
# RDP orders searched for the tightest conversion to (epsilon, delta): fine steps near 1,
# where large epsilons are decided, integers up to 64 and coarser ones up to 256, where
# small epsilons are. (Fractional orders are costly to evaluate, so they are few.)
RDP_ORDERS = tuple(
    [1.05, *np.round(np.arange(1.1, 2.0, 0.1), 2), *np.arange(2.0, 10.0, 0.5), *range(10, 65), *range(72, 257, 8)]
)
# Integer orders only, for the noise calibration's starting guess: each costs a fifth of a
# fractional one, and a guess a little looser than RDP_ORDERS' still starts the search close.
GUESS_ORDERS = tuple([*range(2, 65), *range(72, 257, 8)])


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at every order (Opacus's analysis)."""
    from opacus.accountants.analysis import rdp as opacus_rdp  # opacus loads 1 s of modules

    return np.asarray(opacus_rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders))


def rdp_epsilon(history: HistoryLike, delta: float, orders: tuple[float, ...] = RDP_ORDERS) -> float:
    """Epsilon spent by ``history`` at ``delta`` by RDP at ``orders`` (0.0 for an empty history).

    RDP adds up over steps and mechanisms; the total is converted once, at the best order.
    """
    if not history:
        return 0.0
    from opacus.accountants.analysis import rdp as opacus_rdp

    total = sum(steps * _rdp_per_step(float(sigma), float(rate), orders) for sigma, rate, steps in history)
    with warnings.catch_warnings():
        # Opacus warns when the smallest order is the best one, which happens for the very
        # large epsilons tried while calibrating noise; the result is still a valid bound.
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        eps, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)
