"""Federated mode: fedmed's own ServerApp and ClientApp on Flower's Simulation Runtime."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from fedmed.deploy.launch import start_simulation_superlink, submit_run, write_app, write_flower_home
from fedmed.deploy.processes import ProcessWatch, free_port, wait_for_port
from fedmed.deploy.progress import follow_run
from fedmed.flower.rundir import RunDirectory
from fedmed.flower.settings import RunSettings, SiteSettings
from fedmed.simulate.scenario import Scenario
from fedmed.simulate.sites import SimulationData


def site_settings(scenario: Scenario, data: SimulationData, state_dir: Path, cache_dir: Path) -> list[dict]:
    """Each virtual site's settings, as a real site's node config would hold them."""
    return [
        SiteSettings(data=str(folder), site=name, ledger=str(state_dir / name / "ledger.jsonl"),
                     cache_dir=str(cache_dir), max_epsilon=scenario.per_site("max_epsilon", i),
                     target_epsilon=scenario.per_site("target_epsilon", i), delta=scenario.delta,
                     dp=scenario.dp).to_node_config()
        for i, (name, folder) in enumerate(zip(data.names, data.site_dirs))
    ]


def run_settings(scenario: Scenario, data: SimulationData, run_dir: Path, cache_dir: Path) -> RunSettings:
    sites = site_settings(scenario, data, run_dir / "sites", cache_dir)
    return RunSettings(
        run_dir=str(run_dir), run_id=f"sim-{uuid.uuid4().hex[:12]}", rounds=scenario.rounds,
        min_sites=len(sites), round_timeout=24 * 3600.0, site_wait_timeout=600.0, classes=scenario.classes,
        image_size=scenario.image_size, model_depth=scenario.depth, model_width=scenario.width,
        local_epochs=scenario.local_epochs, batch_size=scenario.batch_size,
        learning_rate=scenario.learning_rate, momentum=scenario.momentum,
        server_learning_rate=scenario.server_learning_rate, server_momentum=scenario.server_momentum,
        max_grad_norm=scenario.max_grad_norm,
        class_weights=scenario.class_weights, server_eval_data=str(data.test_dir), seed=scenario.seed,
        simulation_sites=json.dumps(sites),
    )


def run_federated(scenario: Scenario, data: SimulationData, run_dir: Path, cache_dir: Path,
                  live: bool) -> RunDirectory:
    """Run the scenario's federation; returns its run directory (the same layout as
    ``fedmed-server``'s, with each virtual site's ledger under ``sites/``). Every process
    the Simulation Runtime starts, Ray's included, is stopped by pid before returning."""
    run_dir = run_dir.resolve()
    run = run_settings(scenario, data, run_dir, cache_dir.resolve())
    directory = RunDirectory(run_dir)
    directory.write_config(run.to_run_config())
    port = free_port()
    env = {"RAY_ADDRESS": scenario.ray_address} if scenario.ray_address else {}
    superlink = start_simulation_superlink(port, run_dir / "logs" / "superlink.log", run_dir / ".flwr", env)
    watch = ProcessWatch()
    try:
        wait_for_port("127.0.0.1", port, 60, superlink)
        flower_env = write_flower_home(run_dir / ".flwr", f"127.0.0.1:{port}", None)
        app = write_app(run_dir / "app", run)
        resources = f"num-supernodes={len(data.names)} client-resources-num-cpus={scenario.cpus_per_site}"
        flower_run = submit_run(app, flower_env, resources)
        directory.add_flower_run(flower_run, 1)
        status = follow_run(directory, flower_run, flower_env, superlink, live,
                            on_tick=lambda: watch.look({superlink.pid}))
        if status.get("phase") == "failed":
            raise RuntimeError(f"the federated run failed: {status.get('error', '')}; see {run_dir / 'server.log'}")
    finally:
        watch.look({superlink.pid})
        superlink.stop()
        watch.stop_survivors()
    return directory
