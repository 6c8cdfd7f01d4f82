"""One hospital's work in a round, with no Flower types: validate the received global
model on the site's validation split, then train one private round through the ledger.

A ``SiteWork`` keeps the site's decoded, split data between rounds, so a long-lived
process (the site runtime of ``fedmed-client``, or a simulation actor) loads it once, and
its built network, so a round only loads the received weights into it. The network lives
on the site's own device (``site.device``: its ``resources.device``, never the run's), where
the site validates and trains; its update leaves as the same CPU vector on any device.

A spend is never lost and never repeated:

* a (run, round) the ledger holds as trained is never trained again, whatever model comes
  with it: the update kept in memory or in ``resend.npz`` is resent, or, when none is
  kept, the round is refused (``budget_exhausted``, with the reason) and nothing is spent;
* the ledger line is written before an update leaves: when that write fails nothing is
  sent. The reply is then kept in memory before it is saved to ``resend.npz``, and a
  failed save (a full disk) only logs a warning: the update was paid for, so it is sent,
  and a retry is answered from memory;
* a ledger that cannot be read (a torn or damaged line, a broken chain) raises
  ``LedgerError``: the coordinator gets the error with what the operator must do, and the
  site trains nothing until the ledger is restored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import numpy as np
from torch import nn

from fedmed import protocol
from fedmed.config import PRIVACY_UNITS, RunSettings, SiteSettings
from fedmed.device import resolve_device
from fedmed.model import ModelConfig, build_model, fixed_inputs
from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.privacy.release import VALIDATION, SiteReleases, count_sensitivity, record_weights, validation_counts
from fedmed.protocol import EvaluateRequest, RoundStatus, SiteReply, SiteRequest, TrainRequest, metric_value
from fedmed.site.data import SiteSplit, load_site_split
from fedmed.site.resend import ResendCache
from fedmed.train import TrainConfig, TrainingData, evaluate, predict, privacy_unit, record_count, train_round
from fedmed.vector import pack, unpack
from fedmed.weights import load_state, model_state

log = logging.getLogger("fedmed")


class SiteWork:
    """One site's rounds. The run's settings come with each request; the site's own
    settings (data, ledger, budget) are fixed when the site starts."""

    def __init__(self, site: SiteSettings) -> None:
        self.site = site
        self.device = resolve_device(site.device)  # a device this machine lacks fails here, not in a round
        self._splits: dict[tuple, SiteSplit] = {}
        self._models: dict[ModelConfig, nn.Module] = {}
        self._inputs: dict[tuple, SiteInputs] = {}  # one entry: the current run's
        self._resend = ResendCache(Path(site.ledger).parent)
        self._last: tuple[tuple[str, int], SiteReply] | None = None  # the last reply, kept even if not saved

    def handle(self, request: SiteRequest) -> SiteReply:
        """Answer one request of the coordinator's."""
        if isinstance(request, TrainRequest):
            return self.train(request.run, request.model, request.round)
        if isinstance(request, EvaluateRequest):
            return self.evaluate(request.run, request.model)
        raise ValueError(f"unknown request {type(request).__name__}")

    def split(self, run: RunSettings) -> SiteSplit:
        """The site's data for this run's preprocessing and split, loaded once per process."""
        key = _split_key(run)
        if key not in self._splits:
            self._splits[key] = load_site_split(run, self.site)
        return self._splits[key]

    def train(self, run: RunSettings, vector: np.ndarray, round_number: int) -> SiteReply:
        """Validate the received model (a packed vector) when the run evaluates it, then
        train one private round.

        A round the ledger holds as trained is never trained again, whatever model comes
        with it (a restarted coordinator repeats the round it lost; a hostile one could
        change the model slightly to have the site pay again): the update already computed
        is resent, from memory or the site's disk even after the site restarted, or the
        round is refused when no update is kept. Either way nothing new is spent."""
        started = time.perf_counter()
        site = self.site
        ledger = PrivacyLedger(site.ledger)  # a ledger that cannot prove what it spent stops here
        model = self.received_model(run, vector)  # a malformed request is an error, also when repeated
        key = (run.run_id, round_number)
        earlier = self._kept(key)
        if earlier is not None:
            return dataclasses.replace(
                earlier,
                message=(
                    f"round {round_number} of run {run.run_id} asked again: the update already trained is resent, "
                    "no new privacy spending"
                ),
            )
        if ledger.trained(run.run_id, round_number) is not None:
            return self._already_trained(run, round_number, ledger)
        inputs = self.inputs(run, model)
        privacy = PrivacyConfig.from_settings(site, run)
        releases = self.releases(run, privacy, ledger, inputs)
        metrics = self.validation(releases, model, inputs, round_number - 1) if run.evaluates(round_number - 1) else {}
        loaded = time.perf_counter()
        count = releases.count(round_number)
        result = train_round(
            model,
            self.training_data(inputs),
            train=TrainConfig.from_settings(run, round_number),
            privacy=privacy,
            ledger=ledger,
            site=site.name,
            run_id=run.run_id,
            round_number=round_number,
            reserved=releases.reserved(),
            device=self.device,
        )
        trained = result.status == RoundStatus.TRAINED
        metrics.update(
            {
                "status": int(result.status),
                "dp": int(result.dp),
                "steps": result.steps,
                "epsilon": metric_value(result.epsilon),
                "delta": float(result.delta),
                "noise-multiplier": float(result.noise_multiplier),
                "privacy-unit": PRIVACY_UNITS.index(releases.unit),
                # a whole number of at least 1 (rounding and flooring a noisy count is post-processing)
                "examples": max(1, round(count)),
            }
        )
        exact = sorted(releases.exact & {"loss", "timing"}) if trained else []
        if "loss" in exact:
            metrics["loss"] = metric_value(result.loss)
        if "timing" in exact:
            metrics.update({"seconds-setup": loaded - started, "seconds-train": time.perf_counter() - loaded})
        releases.record_exact(round_number, exact)
        reply = SiteReply(
            site.name, metrics, result.message[: protocol.MAX_TEXT], pack(model_state(model)) if trained else None
        )
        if trained:
            self._keep(key, (*key, hashlib.sha256(vector.tobytes()).hexdigest()), reply)
        return reply

    def _kept(self, key: tuple[str, int]) -> SiteReply | None:
        """This site's reply to ``key`` (run id, round), kept in memory or on disk."""
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        earlier = self._resend.get(key)
        return earlier if earlier is not None and earlier.site == self.site.name else None  # never another site's

    def _keep(self, key: tuple[str, int], request: tuple[str, int, str], reply: SiteReply) -> None:
        """Keep a paid-for reply in memory, then on disk; a failed save is only a warning:
        the update was paid for and is sent, and a retry in this process is resent from memory."""
        self._last = (key, reply)
        try:
            self._resend.put(request, reply)
        except OSError as exc:
            log.warning(
                "site %s: round %s of run %s trained and paid for, but its update could not be saved to "
                "%s (%s); it is sent now and kept in memory for a retry, but a restarted site cannot "
                "resend it and will refuse that round. Free disk space.",
                self.site.name,
                key[1],
                key[0],
                self._resend.path,
                exc,
            )

    def _already_trained(self, run: RunSettings, round_number: int, ledger: PrivacyLedger) -> SiteReply:
        """The refusal of a round the ledger holds as trained but whose update is no longer
        kept: training it again would spend the budget twice."""
        entry = ledger.trained(run.run_id, round_number)
        if entry is None:  # asked only for a round the ledger holds as trained, and lines are never removed
            raise ValueError(f"round {round_number} of run {run.run_id} is not in the ledger {ledger.path} as trained")
        message = (
            f"round {round_number} of run {run.run_id} was already trained and paid for (ledger "
            f"{ledger.path}); its update is no longer kept, and it is not trained again: no new privacy "
            "spending"
        )
        log.warning("site %s refuses round %s of run %s: %s", self.site.name, round_number, run.run_id, message)
        return SiteReply(
            self.site.name,
            {
                "status": int(RoundStatus.BUDGET_EXHAUSTED),
                "dp": int(entry.dp),
                "steps": 0,
                "epsilon": metric_value(ledger.epsilon(entry.delta)),
                "delta": float(entry.delta),
                "noise-multiplier": float(entry.update_noise_multiplier),
                "privacy-unit": PRIVACY_UNITS.index(entry.privacy_unit),
            },
            message[: protocol.MAX_TEXT],
        )

    def evaluate(self, run: RunSettings, vector: np.ndarray) -> SiteReply:
        """Validate the run's final model."""
        model = self.received_model(run, vector)
        inputs = self.inputs(run, model)
        privacy = PrivacyConfig.from_settings(self.site, run)
        releases = self.releases(run, privacy, PrivacyLedger(self.site.ledger), inputs)
        return SiteReply(self.site.name, self.validation(releases, model, inputs, run.rounds))

    def releases(
        self, run: RunSettings, privacy: PrivacyConfig, ledger: PrivacyLedger, inputs: SiteInputs
    ) -> SiteReleases:
        """The site's releases in this run, under its privacy unit."""
        unit = "image" if inputs.train_patient_of is None else "patient"
        records = record_count(inputs.train_labels, inputs.train_patient_of)
        evaluations = sum(run.evaluates(r) for r in range(run.rounds + 1))
        return SiteReleases(
            ledger, privacy, self.site.name, run.run_id, unit=unit, records=records, evaluations=evaluations
        )

    def validation(
        self, releases: SiteReleases, model: nn.Module, inputs: SiteInputs, model_round: int
    ) -> dict[str, float | list[float]]:
        """The received model on the site's validation split, as the site's policy releases
        it: noisy counts by default (nothing when the budget has no room), or the exact
        scores."""
        if len(inputs.val_labels) == 0:
            return {}
        if VALIDATION in releases.exact:
            releases.record_exact(model_round, [VALIDATION])
            return dict(validation_metrics(model, inputs))  # a copy typed with the lists' values too
        probabilities = predict(model, inputs.val)
        weights = record_weights(inputs.val_patients) if releases.unit == "patient" else np.ones(len(inputs.val))
        counts = validation_counts(probabilities, inputs.val_labels, weights)
        noisy = releases.noisy(model_round, VALIDATION, counts, count_sensitivity(probabilities.shape[1]))
        if noisy is None:
            return {}
        noise = releases.noise_std(model_round, VALIDATION)
        if noise is None:  # the release the counts came from is in the ledger
            raise ValueError(
                f"the validation release of round {model_round} of run {releases.run_id} is missing from the ledger"
            )
        return {protocol.VALIDATION_COUNTS: [float(v) for v in noisy], protocol.VALIDATION_NOISE: float(noise)}

    def inputs(self, run: RunSettings, model: nn.Module) -> SiteInputs:
        """What the run's network is fed for the site's training and validation images,
        computed once per split and architecture (``fedmed.model.fixed_inputs``), with the
        site's privacy unit decided once for its training images."""
        key = (_split_key(run), ModelConfig.from_settings(run))
        if key not in self._inputs:
            split = self.split(run)
            _, patient_of = privacy_unit(
                PrivacyConfig.from_settings(self.site, run), split.train_patients, self.site.name
            )
            self._inputs = {
                key: SiteInputs(
                    fixed_inputs(model, split.train_images),
                    split.train_labels,
                    fixed_inputs(model, split.val_images),
                    split.val_labels,
                    patient_of,
                    split.val_patients,
                )
            }
        return self._inputs[key]

    def training_data(self, inputs: SiteInputs) -> TrainingData:
        """What the round's step loop trains on (``fedmed.audit.canaries`` adds its canaries here)."""
        return TrainingData(inputs.train, inputs.train_labels, inputs.train_patient_of)

    def held_bytes(self) -> int:
        """Memory held for the prepared inputs of the current run."""
        return sum(a.nbytes for i in self._inputs.values() for a in (i.train, i.val))

    def received_model(self, run: RunSettings, vector: np.ndarray) -> nn.Module:
        """The run's network holding the coordinator's weights; refuses a vector that does
        not fit it or holds non-finite values. The network is built once per architecture
        (a scattering front-end's filters take longer to build than a round's validation)
        and every parameter and buffer is overwritten each time."""
        config = ModelConfig.from_settings(run)
        if config not in self._models:
            self._models[config] = build_model(config).to(self.device)
        model = self._models[config]
        load_state(model, unpack(vector, model_state(model)))
        model.zero_grad(set_to_none=True)  # nothing of the last round's training carries over
        return model


def _split_key(run: RunSettings) -> tuple:
    """The run settings a site's data and validation split depend on."""
    return run.classes, run.image_size, run.val_fraction, run.seed


@dataclasses.dataclass(frozen=True)
class SiteInputs:
    """A site's training and validation split as its network is fed them."""

    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray
    train_patient_of: np.ndarray | None  # each training image's patient number; None: image-level DP
    val_patients: np.ndarray  # each validation image's PatientID


def validation_metrics(model, inputs: SiteInputs) -> dict[str, float]:
    """The received model's exact scores on the site's validation split (a non-private
    release: only when the site's settings release them)."""
    if len(inputs.val_labels) == 0:
        return {"val-examples": 0}
    scores = evaluate(model, inputs.val, inputs.val_labels)
    return {
        "val-examples": int(len(inputs.val_labels)),
        "val-loss": metric_value(scores["loss"]),
        "val-accuracy": metric_value(scores["accuracy"]),
        "val-balanced-accuracy": metric_value(scores["balanced_accuracy"]),
        "val-auroc": metric_value(scores["auroc"]),
        "val-sensitivity": metric_value(scores.get("sensitivity")),
        "val-specificity": metric_value(scores.get("specificity")),
    }
