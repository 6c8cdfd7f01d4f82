"""fedmed-client's long-lived site runtime on Flower's real SuperNode (``--isolation process``):
one process serves every round, a failed round is answered and the next one served, and a
run of any other app is refused."""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import psutil
import pytest

from fedmed.config import RunSettings
from fedmed.data.make_sites import export_sites, synthetic_sites
from fedmed.deploy.launch import write_app
from fedmed.deploy.processes import ManagedProcess, descendants
from fedmed.deploy.site import SHUT_DOWN, _wait_for_exit
from fedmed.deploy.site_runtime import ForeignAppError, _check_app, write_secret
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.report.build import build_report
from fedmed.rundir import RunDirectory
from tests.federation_helpers import Federation

pytestmark = pytest.mark.e2e  # real Flower processes or fedmed-simulate


SITES = ("site-1", "site-2")
FAULTY_SITE = Path(__file__).with_name("faulty_site.py")


@pytest.fixture(scope="module")
def sites_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hospitals") / "sites"
    images, parts = synthetic_sites(100, 2, alpha=2.0, size=32, seed=4)
    export_sites(images, parts, out)
    return out


def _bundle(app_dir: Path) -> bytes:
    """An app bundle as ``flwr run`` sends it: the app's files in a zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.write(app_dir / "pyproject.toml", "pyproject.toml")
    return buffer.getvalue()


PLATFORM_QUERIES = ("uname", "file")  # programs Python's platform module runs


def test_only_runs_of_fedmeds_own_app_are_served(tmp_path):
    fedmed_app = write_app(tmp_path / "fedmed", RunSettings())
    _check_app(_bundle(fedmed_app))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "pyproject.toml").write_text(
        (fedmed_app / "pyproject.toml").read_text().replace("fedmed.flower.client_app:app", "evil.app:app"))
    with pytest.raises(ForeignAppError, match="'evil.app:app'"):
        _check_app(_bundle(foreign))
    with pytest.raises(ForeignAppError, match="not a fedmed run"):
        _check_app(b"not a zip")


def test_the_task_secret_is_fresh_and_private(tmp_path):
    first = write_secret(tmp_path / "state").read_bytes()
    path = write_secret(tmp_path / "state")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert len(first) == 32 and path.read_bytes() != first


def _watch_site_processes(federation: Federation, seen: dict[int, str]) -> None:
    """Remember every process under the sites, by pid, with its latest command line. A
    process read while it is starting or already a zombie has an empty one, and one read
    between fork and exec still has its parent's: each is read again on the next look."""
    for pid in descendants({p.pid for p in federation.clients.values()}):
        try:
            command = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            continue
        if command:
            seen[pid] = command


def test_one_site_process_serves_every_round_of_two_consecutive_runs(tmp_path, sites_dir):
    federation = Federation(tmp_path, sites_dir, None)
    seen: dict[int, str] = {}
    try:
        federation.start_server("--rounds", "2", "--min-sites", "2", "--run-dir", str(tmp_path / "run-1"))
        clients = {site: federation.start_client(site) for site in SITES}
        assert federation.wait_server(600, lambda: _watch_site_processes(federation, seen), 0.2) == 0, \
            federation.output("server")
        federation.start_server("--rounds", "2", "--min-sites", "2", "--run-dir", str(tmp_path / "run-2"))
        assert federation.wait_server(600, lambda: _watch_site_processes(federation, seen), 0.2) == 0, \
            federation.output("server")
        for site, process in clients.items():
            assert process.poll() is None and federation.clients[site] is process, federation.output(site)
            assert federation.output(site).count("round 2: trained") == 2, federation.output(site)
            runs = [e.run_id for e in PrivacyLedger(federation.ledger(site)).entries]
            assert len(runs) == 4 and len(set(runs)) == 2, runs
    finally:
        federation.stop_all()
    helpers = [command for command in seen.values() if "flwr-clientapp" in command or "flower-superexec" in command]
    assert not helpers, f"per-message processes were started: {helpers}"
    # Python's platform module runs `uname -p` and `file -b <python>` once per process
    # (Flower's SuperNode builds its telemetry event with platform.platform() even when
    # telemetry is off): milliseconds-long system queries, seen only when the watcher happens
    # to look then; both were caught in fresh-clone runs.
    strays = {pid: command for pid, command in seen.items()
              if "fedmed.deploy.supernode" not in command and command.split(" ")[0] not in PLATFORM_QUERIES}
    assert not strays, strays


def test_a_failed_round_gives_the_sites_error_reply_and_the_next_round_is_served(tmp_path, sites_dir):
    """Site-2's work fails in round 2; with --min-sites 2 that round is discarded, so
    site-1 paid for it in vain, and the privacy report says so."""
    federation = Federation(tmp_path, sites_dir, None)
    try:
        federation.start_server("--rounds", "3", "--min-sites", "2", "--run-dir", str(tmp_path / "run"))
        federation.start_client("site-1")
        federation.start_client("site-2", program=[sys.executable, str(FAULTY_SITE), "fail", "2"])
        assert federation.wait_server(600) == 0, federation.output("server")
        assert federation.clients["site-2"].poll() is None, federation.output("site-2")
    finally:
        federation.stop_all()
    rounds = {r["round"]: r for r in RunDirectory(tmp_path / "run").metrics() if r["event"] == "round"}
    assert "the site's disk failed in round 2" in rounds[2]["failed"]["site-2"]
    assert sorted(rounds[2]["trained"]) == ["site-1"]
    assert sorted(rounds[3]["trained"]) == list(SITES)
    assert [e.round for e in PrivacyLedger(federation.ledger("site-2")).entries] == [1, 3]

    assert not rounds[2]["aggregated"] and rounds[3]["aggregated"]
    report = build_report(tmp_path / "run", [federation.ledger("site-1")])
    assert [r["wasted"] for r in report["run"]["rounds"]] == [[], ["site-1"], []]
    wasted = [w["message"] for w in report["warnings"] if w["code"] == "budget-wasted"]
    assert len(wasted) == 1 and "round 2 was discarded" in wasted[0] and "site-1 paid" in wasted[0]
    site_1 = next(a for a in report["sites"] if a["site"] == "site-1")
    assert [(r["round"], r["wasted"]) for r in site_1["rounds"]] == [(1, False), (2, True), (3, False)]


@pytest.mark.parametrize("logged, expected", [(SHUT_DOWN, 0), ("something else went wrong", -9)])
def test_a_supernode_cut_short_while_shutting_down_has_ended_itself(tmp_path, logged, expected):
    """Flower's SuperNode, leaving a coordinator that is gone, can be interrupted a second
    time during its own shutdown: it dies with a long traceback after saying it shut down.
    That is a SuperNode that ended itself (the site joins again), not a failure."""
    script = (f"import os, signal; print({logged!r}); print('\\n'.join('  File x, line 1' for _ in range(80)));"
              "import sys; sys.stdout.flush(); os.kill(os.getpid(), signal.SIGKILL)")
    process = ManagedProcess([sys.executable, "-c", script], tmp_path / "supernode.log", {})
    try:
        assert _wait_for_exit(process) == expected
    finally:
        process.stop()
