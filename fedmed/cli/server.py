"""``fedmed-server``: the coordinator. Starts a SuperLink, submits the fedmed run, shows
progress and leaves a run directory behind (the work itself: ``fedmed.deploy.server``)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from fedmed.config import DeviceSettings, RunSettings, ServerSettings
from fedmed.config.command_line import add_options, load_settings
from fedmed.deploy.server import check_server, coordinate, new_run, resumed_run
from fedmed.device import resolve_device
from fedmed.flower.waits import check_flower
from fedmed.runtime import entry_point

# resources: where the coordinator scores its own held-out set; never sent to the sites
PARTS = {"server": ServerSettings, "run": RunSettings, "resources": DeviceSettings}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmed-server",
        description="Coordinate a fedmed training run: start the Flower SuperLink, wait for the "
        "hospitals, run FedAvg rounds and write a run directory.",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="TOML",
        help="coordinator config file with [server], [data], [model], [training], [federation] "
        "and [resources] sections (see server/coordinator.toml); options given here override it",
    )
    p.add_argument("--run-dir", type=Path, help="where to write the run (default runs/<date-time>)")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue a run from its last checkpoint after a crash (with its recorded settings)",
    )
    add_options(p, ServerSettings, "the coordinator")
    add_options(p, RunSettings, "the run (sent to every site)")
    add_options(p, DeviceSettings, "this machine (the coordinator's own held-out scoring; never sent)")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_flower()
        settings = load_settings(args, PARTS, args.config)
        server = settings["server"]
        check_server(server)
        device = settings["resources"].device
        if device not in ("auto", "cpu"):  # CUDA named: checked before any site joins; "auto"
            device = str(resolve_device(device))  # cannot fail, and the ServerApp resolves it
        run, run_dir = resumed_run(args.resume) if args.resume else new_run(settings["run"], args.run_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if server.insecure:
        print(
            "WARNING: --insecure: model updates travel UNENCRYPTED. Use only on a trusted test network.",
            file=sys.stderr,
        )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds like Ctrl-C: the SuperLink is stopped
    try:
        status = coordinate(run, run_dir, server, live=sys.stdout.isatty(), device=device)
    except KeyboardInterrupt:
        print("\ninterrupted; resume later with --resume", run_dir.path, file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    phase = status.get("phase")
    if phase == "failed":
        print(f"error: the run failed: {status.get('error', 'see server.log')}", file=sys.stderr)
        return 1
    if phase == "stopped":
        print(f"run stopped early: {status.get('reason', '')}", file=sys.stderr)
    print(f"final model and model card: {run_dir.model_dir}")
    from fedmed.report.write import write_run_report  # imports torch; only needed now

    report = write_run_report(run_dir.path)
    if report is not None:
        print(f"privacy report: {report}")
    return 0 if phase == "completed" else 3
