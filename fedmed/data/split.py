"""Train/validation split that never puts one patient on both sides."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np


def split_by_patient(
    labels: np.ndarray, patient_ids: list[str], val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Return (train, validation) indices, seeded and stratified by each patient's label.

    Images without a patient id count as patients of their own. Every class with at least
    two patients gives at least one patient to each side.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if len(labels) != len(patient_ids):
        raise ValueError(f"{len(labels)} labels but {len(patient_ids)} patient ids")
    images_of: dict[str, list[int]] = defaultdict(list)
    for index, patient in enumerate(patient_ids):
        images_of[patient or f"\0image-{index}"].append(index)

    patients_by_class: dict[int, list[str]] = defaultdict(list)
    for patient, indices in sorted(images_of.items()):
        majority = Counter(int(labels[i]) for i in indices).most_common(1)[0][0]
        patients_by_class[majority].append(patient)

    rng = np.random.default_rng(seed)
    val: list[int] = []
    for label in sorted(patients_by_class):
        patients = patients_by_class[label]
        order = rng.permutation(len(patients))
        n_val = round(len(patients) * val_fraction)
        if val_fraction > 0 and len(patients) >= 2:
            n_val = min(max(n_val, 1), len(patients) - 1)
        for position in order[:n_val]:
            val.extend(images_of[patients[position]])
    val_set = set(val)
    train = np.array([i for i in range(len(labels)) if i not in val_set], dtype=np.int64)
    return train, np.array(sorted(val_set), dtype=np.int64)
