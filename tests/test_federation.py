"""fedmed-server and three fedmed-client processes on loopback over TLS, two rounds."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess

import numpy as np
import pytest

from fedmed import protocol
from fedmed.config import RunSettings
from fedmed.data.make_sites import export_sites, synthetic_sites
from fedmed.deploy.certificates import make_dev_certificates, make_site_key
from fedmed.flower import secagg
from fedmed.model import ModelConfig, build_model
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.privacy.release import scores_from_counts
from fedmed.report import build_report
from fedmed.rundir import RunDirectory, load_arrays
from fedmed.weights import model_state
from tests.federation_helpers import BIN, Federation, process_env

pytestmark = pytest.mark.e2e  # real Flower processes or fedmed-simulate


SITES = ("site-1", "site-2", "site-3")
ROUNDS = 2


@pytest.fixture(scope="module")
def sites_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hospitals") / "sites"
    images, parts = synthetic_sites(180, 3, alpha=0.5, size=32, seed=1)
    export_sites(images, parts, out)
    return out


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    make_dev_certificates(out, ["localhost", "127.0.0.1"])
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, sites_dir, certificates):
    tmp = tmp_path_factory.mktemp("federation")
    federation = Federation(tmp, sites_dir, certificates)
    try:
        federation.start_server("--rounds", str(ROUNDS), "--min-sites", "3", "--run-dir", str(tmp / "run"),
                                "--round-timeout", "300")
        for site in SITES:
            federation.start_client(site)
        code = federation.wait_server(600)
        assert code == 0, federation.output("server")
    finally:
        federation.stop_all()
    return federation, RunDirectory(tmp / "run")


def test_run_directory_is_complete(finished_run):
    _, run_dir = finished_run
    config = RunSettings.from_flower(run_dir.read_config())
    assert config.rounds == ROUNDS and run_dir.status()["phase"] == "completed"
    rounds = [r for r in run_dir.metrics() if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(sorted(r["trained"]) == list(SITES) and r["aggregated"] for r in rounds)
    validations = {r["round"]: r for r in run_dir.metrics() if r["event"] == "validation"}
    assert sorted(validations) == [0, 1, 2], "each global model, initial and after every round, is validated"
    received = run_dir.received()
    for model_round, record in validations.items():
        assert sorted(record["sites"]) == list(SITES)
        # the sites' combined scores are those of their summed noisy counts, as received: the
        # validation of model r came with round r + 1's updates, the final model's alone
        final = model_round == ROUNDS
        counts = [r["metrics"][protocol.VALIDATION_COUNTS] for r in received
                  if r["round"] == (model_round if final else model_round + 1) and bool(r["arrays"]) != final]
        assert len(counts) == len(SITES)
        assert record["weighted"] == pytest.approx(scores_from_counts(np.sum(counts, axis=0), 2), nan_ok=True)
    for round_number in (1, 2):
        state = load_arrays(run_dir.path / "checkpoints" / f"round-{round_number:04d}.npz")
        assert all(np.isfinite(a).all() for a in state.values())
    final = load_arrays(run_dir.model_dir / "model.npz")
    last = load_arrays(run_dir.path / "checkpoints" / "round-0002.npz")
    assert all(np.array_equal(final[k], last[k]) for k in final)
    card = json.loads((run_dir.model_dir / "model_card.json").read_text())
    assert card["architecture"]["width"] == 8 and card["classes"] == ["normal", "pneumonia"]
    assert sorted(card["sites"]) == list(SITES)
    for site in card["sites"].values():
        assert site["rounds_trained"] == ROUNDS and site["dp"] is True and site["examples"] > 0
        assert site["privacy_unit"] == "patient", "the synthetic sites' images carry PatientIDs"
    assert card["privacy"]["unit"].startswith("one patient")
    assert "| site-1 |" in (run_dir.model_dir / "model_card.md").read_text()


def test_each_ledger_holds_the_rounds_with_growing_epsilon(finished_run):
    federation, run_dir = finished_run
    run_id = run_dir.read_config()["run-id"]
    reported = {}
    for record in run_dir.metrics():
        if record["event"] == "round":
            for name, site in record["sites"].items():
                reported[(name, record["round"])] = site["epsilon"]
    for site in SITES:
        entries = PrivacyLedger(federation.ledger(site)).entries
        assert [(e.run_id, e.round) for e in entries] == [(run_id, 1), (run_id, 2)]
        assert 0 < entries[0].epsilon < entries[1].epsilon <= 8.0
        for entry in entries:
            assert reported[(site, entry.round)] == pytest.approx(entry.epsilon, rel=1e-9)


def test_the_coordinator_writes_the_run_report_and_a_site_ledger_checks_against_it(finished_run, tmp_path):
    federation, run_dir = finished_run
    report = json.loads((run_dir.path / "report" / "privacy-report.json").read_text())
    assert report["run"]["sites"] == list(SITES) and report["sites"] == [], "the sites' ledgers stay at the sites"
    assert [r["round"] for r in report["run"]["rounds"]] == [1, 2]
    assert "privacy report:" in federation.output("server")
    ledger = federation.ledger(SITES[0])
    checked = build_report(run_dir.path, [ledger])
    site_ledger = PrivacyLedger(ledger)
    assert checked["sites"][0]["epsilon_spent"] == pytest.approx(site_ledger.epsilon(site_ledger.entries[-1].delta))
    assert not [w for w in checked["warnings"] if w["code"] in ("ledger-missing-round", "epsilon-mismatch")]


def test_only_model_arrays_and_what_the_release_policy_allows_leave_a_site(finished_run):
    """Checked on every reply the coordinator received: by default a site sends its model,
    the description of its guarantee, its noisy record count and noisy validation counts
    with their noise's standard deviation, and no exact statistic (no loss, timing or scores)."""
    _, run_dir = finished_run
    config = RunSettings.from_flower(run_dir.read_config())
    parameters = sum(a.size for a in model_state(build_model(ModelConfig.from_settings(config))).values())
    received = run_dir.received()
    assert len(received) == len(SITES) * (ROUNDS + 1)  # two training replies and one evaluation each
    assert sum(1 for reply in received if reply["arrays"]) == len(SITES) * ROUNDS
    for reply in received:
        assert set(reply["records"]) <= {protocol.ARRAYS, protocol.METRICS, protocol.SITE}
        if reply["arrays"]:  # exactly the model's parameters, packed: nothing image-shaped
            assert reply["arrays"] == {"model": [[parameters], "float32"]}
        assert set(reply["metrics"]) <= {*protocol.GUARANTEE_METRICS, "examples", protocol.VALIDATION_COUNTS,
                                         protocol.VALIDATION_NOISE}
        assert protocol.VALIDATION_COUNTS in reply["metrics"], "every reply validates a model"
        assert all(isinstance(v, (int, float)) for k, v in reply["metrics"].items() if k != protocol.VALIDATION_COUNTS)
        assert set(reply["text"]) <= protocol.REPLY_TEXT


def test_no_tls_choice_is_a_clear_error(tmp_path):
    result = subprocess.run([str(BIN / "fedmed-server"), "--rounds", "1", "--run-dir", str(tmp_path / "r")],
                            capture_output=True, text=True, env=process_env(tmp_path), timeout=120)
    assert result.returncode == 2 and "--certificates" in result.stderr and "--insecure" in result.stderr
    assert not (tmp_path / "r").exists()
    result = subprocess.run([str(BIN / "fedmed-client"), "--server", "localhost:1", "--data", str(tmp_path),
                             "--site", "a"], capture_output=True, text=True, env=process_env(tmp_path), timeout=120)
    assert result.returncode == 2 and "--root-certificates" in result.stderr and "--insecure" in result.stderr


def test_only_sites_with_an_authorized_key_may_join_and_each_is_recorded_under_its_key(
        tmp_path, sites_dir, certificates):
    for site in ("site-1", "site-2", "site-3"):
        make_site_key(tmp_path / "keys", site)
    (tmp_path / "authorized").mkdir()
    for site in ("site-1", "site-2"):
        shutil.copy(tmp_path / "keys" / f"{site}.pub", tmp_path / "authorized")
    federation = Federation(tmp_path, sites_dir, certificates)
    try:
        federation.start_server("--rounds", "1", "--min-sites", "2", "--run-dir", str(tmp_path / "run"),
                                "--authorized-keys", str(tmp_path / "authorized"))
        federation.start_client("site-1", "--auth-key", str(tmp_path / "keys" / "site-1.key"))
        # site-2 holds its own key but answers under site-1's name
        federation.start_client("site-2", "--auth-key", str(tmp_path / "keys" / "site-2.key"), "--site", "site-1")
        federation.start_client("site-3", "--auth-key", str(tmp_path / "keys" / "site-3.key"))
        assert federation.wait_server(300) == 0, federation.output("server")
        assert "did not accept this site (is site-3's public key in its --authorized-keys" in \
            federation.output("site-3")
        assert federation.clients["site-3"].poll() is None, "a refused site keeps trying, it does not crash"
    finally:
        federation.stop_all()
    run = RunDirectory(tmp_path / "run")
    rounds = [r for r in run.metrics() if r["event"] == "round"]
    assert [sorted(r["trained"]) for r in rounds] == [["site-1", "site-2"]]
    impostor = [r for r in run.received() if r["site"] == "site-2"]
    assert impostor and all(r["text"]["name"] == "site-1" and r["key_bound"] for r in impostor)
    assert sorted(run.identities().values()) == ["site-1", "site-2"]
    assert not federation.ledger("site-3").exists()


def test_sites_reach_a_coordinator_listening_on_every_interface_by_its_host_name(tmp_path, sites_dir):
    """As across hosts: the coordinator listens on all interfaces with a certificate for its
    host name, and the sites dial that name, not localhost."""
    name = socket.gethostname()
    try:
        socket.getaddrinfo(name, None)
    except OSError:
        pytest.skip(f"this machine's host name {name!r} does not resolve")
    make_dev_certificates(tmp_path / "certs", [name])
    federation = Federation(tmp_path, sites_dir, tmp_path / "certs", server_name=name)
    try:
        federation.start_server("--rounds", "1", "--min-sites", "2", "--run-dir", str(tmp_path / "run"),
                                listen="0.0.0.0")
        for site in ("site-1", "site-2"):
            federation.start_client(site)
        assert federation.wait_server(300) == 0, federation.output("server")
        assert f"connecting to {name}:" in federation.output("site-1")
    finally:
        federation.stop_all()
    rounds = [r for r in RunDirectory(tmp_path / "run").metrics() if r["event"] == "round"]
    assert [sorted(r["trained"]) for r in rounds] == [["site-1", "site-2"]]


def test_under_secure_aggregation_the_coordinator_holds_only_masked_updates(tmp_path, sites_dir, certificates):
    """Real sites over TLS: each trained reply carries one masked vector (the model's size
    plus the weight share, uint64) and no record count; the coordinator's round sums all
    three, moves the model and records nothing of any one site's update."""
    federation = Federation(tmp_path, sites_dir, certificates)
    try:
        federation.start_server("--rounds", "1", "--min-sites", "3", "--run-dir", str(tmp_path / "run"),
                                "--secure-aggregation", "--max-site-examples", "1000")
        for site in SITES:
            federation.start_client(site)
        assert federation.wait_server(300) == 0, federation.output("server")
    finally:
        federation.stop_all()
    run_dir = RunDirectory(tmp_path / "run")
    config = RunSettings.from_flower(run_dir.read_config())
    parameters = sum(a.size for a in model_state(build_model(ModelConfig.from_settings(config))).values())
    (round_record,) = [r for r in run_dir.metrics() if r["event"] == "round"]
    assert round_record["aggregated"] and sorted(round_record["trained"]) == list(SITES)
    assert round_record["secure_aggregation"] == {"threshold": 2, "summed": 3, "dropped": []}
    trained = [r for r in run_dir.received() if r["round"] == 1 and r["arrays"]]
    assert len(trained) == len(SITES)
    for reply in trained:
        assert reply["arrays"] == {"masked": [[parameters + 1], "uint64"]}
        assert "examples" not in reply["metrics"] and protocol.VALIDATION_COUNTS in reply["metrics"]
    before = build_model(ModelConfig.from_settings(config), seed=config.seed)
    after = load_arrays(run_dir.path / "checkpoints" / "round-0001.npz")
    assert all(np.isfinite(a).all() for a in after.values())
    assert not all(np.array_equal(after[k], v) for k, v in model_state(before).items()), "the sum moved the model"
    for site in SITES:
        assert [e.round for e in PrivacyLedger(federation.ledger(site)).entries] == [1]


def test_under_secure_aggregation_a_site_dropping_mid_protocol_is_unmasked_around(tmp_path, sites_dir,
                                                                                   certificates):
    """site-3 shares its secrets, then refuses to train (its budget is too small): the
    coordinator rebuilds its secret from the others' shares and removes its masks. The
    unmasked sum of weight shares is the two survivors' record counts (to the protocol's
    rounding), as their ledgers recorded them (the round is then too small to change the
    model: min sites 3)."""
    federation = Federation(tmp_path, sites_dir, certificates)
    try:
        federation.start_server("--rounds", "1", "--min-sites", "3", "--run-dir", str(tmp_path / "run"),
                                "--secure-aggregation", "--max-site-examples", "1000")
        federation.start_client("site-1")
        federation.start_client("site-2")
        # a budget no noise level reaches (the PLD ledger can place a round under 0.01 with
        # enough noise; under 1e-5 no multiplier up to 1e4 fits): the site refuses the round
        federation.start_client("site-3", "--max-epsilon", "0.00001")
        assert federation.wait_server(300) == 0, federation.output("server")
    finally:
        federation.stop_all()
    (round_record,) = [r for r in RunDirectory(tmp_path / "run").metrics() if r["event"] == "round"]
    assert round_record["budget_exhausted"] == ["site-3"] and sorted(round_record["trained"]) == ["site-1", "site-2"]
    assert round_record["secure_aggregation"] == {"threshold": 2, "summed": 2, "dropped": ["site-3"]}
    counts = [max(1, round(next(r.value for r in PrivacyLedger(federation.ledger(site)).releases
                                if r.statistic == "examples"))) for site in ("site-1", "site-2")]
    # each survivor's share is rounded to the protocol's grid (half a step: RANGE / LEVELS),
    # and a share of 1 stands for --max-site-examples records
    rounding = len(counts) * secagg.RANGE / secagg.LEVELS * 1000
    assert round_record["examples"] == pytest.approx(sum(counts), abs=rounding)
    assert not round_record["aggregated"]
