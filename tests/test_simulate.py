"""`fedmed-simulate`: the Simulation Runtime end to end, its baselines, scenarios and data."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import pytest

from fedmed.deploy.processes import ProcessWatch, alive
from fedmed.inference import list_studies, load_model_dir, predict_studies
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.rundir import RunDirectory
from fedmed.simulate.scenario import load_scenario
from fedmed.simulate.sites import prepare_sites
from tests.conftest import TINY_SCENARIO as TINY
from tests.federation_helpers import BIN, process_env

pytestmark = pytest.mark.e2e  # real Flower processes or fedmed-simulate


REPO = Path(__file__).resolve().parent.parent
def test_a_federated_simulation_writes_a_complete_run_directory(simulation):
    results, _, _, output = simulation
    run_dir = RunDirectory(results / "federated")
    assert run_dir.status()["phase"] == "completed"
    rounds = [r for r in run_dir.metrics() if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(sorted(r["trained"]) == ["site-1", "site-2", "site-3"] for r in rounds)
    assert "server_validation" not in rounds[0], "evaluate_every = 2: the model after round 1 is not scored"
    assert 0.0 < rounds[1]["server_validation"]["auroc"] < 1.0, "the final model is scored on the held-out set"
    validations = [r for r in run_dir.metrics() if r["event"] == "validation"]
    assert [v["round"] for v in validations] == [0, 2], "the sites validate the initial and the final model only"
    assert all(sorted(v["sites"]) == ["site-1", "site-2", "site-3"] for v in validations)
    assert [p.name for p in sorted((run_dir.path / "checkpoints").iterdir())] == ["round-0001.npz", "round-0002.npz"]
    card = json.loads((run_dir.model_dir / "model_card.json").read_text())
    assert sorted(card["sites"]) == ["site-1", "site-2", "site-3"]
    assert "results:" in output and (results / "summary.md").is_file()


def test_no_process_outlives_the_simulation(simulation):
    _, survivors, seen, _ = simulation
    assert seen > 3, "the simulation's helper processes were observed"
    assert survivors == []


def test_each_sites_epsilon_is_what_its_ledger_says(simulation):
    results, _, _, _ = simulation
    summary = json.loads((results / "summary.json").read_text())
    last_round = [r for r in RunDirectory(results / "federated").metrics() if r["event"] == "round"][-1]
    for site in summary["federated_sites"]:
        entries = PrivacyLedger(site["ledger"]).entries
        assert [e.round for e in entries] == [1, 2]
        assert site["epsilon"] == pytest.approx(entries[-1].epsilon, rel=1e-12)
        assert last_round["sites"][site["site"]]["epsilon"] == pytest.approx(entries[-1].epsilon, rel=1e-9)
    budgets = {s["site"]: s["epsilon"] for s in summary["federated_sites"]}
    assert budgets["site-3"] <= 4.0 < budgets["site-1"] <= 8.0, "per-site budgets differ as configured"


def test_centralized_and_local_baselines_are_compared(simulation):
    results, _, _, output = simulation
    rows = json.loads((results / "summary.json").read_text())["comparison"]
    assert [(r["mode"], r["model"]) for r in rows] == [
        ("federated", "global"), ("centralized", "pooled"), ("centralized-dp", "pooled"),
        ("local", "site-1"), ("local", "site-2"), ("local", "site-3")]
    assert rows[1]["dp"] is False and math.isinf(rows[1]["epsilon"])
    assert all(r["dp"] and 0 < r["epsilon"] <= 8.0 for r in rows if r["mode"] != "centralized")
    # the federated row is the saved model's score: `fedmed predict`'s path on the test split agrees
    loaded = load_model_dir(results / "federated" / "model")
    studies, skipped, labels_from = list_studies(results.parent / "data" / "test", loaded.classes)
    scored = predict_studies(loaded, studies, skipped, labels_from)
    assert rows[0]["test_auroc"] == pytest.approx(scored.metrics["auroc"], abs=1e-6)
    assert rows[0]["test_balanced_accuracy"] == pytest.approx(scored.metrics["balanced_accuracy"], abs=1e-6)
    pooled = (results / "centralized" / "pooled.csv").read_text().splitlines()[1:]
    site_files = list((results.parent / "data" / "sites").rglob("*.dcm"))
    assert len(pooled) == len(site_files), "the pooled baseline sees every site's images"
    assert abs(sum(r["train_examples"] for r in rows[3:]) - rows[1]["train_examples"]) <= 0.1 * rows[1]["train_examples"]
    markdown = (results / "summary.md").read_text()
    assert "| centralized | pooled | NO |" in markdown and "non-private baselines" in markdown
    assert "Privacy unit: patient" in markdown, "the summary states what one protected record is (synthetic sites have PatientIDs)"
    assert "| local | site-2 | yes |" in output


def test_the_same_seed_gives_the_same_sites(tmp_path):
    scenario = load_scenario(None, TINY)
    first = prepare_sites(scenario, tmp_path / "a")
    again = prepare_sites(scenario, tmp_path / "b")
    other = prepare_sites(load_scenario(None, TINY + ["partition.seed=5"]), tmp_path / "c")
    sizes = [_sizes(data) for data in (first, again, other)]
    assert sizes[0] == sizes[1] and first.table == again.table
    assert sizes[0] != sizes[2]
    reused = prepare_sites(scenario, tmp_path / "a")  # unchanged settings: nothing rewritten
    assert _sizes(reused) == sizes[0] and (tmp_path / "a" / "fingerprint.json").is_file()


def _sizes(data) -> dict:
    return {name: sorted(p.name for p in folder.rglob("*.dcm")) for name, folder in zip(data.names, data.site_dirs)}


def test_shipped_scenarios_load():
    default = load_scenario(REPO / "simulations" / "default.toml")
    assert default.simulation.sites == 4 and default.site_settings[0].dp and default.site_settings[0].max_epsilon == 8.0
    with pytest.raises(ValueError, match="needs data.path"):
        load_scenario(REPO / "simulations" / "pneumonia-5-sites.toml")
    pneumonia = load_scenario(REPO / "simulations" / "pneumonia-5-sites.toml", ["data.path=x.npz"])
    assert pneumonia.simulation.sites == 5 and pneumonia.simulation.alpha == 0.5


@pytest.mark.parametrize("override, message", [
    ("training.epochs=3", "unknown setting training.epochs"),
    ("privacy.max_epsilon=[8.0, 4.0]", "lists 2 values for 4 sites"),
    ("training.rounds=two", "must be a whole number"),
    ("data.source=\"tape\"", "data.source must be one of"),
    ("privacy.max_epsilon=0", "max_epsilon must be positive"),
])
def test_bad_scenario_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_scenario(None, [override])


def test_a_terminated_simulation_stops_all_its_processes(tmp_path):
    command = [str(BIN / "fedmed-simulate"), "--out", str(tmp_path / "out")]
    for value in TINY + ["training.rounds=20"]:
        command += ["--set", value]
    watch = ProcessWatch()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                               env=process_env(tmp_path), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "out").glob("results-*/federated/checkpoints/round-0001.npz")):
            assert process.poll() is None and time.monotonic() < deadline, "no round finished"
            watch.look({process.pid})
            time.sleep(0.3)
        watch.look({process.pid})
        process.terminate()
        assert process.wait(60) == 143
        time.sleep(2)
        survivors = [pid for pid in watch.seen if alive(pid)]
    finally:
        if process.poll() is None:
            process.kill()
        watch.stop_survivors()
    assert len(watch.seen) > 3 and survivors == []
