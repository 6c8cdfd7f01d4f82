"""Small private training runs shared by the privacy tests."""

from __future__ import annotations

import warnings

import dp_accounting
import numpy as np
import torch
from opacus.accountants import PRVAccountant

from fedmed.model import ModelConfig, build_model
from fedmed.privacy.accounting import RDP_ORDERS
from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.train import TrainConfig, TrainingData, train_round

TINY_MODEL = ModelConfig(depth=18, width=8, image_size=16)
TINY_TRAIN = TrainConfig(batch_size=16, learning_rate=0.05)


def tiny_site(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.random((n, 16, 16), dtype=np.float32) * 0.5 + labels[:, None, None] * 0.3
    return images.astype(np.float32), labels.astype(np.int64)


def run_rounds(ledger_path, rounds, privacy: PrivacyConfig, run_id="run-a", first_round=1, site="site-a", n=64):
    torch.manual_seed(0)
    model = build_model(TINY_MODEL)
    images, labels = tiny_site(n)
    ledger = PrivacyLedger(ledger_path)
    return [
        train_round(model, TrainingData(images, labels), train=TINY_TRAIN, privacy=privacy, ledger=ledger, site=site,
                    run_id=run_id, round_number=r)
        for r in range(first_round, first_round + rounds)
    ]


def independent_epsilon(history, delta: float) -> float:
    """Epsilon of the same Poisson-subsampled Gaussian steps by another method in another
    library than the ledger's (dp-accounting's PLD): Opacus's PRV accountant, its upper bound
    at an epsilon error of 0.003. (PRV composes one neighbour direction, PLD the worse of two,
    so the ledger may lie a little above it, never far below.)"""
    accountant = PRVAccountant()
    accountant.history = [(float(sigma), float(rate), int(steps)) for sigma, rate, steps in history]
    with warnings.catch_warnings():  # a full-batch release (rate 1.0) makes its pdf divide by zero at -inf
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(accountant.get_epsilon(delta, eps_error=0.003))


def independent_rdp_epsilon(history, delta: float) -> float:
    """RDP epsilon of the same Poisson-subsampled Gaussian steps, by Google's dp-accounting
    (not the Opacus analysis the ledger's RDP lines used)."""
    accountant = dp_accounting.rdp.RdpAccountant(orders=RDP_ORDERS)
    for sigma, rate, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)
