"""MedMNIST-style ``.npz`` files: ``<split>_images`` and ``<split>_labels`` arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmed.data.dicom import LUMA_WEIGHTS
from fedmed.data.imageset import ImageSet

SPLITS = ("train", "val", "test")


def load_npz(path: Path | str, split: str = "train", classes: tuple[str, ...] | None = None) -> ImageSet:
    """Read one split of a MedMNIST-style file.

    Colour images (n, h, w, 3) are converted to grey. An optional ``<split>_patient_ids``
    array is used when present; otherwise every image is its own patient. Without
    ``classes`` the classes are named ``class-0``, ``class-1``, ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        image_key, label_key = f"{split}_images", f"{split}_labels"
        missing = [key for key in (image_key, label_key) if key not in data.files]
        if missing:
            raise ValueError(
                f"{path}: no {' or '.join(missing)} array (the file holds: {', '.join(data.files)}); "
                f"choose a split from {', '.join(SPLITS)} that the file has"
            )
        images = _to_grey_uint8(data[image_key], path, image_key)
        labels = data[label_key].reshape(len(data[label_key]), -1)
        if labels.shape[1] != 1:
            raise ValueError(
                f"{path}: {label_key} has {labels.shape[1]} columns; fedmed reads single-label "
                "(multi-class) files, not multi-label ones"
            )
        labels = labels[:, 0].astype(np.int64)
        id_key = f"{split}_patient_ids"
        if id_key in data.files:
            patient_ids = tuple(str(p) for p in data[id_key])
        else:
            patient_ids = tuple(f"{split}-{i:06d}" for i in range(len(labels)))
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    classes = tuple(classes) if classes else tuple(f"class-{i}" for i in range(n_classes))
    if len(classes) < n_classes:
        raise ValueError(f"{path}: labels go up to {n_classes - 1} but only {len(classes)} class names were given")
    return ImageSet(images=images, labels=labels, classes=classes, patient_ids=patient_ids)


def save_npz(path: Path | str, splits: dict[str, ImageSet]) -> None:
    """Write image sets as one MedMNIST-style file (plus ``<split>_patient_ids``)."""
    arrays: dict[str, np.ndarray] = {}
    for split, images in splits.items():
        arrays[f"{split}_images"] = images.images
        arrays[f"{split}_labels"] = images.labels.reshape(-1, 1).astype(np.uint8)
        arrays[f"{split}_patient_ids"] = np.array(images.patient_ids)
    np.savez_compressed(path, allow_pickle=False, **arrays)  # every reader loads with allow_pickle=False too


def _to_grey_uint8(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    if images.ndim == 4 and images.shape[-1] == 3:
        images = np.rint(images.astype(np.float64) @ LUMA_WEIGHTS)
    if images.ndim != 3:
        raise ValueError(f"{path}: {key} has shape {images.shape}; expected (n, height, width[, 3])")
    if images.dtype != np.uint8:
        if images.min() < 0 or images.max() > 255:
            raise ValueError(f"{path}: {key} values lie outside 0..255; expected 8-bit images")
        images = images.astype(np.uint8)
    return images
