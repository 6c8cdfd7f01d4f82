"""A federated DP run on real chest X-rays gives a model that ranks and decides, not one
that calls every image one class (what fedmed's models did before: balanced accuracy 0.50).

The shipped PneumoniaMNIST recipe through fedmed-simulate (Flower's runtime, each site's
ledger and DP-SGD, epsilon 8), scored on the official test split no site trained on. Its
runs score 0.82-0.88 AUROC and 0.73-0.80 balanced accuracy (BENCHMARKS.md, the target
table): below the project's goal of 0.85 / 0.75 for a short run, so this test guards the
level reached with a margin for DP's run-to-run spread, not the goal."""

import json
from pathlib import Path

from tests.federation_helpers import BIN, run_simulate

SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "pneumonia-5-sites.toml"


def test_a_federated_dp_run_on_real_chest_xrays_ranks_and_decides(pneumonia_npz, tmp_path):
    command = [str(BIN / "fedmed-simulate"), str(SCENARIO), "--out", str(tmp_path / "out"),
               "--set", f"data.path={pneumonia_npz}"]
    code, survivors, _ = run_simulate(command, tmp_path)
    assert code == 0, (tmp_path / "simulate.out").read_text()[-3000:]
    assert not survivors, f"processes outlived the simulation: {survivors}"
    (summary,) = (tmp_path / "out").glob("results-*/summary.json")
    (federated,) = [row for row in json.loads(summary.read_text())["comparison"] if row["mode"] == "federated"]
    assert federated["dp"] and 7.5 < federated["epsilon"] <= 8.0
    assert federated["test_auroc"] >= 0.75, federated
    assert federated["test_balanced_accuracy"] >= 0.65, federated
