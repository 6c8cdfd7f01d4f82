"""Baselines to compare a federation against, through the same site code and ledger as a
real site, each from the federation's starting model (random, or the public one):

* public: the public pre-trained model alone, before any site's data;
* centralized: all sites' data pooled at one place, one model. The private one is trained
  on the federation's rounds with as many DP-SGD steps per round as all the sites take
  together (local steps x sites), then the coordinator's server step: the same number of
  noisy steps as the federation. The non-private one is the upper bound every reader compares against, so it is
  trained on a non-private schedule to convergence: ``NON_PRIVATE_EPOCHS`` full passes
  over the pooled data, one per round, with the run's cosine-decayed step size;
* local: every site alone on its own data, on the federation's schedule.
"""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedmed.config import RunSettings, SiteSettings
from fedmed.coordinator.fedavg import server_step
from fedmed.data.dicom import ReadOptions
from fedmed.data.site import SiteSource, load_site
from fedmed.device import resolve_device
from fedmed.model import ModelConfig, build_model
from fedmed.simulate.scenario import Scenario
from fedmed.simulate.sites import SimulationData
from fedmed.site.work import SiteWork, validation_metrics
from fedmed.train import evaluate
from fedmed.vector import pack, unpack
from fedmed.weights import load_state, model_state

DICOM_SUFFIXES = (".dcm", ".dicom")


def load_test_set(run: RunSettings, data: SimulationData, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    test = load_site(
        SiteSource.from_path(data.test_dir, run.class_names), ReadOptions(image_size=run.image_size), cache_dir
    )
    return np.asarray(test.images), test.labels


def test_scores(run: RunSettings, vector: np.ndarray, test: tuple[np.ndarray, np.ndarray], device: str = "cpu") -> dict:
    """A packed model's scores on the held-out test set, computed on ``device``."""
    model = build_model(ModelConfig.from_settings(run))
    load_state(model, unpack(vector, model_state(model)))
    return evaluate(model.to(resolve_device(device)), *test)


NON_PRIVATE_EPOCHS = 20  # full passes of the pooled non-private baseline (its validation AUROC had levelled off)


def schedule_of(run: RunSettings) -> str:
    """A run's training schedule in words, for the summary's rows."""
    steps = f"{run.local_steps} steps" if run.local_steps else f"{run.local_epochs} epoch(s)"
    return f"{run.rounds} rounds x {steps}, lr {run.learning_rate:g} {run.learning_rate_schedule}"


def non_private_schedule(run: RunSettings) -> RunSettings:
    """The pooled non-private baseline's schedule: full passes to convergence, cosine-decayed."""
    return replace(
        run,
        rounds=NON_PRIVATE_EPOCHS,
        local_steps=0,
        local_epochs=1,
        learning_rate_schedule="cosine",
        evaluate_every=NON_PRIVATE_EPOCHS,
    )


def pooled_private_schedule(run: RunSettings, sites: int) -> RunSettings:
    """The pooled private baseline's schedule: the federation's, with every site's steps of a
    round taken at the one pooled site (epochs stay epochs: a pass over the pooled data is
    all sites' passes)."""
    return replace(run, local_steps=run.local_steps * sites) if run.local_steps else run


def starting_state(run: RunSettings) -> dict[str, np.ndarray]:
    """The federation's starting weights: the run's initial model, else its seeded random ones."""
    if run.initial_model:
        from fedmed.coordinator.initial_model import load_initial_model

        return load_initial_model(run)[0]
    return model_state(build_model(ModelConfig.from_settings(run), seed=run.seed))


def public_row(run: RunSettings, test: tuple[np.ndarray, np.ndarray], device: str = "cpu") -> dict:
    """The public pre-trained model alone on the held-out test set: no site's data, no budget."""
    scores = test_scores(run, pack(starting_state(run)), test, device)
    return {**_row("public", "public model alone", True, {"epsilon": 0.0}, scores), "schedule": "public pre-training"}


def train_alone(run: RunSettings, site: SiteSettings) -> tuple[np.ndarray, dict]:
    """Train one model on one site's data for the run's rounds, as a federation of that one
    site (the coordinator's server step included, so server momentum applies here too);
    returns the packed model, the last round's reply metrics (epsilon) and, as a
    simulation knows its own data, the exact training images and validation scores of the
    final model."""
    work = SiteWork(site)
    state = starting_state(run)
    vector, velocity = pack(state), None
    metrics: dict = {}
    for round_number in range(1, run.rounds + 1):
        reply = work.train(run, vector, round_number)
        metrics = reply.metrics
        outcome = reply.message or "trained"
        spent = f", epsilon {metrics.get('epsilon', math.nan):.2f}" if site.dp else ""
        print(f"  {site.name} round {round_number}/{run.rounds}: {outcome}{spent}", flush=True)
        if reply.model is None:  # budget exhausted: keep the last model
            break
        state, velocity = server_step(
            state, unpack(reply.model, state), velocity, run.server_learning_rate, run.server_momentum
        )
        vector = pack(state)
    model = work.received_model(run, vector)
    exact = {"examples": len(work.split(run).train), **validation_metrics(model, work.inputs(run, model))}
    return vector, {**metrics, **exact}


def pooled_manifest(data: SimulationData, path: Path) -> Path:
    """A CSV manifest of every site's files (folder-per-class layout), for the pooled baseline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for folder in data.site_dirs:
            for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
                for file in sorted(label_dir.rglob("*")):
                    if file.suffix.lower() in DICOM_SUFFIXES:
                        writer.writerow([str(file.resolve()), label_dir.name])
    return path


def run_centralized(
    scenario: Scenario,
    run: RunSettings,
    data: SimulationData,
    *,
    out_dir: Path,
    cache_dir: Path,
    test: tuple[np.ndarray, np.ndarray],
    device: str = "cpu",
) -> list[dict]:
    """Pooled data, one model: non-private, then private at the scenario's largest budget,
    trained and scored on ``device`` (``simulation_device``)."""
    manifest = pooled_manifest(data, out_dir / "pooled.csv")
    budget = max(site.max_epsilon for site in scenario.site_settings)
    rows = []
    for dp in (False, True):
        name = "centralized-dp" if dp else "centralized"
        site = replace(
            scenario.site_settings[0],
            name=name,
            data=str(manifest),
            ledger=str(out_dir / name / "ledger.jsonl"),
            cache_dir=str(cache_dir),
            max_epsilon=budget,
            max_epsilon_per_run=budget,
            target_epsilon=budget,
            dp=dp,
            allow_outside_paths=True,
            device=device,
        )  # the pooled manifest names the sites' own folders
        schedule = pooled_private_schedule(run, len(data.site_dirs)) if dp else non_private_schedule(run)
        vector, metrics = train_alone(schedule, site)
        rows.append(
            {
                **_row(name, "pooled", dp, metrics, test_scores(run, vector, test, device)),
                "schedule": schedule_of(schedule),
            }
        )
    return rows


def run_local(run: RunSettings, sites: list[SiteSettings], test: tuple[np.ndarray, np.ndarray]) -> list[dict]:
    """Every site alone, with its own privacy settings, on its own device; the ``sites``'
    ledgers are this baseline's own (not the federation's)."""
    rows = []
    for site in sites:
        vector, metrics = train_alone(run, site)
        scores = test_scores(run, vector, test, site.device)
        rows.append({**_row("local", site.name, site.dp, metrics, scores), "schedule": schedule_of(run)})
    return rows


def _row(mode: str, model: str, dp: bool, metrics: dict, scores: dict) -> dict:
    return {
        "mode": mode,
        "model": model,
        "dp": dp,
        "epsilon": float(metrics.get("epsilon", float("nan"))) if dp else float("inf"),
        "train_examples": int(metrics.get("examples", 0)),
        "test_auroc": scores["auroc"],
        "test_balanced_accuracy": scores["balanced_accuracy"],
        "test_accuracy": scores["accuracy"],
        "val_auroc": float(metrics.get("val-auroc", float("nan"))),
    }
