"""Adaptive clipping: the clip norm follows a quantile of the records' gradient norms.

Andrew, Thakkar, McMahan & Ramaswamy, "Differentially private learning with adaptive
clipping", NeurIPS 2021. A fixed clip norm C is either too small (most gradients are cut
short, the update is biased) or too large (the noise, proportional to C, drowns the
signal), and the right value moves as training goes on. Instead, each DP-SGD step also
counts, on the same Poisson sample, the records whose gradient norm was at most C, and C
moves geometrically towards the target quantile gamma of the norms:

    b_noisy = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2,   b_i = 1[||g_i|| <= C]
    C      <- C * exp(-eta * (b_noisy - gamma))

where m is the expected number of records per step (sample rate x records). Each record
adds b_i - 1/2, +1/2 or -1/2, so adding or removing one changes the count by at most 1/2.

Privacy. The step releases two sums of the same sample: the clipped gradients
(sensitivity C, noise std z_grad * C) and the count (sensitivity 1/2, noise std sigma_b).
Each divided by its noise std is a Gaussian query with noise 1 and sensitivity 1/z_grad and
1/(2 sigma_b); together they are ONE Gaussian mechanism of L2 sensitivity
sqrt(z_grad^-2 + (2 sigma_b)^-2), whose noise multiplier is

    z_eff = (z_grad^-2 + (2 sigma_b)^-2)^(-1/2)        (as in Andrew et al.).

This is exact, not a bound of a bound: the site calibrates z_eff as it calibrates a fixed
clip norm's noise, its ledger and accountant compose z_eff, and training splits it
(``split_noise``): sigma_b = max(m / 20, z_eff) (the paper recommends m / 20; the floor at
z_eff keeps z_grad defined and at most 2 / sqrt(3) = 1.155 times z_eff), and the gradient
noise z_grad from the formula above, a little above z_eff (1.012 z_eff at m = 64, z_eff = 1).

The run's ``max_grad_norm`` is the clip norm's start and its ceiling: the coordinator bounds
an honest site's update with it (``fedmed.coordinator.aggregation.honest_norm_bound``), so a
site never clips above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# sigma_b = expected records per step / COUNT_NOISE_SHARE (Andrew et al.'s recommendation)
COUNT_NOISE_SHARE = 20.0
# The clip norm never falls below this share of its ceiling: a clip norm that underflowed to
# 0 would stop training for good (a geometric update cannot leave 0).
FLOOR_SHARE = 1e-6


def count_noise(noise_multiplier: float, expected_records: float) -> float:
    """sigma_b, the count's noise std: m / 20, but never below the joint multiplier (so the
    gradient noise stays defined and close to it)."""
    return max(expected_records / COUNT_NOISE_SHARE, noise_multiplier)


def split_noise(noise_multiplier: float, expected_records: float) -> tuple[float, float]:
    """(z_grad, sigma_b) whose joint mechanism has exactly ``noise_multiplier`` (z_eff)."""
    if noise_multiplier <= 0 or expected_records <= 0:
        raise ValueError(
            f"adaptive clipping needs a positive noise multiplier and expected batch, got {noise_multiplier} "
            f"and {expected_records}"
        )
    sigma_b = count_noise(noise_multiplier, expected_records)
    gradient = (noise_multiplier**-2 - (2 * sigma_b) ** -2) ** -0.5
    return gradient, sigma_b


def joint_noise(gradient_noise: float, count_noise: float) -> float:
    """z_eff of the gradient sum (noise multiplier ``gradient_noise``) and the count (noise
    std ``count_noise``, sensitivity 1/2) released on the same sample."""
    return (gradient_noise**-2 + (2 * count_noise) ** -2) ** -0.5


def noisy_unclipped_share(unclipped: int, drawn: int, noise: float, expected_records: float) -> float:
    """b_noisy: the share of records at most the clip norm, from the noisy sum of b_i - 1/2
    over the ``drawn`` records (``noise`` a draw of N(0, sigma_b^2)); may leave [0, 1]."""
    return (unclipped - drawn / 2 + noise) / expected_records + 0.5


def next_clip_norm(clip_norm: float, share: float, *, quantile: float, learning_rate: float, ceiling: float) -> float:
    """The geometric step towards the ``quantile``: down when more than that share of the
    records was unclipped, up when fewer; never above ``ceiling``."""
    moved = clip_norm * math.exp(-learning_rate * (share - quantile))
    return min(ceiling, max(moved, FLOOR_SHARE * ceiling))


@dataclass(frozen=True)
class AdaptiveClipping:
    """One round's adaptive clipping: where its clip norm starts, and its share of the noise."""

    quantile: float  # gamma, the target share of unclipped records
    learning_rate: float  # eta
    start: float  # the clip norm at the round's first step
    ceiling: float  # the run's max_grad_norm
    gradient_noise: float  # z_grad: the gradient sum's noise std over the clip norm
    count_noise: float  # sigma_b: the count's noise std

    @classmethod
    def for_round(
        cls,
        noise_multiplier: float,
        expected_records: float,
        *,
        quantile: float,
        learning_rate: float,
        start: float,
        ceiling: float,
    ) -> AdaptiveClipping:
        """The round's clipping for the calibrated joint ``noise_multiplier``."""
        gradient, sigma_b = split_noise(noise_multiplier, expected_records)
        return cls(quantile, learning_rate, min(start, ceiling), ceiling, gradient, sigma_b)

    def step(self, clip_norm: float, unclipped: int, drawn: int, noise: float, expected_records: float) -> float:
        """The clip norm after a step that drew ``drawn`` records, ``unclipped`` of them at most
        ``clip_norm``; ``noise`` is the step's N(0, count_noise^2) draw."""
        share = noisy_unclipped_share(unclipped, drawn, noise, expected_records)
        return next_clip_norm(
            clip_norm, share, quantile=self.quantile, learning_rate=self.learning_rate, ceiling=self.ceiling
        )
