"""FedAvg rounds in one process: each virtual site does exactly what a fedmed site does in a
round (``SiteWork.train``: its data, its own ledger, DP-SGD at its own budget) and the
server step is fedmed's (``aggregate_round``, then ``server_step``), without Flower's
processes in between, so a round costs only the sites' training.

For recipe probes (benchmarks/fedavg_probe.py) and audits (``fedmed audit``), where many
runs are needed; ``fedmed-simulate`` runs the same rounds through Flower's runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedmed.config import RunSettings
from fedmed.coordinator.aggregation import aggregate_round
from fedmed.coordinator.fedavg import SiteUpdate, server_step
from fedmed.model import ModelConfig, build_model
from fedmed.protocol import SiteReply
from fedmed.site.work import SiteWork
from fedmed.vector import pack, unpack


@dataclass(frozen=True)
class RoundView:
    """One finished round, as a caller watching the rounds sees it."""

    number: int
    previous: dict[str, np.ndarray]  # the global model the round began from
    state: dict[str, np.ndarray]  # the global model after the round
    replies: list[SiteReply]  # every site's reply, trained or not
    norm_bound: float | None  # the round's bound on an update's norm (None: nothing aggregated)


def run_rounds(
    run: RunSettings,
    sites: list[SiteWork],
    state: dict[str, np.ndarray],
    on_round: Callable[[RoundView], None] | None = None,
) -> dict[str, np.ndarray]:
    """``run.rounds`` rounds from the global model ``state``; returns the final global model."""
    model = build_model(ModelConfig.from_settings(run), seed=run.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    velocity = None
    for round_number in range(1, run.rounds + 1):
        previous = state
        replies = [site.train(run, pack(state), round_number) for site in sites]
        trained = [(r, r.model) for r in replies if r.model is not None]
        norm_bound = None
        if trained:
            updates = [SiteUpdate(r.site, int(r.metrics["examples"]), unpack(vector, state)) for r, vector in trained]
            combined, bounded = aggregate_round(
                run, round_number, state, updates, reports=[r.metrics for r, _ in trained], trained_parameters=trainable
            )
            norm_bound = float(bounded.norm_bound) if np.isfinite(bounded.norm_bound) else None
            state, velocity = server_step(state, combined, velocity, run.server_learning_rate, run.server_momentum)
        if on_round is not None:
            on_round(RoundView(round_number, previous, state, replies, norm_bound))
    return state
