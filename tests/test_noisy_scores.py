"""Scores from noisy validation counts are shown with their error bars, and as unreadable
where the noise swamps them."""

from __future__ import annotations

import numpy as np

from fedmed.deploy.progress import progress_line
from fedmed.numbers import TOO_NOISY, format_noisy
from fedmed.privacy.release import SCORE_BINS, score_errors, scores_from_counts, validation_counts
from fedmed.simulate.summary import sites_table


def counts_of(n: int, seed: int = 0) -> np.ndarray:
    """Validation counts of a fair classifier on ``n`` records."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    positive = np.clip(0.5 + 0.3 * (2 * labels - 1) + rng.normal(0, 0.2, n), 0, 1)
    return validation_counts(np.column_stack([1 - positive, positive]), labels, np.ones(n))


def test_the_standard_error_follows_the_noise_against_the_counts():
    counts = counts_of(2000)
    quiet = score_errors(counts, 0.5, 2)
    loud = score_errors(counts, 200.0, 2)
    assert quiet["val-auroc-se"] < 0.01 < 0.1 < loud["val-auroc-se"]
    # the spread of scores from independently noised copies of the counts: the error bar is its size
    rng = np.random.default_rng(5)
    clean = scores_from_counts(counts, 2)["val-auroc"]
    spread = np.std([scores_from_counts(counts + rng.normal(0, 20.0, counts.shape), 2)["val-auroc"] - clean
                     for _ in range(300)])
    assert abs(score_errors(counts, 20.0, 2)["val-auroc-se"] - spread) < 0.3 * spread
    assert len(counts) == 2 * SCORE_BINS


def test_a_score_buried_in_noise_is_shown_as_unreadable_and_a_clear_one_with_its_error_bar():
    assert format_noisy(0.8713, 0.0123, 0.1) == "0.871 ± 0.012"
    assert format_noisy(0.0, 0.31, 0.1) == f"{TOO_NOISY} (± 0.31)"
    assert format_noisy(0.8713, None, 0.1) == "0.871"
    status = {"phase": "training", "round": 4, "rounds": 30, "asked": 5,
              "validation": {"val-auroc": 1.0, "val-auroc-se": 0.34, "val-balanced-accuracy": 0.5,
                             "val-balanced-accuracy-se": 0.2}}
    line = progress_line(status)
    assert TOO_NOISY in line and "AUROC 1.000" not in line
    status["validation"] = {"val-auroc": 0.91, "val-auroc-se": 0.012, "val-balanced-accuracy": 0.84,
                            "val-balanced-accuracy-se": 0.02}
    assert "validation AUROC 0.910 ± 0.012, balanced accuracy 0.840 ± 0.020" in progress_line(status)


def test_the_simulation_summary_marks_a_site_too_noisy_to_read():
    rows = [{"site": "site-1", "rounds_trained": 30, "train_examples": 40, "val_examples": 9.3, "val_auroc": 0.0,
             "val_auroc_se": 0.4, "val_balanced_accuracy": 0.5, "val_balanced_accuracy_se": 0.3,
             "val_accuracy": 0.5, "epsilon": 7.9},
            {"site": "site-2", "rounds_trained": 30, "train_examples": 900, "val_examples": 220.0,
             "val_auroc": 0.93, "val_auroc_se": 0.02, "val_balanced_accuracy": 0.86,
             "val_balanced_accuracy_se": 0.03, "val_accuracy": 0.85, "epsilon": 7.9}]
    table = sites_table(rows)
    (first,) = [line for line in table.splitlines() if "site-1" in line]
    (second,) = [line for line in table.splitlines() if "site-2" in line]
    assert TOO_NOISY in first and TOO_NOISY not in second and "0.930 ± 0.020" in second
