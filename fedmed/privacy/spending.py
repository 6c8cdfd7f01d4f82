"""A round's claim on a site's privacy budget, as one transaction on its ledger: lock the
ledger, plan the round's noise against everything already spent (``plan_round_privacy``),
then either record a refusal or train and record the spend. Nothing trains outside the
lock, and nothing is trained that the ledger does not record."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from fedmed.numbers import finite_or_none
from fedmed.privacy.accounting import ACCOUNTANT, HistoryLike, extend
from fedmed.privacy.adaptive_clipping import AdaptiveClipping
from fedmed.privacy.budget import PrivacyConfig, RoundPrivacy, plan_round_privacy
from fedmed.privacy.ledger import LedgerEntry, LedgerRefusal, PrivacyLedger, timestamp_now
from fedmed.protocol import RoundStatus

log = logging.getLogger("fedmed")


@dataclass(frozen=True)
class SpendRequest:
    """One round's claim: whose, for which run and round, and over how many records."""

    site: str
    run_id: str
    round: int
    records: int  # the protected records: images, or patients
    examples: int  # the training images
    expected_batch: float  # expected records per step
    epochs: int
    steps: int  # 0: ``epochs`` passes
    unit: str  # "image" or "patient"


@dataclass(frozen=True)
class RoundResult:
    """What a site reports about one round: scalars only."""

    status: RoundStatus
    dp: bool
    examples: int
    steps: int
    loss: float | None
    epsilon: float  # cumulative after the round (before it, when refused); inf if non-private
    delta: float
    # A trained round's noise on the update over the clip norm (under adaptive clipping the
    # gradient's z_grad, a little above the ledger's joint multiplier), which the coordinator
    # bounds updates with; a refused round's calibrated multiplier.
    noise_multiplier: float
    message: str = ""


@dataclass(frozen=True)
class TrainedRound:
    """What a round's training returns: its mean loss, and the clip norm after its last step
    (under adaptive clipping, where the run's next round starts)."""

    loss: float
    clip_norm: float


def round_clipping(
    privacy: PrivacyConfig, plan: RoundPrivacy, request: SpendRequest, ledger: PrivacyLedger
) -> AdaptiveClipping | None:
    """The round's adaptive clipping (None: a fixed clip norm), continuing where the run's
    last round left its clip norm."""
    if not (privacy.adaptive_clipping and plan.dp and plan.noise_multiplier > 0):
        return None
    return AdaptiveClipping.for_round(
        plan.noise_multiplier,
        plan.sample_rate * request.records,
        quantile=privacy.clip_quantile,
        learning_rate=privacy.clip_learning_rate,
        start=ledger.clip_norm(request.run_id, privacy.max_grad_norm),
        ceiling=privacy.max_grad_norm,
    )


def spend_round(
    ledger: PrivacyLedger,
    privacy: PrivacyConfig,
    request: SpendRequest,
    train: Callable[[RoundPrivacy, AdaptiveClipping | None], TrainedRound],
    reserved: HistoryLike = (),
) -> RoundResult:
    """Run ``train(plan, clipping)`` if the budget allows the round, and record either the
    spend or the refusal. ``clipping`` is None for a fixed clip norm. ``reserved`` is the
    privacy cost of the run's releases still to come (``fedmed.privacy.release``)."""
    with ledger.locked():
        plan = plan_round_privacy(
            privacy,
            ledger,
            request.run_id,
            examples=request.records,
            batch_size=request.expected_batch,
            epochs=request.epochs,
            local_steps=request.steps,
            reserved=reserved,
        )
        if not plan.allowed:
            log.warning(
                "site %s refuses round %s of run %s: %s", request.site, request.round, request.run_id, plan.reason
            )
            ledger.append(
                LedgerRefusal(
                    site=request.site,
                    run_id=request.run_id,
                    round=request.round,
                    timestamp=timestamp_now(),
                    reason=plan.reason,
                    epsilon_before=finite_or_none(plan.epsilon_before),
                    epsilon_after=finite_or_none(plan.epsilon_after),
                    delta=plan.delta,
                    max_epsilon=privacy.budget,
                )
            )
            return RoundResult(
                RoundStatus.BUDGET_EXHAUSTED,
                plan.dp,
                request.examples,
                0,
                None,
                plan.epsilon_before,
                plan.delta,
                plan.noise_multiplier,
                plan.reason,
            )
        if not plan.dp:
            log.warning(
                "site %s: NON-PRIVATE training in round %s of run %s; no privacy guarantee",
                request.site,
                request.round,
                request.run_id,
            )
        clipping = round_clipping(privacy, plan, request, ledger)
        trained = train(plan, clipping)
        ledger.append(
            LedgerEntry(
                site=request.site,
                run_id=request.run_id,
                round=request.round,
                timestamp=timestamp_now(),  # when the round's training ended
                dp=plan.dp,
                examples=request.records,
                steps=plan.steps,
                sample_rate=plan.sample_rate,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=(privacy.max_grad_norm if clipping is None else clipping.start) if plan.dp else 0.0,
                delta=plan.delta,
                epsilon=plan.epsilon_after if plan.dp else None,
                accountant=ACCOUNTANT,
                accountant_state=extend(ledger.history, plan.noise_multiplier, plan.sample_rate, plan.steps)
                if plan.dp
                else ledger.history,
                max_epsilon=privacy.budget,
                max_epsilon_per_run=privacy.max_epsilon_per_run if plan.dp else None,
                target_epsilon=privacy.target_epsilon if plan.dp else None,
                privacy_unit=request.unit,
                **_adaptive_fields(clipping, trained),
            )
        )
    return RoundResult(
        RoundStatus.TRAINED,
        plan.dp,
        request.examples,
        plan.steps,
        trained.loss,
        plan.epsilon_after,
        plan.delta,
        plan.noise_multiplier if clipping is None else clipping.gradient_noise,
        plan.reason,
    )


def _adaptive_fields(clipping: AdaptiveClipping | None, trained: TrainedRound) -> dict:
    """The ledger fields of an adaptive round (none for a fixed clip norm: its line is written without them)."""
    if clipping is None:
        return {}
    return {
        "clip_quantile": clipping.quantile,
        "gradient_noise_multiplier": clipping.gradient_noise,
        "count_noise": clipping.count_noise,
        "clip_norm_after": trained.clip_norm,
        "clip_norm_ceiling": clipping.ceiling,
    }
