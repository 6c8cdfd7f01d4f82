"""Flower's SuperLink and fedmed's run on it: the one launch path of ``fedmed-server``
and ``fedmed-simulate``.

Both start a SuperLink (TLS for a deployment, the Simulation Runtime for a simulation),
then ``launch`` does the rest the same way: a private Flower config, the sites' keys,
the app spec with the run's settings, ``flwr run``, and following the run to its end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import tomli_w

from fedmed.config import RunSettings
from fedmed.deploy.certificates import CA_CERT, SERVER_CERT, SERVER_KEY
from fedmed.deploy.processes import ManagedProcess, child_environ, flower_command, wait_for_port
from fedmed.deploy.progress import CONNECTION, follow_run
from fedmed.files import private_dir, write_atomic
from fedmed.rundir import RunDirectory

APP_COMPONENTS = {"serverapp": "fedmed.flower.server_app:app", "clientapp": "fedmed.flower.client_app:app"}


def check_tls_choice(certificates: Path | None, insecure: bool, files: tuple[str, ...]) -> None:
    """TLS is the default: refuse to start without certificates unless --insecure was given."""
    if certificates is not None and insecure:
        raise ValueError("give either --certificates or --insecure, not both")
    if certificates is None and not insecure:
        raise ValueError(
            "no TLS certificates given: pass --certificates DIR (see server/README.md to "
            "create them), or --insecure to run without encryption on a trusted test network"
        )
    if certificates is not None:
        missing = [name for name in files if not (certificates / name).is_file()]
        if missing:
            raise ValueError(f"{certificates} lacks {', '.join(missing)}")


# Flower's legacy gRPC Control and Fleet APIs listen on all interfaces when these are "1".
LEGACY_GRPC_OFF = {"FLWR_INTERNAL_GRPC_CONTROL_API": "0", "FLWR_INTERNAL_GRPC_FLEET_API": "0"}


def start_superlink(
    port: int, certificates: Path | None, log_path: Path, flwr_home: Path, node_auth: bool = False
) -> ManagedProcess:
    """A SuperLink on loopback only: its one port also serves Flower's Control API, which
    must never be reachable from where the sites connect (the sites reach its Fleet API
    through ``fedmed.deploy.gateway``).

    It keeps its state (registered sites, runs, messages) in memory: a SQLite file made
    every message wait for disk writes (BENCHMARKS.md, round overhead: 0.8 s against 0.3 s
    a round). A restarted coordinator starts afresh; the sites notice and register again by
    themselves (``fedmed.deploy.site``), and the run directory holds what a resumed run needs."""
    command = [
        flower_command("flower-superlink"),
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]  # state in memory (the default)
    if certificates is None:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile",
            str(certificates / CA_CERT),
            "--ssl-certfile",
            str(certificates / SERVER_CERT),
            "--ssl-keyfile",
            str(certificates / SERVER_KEY),
        ]
    if node_auth:
        command.append("--enable-supernode-auth")
    return ManagedProcess(command, log_path, {"FLWR_HOME": str(flwr_home), **LEGACY_GRPC_OFF})


def start_gateway(
    host: str, port: int, superlink_port: int, certificates: Path | None, log_path: Path
) -> ManagedProcess:
    """The sites' door on ``host:port``: forwards only the Fleet API to the loopback SuperLink."""
    command = [
        sys.executable,
        "-m",
        "fedmed.deploy.gateway",
        "--host",
        host,
        "--port",
        str(port),
        "--upstream-port",
        str(superlink_port),
    ]
    if certificates is not None:
        command += [
            "--certfile",
            str(certificates / SERVER_CERT),
            "--keyfile",
            str(certificates / SERVER_KEY),
            "--ca-certfile",
            str(certificates / CA_CERT),
        ]
    return ManagedProcess(command, log_path)


def start_simulation_superlink(port: int, log_path: Path, flwr_home: Path, env: dict[str, str]) -> ManagedProcess:
    """A loopback SuperLink that runs submitted apps on Flower's Simulation Runtime (Ray)."""
    command = [
        flower_command("flower-superlink"),
        "--simulation",
        "--insecure",
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return ManagedProcess(command, log_path, {"FLWR_HOME": str(flwr_home), **env})


def launch(
    run: RunSettings,
    run_dir: RunDirectory,
    superlink: ManagedProcess,
    host: str,
    port: int,
    *,
    root_certificate: Path | None = None,
    authorized_keys: Path | None = None,
    federation_config: str = "",
    device: str = "cpu",
    live: bool = False,
    on_tick: Callable[[], None] | None = None,
) -> dict:
    """Submit fedmed's apps with ``run``'s settings to a started SuperLink and follow the
    run until it ends; returns its final status (see ``follow_run``). ``device`` (resolved)
    is where the ServerApp scores the coordinator's held-out set."""
    run_dir.write_device(device)
    wait_for_port(host, port, 60, superlink)
    env = write_flower_home(run_dir.path / ".flwr", f"{host}:{port}", root_certificate)
    if authorized_keys is not None:
        run_dir.write_identities(register_keys(authorized_keys, env))
    for earlier in run_dir.flower_runs():
        stop_run(earlier, env)  # a crashed coordinator's run must not hand out stale work
    app = write_app(run_dir.path / "app" / f"from-round-{run.start_round}", run)
    flower_run = submit_run(app, env, federation_config)
    run_dir.add_flower_run(flower_run, run.start_round)
    print(f"fedmed run {run.run_id} (Flower run {flower_run}) on port {port}; run directory {run_dir.path}", flush=True)
    return follow_run(run_dir, flower_run, env, superlink, live=live, on_tick=on_tick)


def write_flower_home(flwr_home: Path, address: str, root_certificate: Path | None) -> dict[str, str]:
    """A private Flower config with one connection; returns the environment that uses it."""
    private_dir(flwr_home)  # owner-only, as all of a run directory
    connection: dict[str, object] = {"address": address}
    if root_certificate is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_certificate.resolve())
    write_atomic(flwr_home / "config.toml", tomli_w.dumps({"superlink": {CONNECTION: connection}}).encode("utf-8"))
    return {"FLWR_HOME": str(flwr_home)}


def write_app(app_dir: Path, run: RunSettings) -> Path:
    """The app spec ``flwr run`` submits: fedmed's installed apps with this run's settings
    as the app's config (which Flower hands every ServerApp and ClientApp as run config)."""
    private_dir(app_dir)  # owner-only, as all of a run directory
    spec = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "fedmed-run",
            "version": "1.0.0",
            "description": "fedmed federated run",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {"flwr": {"app": {"publisher": "fedmed", "components": APP_COMPONENTS, "config": run.to_flower()}}},
    }
    write_atomic(app_dir / "pyproject.toml", tomli_w.dumps(spec).encode("utf-8"))
    return app_dir


def write_node_config(path: Path, values: dict[str, object]) -> Path:
    """A SuperNode's node config as a TOML file (``flower-supernode --node-config FILE``)."""
    private_dir(path.parent)
    write_atomic(path, tomli_w.dumps(values).encode("utf-8"))
    return path


def register_keys(folder: Path, env: dict[str, str]) -> dict[int, str]:
    """Register every site public key (*.pub) in ``folder`` with the SuperLink; returns the
    node id Flower bound to each key, with the site name the key file gives (its stem)."""
    keys = sorted(folder.glob("*.pub"))
    if not keys:
        raise RuntimeError(f"--authorized-keys {folder} holds no *.pub files")
    identities = {}
    for key in keys:
        result = subprocess.run(
            [flower_command("flwr"), "supernode", "register", str(key), CONNECTION, "--format", "json"],
            capture_output=True,
            text=True,
            env=child_environ(env),
        )
        answer = (result.stderr or result.stdout).strip()
        if result.returncode != 0 or '"node-id"' not in result.stdout:
            raise RuntimeError(f"could not register {key}: {answer[-500:]} (each site needs its own key)")
        reply = result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1]
        identities[int(json.loads(reply)["node-id"])] = key.stem
    print(f"{len(keys)} site keys registered; other SuperNodes are refused", flush=True)
    return identities


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
    result = subprocess.run(
        [flower_command("flwr"), "stop", run_id, CONNECTION, "--format", "json"],
        capture_output=True,
        text=True,
        env=child_environ(env),
        timeout=60,
    )
    return result.returncode == 0
