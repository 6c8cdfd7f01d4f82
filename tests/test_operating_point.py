"""The decision rule a model is handed over with comes from public settings, never from a
site's validation data (choosing it from private labels would spend unrecorded privacy)."""

import numpy as np
import pytest

from fedmed.config import RunSettings
from fedmed.coordinator.model_card import model_card
from fedmed.metrics import classification_metrics


def site_validation(labels: np.ndarray) -> dict:
    """A site's validation metrics of one fixed set of predictions against ``labels``."""
    probabilities = np.linspace(0.05, 0.95, len(labels))
    scores = classification_metrics(labels, np.stack([1 - probabilities, probabilities], axis=1))
    return {"val-auroc": scores["auroc"], "val-balanced-accuracy": scores["balanced_accuracy"]}


def test_the_decision_rule_does_not_move_when_a_sites_validation_labels_change():
    run = RunSettings(run_id="r", class_prior="0.26,0.74")
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    sites = {"site-1": {"examples": 100, "dp": True}}
    card_a = model_card(run, sites, 3, site_validation(first))
    card_b = model_card(run, sites, 3, site_validation(second))
    assert card_a["validation"] != card_b["validation"], "the two label sets give different site metrics"
    assert card_a["decision"] == card_b["decision"]
    assert "0.26,0.74" in card_a["decision"]["chosen_from"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_scores_in_fedmeds_tables_are_measured_at_the_stated_rule_not_at_a_threshold_tuned_on_labels(seed):
    """The card says balanced accuracy is measured at "the second class when its probability
    is at least 0.5". On labels where another threshold would score higher, the reported
    balanced accuracy is still the one at 0.5: no threshold is chosen from private labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    probabilities = np.clip(0.25 + 0.3 * labels + rng.normal(0, 0.15, 300), 0.01, 0.99)  # positives near 0.55
    scores = classification_metrics(labels, np.stack([1 - probabilities, probabilities], axis=1))

    def balanced_accuracy_at(threshold: float) -> float:
        predicted = probabilities >= threshold
        return 0.5 * (predicted[labels == 1].mean() + (~predicted[labels == 0]).mean())

    best = max(balanced_accuracy_at(t) for t in np.linspace(0.05, 0.95, 91))
    assert best > balanced_accuracy_at(0.5) + 0.02, "a tuned threshold would have scored higher here"
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_at(0.5), abs=1e-12)
    rule = model_card(RunSettings(run_id="r"), {}, 1, None)["decision"]["rule"]
    assert "at least 0.5" in rule


def test_the_model_card_says_where_the_rule_came_from():
    adjusted = model_card(RunSettings(run_id="r", class_prior="0.4,0.6"), {}, 1, None)["decision"]
    plain = model_card(RunSettings(run_id="r"), {}, 1, None)["decision"]
    assert "0.4,0.6" in adjusted["chosen_from"] and "logit-adjusted" in adjusted["chosen_from"]
    assert "no class prior" in plain["chosen_from"]
