"""``fedmed-simulate``: several virtual hospitals on one machine, with fedmed's own apps on
Flower's Simulation Runtime, and baselines (pooled data, each site alone) to compare
(the work itself: ``fedmed.simulate.modes``)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from fedmed.config.command_line import add_scenario_overrides
from fedmed.config.files import settings_table
from fedmed.flower.waits import check_flower
from fedmed.runtime import entry_point, keep_freed_memory
from fedmed.simulate.scenario import PARTS, TOP_LEVEL, load_scenario, simulation_device

MODES = ("federated", "centralized", "local")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmed-simulate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Simulate a private federation of hospitals on this machine (Flower Simulation Runtime, "
        "Ray) and compare it with centralized and site-alone training on a held-out test set.",
        epilog="scenario settings (TOML sections and --set keys):\n" + settings_table(PARTS, TOP_LEVEL, scenario=True),
    )
    p.add_argument(
        "scenario", type=Path, nargs="?", help="scenario TOML file (see simulations/); default: built-in defaults"
    )
    add_scenario_overrides(p)
    p.add_argument(
        "--mode",
        default="federated",
        help=f"comma-separated modes out of {', '.join(MODES)}, or 'all' (default federated)",
    )
    p.add_argument("--out", type=Path, help="output folder (default runs/<scenario name>)")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = MODES if args.mode == "all" else tuple(m.strip() for m in args.mode.split(","))
    unknown = [m for m in modes if m not in MODES]
    try:
        if unknown:
            raise ValueError(f"unknown mode {', '.join(unknown)}; choose from {', '.join(MODES)} or all")
        check_flower()
        scenario = load_scenario(args.scenario, args.overrides)
        simulation_device(scenario)  # a device this machine lacks is refused before any site starts
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = (args.out or Path("runs") / scenario.name).resolve()
    from fedmed.simulate.modes import simulate

    keep_freed_memory()  # the baselines train in this process (fedmed.runtime)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds like Ctrl-C: SuperLink and Ray are stopped
    try:
        simulate(scenario, modes, out, live=sys.stdout.isatty())
    except (RuntimeError, TimeoutError, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0
