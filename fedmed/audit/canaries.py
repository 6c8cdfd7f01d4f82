"""Canaries for the one-run audit: records the auditor made, half of them (at random) added
to one site's training data, each as a patient of its own.

A canary is a held-out image (one no site holds: the scenario's test set) given a wrong
class, drawn at random among the others. A model learns such a class only by remembering
that very image, so whether the final model leans to it says whether the image was trained
on. (Images of pure noise were tried first: a network that pools over the image sees every
noise image alike and remembers none; BENCHMARKS.md, "Privacy audit".) The attacker's score
is how much the canary's loss fell from the model the run started from to the final model,
so that an image the network finds easy from the start is not mistaken for one it learnt.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from torch import nn

from fedmed.audit.membership import image_losses
from fedmed.config import RunSettings
from fedmed.model import fixed_inputs
from fedmed.site.data import SiteSplit
from fedmed.site.work import SiteWork

CANARY_PREFIX = "fedmed-canary-"  # each canary's PatientID is this and its number: one patient each


@dataclass(frozen=True)
class Canaries:
    """The auditor's canaries and its secret: which of them the site trains on."""

    images: np.ndarray  # (m, size, size) float32 in [0, 1], as a site's decoded images
    labels: np.ndarray  # (m,) int64
    included: np.ndarray  # (m,) bool

    @classmethod
    def draw(cls, count: int, images: np.ndarray, labels: np.ndarray, classes: int, seed: int) -> Canaries:
        """``count`` of the held-out ``images``, each with a wrong class and included with
        probability 1/2."""
        if not 2 <= count <= len(labels):
            raise ValueError(f"an audit needs 2 to {len(labels)} canaries (the held-out images), got {count}")
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(labels), count, replace=False)
        wrong = (labels[chosen] + rng.integers(1, classes, count)) % classes  # any class but the true one
        return cls(np.asarray(images[chosen], dtype=np.float32), wrong.astype(np.int64), rng.random(count) < 0.5)

    def scores(self, start: nn.Module, final: nn.Module) -> np.ndarray:
        """The attacker's score of each canary: its loss under ``start`` minus under ``final``."""
        return image_losses(start, fixed_inputs(start, self.images), self.labels) - image_losses(
            final, fixed_inputs(final, self.images), self.labels
        )


class CanarySite(SiteWork):
    """A site whose training split also holds the included canaries (its validation split
    and everything else are the site's own)."""

    def __init__(self, work: SiteWork, canaries: Canaries) -> None:
        super().__init__(work.site)
        self.canaries = canaries

    def split(self, run: RunSettings) -> SiteSplit:
        own = super().split(run)
        chosen = np.flatnonzero(self.canaries.included)
        data = own.data
        first = len(data)
        with_canaries = dataclasses.replace(
            data,
            images=np.concatenate([np.asarray(data.images), self.canaries.images[chosen]]),
            labels=np.concatenate([data.labels, self.canaries.labels[chosen]]),
            patient_ids=[*data.patient_ids, *(f"{CANARY_PREFIX}{i:05d}" for i in chosen)],
            paths=[*data.paths, *(f"<canary {i}>" for i in chosen)],
        )
        return SiteSplit(with_canaries, np.concatenate([own.train, first + np.arange(len(chosen))]), own.val)
