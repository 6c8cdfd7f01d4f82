"""Canaries for the one-run audit: records the auditor crafted, half of them (at random)
added to one site's training data.

A canary is a gradient canary (Steinke, Nasr & Jagielski 2023, section 6): a record whose
clipped gradient points along one coordinate of the model's trained parameters, with the
full clip norm, the largest contribution DP-SGD lets one record make. Each canary has a
coordinate of its own, drawn at random. DP-SGD samples a canary like any other record
(``fedmed.train.TrainingData.canaries``), so each step that draws it moves its coordinate by
a clip norm's worth before the noise is added; a model trained with the noise the ledger
paid for hides that move under the noise, one trained without it does not. The attacker's
score of a canary is how far its coordinate fell from the model the run started from to
the final model (SGD steps against the gradient).

Canaries made of images, held-out X-rays given a wrong class, were tried first: in a
CI-sized federated run a network does not remember them, with or without noise, so the
audit could not tell (BENCHMARKS.md, "Privacy audit").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from fedmed.config import SiteSettings
from fedmed.site.work import SiteInputs, SiteWork
from fedmed.train import TrainingData
from fedmed.vector import pack
from fedmed.weights import model_state


@dataclass(frozen=True)
class Canaries:
    """The auditor's canaries and its secret: which of them the site trains on."""

    coordinates: np.ndarray  # (m,) distinct indices into the trained parameters, flattened in order
    included: np.ndarray  # (m,) bool

    @classmethod
    def draw(cls, count: int, model: nn.Module, seed: int) -> Canaries:
        """``count`` canaries on distinct coordinates of ``model``'s trained parameters,
        each included with probability 1/2."""
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if not 2 <= count <= trained:
            raise ValueError(f"an audit needs 2 to {trained} canaries (the model's trained parameters), got {count}")
        rng = np.random.default_rng(seed)
        return cls(rng.choice(trained, count, replace=False).astype(np.int64), rng.random(count) < 0.5)

    def scores(self, model: nn.Module, start: dict[str, np.ndarray], final: dict[str, np.ndarray]) -> np.ndarray:
        """How far each canary's coordinate fell from ``start`` to ``final`` (global models of
        ``model``'s architecture)."""
        where = trained_positions(model)[self.coordinates]
        return (pack(start).astype(np.float64) - pack(final).astype(np.float64))[where]


def trained_positions(model: nn.Module) -> np.ndarray:
    """For each trained parameter value, in the order DP-SGD flattens them, its position in
    the packed model state (``fedmed.vector.pack`` of ``model_state``)."""
    state = model_state(model)
    offsets, offset = {}, 0
    for name, array in state.items():
        offsets[name] = offset
        offset += array.size
    positions = [offsets[name] + np.arange(p.numel()) for name, p in model.named_parameters() if p.requires_grad]
    return np.concatenate(positions)


class CanarySite(SiteWork):
    """A site whose DP-SGD rounds also draw the included canaries (its data, validation and
    ledger are its own)."""

    def __init__(self, site: SiteSettings, canaries: Canaries) -> None:
        super().__init__(site)
        self.canaries = canaries

    def training_data(self, inputs: SiteInputs) -> TrainingData:
        own = super().training_data(inputs)
        return TrainingData(
            own.images, own.labels, own.patient_of, canaries=self.canaries.coordinates[self.canaries.included]
        )
