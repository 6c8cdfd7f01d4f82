"""The ledger's accountant (issue 27): its epsilon against an independent method, for DP-SGD
rounds with releases at image and at patient level, and a ledger begun with RDP that
continues with PLD soundly (never below its RDP-era spend, never decreasing)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fedmed.model import build_model
from fedmed.privacy.accounting import ACCOUNTANT, epsilon
from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.ledger import GENESIS, LedgerEntry, LedgerRelease, PrivacyLedger, line_hash, verify_chain
from fedmed.privacy.rdp import rdp_epsilon
from fedmed.privacy.release import SiteReleases
from fedmed.report.site import ledger_account
from fedmed.train import TrainingData, privacy_unit, train_round
from tests.privacy_helpers import TINY_MODEL, TINY_TRAIN, independent_epsilon, independent_rdp_epsilon, tiny_site


def spending(ledger: PrivacyLedger) -> list[LedgerEntry | LedgerRelease]:
    """The lines that spend: DP-SGD rounds and private releases, in ledger order."""
    return [r for r in ledger.records if (isinstance(r, LedgerEntry) and r.dp) or
            (isinstance(r, LedgerRelease) and r.private)]


def site_run(path, unit: str, run_id: str = "run-a", rounds: int = 3, target: float = 4.0, first_round: int = 1):
    """A site's run as SiteWork makes it: the validation of the starting model and the record
    count released with noise, DP-SGD rounds calibrated around the releases still to come,
    the final model's validation released."""
    images, labels = tiny_site(96)
    patients = np.array([f"p{i // 3}" for i in range(96)])  # 32 patients, 3 images each
    privacy = PrivacyConfig(target_epsilon=target, max_epsilon=target, planned_rounds=rounds, privacy_unit=unit)
    data = TrainingData(images, labels, privacy_unit(privacy, patients, "site-a")[1])
    records = 32 if unit == "patient" else 96
    ledger = PrivacyLedger(path)
    releases = SiteReleases(ledger, privacy, "site-a", run_id, unit=unit, records=records, evaluations=2)
    assert releases.noisy(first_round - 1, "validation", np.zeros(12), 1.0) is not None
    assert releases.count(first_round) != 1.0
    torch.manual_seed(0)
    model = build_model(TINY_MODEL)
    for number in range(first_round, first_round + rounds):
        train_round(model, data, train=TINY_TRAIN, privacy=privacy, ledger=ledger, site="site-a", run_id=run_id,
                    round_number=number, reserved=releases.reserved())
    assert releases.noisy(first_round + rounds - 1, "validation", np.zeros(12), 1.0) is not None
    return PrivacyLedger(path)


@pytest.mark.parametrize("unit", ["image", "patient"])
def test_every_spend_equals_opacus_prv_of_the_same_events_within_one_percent(tmp_path, unit):
    """Each round's and release's epsilon, against Opacus's PRV accountant (another method,
    another library) given the events rebuilt from the lines' own mechanism parameters, not
    from the accountant state the ledger wrote."""
    ledger = site_run(tmp_path / "ledger.jsonl", unit)
    lines = spending(ledger)
    assert len(ledger.entries) == 3 and len(ledger.releases) == 3
    assert {r.privacy_unit for r in lines} == {unit} and all(r.accountant == ACCOUNTANT == "pld" for r in lines)
    events: list[tuple[float, float, int]] = []
    for line in lines:
        if isinstance(line, LedgerEntry):
            events.append((line.noise_multiplier, line.sample_rate, line.steps))
        else:
            events.append((line.noise_multiplier, 1.0, 1))
        assert line.epsilon == pytest.approx(independent_epsilon(events, line.delta), rel=0.01)
    assert ledger.entries[0].examples == (32 if unit == "patient" else 96)
    final = lines[-1].epsilon
    assert 0.9 * 4.0 <= final <= 4.0, "calibrated around its releases, the run lands just under its target"
    assert final < independent_rdp_epsilon(ledger.history, lines[-1].delta), "tighter than RDP"


def rewrite_as_rdp_era(path) -> None:
    """Turn a ledger into what fedmed wrote before issue 27: every epsilon by RDP (Opacus's
    analysis), rounds naming "rdp", release lines without an accountant, the chain relinked."""
    lines, previous = [], GENESIS
    for text in path.read_text().splitlines():
        data = json.loads(text)
        if data.get("epsilon") is not None:
            data["epsilon"] = rdp_epsilon([tuple(s) for s in data["accountant_state"]], data["delta"])
        if data.get("kind") == "release":
            del data["accountant"]
        else:
            data["accountant"] = "rdp"
        data["previous"] = previous
        line = json.dumps(data, sort_keys=True, allow_nan=False)
        lines.append(line)
        previous = line_hash(line)
    path.write_text("".join(f"{line}\n" for line in lines))


def test_a_ledger_begun_with_rdp_continues_never_below_its_rdp_spend_and_never_decreasing(tmp_path):
    path = tmp_path / "ledger.jsonl"
    site_run(path, "image", run_id="run-a", rounds=2, target=3.0)
    rewrite_as_rdp_era(path)
    old = PrivacyLedger(path)
    assert verify_chain(path.read_text()).status == "chained"
    assert {r.accountant for r in old.records if isinstance(r, (LedgerEntry, LedgerRelease))} == {"rdp"}
    delta = old.entries[-1].delta
    old_lines, old_state = len(old.records), old.history
    rdp_era = rdp_epsilon(old_state, delta)
    assert rdp_era == pytest.approx(independent_rdp_epsilon(old_state, delta), rel=0.01)
    assert epsilon(old_state, delta) < rdp_era, "PLD of the same history is lower: the floor is needed"
    assert old.epsilon(delta) == rdp_era, "what the ledger recorded stays spent"

    site_run(path, "image", run_id="run-b", rounds=2, target=6.0, first_round=1)
    ledger = PrivacyLedger(path)
    new = spending(ledger)[len(spending(old)):]
    assert len(ledger.records) > old_lines and all(r.accountant == "pld" for r in new)
    spent = [r.epsilon for r in spending(ledger)]
    assert spent == sorted(spent), "the recorded spend never decreases"
    assert all(r.epsilon >= rdp_era for r in new), "never below the RDP composition of its RDP-era history"
    assert all(r.epsilon == max(epsilon(r.accountant_state, r.delta), rdp_era) for r in new)
    first = new[0]  # run-b's first validation release: PLD of everything is still below the RDP-era spend
    assert epsilon(first.accountant_state, delta) < rdp_era and first.epsilon == rdp_era
    assert new[-1].epsilon > rdp_era and new[-1].epsilon <= 6.0
    account, findings = ledger_account(path)
    assert not [f for f in findings if f.level == "critical"], [f.message for f in findings]
    assert account.accountant == "pld" and account.epsilon_spent == new[-1].epsilon
    assert {r["accountant"] for r in account.rounds} == {"rdp", "pld"}


def test_the_report_flags_a_pld_line_recorded_below_the_earlier_rdp_spend(tmp_path):
    """The floor is part of the recheck: a continued line that records PLD alone, below what
    the RDP-era lines recorded, is a critical arithmetic finding."""
    path = tmp_path / "ledger.jsonl"
    site_run(path, "image", run_id="run-a", rounds=2, target=3.0)
    rewrite_as_rdp_era(path)
    ledger = PrivacyLedger(path)
    last = ledger.releases[-1]
    below = epsilon(last.accountant_state, last.delta)
    ledger.append(dataclasses.replace(last, round=9, accountant="pld", epsilon=below))
    _, findings = ledger_account(path)
    assert any(f.code == "ledger-arithmetic" and "round 9" in f.message for f in findings)


@pytest.mark.parametrize("rate, sigma, steps", [(1e-3, 2.0, 10_000), (1e-3, 10.0, 10_000), (1e-4, 2.0, 100_000)])
def test_at_small_sample_rates_and_epsilons_the_ledger_is_not_looser_than_rdp(rate, sigma, steps):
    """The PLD grid's pessimistic rounding costs a fixed amount of epsilon over many steps
    (about 0.1 on the coarse grid here); below 0.5 the ledger refines the grid, so it stays at
    or below RDP, and above Opacus's PRV (both sound bounds of the same steps)."""
    history = [(sigma, rate, steps)]
    ledger = epsilon(history, 1e-6)
    assert ledger < rdp_epsilon(history, 1e-6)
    assert ledger >= independent_epsilon(history, 1e-6) - 0.01
