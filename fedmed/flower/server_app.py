"""fedmed's ServerApp: runs the coordinator's loop and records failures in the run directory."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmed.config import RunSettings
from fedmed.flower.coordinator import FederatedRun
from fedmed.flower.waits import shorten_object_retries
from fedmed.rundir import RunDirectory

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunSettings.from_flower(context.run_config)
    run_dir = RunDirectory(run.run_dir)
    shorten_object_retries()  # this process is Flower's ServerApp process for this run alone
    handler = _log_to(Path(run.run_dir) / "server.log")
    try:
        FederatedRun(grid, run).execute()
    except Exception as error:
        logging.getLogger("fedmed").exception("run failed")
        run_dir.write_status(phase="failed", round=run.start_round, rounds=run.rounds, error=str(error))
        raise
    finally:
        logging.getLogger("fedmed").removeHandler(handler)
        handler.close()


def _log_to(path: Path) -> logging.Handler:
    """Send fedmed's log records to the run's server.log (this ServerApp's process is
    Flower's, started for this run alone, so it may set the "fedmed" logger's level)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fedmed")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler
