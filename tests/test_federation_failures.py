"""A coordinator crash with --resume, and a hospital dropping out mid-run."""

from __future__ import annotations

import signal
import time

from fedmed.flower.rundir import RunDirectory
from fedmed.privacy.ledger import PrivacyLedger
from tests.federation_helpers import Federation
from tests.test_federation import SITES, certificates, sites_dir  # noqa: F401 (fixtures)


def _wait_for(condition, timeout: float, what: str, federation: Federation) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{federation.output('server')}")
        federation.remember_descendants()
        time.sleep(0.5)


def test_resume_after_a_coordinator_crash_and_a_site_dropping_out(tmp_path, sites_dir, certificates):
    federation = Federation(tmp_path, sites_dir, certificates)
    run_dir = RunDirectory(tmp_path / "run")
    settings = ("--min-sites", "2", "--round-timeout", "25")
    try:
        federation.start_server("--rounds", "3", "--run-dir", str(run_dir.path), *settings)
        for site in SITES:
            federation.start_client(site)
        _wait_for(lambda: (run_dir.path / "checkpoints" / "round-0001.npz").exists(), 400,
                  "round 1", federation)
        federation.kill(federation.server, signal.SIGKILL)  # the coordinator crashes

        federation.start_server("--resume", str(run_dir.path), "--certificates",
                                str(certificates))
        _wait_for(lambda: run_dir.status().get("phase") == "training" and run_dir.status().get("round") == 2,
                  300, "round 2 after the restart", federation)
        federation.kill(federation.clients["site-3"], signal.SIGKILL)  # a hospital drops out
        assert federation.wait_server(600) == 0, federation.output("server")
    finally:
        federation.stop_all()

    rounds = {r["round"]: r for r in run_dir.metrics() if r["event"] == "round"}
    assert sorted(rounds) == [1, 2, 3], "round 1 before the crash, 2 and 3 after the resume"
    assert sorted(rounds[1]["trained"]) == list(SITES)
    gone = [r for n, r in rounds.items() if n >= 2 and ("site-3" in r["missing"] or "site-3" in r["failed"])]
    assert gone, f"the report names the missing site: {rounds}"
    assert all(r["aggregated"] and "site-1" in r["trained"] and "site-2" in r["trained"] for r in rounds.values())
    run_id = run_dir.read_config()["run-id"]
    for site in ("site-1", "site-2"):
        entries = PrivacyLedger(federation.ledger(site)).entries
        assert [(e.run_id, e.round) for e in entries] == [(run_id, 1), (run_id, 2), (run_id, 3)]
        noise = {e.noise_multiplier for e in entries}
        assert len(noise) == 1, "the restarted run keeps each site's noise"
    assert run_dir.status()["phase"] == "completed"
