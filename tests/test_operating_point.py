"""The decision rule a model is handed over with comes from public settings, never from a
site's validation data (choosing it from private labels would spend unrecorded privacy)."""

import numpy as np

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
    assert card_a["decision"]["site_data_used"] is False
    assert "0.26,0.74" in card_a["decision"]["chosen_from"]


def test_the_model_card_says_where_the_rule_came_from():
    adjusted = model_card(RunSettings(run_id="r", class_prior="0.4,0.6"), {}, 1, None)["decision"]
    plain = model_card(RunSettings(run_id="r"), {}, 1, None)["decision"]
    assert "0.4,0.6" in adjusted["chosen_from"] and "logit-adjusted" in adjusted["chosen_from"]
    assert "no class prior" in plain["chosen_from"]
