"""Small seeded DP rounds whose updates tests/test_device.py pins by hash.

The rounds touch every part of a step that the device setting moves: image-level and
patient-level sampling, fixed and adaptive clipping, class weights and a class prior, a
canary, the scattering front-end's fixed inputs and a non-private round. This module uses
only what fedmed had before ``resources.device``, so it ran unchanged on that code to record
the hashes; ``train_round``'s keyword arguments are passed through (``device``).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

import fedmed.train
from fedmed.model import ModelConfig, build_model, fixed_inputs
from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.clipping import PerSampleClipper
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.protocol import RoundStatus
from fedmed.train import TrainConfig, TrainingData, train_round
from fedmed.vector import pack
from fedmed.weights import model_state

PIXELS = ModelConfig(depth=10, width=8, image_size=16)
SCATTERING = ModelConfig(depth=10, width=8, image_size=16, frontend="scattering")
TRAIN = TrainConfig(batch_size=16, physical_batch_size=8, steps=4, learning_rate=0.05, insecure_noise_seed=5)
ROUNDS = ("image", "patient-adaptive", "scattering", "plain")


def _site(n: int = 96) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    images = rng.random((n, 16, 16), dtype=np.float32) * 0.5 + labels[:, None, None] * 0.3
    return images.astype(np.float32), labels.astype(np.int64)


def seeded_round(kind: str, ledger_dir: Path, **options: Any) -> np.ndarray:
    """The packed model after one seeded round of ``kind``; ``options`` go to ``train_round``.
    Conv norms take one route: the autotuner picks routes by timing, and routes agree only
    to rounding."""
    images, labels = _site()
    model = build_model(SCATTERING if kind == "scattering" else PIXELS, seed=0)
    train, privacy, data = TRAIN, PrivacyConfig(target_epsilon=1.0, max_grad_norm=0.3), TrainingData(images, labels)
    if kind == "patient-adaptive":
        train = replace(TRAIN, class_weights=(2.0, 0.7), class_prior=(0.3, 0.7))
        privacy = PrivacyConfig(target_epsilon=1.0, max_grad_norm=0.3, clip_quantile=0.5, privacy_unit="patient")
        patients = np.arange(len(labels)) // 2  # two images each
        data = TrainingData(images, labels, patient_of=patients, canaries=np.array([5]))
    elif kind == "scattering":
        data = TrainingData(fixed_inputs(model, images), labels)
    elif kind == "plain":
        privacy = PrivacyConfig(dp=False, max_grad_norm=0.3)
    one_route = functools.partial(PerSampleClipper, conv_route="unfold")
    with mock.patch.object(fedmed.train, "PerSampleClipper", one_route):
        result = train_round(
            model,
            data,
            train=train,
            privacy=privacy,
            ledger=PrivacyLedger(ledger_dir / f"{kind}.jsonl"),
            site="s",
            run_id="r",
            round_number=1,
            **options,
        )
    assert result.status == RoundStatus.TRAINED and result.steps == TRAIN.steps, result.message
    return pack(model_state(model))


def digest(vector: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vector, dtype=np.float32).tobytes()).hexdigest()


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread: a reduction split over threads may add in another order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
