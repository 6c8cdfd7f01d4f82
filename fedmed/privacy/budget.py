"""Each site's privacy settings, noise calibration and budget enforcement.

The site, not the server, decides how much noise it adds and whether it trains at all:

* the noise multiplier is calibrated at a run's first round so that the site's whole
  history plus the run's planned rounds lands at (not above) ``target_epsilon``, and so
  that the run's own mechanisms (its rounds and releases, composed alone) land at (not
  above) ``max_epsilon_per_run``: the larger of the two noise levels is used, and then kept
  for every later round of that run, also after a restart;
* before each round the site computes the epsilon it would reach; if that exceeds
  ``max_epsilon`` it refuses the round, and if the run's own epsilon would exceed
  ``max_epsilon_per_run`` it refuses it too. The per-run ceiling is what keeps one run, and
  so one coordinator that starts it, from taking the site's whole lifetime budget (a
  coordinator that lies about the number of rounds is refused at the ceiling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedmed.config import RunSettings, SiteSettings, exact_releases
from fedmed.privacy.accounting import (
    HistoryLike,
    calibrate_noise,
    check_delta,
    default_delta,
    epsilon,
    extend,
    round_plan,
)
from fedmed.privacy.ledger import PrivacyLedger


@dataclass(frozen=True)
class PrivacyConfig:
    """A site's privacy settings. ``dp=False`` is for non-private baselines only."""

    dp: bool = True
    target_epsilon: float = 8.0
    max_epsilon: float | None = None  # the hard budget; defaults to target_epsilon
    # The most one run may spend, its own mechanisms composed alone (None: only the lifetime budget)
    max_epsilon_per_run: float | None = None
    delta: float | None = None  # defaults to default_delta(n)
    max_grad_norm: float = RunSettings.max_grad_norm  # the clip norm; under adaptive clipping its start and ceiling
    clip_quantile: float = RunSettings.clip_quantile  # 0: fixed clipping; see fedmed.privacy.adaptive_clipping
    clip_learning_rate: float = RunSettings.clip_learning_rate
    planned_rounds: int = 1
    privacy_unit: str = SiteSettings.privacy_unit  # "patient" or "image": see fedmed.train
    release_share: float = SiteSettings.release_share  # see fedmed.privacy.release
    release_exact: str = SiteSettings.release_exact  # statistics sent without DP, comma-separated

    def __post_init__(self) -> None:
        if self.dp and self.target_epsilon <= 0:
            raise ValueError(f"target_epsilon must be positive, got {self.target_epsilon}")
        if self.max_epsilon is not None and self.max_epsilon <= 0:
            raise ValueError(f"max_epsilon must be positive, got {self.max_epsilon}")
        if self.max_epsilon_per_run is not None and self.max_epsilon_per_run <= 0:
            raise ValueError(f"max_epsilon_per_run must be positive, got {self.max_epsilon_per_run}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if not 0 <= self.clip_quantile < 1:
            raise ValueError(f"clip_quantile must be in [0, 1) (0: fixed clipping), got {self.clip_quantile}")
        if self.clip_learning_rate <= 0:
            raise ValueError(f"clip_learning_rate must be positive, got {self.clip_learning_rate}")
        if self.planned_rounds < 1:
            raise ValueError(f"planned_rounds must be at least 1, got {self.planned_rounds}")

    @classmethod
    def from_settings(cls, site: SiteSettings, run: RunSettings) -> PrivacyConfig:
        """A site's privacy for one run: its own budget, the run's clipping norm and rounds."""
        return cls(
            dp=site.dp,
            target_epsilon=site.target_epsilon or site.max_epsilon,
            max_epsilon=site.max_epsilon if site.dp else None,
            max_epsilon_per_run=per_run_ceiling(site) if site.dp else None,
            delta=site.delta or None,
            max_grad_norm=run.max_grad_norm,
            clip_quantile=run.clip_quantile,
            clip_learning_rate=run.clip_learning_rate,
            planned_rounds=run.rounds,
            privacy_unit=site.privacy_unit,
            release_share=site.release_share,
            release_exact=site.release_exact,
        )

    @property
    def exact_releases(self) -> frozenset[str]:
        return exact_releases(self.release_exact)

    @property
    def adaptive_clipping(self) -> bool:
        """Whether DP rounds move the clip norm towards ``clip_quantile``."""
        return self.dp and self.clip_quantile > 0

    @property
    def budget(self) -> float | None:
        return self.max_epsilon if self.max_epsilon is not None else (self.target_epsilon if self.dp else None)


def per_run_ceiling(site: SiteSettings) -> float:
    """The site's ``max_epsilon_per_run``; 0 stands for half of ``max_epsilon``, so that no
    single run (whoever starts it) takes more than half of the site's lifetime budget."""
    return site.max_epsilon_per_run or site.max_epsilon / 2


@dataclass(frozen=True)
class RoundPrivacy:
    """The site's decision for one round and the mechanism it will run."""

    allowed: bool
    dp: bool
    delta: float
    sample_rate: float
    steps: int
    noise_multiplier: float
    epsilon_before: float
    epsilon_after: float
    reason: str = ""


def plan_round_privacy(
    config: PrivacyConfig,
    ledger: PrivacyLedger,
    run_id: str,
    *,
    examples: int,
    batch_size: float,
    epochs: int,
    local_steps: int = 0,
    reserved: HistoryLike = (),
) -> RoundPrivacy:
    """Decide whether this round may run, and with how much noise. ``examples`` counts the
    protected records (images or patients) and ``batch_size`` the expected records per step;
    ``reserved`` is what the run's releases still to come will spend (calibration leaves
    room for them)."""
    delta = config.delta if config.delta is not None else default_delta(examples)
    check_delta(delta, examples)
    sample_rate, steps = round_plan(examples, batch_size, epochs, local_steps)
    before = ledger.epsilon(delta)

    def refuse(reason: str, after: float = math.inf, sigma: float = 0.0) -> RoundPrivacy:
        return RoundPrivacy(False, config.dp, delta, sample_rate, steps, sigma, before, after, reason)

    if not config.dp:
        if config.max_epsilon is not None:
            return refuse(
                f"non-private training would spend an unbounded budget, and this site has "
                f"max_epsilon={config.max_epsilon:g}; remove max_epsilon for a non-private baseline"
            )
        return RoundPrivacy(
            True,
            False,
            delta,
            sample_rate,
            steps,
            0.0,
            before,
            math.inf,
            "NON-PRIVATE round: no differential privacy guarantee",
        )
    if ledger.non_private_rounds:
        return refuse(f"the ledger {ledger.path} holds non-private rounds, so no privacy budget is left")

    budget = config.budget
    ceiling = config.max_epsilon_per_run
    run_history = ledger.run_history(run_id)
    run_before = epsilon(run_history, delta)
    earlier = ledger.run_entries(run_id)
    if earlier:
        sigma = earlier[0].noise_multiplier
    else:
        try:
            sigma = calibrate_noise(
                config.target_epsilon,
                delta,
                sample_rate,
                steps * config.planned_rounds,
                spent=[*ledger.history, *reserved],
                floor=ledger.recorded_epsilon(delta),
            )
        except ValueError as exc:
            return refuse(f"budget exhausted: {exc}")
        if ceiling is not None:
            if run_before >= ceiling:
                return refuse(
                    f"per-run ceiling reached: run {run_id} has already spent epsilon {run_before:.3f} "
                    f"by itself (delta={delta:g}), the site's max_epsilon_per_run {ceiling:g}"
                )
            try:  # the run alone lands at its ceiling: the larger noise of the two wins
                sigma = max(
                    sigma,
                    calibrate_noise(
                        ceiling, delta, sample_rate, steps * config.planned_rounds, spent=[*run_history, *reserved]
                    ),
                )
            except ValueError as exc:
                return refuse(f"per-run ceiling reached (max_epsilon_per_run {ceiling:g}): {exc}")
    after = ledger.epsilon_of(extend(ledger.history, sigma, sample_rate, steps), delta)
    if budget is not None and after > budget:
        return refuse(
            f"budget exhausted: this round would take epsilon from {before:.3f} to {after:.3f} "
            f"(delta={delta:g}), above the site's max_epsilon {budget:g}",
            after,
            sigma,
        )
    run_after = epsilon(extend(run_history, sigma, sample_rate, steps), delta)
    if ceiling is not None and run_after > ceiling:
        return refuse(
            f"per-run ceiling reached: this round would take run {run_id}'s own epsilon (its rounds and releases "
            f"composed alone) from {run_before:.3f} to {run_after:.3f} (delta={delta:g}), above the site's "
            f"max_epsilon_per_run {ceiling:g}",
            after,
            sigma,
        )
    return RoundPrivacy(True, True, delta, sample_rate, steps, sigma, before, after)
