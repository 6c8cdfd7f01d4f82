"""``fedmed audit`` on CI-sized federations: the canary audit catches a site whose noise was
switched off (an injected fault, test-only), and stays below the ledger when the noise is there."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import fedmed.train
from fedmed.audit import SITE_AUDIT_FILE
from fedmed.audit.run import audit_scenario
from fedmed.report.site import ledger_account
from fedmed.simulate.scenario import load_scenario

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent

# Three small synthetic sites from the default scenario; site-1 holds the canaries.
SMALL = ["data.images=600", "partition.sites=3", "pretrain.data=", "training.rounds=3", "training.evaluate_every=3"]


def _budget(epsilon: float) -> list[str]:
    return [f"privacy.{key}={epsilon}" for key in ("target_epsilon", "max_epsilon", "max_epsilon_per_run")]


def _audit(tmp_path, epsilon: float) -> dict:
    scenario = load_scenario(REPO / "simulations" / "default.toml", [*SMALL, *_budget(epsilon)])
    return audit_scenario(scenario, tmp_path, canaries=200, seed=11)


def test_the_audit_catches_a_site_whose_noise_was_switched_off(tmp_path, monkeypatch):
    """The fault: site training draws no noise while the ledger still records the calibrated
    noise's epsilon. The canaries' lower bound then passes the ledger's claim."""
    train_private = fedmed.train._train_private

    def without_noise(model, data, *, plan, **settings):
        return train_private(model, data, plan=dataclasses.replace(plan, noise_multiplier=0.0), **settings)

    monkeypatch.setattr(fedmed.train, "_train_private", without_noise)
    result = _audit(tmp_path, 1.0)
    assert 0.9 < result["ledger_epsilon"] <= 1.0
    assert result["canary_audit"]["epsilon_lower_bound"] > result["ledger_epsilon"], result["canary_audit"]
    assert result["critical"]
    site = json.loads((tmp_path / "sites" / "site-1" / SITE_AUDIT_FILE).read_text())
    account, findings = ledger_account(tmp_path / "sites" / "site-1" / "ledger.jsonl")
    assert site["canary_audit"] == result["canary_audit"] and account.audit is not None
    assert "audit-above-ledger" in [f.code for f in findings]


def test_with_the_noise_in_place_the_bound_stays_below_the_claim(tmp_path):
    """Through the command a privacy officer runs: exit 0, the bound printed beside the ledger."""
    command = [sys.executable, "-m", "fedmed.cli.main", "audit", str(REPO / "simulations" / "default.toml"),
               "--out", str(tmp_path / "audit"), "--canaries", "200", "--seed", "11"]
    for value in [*SMALL, *_budget(8.0)]:
        command += ["--set", value]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert 7.0 < result["ledger_epsilon"] <= 8.0
    assert result["canary_audit"]["epsilon_lower_bound"] < result["ledger_epsilon"] and not result["critical"]
    assert f"ledger epsilon {result['ledger_epsilon']:.3f}" in done.stdout and "CRITICAL" not in done.stdout
    assert sorted(result["membership"]) == ["site-1", "site-2", "site-3"]
    _, findings = ledger_account(tmp_path / "audit" / "sites" / "site-1" / "ledger.jsonl")
    assert not [f for f in findings if f.code.startswith("audit")]
