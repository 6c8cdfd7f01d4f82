"""Patient-level DP (``privacy.privacy_unit = "patient"``): a patient, with all of their
images, is the protected record."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmed.model import ModelConfig, build_model
from fedmed.privacy.accounting import default_delta
from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.clipping import CONV_ROUTES, PerSampleClipper
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.train import TrainingData, privacy_unit, train_round
from tests.privacy_helpers import TINY_MODEL, TINY_TRAIN, independent_epsilon, tiny_site

CLIP = 0.05  # small, so every patient's gradient is clipped and the bound is reached
PATIENTS = np.array([0, 0, 0, 1, 1, 2, 3, 3])  # patient 1 has two images, patient 0 three


def _clipped_sum(images: torch.Tensor, labels: torch.Tensor, groups: np.ndarray | None, route: str | None) -> torch.Tensor:
    model = build_model(ModelConfig(depth=10, width=8, image_size=16), seed=0)
    clipper = PerSampleClipper(model, CLIP, conv_route=route)
    clipper.accumulate(images, lambda out: F.cross_entropy(out, labels, reduction="none"),
                       groups=None if groups is None else torch.from_numpy(groups))
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("route", [None, *CONV_ROUTES])
def test_removing_one_patient_changes_the_clipped_sum_by_at_most_the_clip_norm(route):
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.random((len(PATIENTS), 1, 16, 16), dtype=np.float32))
    labels = torch.from_numpy(rng.integers(0, 2, len(PATIENTS)))
    keep = PATIENTS != 0  # all three images of patient 0 leave
    _, regrouped = np.unique(PATIENTS[keep], return_inverse=True)
    with_patient = _clipped_sum(images, labels, PATIENTS, route)
    without = _clipped_sum(images[keep], labels[keep], regrouped, route)
    change = float((with_patient - without).norm())
    assert change == pytest.approx(CLIP, rel=1e-3), "the patient's gradient was clipped to exactly the clip norm"
    # Clipping image by image would let the same patient move the sum by up to 3 x the clip norm.
    per_image = float((_clipped_sum(images, labels, None, route) - _clipped_sum(images[keep], labels[keep], None,
                                                                                  route)).norm())
    assert per_image > 2 * CLIP


def test_a_patients_clipped_gradient_is_their_summed_gradient_scaled(route=None):
    """Against autograd: each patient's gradient is the gradient of the sum of their images'
    losses, scaled to the clip norm."""
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.random((len(PATIENTS), 1, 16, 16), dtype=np.float32))
    labels = torch.from_numpy(rng.integers(0, 2, len(PATIENTS)))
    got = _clipped_sum(images, labels, PATIENTS, route)
    model = build_model(ModelConfig(depth=10, width=8, image_size=16), seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.zeros_like(got)
    for patient in np.unique(PATIENTS):
        rows = torch.from_numpy(np.flatnonzero(PATIENTS == patient))
        loss = F.cross_entropy(model(images[rows]), labels[rows], reduction="sum")
        gradient = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        expected += gradient * min(1.0, CLIP / float(gradient.norm()))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_patient_level_rounds_are_accounted_at_the_patient_sampling_rate(tmp_path):
    images, labels = tiny_site(96)
    patients = np.array([f"p{i // 3}" for i in range(96)])  # 32 patients, 3 images each
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    privacy = PrivacyConfig(target_epsilon=4.0, planned_rounds=2, privacy_unit="patient")
    torch.manual_seed(0)
    model = build_model(TINY_MODEL)
    for round_number in (1, 2):
        result = train_round(model, TrainingData(images, labels, privacy_unit(privacy, patients, "site-a")[1]),
                             train=TINY_TRAIN, privacy=privacy, ledger=ledger, site="site-a", run_id="run-p",
                             round_number=round_number)
    entry = ledger.entries[-1]
    assert entry.privacy_unit == "patient" and entry.examples == 32, "the record count is the patients'"
    assert entry.sample_rate == pytest.approx(TINY_TRAIN.batch_size / 96), "the same expected images per step"
    assert entry.delta == default_delta(32) and entry.delta < 1 / 32
    assert entry.epsilon == pytest.approx(independent_epsilon(ledger.history, entry.delta), rel=0.01)
    assert entry.epsilon <= 4.0 + 1e-6 and result.examples == 96


def test_without_patient_ids_a_site_trains_at_image_level_and_says_so(tmp_path, caplog):
    images, labels = tiny_site(32)
    patients = np.array(["p1"] * 16 + [""] * 16)
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    privacy = PrivacyConfig(target_epsilon=4.0, privacy_unit="patient")
    with caplog.at_level(logging.WARNING):
        train_round(build_model(TINY_MODEL), TrainingData(images, labels, privacy_unit(privacy, patients, "site-a")[1]),
                    train=TINY_TRAIN, privacy=privacy, ledger=ledger, site="site-a", run_id="run-i", round_number=1)
    assert ledger.entries[-1].privacy_unit == "image" and ledger.entries[-1].examples == 32
    assert "not every training image has a PatientID" in caplog.text
