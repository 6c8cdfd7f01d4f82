"""A federation that survives its failures: the coordinator is killed after round 1 and
resumed, then a hospital is killed during round 2. Real processes on loopback, over TLS."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedmed.data.make_sites import export_sites, synthetic_sites
from fedmed.deploy.certificates import make_dev_certificates
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.rundir import RunDirectory, load_arrays
from tests.federation_helpers import Federation

pytestmark = pytest.mark.e2e  # real Flower processes or fedmed-simulate


SITES = ("site-1", "site-2", "site-3")
DROPPED = "site-1"
FAULTY_SITE = Path(__file__).with_name("faulty_site.py")
ROUNDS = 3


def _wait_for(condition, timeout: float, what: str, federation: Federation) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{federation.output('server')[-3000:]}")
        federation.remember_descendants()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def failed_and_recovered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failures")
    images, parts = synthetic_sites(240, 3, alpha=0.5, quantity_alpha=2.0, size=32, seed=3)  # 133/70/37
    export_sites(images, parts, tmp / "sites")
    make_dev_certificates(tmp / "certs", ["localhost", "127.0.0.1"])
    federation = Federation(tmp, tmp / "sites", tmp / "certs")
    run_dir = RunDirectory(tmp / "run")
    server_options = ("--round-timeout", "40", "--site-wait-timeout", "120")
    try:
        for site in SITES:  # the dropped site hangs in round 2 after the restart, until killed
            program = [sys.executable, str(FAULTY_SITE), "stall", "2"] if site == DROPPED else None
            federation.start_client(site, "--max-epsilon", "30", "--target-epsilon", "8", program=program)
        federation.start_server("--rounds", str(ROUNDS), "--min-sites", "2", "--run-dir", str(run_dir.path),
                                *server_options)
        _wait_for(lambda: (run_dir.path / "checkpoints" / "round-0001.npz").exists(), 300,
                  "the checkpoint of round 1", federation)
        federation.crash(federation.server)  # the coordinator's host crashes
        first_exit = federation.server.returncode

        federation.start_server("--resume", str(run_dir.path), *server_options)
        # The first coordinator's last status may already say round 2: wait for the new one's.
        _wait_for(lambda: _restarted_and_training(run_dir), 300, "round 2 after the restart", federation)
        _wait_for(lambda: "stalled in round 2 of a later run" in federation.output(DROPPED), 120,
                  f"{DROPPED} to be mid-way through round 2", federation)
        federation.kill(federation.clients[DROPPED])  # a hospital drops out mid-round
        code = federation.wait_server(600)
        assert code == 0, federation.output("server")
    finally:
        federation.stop_all()
    return federation, run_dir, first_exit


def test_a_killed_coordinator_resumes_at_the_next_round(failed_and_recovered):
    federation, run_dir, first_exit = failed_and_recovered
    assert first_exit != 0
    assert [r["start_round"] for r in _flower_runs(run_dir)] == [1, 2]
    rounds = [r for r in run_dir.metrics() if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3], "no round lost or repeated in the record"
    assert sorted(rounds[0]["trained"]) == list(SITES)
    assert "resuming at round 2 from the checkpoint of round 1" in (run_dir.path / "server.log").read_text()
    for number in range(1, ROUNDS + 1):
        assert all(np.isfinite(a).all() for a in load_arrays(run_dir.path / "checkpoints" / f"round-{number:04d}.npz").values())
    assert run_dir.status()["phase"] == "completed" and (run_dir.model_dir / "model.npz").is_file()
    for site in SITES:
        if site != DROPPED:  # a repeated round is answered from the site's last update, not paid twice
            assert [e.round for e in PrivacyLedger(federation.ledger(site)).entries] == [1, 2, 3], site


def test_a_site_killed_mid_round_is_named_and_the_run_goes_on(failed_and_recovered):
    federation, run_dir, _ = failed_and_recovered
    rounds = {r["round"]: r for r in run_dir.metrics() if r["event"] == "round"}
    survivors = sorted(set(SITES) - {DROPPED})
    for number in (2, 3):
        assert sorted(rounds[number]["trained"]) == survivors and rounds[number]["aggregated"]
    assert DROPPED in rounds[2]["missing"] or DROPPED in rounds[2]["failed"]
    assert DROPPED in federation.output("server"), "the console names the site that dropped out"
    assert DROPPED not in rounds[3]["trained"]
    report = json.loads((run_dir.path / "report" / "privacy-report.json").read_text())
    dropped = [w["message"] for w in report["warnings"] if w["code"] == "sites-dropped"]
    assert len(dropped) == 1 and f"round 2: {DROPPED}" in dropped[0], "the run's report names the dropout"
    assert [r["round"] for r in report["run"]["rounds"]] == [1, 2, 3], "a repeated round is reported once"


def _restarted_and_training(run_dir: RunDirectory) -> bool:
    log = run_dir.path / "server.log"
    restarted = log.exists() and log.read_text().count("sites connected") == 2
    return restarted and run_dir.status().get("phase") == "training" and run_dir.status().get("round") == 2


def _flower_runs(run_dir: RunDirectory) -> list[dict]:
    return [json.loads(line) for line in (run_dir.path / "flower-runs.jsonl").read_text().splitlines()]
