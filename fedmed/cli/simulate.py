"""``fedmed-simulate``: several virtual hospitals on one machine, with fedmed's own apps on
Flower's Simulation Runtime, and baselines (pooled data, each site alone) to compare."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

MODES = ("federated", "centralized", "local")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmed-simulate",
        description="Simulate a private federation of hospitals on this machine (Flower Simulation Runtime, "
                    "Ray) and compare it with centralized and site-alone training on a held-out test set.")
    p.add_argument("scenario", type=Path, nargs="?",
                   help="scenario TOML file (see simulations/); default: built-in defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a scenario value, e.g. --set training.rounds=3 (repeatable)")
    p.add_argument("--mode", default="federated",
                   help=f"comma-separated modes out of {', '.join(MODES)}, or 'all' (default federated)")
    p.add_argument("--out", type=Path, help="output folder (default runs/<scenario name>)")
    p.add_argument("--ray-address", help="attach to this running Ray cluster instead of starting one")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedmed.simulate.scenario import load_scenario

    modes = MODES if args.mode == "all" else tuple(m.strip() for m in args.mode.split(","))
    unknown = [m for m in modes if m not in MODES]
    overrides = list(args.overrides) + ([f"resources.ray_address={_quoted(args.ray_address)}"]
                                        if args.ray_address else [])
    try:
        if unknown:
            raise ValueError(f"unknown mode {', '.join(unknown)}; choose from {', '.join(MODES)} or all")
        scenario = load_scenario(args.scenario, overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = (args.out or Path("runs") / scenario.name).resolve()
    # SIGTERM unwinds like Ctrl-C, so the SuperLink and Ray's processes are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _simulate(scenario, modes, out)
    except (RuntimeError, TimeoutError, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _simulate(scenario, modes: tuple[str, ...], out: Path) -> int:
    from fedmed.report.write import write_run_report
    from fedmed.simulate.baselines import load_test_set, run_centralized, run_local
    from fedmed.simulate.federated import run_federated, run_settings, site_settings
    from fedmed.simulate.sites import prepare_sites
    from fedmed.simulate.summary import comparison_table, federated_rows, sites_table, write_summary

    started = time.monotonic()
    cache = out / "cache"
    print(f"scenario {scenario.name}: {scenario.site_count} sites, {scenario.rounds} rounds, "
          f"{'DP' if scenario.dp else 'NON-PRIVATE'}; modes {', '.join(modes)}", flush=True)
    data = prepare_sites(scenario, out / "data")
    print(data.table, flush=True)
    results = out / datetime.now().strftime("results-%Y%m%d-%H%M%S")
    results.mkdir(parents=True)
    comparison, per_site = [], []
    run = run_settings(scenario, data, results / "federated", cache)
    if "federated" in modes:
        run_dir = run_federated(scenario, data, results / "federated", cache, live=sys.stdout.isatty())
        overall, per_site = federated_rows(run_dir)
        comparison.append(overall)
    if "centralized" in modes or "local" in modes:
        test = load_test_set(run, data, cache)
        if "centralized" in modes:
            print("centralized baselines (pooled data, non-private and private) ...", flush=True)
            comparison += run_centralized(scenario, run, data, results / "centralized", cache, test)
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
    return 0


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
