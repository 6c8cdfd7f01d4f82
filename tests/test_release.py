"""What a site sends besides its model (fedmed.privacy.release): the scores that follow from
the validation counts, the counts' sensitivity to one patient, the accounting of each
release, and a site's replies under the default and an opted-in policy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedmed import protocol
from fedmed.config import RunSettings, SiteSettings
from fedmed.data.make_sites import export_sites, synthetic_sites
from fedmed.metrics import auroc, classification_metrics
from fedmed.model import ModelConfig, build_model
from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.privacy.release import (
    SCORE_EDGES,
    SiteReleases,
    count_sensitivity,
    record_weights,
    scores_from_counts,
    validation_counts,
)
from fedmed.protocol import RoundStatus
from fedmed.report import build_report
from fedmed.report.document import report_document
from fedmed.report.site import site_account
from fedmed.site.work import SiteWork
from fedmed.vector import pack
from fedmed.weights import model_state

RUN = RunSettings(run_id="run-release", rounds=3, width=8, image_size=16, batch_size=16)


def _probabilities(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(0.0, 1.5, (n, classes)) + 1.5 * np.eye(classes)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probabilities, labels


@pytest.mark.parametrize("classes", [2, 3])
def test_scores_from_exact_counts_are_the_metrics_of_the_binned_scores(classes):
    probabilities, labels = _probabilities(400, classes)
    scores = scores_from_counts(validation_counts(probabilities, labels, np.ones(len(labels))), classes)
    exact = classification_metrics(labels, probabilities)
    assert scores["val-examples"] == len(labels)
    for name in ("accuracy", "balanced_accuracy") + (("sensitivity", "specificity") if classes == 2 else ()):
        assert scores[f"val-{name.replace('_', '-')}"] == pytest.approx(exact[name], abs=1e-12), name
    # AUROC: the Mann-Whitney statistic of the bin numbers (one bin, one tie), close to the exact one
    binned = [auroc(np.searchsorted(SCORE_EDGES, probabilities[:, c]), labels == c)
              for c in ([1] if classes == 2 else range(classes))]
    assert scores["val-auroc"] == pytest.approx(np.mean(binned), abs=1e-12)
    assert abs(scores["val-auroc"] - exact["auroc"]) < 0.02


@pytest.mark.parametrize("classes", [2, 3])
def test_one_patient_moves_the_counts_by_at_most_their_sensitivity(classes):
    probabilities, labels = _probabilities(120, classes, seed=1)
    patients = np.array([f"p{i % 37}" for i in range(120)])  # 37 patients with 3 or 4 images
    full = validation_counts(probabilities, labels, record_weights(patients))
    for patient in np.unique(patients):
        kept = patients != patient
        without = validation_counts(probabilities[kept], labels[kept], record_weights(patients[kept]))
        assert np.linalg.norm(full - without) <= count_sensitivity(classes) + 1e-12
    one_image = validation_counts(probabilities[1:], labels[1:], np.ones(119))
    expected = 1.0 if classes == 2 else np.sqrt(classes + 1)
    assert np.linalg.norm(validation_counts(probabilities, labels, np.ones(120)) - one_image) == \
        pytest.approx(expected), "the bound is reached: it is the sensitivity, not a loose one"


def test_releases_are_accounted_as_gaussian_mechanisms_composed_with_dp_sgd(tmp_path):
    """The ledger's epsilon after DP-SGD steps and releases equals Opacus's PRV composition
    of the same mechanisms (the ledger's is dp-accounting's PLD), built from the records' own
    parameters; a release
    that would pass the budget is withheld and spends nothing."""
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    privacy = PrivacyConfig(target_epsilon=4.0, max_epsilon=6.0, planned_rounds=2)
    releases = SiteReleases(ledger, privacy, "site-a", "run-a", unit="patient", records=200, evaluations=3)
    releases.noisy(0, "validation", np.zeros(12), 1.0)
    assert releases.count(1) != 1.0
    from tests.privacy_helpers import independent_epsilon, run_rounds  # DP-SGD rounds on the same ledger
    run_rounds(ledger.path, 2, privacy, run_id="run-a", n=200)
    ledger = PrivacyLedger(ledger.path)
    releases = SiteReleases(ledger, privacy, "site-a", "run-a", unit="patient", records=200, evaluations=3)
    releases.noisy(2, "validation", np.zeros(12), 1.0)
    ledger = PrivacyLedger(ledger.path)
    assert len(ledger.releases) == 3 and len({r.noise_multiplier for r in ledger.releases}) == 1
    events = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries]
    events += [(r.noise_multiplier, 1.0, 1) for r in ledger.releases]
    delta = ledger.releases[-1].delta
    assert ledger.releases[-1].epsilon == pytest.approx(independent_epsilon(events, delta), rel=0.01)
    assert ledger.releases[-1].epsilon == pytest.approx(ledger.epsilon(delta), rel=1e-12)
    full = SiteReleases(ledger, dataclasses.replace(privacy, max_epsilon=ledger.epsilon(delta) + 0.01), "site-a",
                        "run-a", unit="patient", records=200, evaluations=3)
    assert full.noisy(3, "validation", np.zeros(12), 1.0) is None
    assert len(PrivacyLedger(ledger.path).records) == len(ledger.records)


def test_a_release_asked_again_is_answered_from_the_ledger_not_drawn_again(tmp_path):
    """The same (run, round, statistic) twice: the noisy values already sent, from the ledger,
    and nothing spent; a line from before the values were stored answers nothing."""
    path = tmp_path / "ledger.jsonl"
    privacy = PrivacyConfig(target_epsilon=4.0, planned_rounds=2)
    releases = SiteReleases(PrivacyLedger(path), privacy, "site-a", "run-a", unit="image", records=200, evaluations=3)
    first = releases.noisy(0, "validation", np.zeros(12), 1.0)
    text = path.read_text()
    again = releases.noisy(0, "validation", np.ones(12), 1.0)  # another model's counts, same round
    assert np.array_equal(again, first) and path.read_text() == text
    assert PrivacyLedger(path).releases[0].values == [float(v) for v in first]
    old = PrivacyLedger(tmp_path / "old.jsonl")
    old.append(dataclasses.replace(PrivacyLedger(path).releases[0], values=None, previous=None))
    older = SiteReleases(old, privacy, "site-a", "run-a", unit="image", records=200, evaluations=3)
    assert older.noisy(0, "validation", np.zeros(12), 1.0) is None
    assert len(PrivacyLedger(old.path).records) == 1, "not drawn again"


def test_a_release_past_the_per_run_ceiling_is_withheld_and_spends_nothing(tmp_path):
    path = tmp_path / "ledger.jsonl"
    privacy = PrivacyConfig(target_epsilon=8.0, max_epsilon_per_run=1.0, planned_rounds=1)
    releases = SiteReleases(PrivacyLedger(path), privacy, "site-a", "run-a", unit="image", records=200, evaluations=1)
    sent = [releases.noisy(r, "validation", np.zeros(12), 1.0) for r in range(80)]
    ledger = PrivacyLedger(path)
    assert sent[0] is not None and sent[-1] is None, "more releases than planned reach the ceiling"
    assert ledger.epsilon(ledger.releases[0].delta) <= 1.0 * (1 + 1e-6)
    assert len(ledger.records) == sum(s is not None for s in sent)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> SiteSettings:
    tmp = tmp_path_factory.mktemp("release")
    images, parts = synthetic_sites(80, 1, alpha=10.0, size=32, seed=3)
    export_sites(images, parts, tmp / "sites")
    # one run may take the whole budget here: these tests follow a run to its target
    return SiteSettings(data=str(tmp / "sites" / "site-1"), name="site-1", cache_dir=str(tmp / "cache"),
                        max_epsilon=4.0, max_epsilon_per_run=4.0)


def _initial_model() -> np.ndarray:
    return pack(model_state(build_model(ModelConfig.from_settings(RUN))))


def _whole_run(site: SiteSettings) -> list:
    """Every reply of a site over RUN: three training rounds and the final evaluation."""
    work, model, replies = SiteWork(site), _initial_model(), []
    for round_number in range(1, RUN.rounds + 1):
        replies.append(work.train(RUN, model, round_number))
        model = replies[-1].model
    replies.append(work.evaluate(RUN, model))
    return replies


def test_a_default_site_sends_noisy_counts_and_ends_the_run_at_its_target(site, tmp_path):
    site = dataclasses.replace(site, ledger=str(tmp_path / "ledger.jsonl"))
    replies = _whole_run(site)
    allowed = {*protocol.GUARANTEE_METRICS, "examples", protocol.VALIDATION_COUNTS, protocol.VALIDATION_NOISE}
    assert all(set(r.metrics) <= allowed for r in replies), [sorted(r.metrics) for r in replies]
    assert all(protocol.VALIDATION_COUNTS in r.metrics for r in replies), "models 0 to 3 are all validated"
    ledger = PrivacyLedger(site.ledger)
    [count] = [r for r in ledger.releases if r.statistic == "examples"]
    assert count.private and count.round == 1
    assert {r.metrics["examples"] for r in replies[:3]} == {max(1, round(count.value))}, "one draw, resent"
    validations = [r for r in ledger.releases if r.statistic == "validation"]
    assert [r.round for r in validations] == [0, 1, 2, 3] and all(r.private for r in validations)
    assert all(r.privacy_unit == "patient" for r in ledger.records if hasattr(r, "privacy_unit"))
    # DP-SGD was calibrated around the five planned releases: the run ends at its target
    spent = ledger.epsilon(count.delta)
    assert 0.97 * 4.0 <= spent <= 4.0 + 1e-9
    assert all(r.metrics["status"] == RoundStatus.TRAINED for r in replies[:3])
    account, findings = site_account(site.ledger)
    assert account["epsilon_spent"] == pytest.approx(spent, rel=1e-12)
    assert not [f for f in findings if f.level == "critical" or f.code == "non-private-release"]


def test_statistics_a_site_releases_exactly_are_sent_recorded_and_reported(site, tmp_path):
    site = dataclasses.replace(site, ledger=str(tmp_path / "ledger.jsonl"),
                               release_exact="examples,validation,loss,timing")
    replies = _whole_run(site)
    train = replies[0].metrics
    assert {"loss", "seconds-setup", "seconds-train", "val-auroc", "val-loss"} <= set(train)
    assert protocol.VALIDATION_COUNTS not in train
    assert "val-auroc" in replies[-1].metrics
    ledger = PrivacyLedger(site.ledger)
    exact = {(r.statistic, r.round) for r in ledger.releases if not r.private}
    assert {("examples", 1), ("loss", 1), ("timing", 1), ("validation", 0), ("validation", 3)} <= exact
    assert not [r for r in ledger.releases if r.private], "nothing left to add noise to"
    assert train["examples"] == ledger.entries[0].examples, "the exact count"
    account, findings = site_account(site.ledger)
    assert account["epsilon_spent"] < account["epsilon_second_opinion"], \
        "exact releases spend and hide nothing (the second opinion, RDP, is the looser bound)"
    flagged = {f.message.split(": ")[1].split(" sent")[0] for f in findings if f.code == "non-private-release"}
    assert flagged == {"examples", "validation", "loss", "timing"}
    [run] = account["runs"]
    assert {(w["what"], w["private"]) for w in run["released"]} == \
        {("model update", True), ("examples", False), ("validation", False), ("loss", False), ("timing", False)}
    report = build_report(ledgers=[site.ledger])  # the whole report, as fedmed-report writes it
    assert "non-private-release" in report["warning_codes"]
    assert report_document(report, []).blocks, "and it renders"
