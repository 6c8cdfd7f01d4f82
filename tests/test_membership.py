"""Membership inference at a site (fedmed.audit.membership) on real training: an overfit
non-private model gives its training patients away, a DP model at epsilon 1 does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmed.audit.membership import attack_auc, membership_attacks
from fedmed.data.synthetic import synthesize, synthetic_labels
from fedmed.model import ModelConfig, build_model, fixed_inputs
from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.train import TrainConfig, TrainingData, train_round

pytestmark = pytest.mark.slow
MODEL = ModelConfig(depth=10, width=16, image_size=28, frontend="scattering")


def _site(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic chest X-rays, one image per patient, with a fifth of the labels flipped:
    a model that fits them can only have remembered them."""
    labels, patients = synthetic_labels(n, 0.5, seed)
    images = synthesize(labels, patients, size=28, seed=seed).images.astype(np.float32) / 255
    flipped = np.random.default_rng(seed).random(n) < 0.2
    return images, np.where(flipped, 1 - labels, labels).astype(np.int64), np.array([f"p{seed}-{i}" for i in range(n)])


def _attacks(privacy: PrivacyConfig, tmp_path) -> dict[str, object]:
    torch.manual_seed(0)
    members, non_members = _site(80, 1), _site(80, 2)
    start = build_model(MODEL, seed=0)
    model = build_model(MODEL, seed=0)
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    train = TrainConfig(epochs=1, steps=0, batch_size=16, learning_rate=0.05, momentum=0.9)
    inputs = fixed_inputs(model, members[0])  # the scattering coefficients, once, as a site computes them
    for round_number in range(1, 61):
        train_round(model, TrainingData(inputs, members[1]), train=train, privacy=privacy, ledger=ledger,
                    site="site-a", run_id="mia", round_number=round_number)
    return {a.attack: a for a in membership_attacks(model, start, members, non_members)}


def test_a_model_trained_without_dp_on_a_tiny_site_gives_its_patients_away(tmp_path):
    attacks = _attacks(PrivacyConfig(dp=False), tmp_path)
    for attack in attacks.values():
        assert attack.auc > 0.65 and attack.low > 0.55, attack
        assert attack.members == 80 and attack.non_members == 80


def test_a_dp_model_at_epsilon_1_keeps_them(tmp_path):
    attacks = _attacks(PrivacyConfig(target_epsilon=1.0, max_epsilon=1.0, planned_rounds=60), tmp_path)
    for attack in attacks.values():
        assert abs(attack.auc - 0.5) < 0.12 and attack.low < 0.5 < attack.high, attack


def test_the_interval_holds_the_auc_and_narrows_with_more_patients():
    rng = np.random.default_rng(0)
    small = attack_auc(rng.normal(0.3, 1, 20), rng.normal(0, 1, 20), "loss")
    large = attack_auc(rng.normal(0.3, 1, 2000), rng.normal(0, 1, 2000), "loss")
    assert small.low < small.auc < small.high and large.low < large.auc < large.high
    assert large.high - large.low < (small.high - small.low) / 5
    assert large.low < 0.584 < large.high  # the true AUC of this shift: Phi(0.3 / sqrt(2))
    with pytest.raises(ValueError, match="at least 2 training and 2 validation patients"):
        attack_auc(np.array([1.0]), np.array([0.0, 1.0]), "loss")
