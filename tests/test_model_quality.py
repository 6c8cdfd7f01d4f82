"""A short federated DP run on real chest X-rays gives a model worth looking at: the shipped
PneumoniaMNIST recipe over 3 sites, through fedmed-simulate (Flower's runtime, each site's
ledger and DP-SGD), scored on the official test split no site trained on."""

import json
import subprocess
import time

from fedmed.deploy.processes import ProcessWatch
from tests.federation_helpers import BIN, process_env

SCENARIO = "simulations/pneumonia-5-sites.toml"


def test_a_short_federated_dp_run_on_real_chest_xrays_ranks_and_decides_well(pneumonia_npz, tmp_path):
    command = [str(BIN / "fedmed-simulate"), SCENARIO, "--out", str(tmp_path / "out"),
               "--set", f"data.path={pneumonia_npz}", "--set", "partition.sites=3",
               "--set", "training.rounds=15"]
    watch = ProcessWatch()
    with open(tmp_path / "simulate.out", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=process_env(tmp_path),
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + 900
            while process.poll() is None and time.monotonic() < deadline:
                watch.look({process.pid})
                time.sleep(0.3)
        finally:
            if process.poll() is None:
                process.kill()
            watch.stop_survivors()
    assert process.returncode == 0, (tmp_path / "simulate.out").read_text()[-3000:]
    (summary,) = (tmp_path / "out").glob("results-*/summary.json")
    (federated,) = [row for row in json.loads(summary.read_text())["comparison"] if row["mode"] == "federated"]
    assert federated["dp"] and 7.5 < federated["epsilon"] <= 8.0
    assert federated["test_auroc"] >= 0.85, federated
    assert federated["test_balanced_accuracy"] >= 0.75, federated
