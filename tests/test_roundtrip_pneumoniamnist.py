"""Real chest X-rays -> per-site DICOM folders -> reader gives back the original pixels."""

import json

import numpy as np
import pytest

from fedmed.data import ReadOptions, SiteSource, load_site
from fedmed.data.make_sites import export_sites
from fedmed.data.npz import load_npz
from fedmed.data.partition import dirichlet_partition

CLASSES = ("normal", "pneumonia")


def expected_display(original: np.ndarray, windowed: bool) -> np.ndarray:
    """The documented normalisation: p / 255 under a window, min-max otherwise."""
    p = original.astype(np.float64)
    return p / 255 if windowed else (p - p.min()) / (p.max() - p.min())


@pytest.fixture(scope="module")
def pneumonia_train(pneumonia_npz):
    return load_npz(pneumonia_npz, "train", CLASSES)


def test_npz_import_matches_the_published_split(pneumonia_train):
    assert pneumonia_train.images.shape == (4708, 28, 28)
    assert np.bincount(pneumonia_train.labels).tolist() == [1214, 3494]


def test_partition_is_fixed_by_its_seed(pneumonia_train):
    a = dirichlet_partition(pneumonia_train.labels, 5, alpha=0.5, quantity_alpha=2.0, seed=42)
    b = dirichlet_partition(pneumonia_train.labels, 5, alpha=0.5, quantity_alpha=2.0, seed=42)
    assert [s.tolist() for s in a] == [s.tolist() for s in b]
    assert sum(len(s) for s in a) == 4708


@pytest.mark.slow
def test_every_site_reads_back_the_original_pixels(pneumonia_train, tmp_path):
    subset = pneumonia_train
    sites = dirichlet_partition(subset.labels, 5, alpha=0.5, quantity_alpha=2.0, seed=42)
    summary = export_sites(subset, sites, tmp_path / "sites", seed=42)
    assert json.loads((tmp_path / "sites" / "sites.json").read_text()) == summary
    styles = {s["dicom_style"] for s in summary["sites"]}
    assert {"monochrome1-16bit", "signed-12bit-rescaled", "windowed-16bit-rle"} <= styles

    for site_summary, indices in zip(summary["sites"], sites):
        data = load_site(SiteSource(tmp_path / "sites" / site_summary["name"], classes=CLASSES), ReadOptions(image_size=28))
        assert data.report.skipped == []
        assert len(data) == len(indices) == site_summary["images"]
        assert data.report.class_counts() == site_summary["class_counts"]
        originals = {pid: subset.images[i] for i, pid in ((i, subset.patient_ids[i]) for i in indices)}
        windowed = site_summary["dicom_style"].startswith("windowed")
        for path, pixels, label, patient in zip(data.paths, data.images, data.labels, data.patient_ids):
            assert path.startswith(CLASSES[label] + "/")
            np.testing.assert_allclose(pixels, expected_display(originals[patient], windowed), atol=1e-6)
