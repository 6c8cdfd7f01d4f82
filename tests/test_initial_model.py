"""Starting a run from an earlier model: ``data.initial_model`` in a scenario and
``--initial-model`` for fedmed-server. The source is the model the shared 3-site
simulation trained (tests/conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess

import pytest

from fedmed.config import RunSettings, SiteSettings
from fedmed.coordinator.initial_model import load_initial_model
from fedmed.coordinator.model_card import model_card, weights_sha256
from fedmed.data.cache import PREPROCESSING_VERSION
from fedmed.inference import load_model_dir
from fedmed.model import ModelConfig, build_model
from fedmed.rundir import RunDirectory, load_arrays, write_model_folder
from fedmed.site.work import SiteWork
from fedmed.vector import pack
from fedmed.weights import load_state, model_state
from tests.conftest import TINY_SCENARIO
from tests.federation_helpers import BIN, process_env, run_simulate

# A model card's architecture as fedmed wrote it before it recorded the scattering front-end's J.
CARD_WITHOUT_J = {"depth": 10, "width": 8, "frontend": "scattering", "num_classes": 2, "image_size": 28,
                  "in_channels": 1, "norm_groups": 8}


def test_a_model_card_without_j_loads_as_j_2(tmp_path):
    """Every card written before J was recorded is of a 28 px model, J=2: `fedmed predict`
    and a run started from it rebuild that model, and new cards record J."""
    state = model_state(build_model(ModelConfig(**CARD_WITHOUT_J), seed=0))
    card = {"architecture": CARD_WITHOUT_J, "classes": ["normal", "pneumonia"],
            "input": {"image_size": 28, "preprocessing_version": PREPROCESSING_VERSION}}
    write_model_folder(tmp_path / "model", state, card, "")
    loaded = load_model_dir(tmp_path / "model")
    assert loaded.model.frontend.scales == 2 and loaded.model.conv1.in_channels == 81
    run = RunSettings(depth=10, width=8, frontend="scattering", image_size=28, initial_model=str(tmp_path / "model"))
    weights, _ = load_initial_model(run)
    assert pack(weights).tobytes() == pack(state).tobytes()
    assert model_card(run, {}, 1, None)["architecture"]["scattering_scales"] == 2
    at_64 = dataclasses.replace(run, image_size=64)
    assert model_card(at_64, {}, 1, None)["architecture"]["scattering_scales"] == 3


def _validations(run_dir: RunDirectory) -> dict[int, dict]:
    return {r["round"]: r for r in run_dir.metrics() if r["event"] == "validation"}


def _exact_validation(source: RunDirectory, run_dir: RunDirectory, tmp_path) -> dict[str, dict]:
    """The source's final model scored exactly on each site of ``run_dir``, as the site does."""
    config = run_dir.read_config()
    run = RunSettings.from_flower(config)
    model = build_model(ModelConfig.from_settings(run))
    load_state(model, load_arrays(source.model_dir / "model.npz"))
    scores = {}
    for node_config in json.loads(config["simulation-sites"]):
        site = dataclasses.replace(SiteSettings.from_flower(node_config), release_exact="validation",
                                   ledger=str(tmp_path / f"{node_config['name']}.jsonl"))
        scores[site.name] = SiteWork(site).evaluate(run, pack(model_state(model))).metrics
    return scores


def test_a_run_started_from_a_model_begins_at_exactly_its_weights(simulation, tmp_path):
    """The sites release their exact validation scores in the continued run, and round 0's
    equal the source model's exact scores on the same sites' validation splits."""
    source = RunDirectory(simulation[0] / "federated")
    command = [str(BIN / "fedmed-simulate"), "--mode", "federated", "--out", str(tmp_path / "out"),
               "--set", "training.rounds=1", "--set", f"data.initial_model={source.model_dir}",
               "--set", "privacy.release_exact=validation",
               "--set", "privacy.max_epsilon=[8.0, 8.0, 4.0]", "--set", "privacy.target_epsilon=[8.0, 8.0, 4.0]",
               "--set", "privacy.max_epsilon_per_run=[8.0, 8.0, 4.0]"]
    for value in TINY_SCENARIO:
        if not value.startswith("training.rounds="):
            command += ["--set", value]
    code, survivors, _ = run_simulate(command, tmp_path)
    assert code == 0, (tmp_path / "simulate.out").read_text()
    assert survivors == []
    continued = RunDirectory(next((tmp_path / "out").glob("results-*")) / "federated")
    start = _validations(continued)[0]["sites"]
    assert sorted(start) == ["site-1", "site-2", "site-3"]
    for name, scores in _exact_validation(source, continued, tmp_path).items():
        assert start[name] == pytest.approx(scores, rel=0, abs=0, nan_ok=True), name
    card = json.loads((continued.model_dir / "model_card.json").read_text())
    origin = card["model_details"]["initial_model"]
    source_card = json.loads((source.model_dir / "model_card.json").read_text())
    assert origin["weights_sha256"] == weights_sha256(load_arrays(source.model_dir / "model.npz"))
    assert origin["weights_sha256"] == source_card["model_details"]["weights_sha256"]
    assert origin["run_id"] == source_card["run_id"] and origin["source"].endswith("model.npz")


@pytest.mark.parametrize("program", ["fedmed-simulate", "fedmed-server"])
def test_a_model_of_another_architecture_is_refused_by_name(program, simulation, tmp_path):
    source = simulation[0] / "federated" / "model"
    if program == "fedmed-simulate":
        command = [str(BIN / program), "--mode", "federated", "--out", str(tmp_path / "out"),
                   *[a for v in TINY_SCENARIO for a in ("--set", v)],
                   "--set", "model.width=16", "--set", f"data.initial_model={source}"]
    else:
        command = [str(BIN / program), "--insecure", "--port", "1", "--run-dir", str(tmp_path / "run"),
                   "--image-size", "16", "--width", "16", "--initial-model", str(source)]
    result = subprocess.run(command, capture_output=True, text=True, env=process_env(tmp_path), timeout=300)
    assert result.returncode != 0
    assert "has another architecture than this run: width 8 there, 16 in this run" in result.stderr + result.stdout
    assert not (tmp_path / "run" / "config.json").exists(), "nothing started"
