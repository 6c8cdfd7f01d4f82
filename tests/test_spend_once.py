"""A spend is never lost and never repeated, and no single run takes a site's lifetime budget
(issue 24): a real site (``SiteWork``) on small synthetic data, with its real ledger."""

from __future__ import annotations

import errno
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedmed import protocol
from fedmed.config import RunSettings, SiteSettings
from fedmed.data.make_sites import export_sites, synthetic_sites
from fedmed.model import ModelConfig, build_model
from fedmed.privacy.ledger import LedgerError, PrivacyLedger
from fedmed.protocol import RoundStatus
from fedmed.report import build_report
from fedmed.site.resend import ResendCache
from fedmed.site.work import SiteWork
from fedmed.vector import pack
from fedmed.weights import model_state

RUN = RunSettings(run_id="run-once", rounds=2, width=8, image_size=16, batch_size=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("spend-once")
    images, parts = synthetic_sites(60, 1, alpha=10.0, size=32, seed=4)
    export_sites(images, parts, tmp / "sites")
    return tmp


@pytest.fixture
def site(data, tmp_path) -> SiteSettings:
    """A site with the default budget (max_epsilon 8) and its own fresh ledger."""
    return SiteSettings(data=str(data / "sites" / "site-1"), name="site-1", cache_dir=str(data / "cache"),
                        ledger=str(tmp_path / "state" / "ledger.jsonl"))


def initial_model(run: RunSettings = RUN) -> np.ndarray:
    return pack(model_state(build_model(ModelConfig.from_settings(run))))


def one_ulp_off(vector: np.ndarray) -> np.ndarray:
    """The same model but for one weight, moved to the next float32."""
    changed = vector.copy()
    changed[0] = np.nextafter(changed[0], np.float32(np.inf))
    assert not np.array_equal(changed, vector)
    return changed


def spent(site: SiteSettings) -> tuple[float, int]:
    """(the ledger's epsilon at its delta, its number of lines)."""
    ledger = PrivacyLedger(site.ledger)
    delta = ledger.entries[0].delta if ledger.entries else ledger.releases[0].delta
    return ledger.epsilon(delta), len(Path(site.ledger).read_text().splitlines())


def test_a_torn_last_line_stops_the_site_keeps_the_line_and_reads_as_spent(site):
    first = SiteWork(site).train(RUN, initial_model(), 1)
    assert first.metrics["status"] == RoundStatus.TRAINED
    path = Path(site.ledger)
    good = path.read_text()
    torn = good + good.splitlines()[-1][:50]  # the last write cut short
    path.write_text(torn)
    lines = len(torn.splitlines())
    with pytest.raises(LedgerError, match=rf"{path.name}: line {lines}, the last, cannot be read.*restore the "
                                          "ledger from a backup"):
        SiteWork(site).train(RUN, first.model, 2)
    assert path.read_text() == torn, "the torn line is still there: nothing rewrote the ledger"
    report = build_report(None, [path])
    [finding] = [w for w in report["warnings"] if w["code"] == "ledger-torn-line"]
    assert finding["level"] == "critical" and f"{path}: line {lines}" in finding["message"]
    [account] = report["sites"]
    assert account["budget"] == 8.0 and account["epsilon_spent"] >= 8.0 and account["budget_left"] == 0.0


def test_the_same_round_with_a_model_one_ulp_off_is_paid_once(site):
    work = SiteWork(site)
    model = initial_model()
    first = work.train(RUN, model, 1)
    assert first.metrics["status"] == RoundStatus.TRAINED
    after_first = spent(site)
    for asker in (work, SiteWork(site)):  # the same process, and a restarted one (from resend.npz)
        again = asker.train(RUN, one_ulp_off(model), 1)
        assert "resent" in again.message and np.array_equal(again.model, first.model)
        assert again.metrics == first.metrics
        assert spent(site) == after_first


def test_a_trained_round_whose_update_is_gone_is_refused_without_spending(site):
    first = SiteWork(site).train(RUN, initial_model(), 1)
    (Path(site.ledger).parent / "resend.npz").unlink()
    after_first = spent(site)
    refused = SiteWork(site).train(RUN, one_ulp_off(first.model), 1)
    assert refused.model is None and refused.metrics["status"] == RoundStatus.BUDGET_EXHAUSTED
    assert "already trained" in refused.message and "run-once" in refused.message
    assert set(refused.metrics) <= protocol.REPLY_METRICS
    assert spent(site) == after_first, "no ledger line for the repeat, nothing spent"


def test_the_same_evaluation_twice_is_paid_once(site):
    work = SiteWork(site)
    model = initial_model()
    first = work.evaluate(RUN, model)
    assert protocol.VALIDATION_COUNTS in first.metrics
    after_first = spent(site)
    again = SiteWork(site).evaluate(RUN, one_ulp_off(model))
    assert again.metrics == first.metrics, "the noisy counts already sent, not a new draw"
    assert spent(site) == after_first


def test_an_exact_evaluation_twice_is_recorded_once(site):
    site = replace(site, release_exact="validation")
    work = SiteWork(site)
    work.evaluate(RUN, initial_model())
    work.evaluate(RUN, one_ulp_off(initial_model()))
    exact = [(r.run_id, r.round, r.statistic) for r in PrivacyLedger(site.ledger).releases if not r.private]
    assert exact == [("run-once", RUN.rounds, "validation")]


def test_a_full_disk_for_the_resend_file_still_delivers_the_paid_update(site, monkeypatch, caplog):
    def full_disk(self, request, reply):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(ResendCache, "put", full_disk)
    work = SiteWork(site)
    model = initial_model()
    first = work.train(RUN, model, 1)
    assert first.metrics["status"] == RoundStatus.TRAINED and first.model is not None
    assert any("could not be saved" in r.message for r in caplog.records)
    after_first = spent(site)
    retry = work.train(RUN, model.copy(), 1)
    assert "resent" in retry.message and np.array_equal(retry.model, first.model)
    assert spent(site) == after_first, "a retry spends nothing"
    restarted = SiteWork(site).train(RUN, model, 1)  # nothing on disk: refused, not trained again
    assert restarted.metrics["status"] == RoundStatus.BUDGET_EXHAUSTED and restarted.model is None
    assert spent(site) == after_first


def _truncated_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.zeros(100, dtype=np.uint8), model=np.ones(1000, dtype=np.float32))
    return buffer.getvalue()[:300]


@pytest.mark.parametrize("content", [b"", _truncated_npz(), b"not a zip at all"], ids=["empty", "truncated",
                                                                                        "not-a-zip"])
def test_a_damaged_resend_file_is_moved_aside_and_the_site_trains(site, content, caplog):
    state = Path(site.ledger).parent
    state.mkdir(parents=True)
    (state / "resend.npz").write_bytes(content)
    reply = SiteWork(site).train(RUN, initial_model(), 1)
    assert reply.metrics["status"] == RoundStatus.TRAINED
    [aside] = state.glob("resend.npz.damaged-*")
    assert aside.read_bytes() == content, "kept for a person to look at"
    assert any("moved aside" in r.message for r in caplog.records)
    kept = ResendCache(state).get((RUN.run_id, 1))
    assert kept is not None and np.array_equal(kept.model, reply.model), "the new update replaced it"


def test_one_run_takes_at_most_the_per_run_ceiling_and_another_run_can_still_spend(site):
    """By default a site's per-run ceiling is half its lifetime budget: a run that asks for
    one round, with the site's target at its whole budget (8), still ends at 4."""
    one_round = replace(RUN, run_id="run-greedy", rounds=1)
    work = SiteWork(site)
    model = initial_model(one_round)
    trained = work.train(one_round, model, 1)
    assert trained.metrics["status"] == RoundStatus.TRAINED
    ceiling = site.max_epsilon / 2
    assert spent(site)[0] <= ceiling * (1 + 1e-6)
    work.evaluate(one_round, trained.model)
    greedy, _ = spent(site)
    assert 0.9 * ceiling <= greedy <= ceiling * (1 + 1e-6), "the run, releases included, lands at its ceiling"
    later = work.train(replace(one_round, run_id="run-later"), model, 1)
    assert later.metrics["status"] == RoundStatus.TRAINED and spent(site)[0] > greedy


def test_a_site_sets_its_own_per_run_ceiling(site):
    site = replace(site, max_epsilon_per_run=1.5)
    reply = SiteWork(site).train(replace(RUN, rounds=1), initial_model(), 1)
    assert reply.metrics["status"] == RoundStatus.TRAINED
    assert spent(site)[0] <= 1.5 * (1 + 1e-6)
    assert PrivacyLedger(site.ledger).entries[0].max_epsilon_per_run == 1.5
