"""The two ways a round is aggregated, one interface (``play``): FedAvg on updates sent in
clear (``PlainRound``) and secure aggregation (``SecureRound``, see ``fedmed.flower.secagg``),
where the coordinator learns only the sum. The run loop (``fedmed.flower.coordinator``)
chooses one per run and never asks which."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import numpy as np
from flwr.app import MessageType

from fedmed.coordinator.aggregation import (
    aggregate_round,
    apply_move,
    round_norm_bound,
    scale_to_bound,
    state_norm,
    weight_cap,
)
from fedmed.coordinator.outcome import RoundOutcome
from fedmed.coordinator.replies import MaskedUpdates, PlainUpdates, UpdateFormat
from fedmed.flower.secagg_coordinator import SecureRoundFailed, SecureSum
from fedmed.protocol import RoundStatus

if TYPE_CHECKING:
    from fedmed.flower.coordinator import FederatedRun

log = logging.getLogger("fedmed.coordinator")
SECURE_STAGE_TIMEOUT = 60.0  # seconds to wait for secure aggregation's key and share stages (milliseconds of work)

State = dict[str, np.ndarray]


class RoundKind(Protocol):
    updates: UpdateFormat  # what a trained reply carries

    def play(
        self, loop: FederatedRun, round_number: int, chosen: list[int], state: State
    ) -> tuple[RoundOutcome, State | None]:
        """Ask ``chosen`` to train from ``state``; the outcome and the sites' combined model
        (None: too few valid updates, the round changes nothing)."""
        ...


class PlainRound:
    updates: UpdateFormat = PlainUpdates()

    def play(
        self, loop: FederatedRun, round_number: int, chosen: list[int], state: State
    ) -> tuple[RoundOutcome, State | None]:
        messages = [loop.message(MessageType.TRAIN, node, state, round_number) for node in chosen]
        outcome = loop.collect(round_number, *loop.exchange(messages))
        if len(outcome.updates) < loop.run.min_sites:
            return outcome, None
        return outcome, self.aggregate(loop, round_number, state, outcome)

    @staticmethod
    def aggregate(loop: FederatedRun, round_number: int, state: State, outcome: RoundOutcome) -> State:
        """The sites' combined model (``fedmed.coordinator.aggregation``); what was bounded goes into ``outcome``."""
        reports = [outcome.site_metrics[u.site] for u in outcome.updates]
        combined, bounded = aggregate_round(
            loop.run, round_number, state, outcome.updates, reports=reports, trained_parameters=loop.trained_parameters
        )
        outcome.norm_bound, outcome.clipped = bounded.norm_bound, bounded.clipped
        for name, reason in bounded.clipped.items():
            log.warning("round %d: update of %s bounded: %s", round_number, name, reason)
        return combined


class SecureRound:
    updates: UpdateFormat = MaskedUpdates()

    def play(
        self, loop: FederatedRun, round_number: int, chosen: list[int], state: State
    ) -> tuple[RoundOutcome, State | None]:
        """The coordinator learns the sum of the sites' bounded, weighted moves and of their
        weight shares, and moves the model by their ratio, itself bounded."""
        run = loop.run
        secure = SecureSum(round_number, chosen)
        outcome = RoundOutcome()
        try:
            stage_timeout = min(run.round_timeout, SECURE_STAGE_TIMEOUT)
            secure.take_keys(loop.exchange(secure.keys_messages(), stage_timeout)[0])
            secure.take_shares(loop.exchange(secure.shares_messages(), stage_timeout)[0])
            outcome = loop.collect(
                round_number,
                *loop.exchange(
                    secure.train_messages(lambda node: loop.message(MessageType.TRAIN, node, state, round_number))
                ),
            )
            secure.take_masked(outcome.masked)
            total, count = secure.unmask(loop.exchange(secure.unmask_messages(), stage_timeout)[0])
        except SecureRoundFailed as error:
            outcome.secure = {"threshold": secure.threshold, "failed": str(error)}
            log.warning("round %d: secure aggregation failed: %s", round_number, error)
            return outcome, None
        outcome.secure = {
            "threshold": secure.threshold,
            "summed": count,
            "dropped": [loop.names.name(n) for n in secure.dropped],
        }
        share = float(total[-1])
        outcome.examples = share * weight_cap(run)
        if not 0 < share <= count + 1e-6:
            outcome.secure["failed"] = (
                f"the {count} sites' weight shares sum to {share:.6g}, outside 0..{count}: a site broke the protocol"
            )
            return outcome, None
        if count < run.min_sites:
            return outcome, None  # recorded as too few valid updates, as without secure aggregation
        move = total[:-1] / share
        reports = [m for m in outcome.site_metrics.values() if m.get("status") == RoundStatus.TRAINED]
        outcome.norm_bound = round_norm_bound(run, round_number, reports, loop.trained_parameters, state_norm(state))
        norm = scale_to_bound(move, outcome.norm_bound)
        if norm is not None:
            outcome.clipped["aggregate"] = (
                f"summed move's norm {norm:.4g} above the bound {outcome.norm_bound:.4g}: scaled down to it"
            )
        return outcome, apply_move(state, move)
