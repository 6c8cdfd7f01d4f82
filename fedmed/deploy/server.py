"""``fedmed-server``'s work: the run directory of a new or resumed run, a TLS SuperLink
that admits the hospitals, and the run on it (``fedmed.deploy.launch``)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from fedmed.config import RunSettings, ServerSettings
from fedmed.deploy.certificates import CA_CERT, SERVER_CERT, SERVER_KEY
from fedmed.deploy.launch import check_tls_choice, launch, start_superlink
from fedmed.flower.rundir import RunDirectory


def check_server(server: ServerSettings) -> None:
    """Refuse a coordinator without a deliberate TLS choice, or with keys but no TLS."""
    check_tls_choice(certificates_dir(server), server.insecure, (CA_CERT, SERVER_CERT, SERVER_KEY))
    if server.authorized_keys and server.insecure:
        raise ValueError("--authorized-keys needs TLS (Flower's node authentication runs over TLS)")


def certificates_dir(server: ServerSettings) -> Path | None:
    return Path(server.certificates).resolve() if server.certificates else None


def new_run(run: RunSettings, path: Path | None) -> tuple[RunSettings, RunDirectory]:
    """A fresh run id and run directory (default runs/<date-time>) holding the run's settings."""
    path = path or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if (path / "config.json").exists():
        raise ValueError(f"{path} already holds a run; use --resume {path} to continue it")
    run = replace(run, run_dir=str(path.resolve()), run_id=f"run-{uuid.uuid4().hex[:12]}",
                  server_eval_data=str(Path(run.server_eval_data).resolve()) if run.server_eval_data else "",
                  initial_model=str(Path(run.initial_model).resolve()) if run.initial_model else "")
    if run.initial_model:
        from fedmed.flower.initial_model import load_initial_model  # torch: only when needed

        load_initial_model(run)  # refuse a missing or mismatched model now, not inside the ServerApp
    run_dir = RunDirectory(path)
    run_dir.write_config(run.to_flower())
    return run, run_dir


def resumed_run(path: Path) -> tuple[RunSettings, RunDirectory]:
    """A crashed run's settings, to continue after its last checkpoint."""
    run_dir = RunDirectory(path)
    run = RunSettings.from_flower(run_dir.read_config())
    checkpoint = run_dir.last_checkpoint()
    done = checkpoint[0] if checkpoint else 0
    if done >= run.rounds:
        raise ValueError(f"{run_dir.path} already holds all {run.rounds} rounds; nothing to resume")
    return replace(run, start_round=done + 1), run_dir


def coordinate(run: RunSettings, run_dir: RunDirectory, server: ServerSettings, live: bool) -> dict:
    """Start the SuperLink, register the sites' keys, run the rounds; the SuperLink is
    stopped before this returns the run's final status."""
    certificates = certificates_dir(server)
    keys = Path(server.authorized_keys) if server.authorized_keys else None
    superlink = start_superlink(server.host, server.port, certificates, run_dir.path / "logs" / "superlink.log",
                                run_dir.path / ".flwr", node_auth=keys is not None)
    try:
        local = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
        ca = certificates / CA_CERT if certificates else None
        # Over TLS, connect by a name the development certificate covers.
        host = "localhost" if ca is not None and local == "127.0.0.1" else local
        return launch(run, run_dir, superlink, host, server.port, root_certificate=ca, authorized_keys=keys,
                      live=live)
    finally:
        superlink.stop()
