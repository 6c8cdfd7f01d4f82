"""The one-run canary audit's lower bound on epsilon (Steinke, Nasr & Jagielski, NeurIPS 2023).

m canaries are each put into a site's training data independently with probability 1/2.
After training, an attacker guesses "included" or "excluded" for r of them and abstains on
the rest. If training is (epsilon, delta)-DP for one record, and every canary is one record,
the number V of correct guesses satisfies for every v (the paper's main theorem, with delta):

    P[V >= v] <= B(v) + 2 m delta max over 1 <= i <= v of (B(v - i) - B(v)) / i,
    B(k) = P[Binomial(r, e^eps / (1 + e^eps)) >= k].

An observed v whose right-hand side is below alpha rejects the (epsilon, delta) claim at
confidence 1 - alpha; the largest epsilon rejected so is the audit's lower bound. The
right-hand side grows with epsilon, so that epsilon is found by bisection.

The attacker fixes in advance the few guess counts it will try (``GUESS_FRACTIONS``) and
splits alpha between them (Bonferroni), so choosing the best count after seeing the scores
keeps the confidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

# Guess "included" for the k highest scores and "excluded" for the k lowest, for k = each
# fraction of the canaries (rounded, at least 1); abstain on the rest.
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)
LARGEST_EPSILON = 50.0  # where the search stops: no DP training claims more
SEARCH_STEPS = 60  # bisection steps: 50 / 2^60 is far below any epsilon of interest


@dataclass(frozen=True)
class AuditBound:
    """The audit's outcome: its lower bound and the guesses behind it."""

    epsilon: float  # lower bound on epsilon at ``confidence`` (0.0: nothing rejected)
    confidence: float
    canaries: int  # m
    included: int  # canaries that were trained on
    guesses: int  # r: the guesses of the best guess count
    correct: int  # v: how many of them were right
    delta: float

    def to_json(self) -> dict:
        return {
            "epsilon_lower_bound": self.epsilon,
            "confidence": self.confidence,
            "canaries": self.canaries,
            "included": self.included,
            "guesses": self.guesses,
            "correct": self.correct,
            "delta": self.delta,
        }


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The largest probability an (epsilon, delta)-DP training allows for ``correct`` or
    more right guesses out of ``guesses`` about ``canaries`` canaries."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}")
    if correct == 0:
        return 1.0
    right = 1.0 / (1.0 + np.exp(-epsilon))  # e^eps / (1 + e^eps): an ideal guess's chance of being right

    def at_least(k: np.ndarray | int) -> np.ndarray:
        return np.asarray(binom.sf(np.asarray(k) - 1, guesses, right))

    tail = float(at_least(correct))
    if delta == 0:
        return min(tail, 1.0)
    shifts = np.arange(1, correct + 1)
    slack = float(np.max((at_least(correct - shifts) - tail) / shifts))
    return min(tail + 2 * canaries * delta * slack, 1.0)


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float, alpha: float) -> float:
    """The largest epsilon that ``correct`` right guesses out of ``guesses`` reject at
    level ``alpha`` (0.0 when even epsilon 0 is not rejected)."""
    if p_value(canaries, guesses, correct, 0.0, delta) > alpha:
        return 0.0
    low, high = 0.0, LARGEST_EPSILON
    if p_value(canaries, guesses, correct, high, delta) <= alpha:
        return high
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(canaries, guesses, correct, middle, delta) <= alpha else (low, middle)
    return low


def audit_bound(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95) -> AuditBound:
    """The best lower bound over the guess counts fixed in advance (``GUESS_FRACTIONS``),
    each tested at ``(1 - confidence) / len(GUESS_FRACTIONS)``.

    ``scores``: the attacker's score of each canary, higher meaning "more likely trained on";
    ``included``: whether each canary really was (the truth the guesses are checked against).
    """
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1 or len(scores) < 2:
        raise ValueError("need one score and one inclusion flag for each of at least 2 canaries")
    if not np.isfinite(scores).all():
        raise ValueError("every canary's score must be finite")
    m = len(scores)
    alpha = (1.0 - confidence) / len(GUESS_FRACTIONS)
    order = np.argsort(-scores, kind="stable")  # highest score first
    best = AuditBound(0.0, confidence, m, int(included.sum()), 0, 0, delta)
    for fraction in GUESS_FRACTIONS:
        k = max(1, min(m // 2, round(fraction * m)))
        correct = int(included[order[:k]].sum() + (~included[order[m - k :]]).sum())
        bound = epsilon_lower_bound(m, 2 * k, correct, delta, alpha)
        if bound > best.epsilon or best.guesses == 0:
            best = AuditBound(bound, confidence, m, int(included.sum()), 2 * k, correct, delta)
    return best
