"""Hospital partitions: reproducible, complete, and as skewed as asked."""

import numpy as np
import pytest

from fedmed.data.partition import class_table, dirichlet_partition

LABELS = np.repeat([0, 1, 2], [300, 500, 200])


def mean_top_class_share(sites, labels):
    shares = [np.bincount(labels[s], minlength=3).max() / len(s) for s in sites]
    return float(np.mean(shares))


def test_same_seed_same_partition_other_seed_other_partition():
    first = dirichlet_partition(LABELS, 5, alpha=0.5, quantity_alpha=1.0, seed=11)
    second = dirichlet_partition(LABELS, 5, alpha=0.5, quantity_alpha=1.0, seed=11)
    other = dirichlet_partition(LABELS, 5, alpha=0.5, quantity_alpha=1.0, seed=12)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert [len(s) for s in first] != [len(s) for s in other]


def test_every_image_goes_to_exactly_one_site():
    sites = dirichlet_partition(LABELS, 4, alpha=0.3, seed=1)
    everything = np.concatenate(sites)
    assert len(everything) == len(LABELS)
    assert sorted(everything.tolist()) == list(range(len(LABELS)))
    assert min(len(s) for s in sites) >= 10


def test_small_alpha_skews_labels_more_than_large_alpha():
    skewed = np.mean([mean_top_class_share(dirichlet_partition(LABELS, 5, alpha=0.1, seed=s), LABELS) for s in range(5)])
    mild = np.mean([mean_top_class_share(dirichlet_partition(LABELS, 5, alpha=100.0, seed=s), LABELS) for s in range(5)])
    iid = mean_top_class_share(dirichlet_partition(LABELS, 5, alpha=None, seed=0), LABELS)
    assert skewed > mild + 0.2
    assert iid == pytest.approx(0.5, abs=0.02)


def test_quantity_skew_makes_unequal_sites():
    equal = dirichlet_partition(LABELS, 5, alpha=None, quantity_alpha=None, seed=0)
    unequal = dirichlet_partition(LABELS, 5, alpha=None, quantity_alpha=0.5, seed=0)
    assert np.std([len(s) for s in equal]) < 5
    assert np.std([len(s) for s in unequal]) > 50


def test_class_table_counts_match_the_partition():
    sites = dirichlet_partition(LABELS, 3, alpha=0.5, seed=2)
    table = class_table(sites, LABELS, ("a", "b", "c"))
    lines = table.splitlines()
    assert lines[0].split() == ["site", "a", "b", "c", "total"]
    for line, site in zip(lines[1:4], sites):
        counts = [int(v) for v in line.split()[1:]]
        assert counts[:3] == np.bincount(LABELS[site], minlength=3).tolist()
        assert counts[3] == len(site)
    assert lines[-1].split()[1:] == ["300", "500", "200", "1000"]


def test_impossible_requests_explain_themselves():
    with pytest.raises(ValueError, match="cannot give 200 sites"):
        dirichlet_partition(LABELS, 200, min_site_size=10)
    with pytest.raises(ValueError, match="alpha must be positive"):
        dirichlet_partition(LABELS, 3, alpha=0)
    with pytest.raises(ValueError, match="raise alpha"):
        dirichlet_partition(LABELS, 20, alpha=0.01, quantity_alpha=0.05, min_site_size=45, max_tries=3)
