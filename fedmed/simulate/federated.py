"""Federated mode: fedmed's own ServerApp and ClientApp on Flower's Simulation Runtime,
started through the same launch path as a deployment (``fedmed.deploy.launch``)."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from pathlib import Path

from fedmed.config import RunSettings, SimulationSettings, SiteSettings
from fedmed.deploy.launch import launch, start_simulation_superlink
from fedmed.deploy.processes import ProcessWatch, free_port
from fedmed.rundir import RunDirectory
from fedmed.simulate.scenario import Scenario, simulation_device
from fedmed.simulate.sites import SimulationData

SIMULATION_ROUND_TIMEOUT = 24 * 3600.0  # virtual sites share the machine: a round may take long


def site_settings(scenario: Scenario, data: SimulationData, state_dir: Path, cache_dir: Path) -> list[SiteSettings]:
    """Each virtual site's settings, as a real site's node config would hold them, with the
    simulation's device (``simulation_device``)."""
    device = simulation_device(scenario)
    return [
        replace(
            privacy,
            name=name,
            data=str(folder),
            ledger=str(state_dir / name / "ledger.jsonl"),
            cache_dir=str(cache_dir),
            device=device,
        )
        for privacy, name, folder in zip(scenario.site_settings, data.names, data.site_dirs)
    ]


def run_settings(scenario: Scenario, data: SimulationData, run_dir: Path, cache_dir: Path) -> RunSettings:
    """The scenario's run with what a simulation sets itself: every site takes part, the
    held-out test set is the coordinator's evaluation data, and the site list."""
    sites = site_settings(scenario, data, run_dir / "sites", cache_dir)
    run = replace(
        scenario.run,
        run_dir=str(run_dir),
        run_id=f"sim-{uuid.uuid4().hex[:12]}",
        min_sites=len(sites),
        round_timeout=SIMULATION_ROUND_TIMEOUT,
        server_eval_data=str(data.test_dir),
        initial_model=str(Path(scenario.run.initial_model).resolve()) if scenario.run.initial_model else "",
        simulation_sites=json.dumps([site.to_flower() for site in sites]),
    )
    if run.initial_model:
        from fedmed.coordinator.initial_model import load_initial_model  # torch: only when needed

        load_initial_model(run)  # refuse a missing or mismatched model before starting anything
    return run


def federation_config(simulation: SimulationSettings, sites: int) -> str:
    """Flower's simulation settings: one SuperNode per site, each reserving
    ``cpus_per_site`` CPUs and, when ``gpus_per_site`` > 0, that share of a GPU (Ray)."""
    config = f"num-supernodes={sites} client-resources-num-cpus={simulation.cpus_per_site}"
    if simulation.gpus_per_site > 0:
        config += f" client-resources-num-gpus={simulation.gpus_per_site}"
    return config


def run_federated(scenario: Scenario, data: SimulationData, run_dir: Path, cache_dir: Path, live: bool) -> RunDirectory:
    """Run the scenario's federation; returns its run directory (the same layout as
    ``fedmed-server``'s, with each virtual site's ledger under ``sites/``). Every process
    the Simulation Runtime starts, Ray's included, is stopped by pid before returning."""
    run_dir = run_dir.resolve()
    run = run_settings(scenario, data, run_dir, cache_dir.resolve())
    directory = RunDirectory(run_dir)
    directory.write_config(run.to_flower())
    port = free_port()
    # Without an address, a Ray of the simulation's own ("local"): left to itself, Ray joins
    # the latest cluster that anyone started on this machine.
    env = {"RAY_ADDRESS": scenario.simulation.ray_address or "local"}
    superlink = start_simulation_superlink(port, run_dir / "logs" / "superlink.log", run_dir / ".flwr", env)
    watch = ProcessWatch()
    try:
        status = launch(
            run,
            directory,
            superlink,
            "127.0.0.1",
            port,
            federation_config=federation_config(scenario.simulation, len(data.names)),
            device=simulation_device(scenario),
            live=live,
            on_tick=lambda: watch.look({superlink.pid}),
        )
        if status.get("phase") == "failed":
            raise RuntimeError(f"the federated run failed: {status.get('error', '')}; see {run_dir / 'server.log'}")
    finally:
        watch.look({superlink.pid})
        superlink.stop()
        watch.stop_survivors()
    return directory
