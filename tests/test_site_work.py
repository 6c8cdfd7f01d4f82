"""A site's round work outside Flower: validation, private training, and repeated rounds."""

from __future__ import annotations

import stat
from dataclasses import replace as dataclass_replace

import numpy as np
import pytest

from fedmed.config import RunSettings, SiteSettings
from fedmed.data.make_sites import export_sites, synthetic_sites
from fedmed.model import ModelConfig, build_model
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.protocol import RoundStatus
from fedmed.site.work import SiteWork
from fedmed.vector import pack
from fedmed.weights import model_state

RUN = RunSettings(run_id="run-test", rounds=3, width=8, image_size=16, batch_size=16)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> SiteSettings:
    tmp = tmp_path_factory.mktemp("site-work")
    images, parts = synthetic_sites(60, 1, alpha=10.0, size=32, seed=2)
    export_sites(images, parts, tmp / "sites")
    return SiteSettings(data=str(tmp / "sites" / "site-1"), name="site-1", ledger=str(tmp / "ledger.jsonl"),
                        cache_dir=str(tmp / "cache"))


def _initial_model() -> np.ndarray:
    return pack(model_state(build_model(ModelConfig.from_settings(RUN))))


def test_a_round_asked_twice_with_the_same_model_is_not_paid_twice(site):
    work = SiteWork(site)
    model = _initial_model()
    first = work.train(RUN, model, 1)
    assert first.metrics["status"] == RoundStatus.TRAINED and first.model.shape == model.shape
    assert not np.array_equal(first.model, model)
    again = work.train(RUN, model.copy(), 1)
    assert "resent" in again.message and np.array_equal(again.model, first.model)
    assert again.metrics["epsilon"] == first.metrics["epsilon"]
    assert [e.round for e in PrivacyLedger(site.ledger).entries] == [1]

    changed = work.train(RUN, first.model, 1)  # same round, another model: still the round already paid for
    assert "resent" in changed.message and np.array_equal(changed.model, first.model)
    assert changed.metrics["epsilon"] == first.metrics["epsilon"]
    assert [e.round for e in PrivacyLedger(site.ledger).entries] == [1]


def test_a_model_that_does_not_fit_the_run_is_refused(site):
    work = SiteWork(site)
    with pytest.raises(ValueError, match="expected float32"):
        work.train(RUN, _initial_model()[:-1], 1)
    broken = _initial_model()
    broken[0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        work.evaluate(RUN, broken)


def test_a_site_that_trained_validates_the_next_model_as_a_fresh_one_does(site, tmp_path):
    """The site keeps one built network between rounds; nothing of a round's training may
    leak into how it scores the next global model. (The site releases its exact scores here:
    noisy counts would differ between any two validations.)"""
    site = dataclass_replace(site, release_exact="validation")
    work = SiteWork(dataclass_replace(site, ledger=str(tmp_path / "ledger.jsonl")))
    trained = work.train(RUN, _initial_model(), 1)
    assert trained.metrics["status"] == RoundStatus.TRAINED
    next_global = _initial_model() * 0.5
    again = work.evaluate(RUN, next_global).metrics
    fresh = SiteWork(site).evaluate(RUN, next_global).metrics
    assert again == fresh and again["val-examples"] > 0
    assert work.evaluate(RUN, trained.model).metrics != fresh, "the scores do depend on the model"


def test_a_restarted_site_resends_the_round_it_already_paid_for(site, tmp_path):
    """The site process dies between a round and the coordinator's repetition of it; the
    new process finds the update on the site's disk and spends nothing."""
    site = dataclass_replace(site, ledger=str(tmp_path / "state" / "ledger.jsonl"))
    model = _initial_model()
    first = SiteWork(site).train(RUN, model, 1)
    cache = tmp_path / "state" / "resend.npz"
    assert cache.is_file() and stat.S_IMODE(cache.stat().st_mode) == 0o600, "owner-only: derived from site data"
    releases = PrivacyLedger(site.ledger).releases
    restarted = SiteWork(site)  # a new process: nothing in memory
    again = restarted.train(RUN, model.copy(), 1)
    assert "resent" in again.message and np.array_equal(again.model, first.model)
    assert again.metrics == first.metrics, "the same noisy count and validation counts, not new draws"
    assert [e.round for e in PrivacyLedger(site.ledger).entries] == [1], "the round is in the ledger once"
    assert PrivacyLedger(site.ledger).releases == releases, "and its releases too"
    other_run = restarted.train(dataclass_replace(RUN, run_id="run-other"), model, 1)
    assert "resent" not in other_run.message, "the key is (run, round, model)"
    assert [e.round for e in PrivacyLedger(site.ledger).entries] == [1, 1]
    neighbour = SiteWork(dataclass_replace(site, name="site-9", ledger=str(tmp_path / "state" / "other.jsonl")))
    own = neighbour.train(dataclass_replace(RUN, run_id="run-other"), model, 1)
    assert own.site == "site-9" and "resent" not in own.message, "a folder shared with another site: never its update"
