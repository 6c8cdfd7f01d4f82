"""``fedmed-server``'s work: the run directory of a new or resumed run, a TLS SuperLink
that admits the hospitals, and the run on it (``fedmed.deploy.launch``)."""

from __future__ import annotations

import sys
import uuid
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from fedmed.config import RunSettings, ServerSettings
from fedmed.deploy.certificates import CA_CERT, SERVER_CERT, SERVER_KEY
from fedmed.deploy.launch import check_tls_choice, launch, start_gateway, start_superlink
from fedmed.deploy.processes import ManagedProcess, free_port, wait_for_port
from fedmed.run_signing import PRIVATE_KEY, sign_run
from fedmed.rundir import RunDirectory


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
    run = replace(
        run,
        run_dir=str(path.resolve()),
        run_id=f"run-{uuid.uuid4().hex[:12]}",
        server_eval_data=str(Path(run.server_eval_data).resolve()) if run.server_eval_data else "",
        initial_model=str(Path(run.initial_model).resolve()) if run.initial_model else "",
    )
    if run.initial_model:
        from fedmed.coordinator.initial_model import load_initial_model  # torch: only when needed

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


def signing_key(server: ServerSettings) -> Path | None:
    """The coordinator's private signing key: the setting, else coordinator.key beside the certificates."""
    if server.signing_key:
        return Path(server.signing_key)
    certificates = certificates_dir(server)
    default = certificates / PRIVATE_KEY if certificates else None
    return default if default is not None and default.is_file() else None


def _check_running(process: ManagedProcess, what: str) -> None:
    if not process.running():
        raise RuntimeError(f"{what} stopped (code {process.process.returncode}):\n{process.log_tail()}")


def coordinate(
    run: RunSettings, run_dir: RunDirectory, server: ServerSettings, live: bool, device: str = "cpu"
) -> dict:
    """Start the SuperLink on loopback and the sites' gateway on the operator's address,
    register the sites' keys, sign the run's settings and run the rounds; both processes
    are stopped before this returns the run's final status. ``device`` (resolved) scores
    the coordinator's held-out set."""
    certificates = certificates_dir(server)
    keys = Path(server.authorized_keys) if server.authorized_keys else None
    key = signing_key(server)
    if key is not None:
        run = sign_run(run, key)
    else:
        print(
            "WARNING: no signing key (coordinator.key): sites that pinned a coordinator key will refuse this run",
            file=sys.stderr,
        )
    logs = run_dir.path / "logs"
    superlink_port = free_port()
    superlink = start_superlink(
        superlink_port, certificates, logs / "superlink.log", run_dir.path / ".flwr", node_auth=keys is not None
    )
    gateway = start_gateway(server.host, server.port, superlink_port, certificates, logs / "gateway.log")
    try:
        wait_for_port({"0.0.0.0": "127.0.0.1", "::": "::1"}.get(server.host, server.host), server.port, 60, gateway)
        ca = certificates / CA_CERT if certificates else None
        # Over TLS, connect by a name the development certificate covers.
        host = "localhost" if ca is not None else "127.0.0.1"
        return launch(
            run,
            run_dir,
            superlink,
            host,
            superlink_port,
            root_certificate=ca,
            authorized_keys=keys,
            device=device,
            live=live,
            on_tick=lambda: _check_running(gateway, "the sites' gateway"),
        )
    finally:
        gateway.stop()
        superlink.stop()
