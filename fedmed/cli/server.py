"""``fedmed-server``: the coordinator. Starts a SuperLink, submits the fedmed run, shows
progress and leaves a run directory behind."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import uuid
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from fedmed.deploy.certificates import CA_CERT, SERVER_CERT, SERVER_KEY
from fedmed.deploy.launch import (CONNECTION, check_tls_choice, start_superlink, stop_run,
                                  submit_run, write_app, write_flower_home)
from fedmed.deploy.processes import child_environ, flower_command, wait_for_port
from fedmed.deploy.progress import follow_run
from fedmed.flower.rundir import RunDirectory
from fedmed.flower.settings import RunSettings

DEFAULTS = RunSettings()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmed-server", fromfile_prefix_chars="@",
        description="Coordinate a fedmed training run: start the Flower SuperLink, wait for the "
                    "hospitals, run FedAvg rounds and write a run directory.")
    p.add_argument("--rounds", type=int, default=DEFAULTS.rounds)
    p.add_argument("--min-sites", type=int, default=DEFAULTS.min_sites,
                   help="sites needed to start, and valid updates needed to change the model in a round")
    p.add_argument("--fraction", type=float, default=DEFAULTS.fraction_train,
                   help="fraction of connected sites asked to train each round (default 1.0)")
    p.add_argument("--round-timeout", type=float, default=DEFAULTS.round_timeout,
                   help="seconds to wait for the sites' replies in a round")
    p.add_argument("--site-wait-timeout", type=float, default=DEFAULTS.site_wait_timeout,
                   help="seconds to wait for --min-sites hospitals to connect")
    p.add_argument("--certificates", type=Path,
                   help=f"folder with {CA_CERT}, {SERVER_CERT} and {SERVER_KEY} (TLS)")
    p.add_argument("--insecure", action="store_true", help="no TLS: trusted test networks only")
    p.add_argument("--authorized-keys", type=Path,
                   help="folder of site public keys (*.pub): only these SuperNodes may join (needs TLS)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    p.add_argument("--port", type=int, default=9092, help="the one port hospitals connect to")
    p.add_argument("--run-dir", type=Path, help="where to write the run (default runs/<date-time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue a run from its last checkpoint after a crash")
    model = p.add_argument_group("model and local training (sent to every site)")
    model.add_argument("--classes", default=DEFAULTS.classes)
    model.add_argument("--image-size", type=int, default=DEFAULTS.image_size)
    model.add_argument("--depth", type=int, default=DEFAULTS.model_depth, choices=(18, 34, 50))
    model.add_argument("--width", type=int, default=DEFAULTS.model_width)
    model.add_argument("--local-epochs", type=int, default=DEFAULTS.local_epochs)
    model.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    model.add_argument("--learning-rate", type=float, default=DEFAULTS.learning_rate)
    model.add_argument("--momentum", type=float, default=DEFAULTS.momentum, help="the sites' SGD momentum")
    model.add_argument("--server-learning-rate", type=float, default=DEFAULTS.server_learning_rate,
                       help="step size towards the sites' average (1.0: plain FedAvg)")
    model.add_argument("--server-momentum", type=float, default=DEFAULTS.server_momentum,
                       help="server momentum over rounds (FedAvgM when > 0)")
    model.add_argument("--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm)
    model.add_argument("--class-weights", default=DEFAULTS.class_weights,
                       help="comma-separated loss weights per class, from public figures")
    model.add_argument("--server-eval-data", default="",
                       help="a DICOM folder or manifest the coordinator owns, evaluated after every round")
    model.add_argument("--seed", type=int, default=DEFAULTS.seed)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.certificates is not None:
        args.certificates = args.certificates.resolve()
    try:
        check_tls_choice(args.certificates, args.insecure, (CA_CERT, SERVER_CERT, SERVER_KEY))
        if args.authorized_keys is not None and args.insecure:
            raise ValueError("--authorized-keys needs TLS (Flower's node authentication runs over TLS)")
        run, run_dir = _settings(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.insecure:
        print("WARNING: --insecure: model updates travel UNENCRYPTED. Use only on a trusted test network.",
              file=sys.stderr)
    return Coordinator(args, run, run_dir).run()


def _settings(args: argparse.Namespace) -> tuple[RunSettings, RunDirectory]:
    if args.resume is not None:
        run_dir = RunDirectory(args.resume)
        run = RunSettings.from_run_config(run_dir.read_config())
        checkpoint = run_dir.last_checkpoint()
        done = checkpoint[0] if checkpoint else 0
        if done >= run.rounds:
            raise ValueError(f"{run_dir.path} already holds all {run.rounds} rounds; nothing to resume")
        return replace(run, start_round=done + 1), run_dir
    path = args.run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if (path / "config.json").exists():
        raise ValueError(f"{path} already holds a run; use --resume {path} to continue it")
    run = RunSettings(
        run_dir=str(path.resolve()), run_id=f"run-{uuid.uuid4().hex[:12]}", rounds=args.rounds,
        min_sites=args.min_sites, fraction_train=args.fraction, round_timeout=args.round_timeout,
        site_wait_timeout=args.site_wait_timeout, classes=args.classes, image_size=args.image_size,
        model_depth=args.depth, model_width=args.width, local_epochs=args.local_epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, momentum=args.momentum,
        server_learning_rate=args.server_learning_rate, server_momentum=args.server_momentum,
        max_grad_norm=args.max_grad_norm,
        class_weights=args.class_weights,
        server_eval_data=str(Path(args.server_eval_data).resolve()) if args.server_eval_data else "",
        seed=args.seed,
    )
    run_dir = RunDirectory(path)
    run_dir.write_config(run.to_run_config())
    return run, run_dir


class Coordinator:
    def __init__(self, args: argparse.Namespace, run: RunSettings, run_dir: RunDirectory) -> None:
        self.args = args
        self.run_settings = run
        self.run_dir = run_dir
        self.superlink = None
        self.live = sys.stdout.isatty()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            return self._run()
        except KeyboardInterrupt:
            print("\ninterrupted; resume later with --resume", self.run_dir.path, file=sys.stderr)
            return 130
        except (RuntimeError, TimeoutError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        finally:
            if self.superlink is not None:
                self.superlink.stop()

    def _run(self) -> int:
        args, run = self.args, self.run_settings
        logs = self.run_dir.path / "logs"
        self.superlink = start_superlink(args.host, args.port, args.certificates, logs / "superlink.log",
                                         self.run_dir.path / ".flwr", self.run_dir.superlink_database,
                                         node_auth=args.authorized_keys is not None)
        local = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        wait_for_port(local, args.port, 60, self.superlink)
        ca = args.certificates / CA_CERT if args.certificates else None
        env = write_flower_home(self.run_dir.path / ".flwr", f"{_connect_host(local, ca)}:{args.port}", ca)
        if args.authorized_keys is not None:
            _register_keys(args.authorized_keys, env)
        for earlier in self.run_dir.flower_runs():
            stop_run(earlier, env)  # a crashed coordinator's run must not hand out stale work
        app = write_app(self.run_dir.path / "app" / f"from-round-{run.start_round}", run)
        flower_run = submit_run(app, env)
        self.run_dir.add_flower_run(flower_run, run.start_round)
        print(f"fedmed run {run.run_id} (Flower run {flower_run}) on port {args.port}; "
              f"run directory {self.run_dir.path}", flush=True)
        return self._follow(flower_run, env)

    def _follow(self, flower_run: str, env: dict[str, str]) -> int:
        return self._finish(follow_run(self.run_dir, flower_run, env, self.superlink, self.live))

    def _finish(self, status: dict) -> int:
        phase = status.get("phase")
        if phase == "failed":
            print(f"error: the run failed: {status.get('error', 'see server.log')}", file=sys.stderr)
            return 1
        if phase == "stopped":
            print(f"run stopped early: {status.get('reason', '')}", file=sys.stderr)
        print(f"final model and model card: {self.run_dir.model_dir}")
        from fedmed.report.write import write_run_report  # imports torch; only needed now

        report = write_run_report(self.run_dir.path)
        if report is not None:
            print(f"privacy report: {report}")
        return 0 if phase == "completed" else 3


def _connect_host(local: str, ca: Path | None) -> str:
    """Over TLS, connect by a name the development certificate covers."""
    return "localhost" if ca is not None and local == "127.0.0.1" else local


def _register_keys(folder: Path, env: dict[str, str]) -> None:
    keys = sorted(folder.glob("*.pub"))
    if not keys:
        raise RuntimeError(f"--authorized-keys {folder} holds no *.pub files")
    for key in keys:
        result = subprocess.run([flower_command("flwr"), "supernode", "register", str(key), CONNECTION],
                                capture_output=True, text=True, env=child_environ(env))
        answer = (result.stderr or result.stdout).strip()
        if result.returncode != 0 and "already in use" not in answer:  # known from before a --resume
            raise RuntimeError(f"could not register {key}: {answer[-500:]}")
    print(f"{len(keys)} site keys registered; other SuperNodes are refused", flush=True)
