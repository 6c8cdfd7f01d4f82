"""Starting Flower's SuperLink and SuperNode, and submitting fedmed's apps as a run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from fedmed.deploy.certificates import CA_CERT, SERVER_CERT, SERVER_KEY
from fedmed.deploy.processes import ManagedProcess, child_environ, flower_command
from fedmed.flower.settings import RunSettings

CONNECTION = "fedmed"


def check_tls_choice(certificates: Path | None, insecure: bool, files: tuple[str, ...]) -> None:
    """TLS is the default: refuse to start without certificates unless --insecure was given."""
    if certificates is not None and insecure:
        raise ValueError("give either --certificates or --insecure, not both")
    if certificates is None and not insecure:
        raise ValueError("no TLS certificates given: pass --certificates DIR (see server/README.md to "
                         "create them), or --insecure to run without encryption on a trusted test network")
    if certificates is not None:
        missing = [name for name in files if not (certificates / name).is_file()]
        if missing:
            raise ValueError(f"{certificates} lacks {', '.join(missing)}")


def start_superlink(host: str, port: int, certificates: Path | None, log_path: Path, flwr_home: Path,
                    database: Path, node_auth: bool = False) -> ManagedProcess:
    """The SuperLink keeps its state (registered sites, runs) in ``database``, so the sites'
    SuperNodes find themselves known again when a crashed coordinator is restarted."""
    command = [flower_command("flower-superlink"), "--disable-runtime-dependency-installation",
               "--host", host, "--port", str(port), "--database", str(database)]
    if certificates is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(certificates / CA_CERT),
                    "--ssl-certfile", str(certificates / SERVER_CERT),
                    "--ssl-keyfile", str(certificates / SERVER_KEY)]
    if node_auth:
        command.append("--enable-supernode-auth")
    return ManagedProcess(command, log_path, {"FLWR_HOME": str(flwr_home)})


def write_flower_home(flwr_home: Path, address: str, root_certificate: Path | None) -> dict[str, str]:
    """A private Flower config with one connection; returns the environment that uses it."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [f"[superlink.{CONNECTION}]", f'address = "{address}"']
    if root_certificate is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(root_certificate.resolve()))}")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"FLWR_HOME": str(flwr_home)}


def write_app(app_dir: Path, run: RunSettings) -> Path:
    """The app spec ``flwr run`` submits: fedmed's installed apps with this run's settings."""
    app_dir.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{key} = {_toml_value(value)}" for key, value in run.to_run_config().items())
    text = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedmed-run"
version = "1.0.0"
description = "fedmed federated run"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedmed"

[tool.flwr.app.components]
serverapp = "fedmed.flower.server_app:app"
clientapp = "fedmed.flower.client_app:app"

[tool.flwr.app.config]
{config}
"""
    (app_dir / "pyproject.toml").write_text(text, encoding="utf-8")
    return app_dir


def start_simulation_superlink(port: int, log_path: Path, flwr_home: Path, env: dict[str, str]) -> ManagedProcess:
    """A loopback SuperLink that runs submitted apps on Flower's Simulation Runtime (Ray)."""
    command = [flower_command("flower-superlink"), "--simulation", "--insecure",
               "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)]
    return ManagedProcess(command, log_path, {"FLWR_HOME": str(flwr_home), **env})


def submit_run(app_dir: Path, env: dict[str, str], federation_config: str = "") -> str:
    """Submit the run with ``flwr run``; returns Flower's run id. ``federation_config``
    carries simulation settings, e.g. ``"num-supernodes=4 client-resources-num-cpus=1"``."""
    command = [flower_command("flwr"), "run", str(app_dir), CONNECTION, "--format", "json"]
    if federation_config:
        command += ["--federation-config", federation_config]
    result = subprocess.run(command, capture_output=True, text=True, env=child_environ(env), timeout=120)
    try:
        answer = json.loads(result.stdout)
    except json.JSONDecodeError:
        answer = {}
    if result.returncode != 0 or not answer.get("success"):
        detail = answer.get("error-message") or (result.stderr or result.stdout).strip()[-2000:]
        raise RuntimeError(f"Flower refused the run: {detail}")
    return str(answer["run-id"])


def stop_run(run_id: str, env: dict[str, str]) -> bool:
    """Ask the SuperLink to stop a Flower run (e.g. one whose coordinator crashed)."""
    result = subprocess.run([flower_command("flwr"), "stop", run_id, CONNECTION, "--format", "json"],
                            capture_output=True, text=True, env=child_environ(env), timeout=60)
    return result.returncode == 0


def run_status(run_id: str, env: dict[str, str]) -> str:
    """Flower's status of a run, e.g. "running" or "finished:completed" ("" if unknown)."""
    result = subprocess.run([flower_command("flwr"), "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
                            capture_output=True, text=True, env=child_environ(env), timeout=60)
    try:
        runs = json.loads(result.stdout).get("runs", [])
    except json.JSONDecodeError:
        return ""
    return str(runs[0].get("status", "")) if runs else ""


def node_config_text(values: dict[str, object]) -> str:
    """Flower's ``--node-config`` string (TOML values, strings quoted and escaped)."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in values.items())


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))
