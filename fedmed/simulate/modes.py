"""A whole simulation: the scenario's virtual hospitals, then each requested mode
(federated, centralized, local) on the same held-out test set, and the summary tables."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from fedmed.report.write import write_run_report
from fedmed.simulate.baselines import load_test_set, public_row, run_centralized, run_local
from fedmed.simulate.federated import run_federated, run_settings, site_settings
from fedmed.simulate.pretrained import pretrained_model
from fedmed.simulate.scenario import Scenario, simulation_device
from fedmed.simulate.sites import prepare_sites
from fedmed.simulate.summary import comparison_table, federated_rows, sites_table, write_summary


def simulate(scenario: Scenario, modes: tuple[str, ...], out: Path, live: bool) -> None:
    """Run ``modes`` of ``scenario`` under ``out`` (results in a new results-<time> folder),
    printing progress and the comparison."""
    started = time.monotonic()
    device = simulation_device(scenario)  # refused here, before any site starts
    cache = out / "cache"
    print(
        f"scenario {scenario.name}: {scenario.site_count} sites, {scenario.run.rounds} rounds, "
        f"{'DP' if all(s.dp for s in scenario.site_settings) else 'NON-PRIVATE'}; modes {', '.join(modes)}; "
        f"computing on {device}",
        flush=True,
    )
    data = prepare_sites(scenario, out / "data")
    print(data.table, flush=True)
    if scenario.pretrain.data:  # every row starts from the same public model
        scenario = replace(
            scenario, run=replace(scenario.run, initial_model=str(pretrained_model(scenario, out, device)))
        )
    results = out / datetime.now().strftime("results-%Y%m%d-%H%M%S")
    results.mkdir(parents=True)
    comparison: list[dict] = []
    per_site: list[dict] = []
    run = run_settings(scenario, data, results / "federated", cache)
    if "federated" in modes:
        run_dir = run_federated(scenario, data, results / "federated", cache, live=live)
        overall, per_site = federated_rows(run_dir)
        comparison.append(overall)
    if "centralized" in modes or "local" in modes or run.initial_model:
        test = load_test_set(run, data, cache)
        if run.initial_model:
            comparison.insert(0, public_row(run, test, device))
        if "centralized" in modes:
            print("centralized baselines (pooled data, non-private and private) ...", flush=True)
            comparison += run_centralized(
                scenario, run, data, out_dir=results / "centralized", cache_dir=cache, test=test, device=device
            )
        if "local" in modes:
            print("local baselines (each site alone) ...", flush=True)
            comparison += run_local(run, site_settings(scenario, data, results / "local", cache), test)
    write_summary(results, scenario.to_dict(), comparison, per_site, time.monotonic() - started)
    if per_site:
        print("\nfederated model per site:\n" + sites_table(per_site))
    print("\nall modes on the held-out test set:\n" + comparison_table(comparison))
    print(f"\nresults: {results / 'summary.md'}")
    if "federated" in modes:
        print(f"federated run directory (model, model card, metrics, ledgers): {results / 'federated'}")
        report = write_run_report(results / "federated")
        if report is not None:
            print(f"privacy report: {report}")
