"""A second, independent epsilon for a site's history: the RDP accountant.

The ledger's accountant is the PLD accountant of Google's ``dp-accounting``
(``fedmed.privacy.pld``), a numerical composition of privacy loss distributions. The
report's second opinion is Renyi DP with Opacus's analysis (``fedmed.privacy.rdp``): a
different method in a different library, reading the same ``(noise_multiplier,
sample_rate, steps)`` history. It is the looser of the two sound bounds (by about a tenth on
fedmed's histories), so a report shows how much the ledger's choice of accountant saves and
that the ledger never claims more than a second method could justify.
"""

from __future__ import annotations

from fedmed.privacy.history import HistoryLike
from fedmed.privacy.rdp import NAME, rdp_epsilon

SECOND_OPINION = NAME


def second_opinion_epsilon(history: HistoryLike, delta: float) -> float:
    """Upper bound on epsilon at ``delta`` by RDP (0.0 for an empty history).

    Raises ValueError when the accountant cannot evaluate these parameters."""
    try:
        return rdp_epsilon(history, delta)
    except (RuntimeError, ArithmeticError, OverflowError) as exc:
        raise ValueError(f"the RDP accountant cannot evaluate this history: {exc}") from exc
