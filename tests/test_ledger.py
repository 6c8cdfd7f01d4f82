"""The site's ledger: restarts keep composing, refusals change nothing, a torn write counts as spent, one
run cannot take the whole budget."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fedmed.privacy.accounting import epsilon
from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.ledger import LedgerError, PrivacyLedger
from fedmed.protocol import RoundStatus
from tests.privacy_helpers import run_rounds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = PrivacyConfig(target_epsilon=3.0, planned_rounds=3)


def run_in_new_process(ledger_path, rounds: int, first_round: int) -> None:
    script = textwrap.dedent(
        f"""
        from fedmed.privacy.budget import PrivacyConfig
        from tests.privacy_helpers import run_rounds
        run_rounds({str(ledger_path)!r}, {rounds}, PrivacyConfig(target_epsilon=3.0, planned_rounds=3),
                   first_round={first_round})
        """
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=300)


@pytest.mark.slow
def test_restarted_site_keeps_composing(tmp_path):
    run_in_new_process(tmp_path / "restarted.jsonl", rounds=2, first_round=1)
    run_in_new_process(tmp_path / "restarted.jsonl", rounds=1, first_round=3)
    run_rounds(tmp_path / "one-process.jsonl", 3, PLAN)
    restarted = PrivacyLedger(tmp_path / "restarted.jsonl")
    continuous = PrivacyLedger(tmp_path / "one-process.jsonl")
    assert [e.round for e in restarted.entries] == [1, 2, 3]
    assert restarted.entries[-1].epsilon == pytest.approx(continuous.entries[-1].epsilon, rel=1e-9)
    assert restarted.entries[-1].accountant_state == continuous.entries[-1].accountant_state
    assert len({e.noise_multiplier for e in restarted.entries}) == 1, "one noise level for the whole run"
    assert 0.95 * 3.0 <= restarted.entries[-1].epsilon <= 3.0


def test_a_round_past_max_epsilon_is_refused_recorded_and_spends_nothing(tmp_path):
    path = tmp_path / "ledger.jsonl"
    tight = PrivacyConfig(target_epsilon=3.0, max_epsilon=2.0, planned_rounds=3)
    results = run_rounds(path, 3, tight)
    assert results[0].status == RoundStatus.TRAINED and results[-1].status == RoundStatus.BUDGET_EXHAUSTED
    refused = [r for r in results if r.status == RoundStatus.BUDGET_EXHAUSTED]
    assert refused, "the third round would pass 2.0"
    trained = [r for r in results if r.status == RoundStatus.TRAINED]
    assert all(r.epsilon <= 2.0 for r in trained)
    first_refusal = refused[0]
    assert "budget exhausted" in first_refusal.message and "max_epsilon 2" in first_refusal.message
    assert first_refusal.steps == 0 and first_refusal.loss is None
    ledger = PrivacyLedger(path)
    spent = ledger.epsilon(ledger.entries[-1].delta)
    again = run_rounds(path, 1, tight, first_round=9)
    assert again[0].status == RoundStatus.BUDGET_EXHAUSTED
    after = PrivacyLedger(path)
    assert len(after.entries) == len(trained) and after.epsilon(after.entries[-1].delta) == spent
    assert [r.round for r in after.refusals] == [r + 1 for r, res in enumerate(results)
                                                 if res.status == RoundStatus.BUDGET_EXHAUSTED] + [9]
    last = after.refusals[-1]
    assert last.max_epsilon == 2.0 and last.epsilon_before == pytest.approx(spent)
    assert last.epsilon_after > 2.0 and "max_epsilon 2" in last.reason
    assert after.entries[0].max_epsilon == 2.0 and after.entries[0].target_epsilon == 3.0


def test_budgets_differ_per_site(tmp_path):
    generous = run_rounds(tmp_path / "a.jsonl", 3, PrivacyConfig(target_epsilon=3.0, max_epsilon=10.0, planned_rounds=3))
    strict = run_rounds(tmp_path / "b.jsonl", 3, PrivacyConfig(target_epsilon=3.0, max_epsilon=1.5, planned_rounds=3))
    assert all(r.status == RoundStatus.TRAINED for r in generous)
    assert any(r.status == RoundStatus.BUDGET_EXHAUSTED for r in strict)


def test_non_private_rounds_are_loud_and_spend_everything(tmp_path, caplog):
    path = tmp_path / "ledger.jsonl"
    [result] = run_rounds(path, 1, PrivacyConfig(dp=False))
    assert result.status == RoundStatus.TRAINED and not result.dp and math.isinf(result.epsilon)
    assert "NON-PRIVATE" in result.message
    assert any("NON-PRIVATE" in record.message for record in caplog.records)
    entry = json.loads(path.read_text().splitlines()[0])
    assert entry["dp"] is False and entry["epsilon"] is None and entry["noise_multiplier"] == 0.0
    assert math.isinf(PrivacyLedger(path).epsilon(1e-5))
    [after] = run_rounds(path, 1, PrivacyConfig(target_epsilon=8.0), first_round=2, run_id="run-b")
    assert after.status == RoundStatus.BUDGET_EXHAUSTED and "non-private" in after.message
    [capped] = run_rounds(tmp_path / "capped.jsonl", 1, PrivacyConfig(dp=False, max_epsilon=5.0))
    assert capped.status == RoundStatus.BUDGET_EXHAUSTED and "unbounded" in capped.message


def test_a_torn_last_line_stops_the_site_and_is_never_dropped(tmp_path):
    """What the torn line spent is unknown: it counts as the whole remaining budget, so the
    site trains nothing, and the line stays in the file for the person who restores it."""
    path = tmp_path / "ledger.jsonl"
    run_rounds(path, 2, PLAN)
    good = path.read_text()
    torn = good + good.splitlines()[-1][:37]  # a write cut short
    path.write_text(torn)
    with pytest.raises(LedgerError, match=r"ledger\.jsonl: line 3, the last, cannot be read.*whole remaining "
                                          r"budget.*restore the ledger from a backup"):
        PrivacyLedger(path)
    with pytest.raises(LedgerError, match="line 3, the last"):
        run_rounds(path, 1, PLAN, first_round=3)
    assert path.read_text() == torn, "the file is never rewritten without the torn line"


def test_damage_before_the_last_line_stops_the_site(tmp_path):
    path = tmp_path / "ledger.jsonl"
    run_rounds(path, 2, PLAN)
    lines = path.read_text().splitlines()
    path.write_text(lines[0][:-5] + "\n" + lines[1] + "\n")
    with pytest.raises(LedgerError, match=r"line 1 of 2 is damaged.*Restore the ledger"):
        PrivacyLedger(path)


def test_killing_a_writer_mid_append_never_corrupts_the_ledger(tmp_path):
    path = tmp_path / "ledger.jsonl"
    run_rounds(path, 1, PLAN)
    template = path.read_text().splitlines()[0]
    writer = textwrap.dedent(
        f"""
        import dataclasses, json
        from fedmed.privacy.ledger import LedgerEntry, PrivacyLedger
        ledger = PrivacyLedger({str(path)!r})
        entry = LedgerEntry.from_dict(json.loads({template!r}))
        for number in range(2, 100000):
            ledger.append(dataclasses.replace(entry, round=number))
        """
    )
    process = subprocess.Popen([sys.executable, "-c", writer], cwd=ROOT)
    try:
        deadline = time.time() + 60
        while len(PrivacyLedger(path).entries) < 20 and time.time() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    survivor = PrivacyLedger(path)
    rounds = [e.round for e in survivor.entries]
    assert len(rounds) >= 20 and rounds == list(range(1, len(rounds) + 1))


def test_every_entry_states_its_privacy_unit_and_old_entries_read_as_image_level(tmp_path):
    run_rounds(tmp_path / "ledger.jsonl", 1, PrivacyConfig(target_epsilon=8.0, planned_rounds=2))
    line = json.loads((tmp_path / "ledger.jsonl").read_text().splitlines()[-1])
    assert line["privacy_unit"] == "image"
    del line["privacy_unit"]  # a ledger written before the field existed
    (tmp_path / "old.jsonl").write_text(json.dumps(line) + "\n")
    assert [e.privacy_unit for e in PrivacyLedger(tmp_path / "old.jsonl").entries] == ["image"]


def test_a_run_cannot_take_more_than_the_per_run_ceiling_even_lying_about_its_rounds(tmp_path):
    """A run that says it has one round is calibrated to land at the ceiling in that round;
    its further rounds would pass the ceiling and are refused, naming the setting. Another
    run still has the rest of the lifetime budget."""
    path = tmp_path / "ledger.jsonl"
    capped = PrivacyConfig(target_epsilon=8.0, max_epsilon=8.0, max_epsilon_per_run=3.0, planned_rounds=1)
    results = run_rounds(path, 3, capped)
    assert [r.status for r in results] == [RoundStatus.TRAINED] + 2 * [RoundStatus.BUDGET_EXHAUSTED]
    assert "max_epsilon_per_run 3" in results[1].message and "run run-a" in results[1].message
    ledger = PrivacyLedger(path)
    delta = ledger.entries[0].delta
    assert 0.95 * 3.0 <= ledger.epsilon(delta) <= 3.0 * (1 + 1e-6)
    assert [r.round for r in ledger.refusals] == [2, 3] and ledger.entries[0].max_epsilon_per_run == 3.0
    [other] = run_rounds(path, 1, capped, run_id="run-b")
    assert other.status == RoundStatus.TRAINED and other.epsilon > ledger.epsilon(delta)
    run_b = PrivacyLedger(path).run_history("run-b")
    assert epsilon(run_b, delta) <= 3.0 * (1 + 1e-6), "the second run is held to the ceiling by itself too"
