"""Public pre-training: a starting model from public images only, whose card says so, and
which a federation starts from exactly."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedmed.config import PretrainSettings, RunSettings
from fedmed.coordinator.initial_model import load_initial_model
from fedmed.coordinator.model_card import weights_sha256
from fedmed.pretrain import augment, pretrain
from fedmed.rundir import load_arrays
from fedmed.simulate.baselines import starting_state
from tests.conftest import SHARED_DATA
from tests.federation_helpers import BIN, process_env

NIH = SHARED_DATA / "nih-cxr-public-28.npz"
SMALL = dict(depth=10, width=8, image_size=28)


def test_augmentation_moves_images_a_little_and_never_mirrors_them():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((32, 1, 28, 28), dtype=np.float32))
    images[:, :, :, :8] = 1.0  # a bright band on the left of every image
    moved = augment(images, torch.Generator().manual_seed(1))
    assert moved.shape == images.shape and moved.min() >= 0.0 and moved.max() <= 1.0
    assert not torch.allclose(moved, images), "each image is changed"
    left, right = moved[:, :, :, :6].mean(dim=(1, 2, 3)), moved[:, :, :, -6:].mean(dim=(1, 2, 3))
    assert bool((left > right).all()), "the bright side stays on the left: no horizontal flip"


def test_pretraining_learns_the_public_task_and_keeps_the_best_epoch_with_patience():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 240)
    images = (rng.random((240, 28, 28)) * 0.3).astype(np.float32)
    images[labels == 1, 10:18, 10:18] += 0.6  # a plain mark for the second class
    patients = [f"p{i // 2}" for i in range(240)]
    run = RunSettings(**SMALL)
    result = pretrain(images, labels, patients, run, PretrainSettings(epochs=4, patience=2, learning_rate=0.1))
    assert result.history[-1].val_auroc > 0.9, result.history
    best = max(range(len(result.history)), key=lambda i: result.history[i].val_auroc) + 1
    assert result.kept_epoch == best
    assert result.train_images + result.val_images == 240


def test_public_labels_outside_the_runs_classes_are_refused():
    run = RunSettings(**SMALL)
    with pytest.raises(ValueError, match="run's class order"):
        pretrain(np.zeros((4, 28, 28), np.float32), np.array([0, 1, 2, 1]), ["a", "b", "c", "d"], run,
                 PretrainSettings(epochs=1))


@pytest.mark.skipif(not NIH.is_file(), reason=f"the public NIH chest X-ray set is not at {NIH}")
@pytest.mark.slow
def test_fedmed_pretrain_on_public_chest_xrays_writes_a_public_card_and_a_run_starts_from_its_weights(tmp_path):
    out = tmp_path / "public-model"
    result = subprocess.run(
        [str(BIN / "fedmed"), "pretrain", str(NIH), "--out", str(out), "--epochs", "1", "--depth", "10",
         "--width", "8", "--source-name", "NIH ChestX-ray8 (public subset)", "--terms", "no restrictions (NIH)",
         "--citation", "Wang et al., CVPR 2017"],
        capture_output=True, text=True, env=process_env(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "epoch 1/1" in result.stdout and "no privacy budget was spent" in result.stdout
    card = json.loads((out / "model_card.json").read_text())
    public = card["public_pretraining"]
    assert public["source"] == "NIH ChestX-ray8 (public subset)" and public["citation"] == "Wang et al., CVPR 2017"
    assert public["site_data_used"] is False and public["privacy_budget_spent"] == 0.0
    assert public["images"]["train"] + public["images"]["val"] == 1993
    assert "nih-cxr-public-28.npz" in public["data"]
    assert "no site's data was used" in (out / "model_card.md").read_text()
    weights = load_arrays(out / "model.npz")
    assert card["model_details"]["weights_sha256"] == weights_sha256(weights)
    # a run from it starts at exactly those weights, and carries the public source into its card
    run = RunSettings(**SMALL, initial_model=str(out))
    state, origin = load_initial_model(run)
    assert origin["public"]["source"] == public["source"] and origin["weights_sha256"] == weights_sha256(weights)
    start = starting_state(run)
    assert all(np.array_equal(start[name], weights[name]) for name in weights)
    with pytest.raises(ValueError, match="another architecture"):
        load_initial_model(replace(run, width=16))
