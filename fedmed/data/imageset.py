"""An in-memory labelled image collection: the input of partitioning and DICOM export."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageSet:
    """8-bit grey images with integer labels and, where known, patient ids."""

    images: np.ndarray  # (n, height, width) uint8
    labels: np.ndarray  # (n,) int64, indexes into ``classes``
    classes: tuple[str, ...]
    patient_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be a uint8 array shaped (n, height, width), got {self.images.dtype} {self.images.shape}"
            )
        if len(self.images) != n or len(self.patient_ids) != n:
            raise ValueError(
                f"{len(self.images)} images, {n} labels and {len(self.patient_ids)} patient ids must match"
            )
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1} for classes {self.classes}")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> ImageSet:
        return ImageSet(
            images=self.images[indices],
            labels=self.labels[indices],
            classes=self.classes,
            patient_ids=tuple(self.patient_ids[i] for i in indices),
        )
