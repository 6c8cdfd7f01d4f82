"""The built-in synthetic chest X-rays: reproducible, and the classes are learnable."""

import numpy as np

from fedmed.data.make_sites import synthetic_sites
from fedmed.data.synthetic import synthesize, synthetic_labels
from tests.conftest import auroc


def test_same_seed_same_images():
    labels, patients = synthetic_labels(20, seed=4)
    a = synthesize(labels, patients, size=32, seed=4)
    b = synthesize(labels, patients, size=32, seed=4)
    c = synthesize(labels, patients, size=32, seed=5)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)


def test_class_difference_is_learnable_by_a_linear_probe():
    labels, patients = synthetic_labels(600, seed=1)
    data = synthesize(labels, patients, size=32, seed=1)
    features = data.images.reshape(len(labels), -1).astype(np.float64) / 255
    train, test = slice(0, 400), slice(400, 600)
    direction = features[train][labels[train] == 1].mean(0) - features[train][labels[train] == 0].mean(0)
    score = auroc(features[test] @ direction, labels[test])
    assert 0.75 < score < 1.0


def test_sites_keep_patients_together_and_differ_in_scanner():
    images, sites = synthetic_sites(400, 4, alpha=1.0, seed=2)
    owners = {}
    for site, indices in enumerate(sites):
        for i in indices:
            assert owners.setdefault(images.patient_ids[i], site) == site
    noise = [np.abs(np.diff(images.images[s].astype(float), axis=2)).mean() for s in sites]
    assert max(noise) > 1.5 * min(noise), "scanner noise differs between hospitals"
