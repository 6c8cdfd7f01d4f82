"""The one-run canary audit's arithmetic (fedmed.audit.bounds) and its place in a site's report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedmed.audit import SITE_AUDIT_FILE
from fedmed.audit.bounds import GUESS_FRACTIONS, audit_bound, epsilon_lower_bound, p_value
from fedmed.privacy.budget import PrivacyConfig
from fedmed.report.site import ledger_account
from tests.privacy_helpers import run_rounds


def test_with_every_guess_right_and_no_delta_the_bound_is_the_closed_form():
    """All r guesses right: P = q^r with q = e^eps / (1 + e^eps), so the bound solves q^r = alpha."""
    for guesses in (10, 40, 200):
        q = 0.05 ** (1 / guesses)
        expected = math.log(q / (1 - q))
        assert epsilon_lower_bound(500, guesses, guesses, 0.0, 0.05) == pytest.approx(expected, rel=1e-6)


def test_delta_only_weakens_the_bound_and_half_right_proves_nothing():
    strong = epsilon_lower_bound(1000, 100, 95, 0.0, 0.05)
    assert 0 < epsilon_lower_bound(1000, 100, 95, 1e-5, 0.05) < strong
    assert epsilon_lower_bound(1000, 100, 50, 0.0, 0.05) == 0.0
    # the p-value grows with epsilon: a larger claim is harder to reject
    values = [p_value(1000, 100, 80, eps, 1e-5) for eps in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] < 0.05 < values[-1]


def test_an_attacker_guessing_at_random_gets_no_bound_and_a_perfect_one_gets_a_large_one():
    rng = np.random.default_rng(5)
    included = rng.random(400) < 0.5
    assert audit_bound(rng.random(400), included, 1e-5).epsilon == 0.0
    perfect = audit_bound(included.astype(float) + 0.01 * rng.random(400), included, 1e-5)
    # the most guesses that can all be right: k "in" and k "out" with k <= min(included, excluded)
    k = max(round(f * 400) for f in GUESS_FRACTIONS if round(f * 400) <= min(included.sum(), (~included).sum()))
    assert perfect.guesses == 2 * k and perfect.correct == 2 * k
    assert perfect.epsilon == pytest.approx(
        epsilon_lower_bound(400, 2 * k, 2 * k, 1e-5, 0.05 / len(GUESS_FRACTIONS)), rel=1e-9
    )
    assert perfect.epsilon > 3


def test_a_site_report_shows_its_audit_and_flags_a_bound_above_the_ledger(tmp_path):
    ledger = tmp_path / "site-a" / "ledger.jsonl"
    run_rounds(ledger, 2, PrivacyConfig(target_epsilon=2.0, max_epsilon=4.0))
    account, findings = ledger_account(ledger)
    assert account.audit is None and not [f for f in findings if f.code.startswith("audit")]
    attack = {"attack": "loss", "auc": 0.52, "interval": [0.45, 0.6], "members": 40, "non_members": 12}
    canary = {"epsilon_lower_bound": 0.3, "confidence": 0.95, "canaries": 200, "included": 97, "guesses": 40,
              "correct": 27, "delta": 1e-5}
    (ledger.parent / SITE_AUDIT_FILE).write_text(json.dumps({"run_id": "r1", "membership": [attack],
                                                             "canary_audit": canary}))
    account, findings = ledger_account(ledger)
    assert account.audit["membership"][0]["auc"] == 0.52 and account.audit["canary_audit"]["correct"] == 27
    assert not [f for f in findings if f.code.startswith("audit")], "0.3 is below what the ledger records"
    canary["epsilon_lower_bound"] = account.epsilon_spent + 0.5
    (ledger.parent / SITE_AUDIT_FILE).write_text(json.dumps({"run_id": "r1", "membership": [attack],
                                                             "canary_audit": canary}))
    _, findings = ledger_account(ledger)
    assert [(f.level, f.code) for f in findings if f.code.startswith("audit")] == [("critical", "audit-above-ledger")]
    (ledger.parent / SITE_AUDIT_FILE).write_text('{"membership": [{"auc": "x"}]}')
    account, findings = ledger_account(ledger)
    assert account.audit is None and [f.code for f in findings if f.code.startswith("audit")] == ["audit-unreadable"]
