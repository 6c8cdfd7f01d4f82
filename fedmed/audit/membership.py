"""A membership-inference attack a site runs on a model, against its own patients.

Members are the site's training patients, non-members its validation patients (they come
from the same distribution and were never trained on). The attacker scores each patient by
the model's mean loss on the patient's images, lower meaning "trained on" (Yeom et al.
2018), or, calibrated, by how much that loss fell from a reference model's, the model the
run started from (Watson et al. 2022's difficulty calibration: an image hard for every
model no longer looks like a non-member). The attack's AUC says how well the score tells
members from non-members: 0.5 is guessing. Its 95% interval comes from resampling patients.

Everything here runs at the site on the site's own data; the result is written to the
site's report and never sent anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmed.metrics import auroc

BOOTSTRAP_DRAWS = 1000  # patient resamples behind the interval
CONFIDENCE = 0.95
EVALUATION_BATCH = 256  # images scored at a time


@dataclass(frozen=True)
class AttackResult:
    """One attack's AUC over patients, with its interval."""

    attack: str  # "loss" or "calibrated loss"
    auc: float
    low: float  # the interval's ends
    high: float
    members: int  # training patients scored
    non_members: int  # validation patients scored

    def to_json(self) -> dict:
        return {
            "attack": self.attack,
            "auc": self.auc,
            "interval": [self.low, self.high],
            "confidence": CONFIDENCE,
            "members": self.members,
            "non_members": self.non_members,
        }


def image_losses(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The model's cross-entropy loss on each image (its network inputs as fed in training)."""
    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(labels), EVALUATION_BATCH):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + EVALUATION_BATCH], dtype=np.float32))
            x = x.unsqueeze(1) if x.dim() == 3 else x
            y = torch.from_numpy(np.asarray(labels[start : start + EVALUATION_BATCH], dtype=np.int64))
            losses.append(F.cross_entropy(model(x), y, reduction="none").numpy())
    return np.concatenate(losses) if losses else np.zeros(0)


def patient_means(values: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """The mean of ``values`` over each patient's images (patients in sorted order)."""
    _, patient_of = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    return np.bincount(patient_of, weights=values) / np.bincount(patient_of)


def attack_auc(member_scores: np.ndarray, non_member_scores: np.ndarray, attack: str, seed: int = 0) -> AttackResult:
    """AUC of telling members (higher scores expected) from non-members, with a percentile
    bootstrap interval over patients."""
    members, others = np.asarray(member_scores, float), np.asarray(non_member_scores, float)
    if len(members) < 2 or len(others) < 2:
        raise ValueError(
            f"a membership attack needs at least 2 training and 2 validation patients, got {len(members)} and "
            f"{len(others)}"
        )
    scores = np.concatenate([members, others])
    truth = np.concatenate([np.ones(len(members), bool), np.zeros(len(others), bool)])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP_DRAWS):
        m = rng.choice(members, len(members))
        o = rng.choice(others, len(others))
        draws.append(auroc(np.concatenate([m, o]), truth))
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return AttackResult(attack, auroc(scores, truth), float(low), float(high), len(members), len(others))


def membership_attacks(
    model: nn.Module,
    reference: nn.Module,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> list[AttackResult]:
    """The loss attack and its calibrated variant on ``model``; ``train`` and ``validation``
    are each (network inputs, labels, PatientIDs), ``reference`` the model the run started from."""
    results = {}
    for name, (images, labels, patients) in (("members", train), ("non_members", validation)):
        final = image_losses(model, images, labels)
        start = image_losses(reference, images, labels)
        results[name] = (patient_means(-final, patients), patient_means(start - final, patients))
    return [
        attack_auc(results["members"][0], results["non_members"][0], "loss"),
        attack_auc(results["members"][1], results["non_members"][1], "calibrated loss"),
    ]
