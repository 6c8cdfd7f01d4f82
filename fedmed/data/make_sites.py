"""Turn one pool of images into per-hospital DICOM folders for simulations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedmed.data.export import SITE_STYLES, export_site
from fedmed.data.imageset import ImageSet
from fedmed.data.partition import dirichlet_partition
from fedmed.data.synthetic import synthesize, synthetic_labels

SUMMARY_NAME = "sites.json"


def site_names(n_sites: int) -> list[str]:
    return [f"site-{i + 1}" for i in range(n_sites)]


def export_sites(images: ImageSet, sites: list[np.ndarray], out_dir: Path, seed: int = 0) -> dict:
    """Write site ``i`` to ``out_dir/site-<i+1>`` in the i-th DICOM style; return the summary
    that is also saved as ``out_dir/sites.json``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; fedmed never overwrites existing files, choose a new folder")
    site_rows: list[dict[str, object]] = []
    summary = {"seed": seed, "classes": list(images.classes), "sites": site_rows}
    for name, indices, style in zip(site_names(len(sites)), sites, _styles(len(sites))):
        export_site(images.subset(indices), out_dir / name, name, style, seed)
        counts = np.bincount(images.labels[indices], minlength=len(images.classes))
        site_rows.append(
            {
                "name": name,
                "dicom_style": style.name,
                "images": int(len(indices)),
                "class_counts": dict(zip(images.classes, counts.tolist())),
            }
        )
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def synthetic_sites(
    n_images: int,
    n_sites: int,
    *,
    alpha: float | None = 0.5,
    quantity_alpha: float | None = None,
    size: int = 64,
    seed: int = 0,
    pneumonia_fraction: float = 0.6,
    min_site_size: int = 10,
) -> tuple[ImageSet, list[np.ndarray]]:
    """A synthetic pool split over sites by patient (a patient stays at one hospital);
    each image is drawn with its hospital's scanner profile."""
    labels, patients = synthetic_labels(n_images, pneumonia_fraction, seed)
    first_image = {p: i for i, p in reversed(list(enumerate(patients)))}
    patient_order = list(dict.fromkeys(patients))
    patient_labels = np.array([labels[first_image[p]] for p in patient_order])
    patient_sites = dirichlet_partition(
        patient_labels, n_sites, alpha=alpha, quantity_alpha=quantity_alpha, seed=seed, min_site_size=min_site_size
    )
    site_of_patient = {patient_order[i]: s for s, members in enumerate(patient_sites) for i in members}
    site_of = np.array([site_of_patient[p] for p in patients], dtype=np.int64)
    images = synthesize(labels, patients, size, seed, site_of=site_of)
    return images, [np.flatnonzero(site_of == s) for s in range(n_sites)]


def _styles(n_sites: int):
    return [SITE_STYLES[i % len(SITE_STYLES)] for i in range(n_sites)]
