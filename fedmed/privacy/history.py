"""A site's privacy history: the mechanisms it ran, as parameters any accountant can compose.

Each entry is a run of ``steps`` Poisson-subsampled Gaussian mechanisms ``(noise_multiplier,
sample_rate, steps)``: a DP-SGD round, or a Gaussian release (a full-batch step, rate 1.0).
The ledger stores the whole history with every line, so any accountant, including one added
after the line was written, can recompose it.
"""

from __future__ import annotations

from collections.abc import Sequence

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps), oldest first
HistoryLike = Sequence[tuple[float, float, int]]  # a History or any read-only sequence of its entries


def extend(history: HistoryLike, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """``history`` plus ``steps`` more steps, merged into the last run when it matches."""
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        return [*history[:-1], (noise_multiplier, sample_rate, history[-1][2] + steps)]
    return [*history, (noise_multiplier, sample_rate, steps)]


def grouped(history: HistoryLike) -> tuple[tuple[float, float, int], ...]:
    """The same mechanisms with the steps of each (noise, rate) added up, in order of first
    appearance. Composition does not depend on order, so this is the same guarantee; it lets
    a long history of alternating rounds and releases compose as a few self-compositions."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, rate, count in history:
        key = (float(sigma), float(rate))
        steps[key] = steps.get(key, 0) + int(count)
    return tuple((sigma, rate, count) for (sigma, rate), count in steps.items() if count > 0)
