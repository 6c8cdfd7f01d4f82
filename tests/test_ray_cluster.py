
"""fedmed-simulate on an existing Ray cluster: a head and a second node started here on
loopback, each with its own CPU, the virtual sites placed on both, and nothing of either
node left afterwards."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from fedmed.deploy.processes import ManagedProcess, ProcessWatch, alive, free_port, wait_for_port
from fedmed.privacy.ledger import PrivacyLedger
from tests.conftest import TINY_SCENARIO
from tests.federation_helpers import BIN, process_env, run_simulate

pytestmark = pytest.mark.e2e  # real Flower processes or fedmed-simulate

SITES = 4
ROUNDS = 2


def _start_node(arguments: list[str], log: Path, env: dict[str, str]) -> ManagedProcess:
    """``ray start ... --block`` in its own process group: the node's processes share it."""
    return ManagedProcess([str(BIN / "ray"), "start", *arguments, "--num-cpus", "1", "--node-ip-address",
                           "127.0.0.1", "--disable-usage-stats", "--block"], log, env)


def _raylets(nodes: list[ManagedProcess]) -> dict[int, int]:
    """Each node's raylet pid, by the node's index."""
    found = {}
    for index, node in enumerate(nodes):
        for child in psutil.Process(node.pid).children(recursive=True):
            try:
                if child.name() == "raylet":
                    found[index] = child.pid
            except psutil.Error:
                continue
    return found


def _actor_nodes(raylets: dict[int, int], seen: dict[int, int]) -> None:
    """Remember, for every process running a Flower ClientApp actor, which node started it."""
    for index, raylet in raylets.items():
        try:
            workers = psutil.Process(raylet).children()
        except psutil.Error:
            continue
        for worker in workers:
            try:
                if "ClientAppActor" in " ".join(worker.cmdline()):
                    seen[worker.pid] = index
            except psutil.Error:
                continue


def test_a_simulation_runs_its_sites_on_both_nodes_of_an_existing_ray_cluster(tmp_path):
    env = {**process_env(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    watch = ProcessWatch()
    nodes: list[ManagedProcess] = []
    actors: dict[int, int] = {}
    ray_dir = tempfile.mkdtemp(prefix="fedmed-ray-")  # Ray's socket paths must stay short
    try:
        nodes.append(_start_node(["--head", "--port", str(port), "--temp-dir", ray_dir,
                                  "--include-dashboard", "false"], tmp_path / "head.out", env))
        wait_for_port("127.0.0.1", port, 120, nodes[0])
        nodes.append(_start_node(["--address", f"127.0.0.1:{port}"], tmp_path / "node.out", env))
        deadline = time.monotonic() + 120
        while len(_raylets(nodes)) < 2:
            assert time.monotonic() < deadline, (tmp_path / "node.out").read_text()
            time.sleep(0.5)
        raylets = _raylets(nodes)
        command = [str(BIN / "fedmed-simulate"), "--out", str(tmp_path / "out"), "--mode", "federated",
                   "--set", f"resources.ray_address=127.0.0.1:{port}"]
        for value in TINY_SCENARIO + [f"partition.sites={SITES}", f"training.rounds={ROUNDS}"]:
            command += ["--set", value]

        def watch_cluster() -> None:
            watch.look({node.pid for node in nodes})
            _actor_nodes(raylets, actors)

        code, survivors, _ = run_simulate(command, tmp_path, timeout=600, on_tick=watch_cluster)
        assert code == 0, (tmp_path / "simulate.out").read_text()[-3000:]
        assert not survivors, f"processes outlived the simulation: {survivors}"
    finally:
        for node in reversed(nodes):
            watch.look({node.pid})
            node.stop(grace=15)
        left = watch.stop_survivors()
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert not left, f"processes outlived the cluster: {left}"
    assert not [pid for pid in watch.seen if alive(pid)]
    assert sorted(set(actors.values())) == [0, 1], f"virtual sites ran on nodes {sorted(set(actors.values()))} only"
    (run_dir,) = (tmp_path / "out").glob("results-*/federated")
    ledgers = sorted((run_dir / "sites").glob("*/ledger.jsonl"))
    assert len(ledgers) == SITES
    for ledger in ledgers:
        assert [e.round for e in PrivacyLedger(ledger).entries] == list(range(1, ROUNDS + 1)), ledger
