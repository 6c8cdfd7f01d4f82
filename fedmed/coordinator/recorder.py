"""The coordinator's records of a run, in its run directory: one line per round and per
validation (``metrics.jsonl``, as ``fedmed.records``; ``metrics.csv``, TensorBoard), one
line per reply received (``received.jsonl``: what left each site), the status file, and the
final model with its card. Round records are read back by ``fedmed.coordinator.results``,
the reports and the simulation's summary."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import cast

import numpy as np

from fedmed import protocol
from fedmed.config import PRIVACY_UNITS, RunSettings
from fedmed.coordinator.model_card import model_card, model_card_markdown
from fedmed.coordinator.outcome import RoundOutcome
from fedmed.coordinator.replies import ReplyView
from fedmed.coordinator.results import RunResults
from fedmed.privacy.release import score_errors, scores_from_counts
from fedmed.protocol import RoundStatus
from fedmed.records import RoundRecord, SiteRoundFields, ValidationRecord
from fedmed.rundir import RunDirectory

log = logging.getLogger("fedmed.coordinator")


class RunRecorder:
    def __init__(self, run: RunSettings, run_dir: RunDirectory) -> None:
        self.run = run
        self.run_dir = run_dir
        self.results = RunResults(run_dir)  # metrics.csv and TensorBoard
        self.sites: dict[str, dict] = {}  # per-site summary for the model card
        self.last_validation: dict | None = None  # sites' weighted validation of the latest model
        self.last_held_out: dict | None = None  # the latest evaluation on the coordinator's own data

    def close(self) -> None:
        self.results.close()

    def received(self, round_number: int, node: int, name: str, reply: ReplyView, key_bound: bool) -> None:
        """Record what this reply carried, so anyone can check what left each site."""
        self.run_dir.append_received(
            {
                "round": round_number,
                "site": name,
                "node_id": node,
                "records": sorted(reply.records()),
                "arrays": reply.array_shapes(),
                "metrics": reply.metrics(),
                "text": reply.text(),
                "key_bound": key_bound,
            }
        )

    def round(
        self, round_number: int, outcome: RoundOutcome, aggregated: bool, seconds: float, held_out: dict | None = None
    ) -> None:
        """One round's record; ``held_out``: the new model's scores on the coordinator's own set."""
        for name, metrics in outcome.site_metrics.items():
            self.remember_site(name, metrics)
        trained = outcome.trained
        losses = [(outcome.site_metrics[u.site].get("loss", math.nan), u.examples) for u in outcome.updates]
        record = RoundRecord(
            round=round_number,
            rounds=self.run.rounds,
            seconds=seconds,
            aggregated=aggregated,
            min_sites=self.run.min_sites,
            trained=trained,
            budget_exhausted=outcome.budget_exhausted,
            rejected=outcome.rejected,
            clipped=outcome.clipped,
            norm_bound=outcome.norm_bound if math.isfinite(outcome.norm_bound) else None,
            aggregation=self.run.aggregation,
            secure_aggregation=outcome.secure,
            failed=outcome.failed,
            missing=outcome.missing,
            examples=outcome.examples,
            train_loss=weighted_mean(losses),
            slowest_site_train_seconds=max(
                (m.get("seconds-train", 0.0) for m in outcome.site_metrics.values()), default=0.0
            ),
            sites={name: _site_fields(m) for name, m in outcome.site_metrics.items()},
            reply_seconds=outcome.reply_seconds,
            server_validation=held_out,
            note=None
            if aggregated
            else (
                f"only {len(trained)} valid updates, below the minimum of "
                f"{self.run.min_sites} sites: global model unchanged this round"
            ),
        )
        if held_out is not None:
            self.last_held_out = held_out
        self.run_dir.append_record(record)
        self.results.record(record)
        log.info(
            "round %d/%d: %d trained, %d budget exhausted, %d rejected, %d failed, %d missing (%.1f s)",
            round_number,
            self.run.rounds,
            len(trained),
            len(outcome.budget_exhausted),
            len(outcome.rejected),
            len(outcome.failed),
            len(outcome.missing),
            seconds,
        )

    def validation(self, model_round: int, site_metrics: dict[str, dict]) -> None:
        """Each site's validation of the global model after ``model_round`` (0: the initial
        one): scores from its noisy counts, or the exact scores a site released. The sites'
        combined scores come from their summed counts when all sent counts. Scores from
        noisy counts get standard errors ("errors": the noise each site stated, summed in
        variance for the combined counts)."""
        classes = len(self.run.class_names)
        counts = {
            name: np.asarray(m[protocol.VALIDATION_COUNTS], dtype=np.float64)
            for name, m in site_metrics.items()
            if protocol.VALIDATION_COUNTS in m
        }
        noise = {name: float(site_metrics[name].get(protocol.VALIDATION_NOISE, math.nan)) for name in counts}
        scores = {name: scores_from_counts(c, classes) for name, c in counts.items()}
        errors = {name: _errors(c, noise[name], classes) for name, c in counts.items()}
        scores |= {
            name: {k: v for k, v in m.items() if k.startswith("val-")}
            for name, m in site_metrics.items()
            if name not in counts
        }
        # a site that sent counts is kept whatever its noisy total (it may be below zero)
        sites = {name: s for name, s in scores.items() if name in counts or s.get("val-examples", 0) > 0}
        if not sites:
            return
        if counts and len(counts) == len(sites):
            summed = np.sum(list(counts.values()), axis=0)  # independent noise: the variances add
            weighted = scores_from_counts(summed, classes)
            weighted_errors = _errors(summed, math.sqrt(sum(n * n for n in noise.values())), classes)
        else:
            weighted_errors = {}
            weighted = {
                key: weighted_mean([(s.get(key, math.nan), s["val-examples"]) for s in sites.values()])
                for key in protocol.VALIDATION_METRICS[1:]
            }
            weighted["val-examples"] = sum(s["val-examples"] for s in sites.values())
        record = ValidationRecord(
            round=model_round, sites=sites, weighted=weighted, site_errors=errors, weighted_errors=weighted_errors
        )
        self.run_dir.append_record(record)
        self.results.record(record)
        self.last_validation = weighted | weighted_errors

    def remember_site(self, name: str, metrics: dict) -> None:
        """What the model card says of a site: rounds trained, its guarantee, its last status."""
        site = self.sites.setdefault(name, {"rounds_trained": 0})
        if metrics.get("status") == RoundStatus.TRAINED:
            site["rounds_trained"] += 1
        for key in ("examples", "epsilon", "delta", "dp"):
            if key in metrics:
                site[key] = metrics[key]
        if metrics.get("privacy-unit") in range(len(PRIVACY_UNITS)):
            site["privacy_unit"] = PRIVACY_UNITS[int(metrics["privacy-unit"])]
        if "dp" in site:
            site["dp"] = bool(site["dp"])
        if "status" in metrics:
            site["status"] = RoundStatus.label_of(metrics["status"])

    def status(self, phase: str, round_number: int, **extra: object) -> None:
        self.run_dir.write_status(
            phase=phase, round=round_number, rounds=self.run.rounds, validation=self.last_validation, **extra
        )

    def final_model(self, state: dict[str, np.ndarray], rounds_done: int, initial_model: dict | None) -> None:
        card = model_card(
            self.run,
            self.sites,
            rounds_done,
            self.last_validation,
            weights=state,
            held_out=self.last_held_out,
            initial_model=initial_model,
        )
        self.run_dir.write_final_model(state, card, model_card_markdown(card))


def _site_fields(metrics: dict) -> SiteRoundFields:
    fields = {k: v for k, v in metrics.items() if not k.startswith("val-")}
    fields["status_name"] = RoundStatus.label_of(fields.get("status"))
    return cast(SiteRoundFields, fields)  # a checked reply's whitelisted metrics


def _errors(counts: np.ndarray, noise_std: float, classes: int) -> dict[str, float]:
    """Standard errors of the scores from noisy counts (``score_errors``); none when the
    site did not say its noise (an older fedmed)."""
    return score_errors(counts, noise_std, classes) if math.isfinite(noise_std) else {}


def weighted_mean(pairs: Sequence[tuple[float | None, float]]) -> float:
    """The mean of the finite values, weighted; NaN when none has weight."""
    kept = [(v, w) for v, w in pairs if v is not None and math.isfinite(v) and w > 0]
    total = sum(w for _, w in kept)
    return sum(v * w for v, w in kept) / total if total else math.nan
