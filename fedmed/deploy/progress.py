"""Following a submitted fedmed run: live progress from its run directory until it ends."""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Callable

from fedmed.deploy.processes import ManagedProcess, child_environ, flower_command
from fedmed.numbers import format_noisy
from fedmed.records import RoundRecord
from fedmed.rundir import RunDirectory

CONNECTION = "fedmed"  # the one connection in fedmed's private Flower config

FINAL_PHASES = ("completed", "stopped", "failed")
QUIET_BEFORE_CHECK = 10.0  # seconds without progress before Flower is asked whether the run still runs


def follow_run(
    run_dir: RunDirectory,
    flower_run: str,
    env: dict[str, str],
    superlink: ManagedProcess,
    *,
    live: bool,
    on_tick: Callable[[], None] | None = None,
) -> dict:
    """Print each finished round and a progress line (a bar redrawn in place when ``live``,
    plain lines otherwise) until the run reaches a final phase; returns its status.
    Raises RuntimeError when the SuperLink or the Flower run ends first."""
    shown_rounds: set[int] = set()
    last_line = ""
    last_status: dict = {}
    changed = next_check = time.monotonic()
    while True:
        if on_tick is not None:
            on_tick()
        status = run_dir.status()
        if status != last_status:
            last_status, changed = status, time.monotonic()
        for record in run_dir.rounds():
            if record.round not in shown_rounds:
                shown_rounds.add(record.round)
                if live:
                    print()
                print(round_line(record), flush=True)
        line = progress_line(status)
        if line != last_line:
            print("\r" + line.ljust(100) if live else line, end="" if live else "\n", flush=True)
            last_line = line
        if status.get("phase") in FINAL_PHASES:
            if live:
                print()
            return status
        if not superlink.running():
            raise RuntimeError(f"the SuperLink stopped:\n{superlink.log_tail()}")
        # Asking Flower costs a process start (about a second of CPU): only when the run
        # has been quiet for a while, since a run that writes progress is alive.
        quiet = time.monotonic() - changed > QUIET_BEFORE_CHECK
        if quiet and time.monotonic() > next_check:
            next_check = time.monotonic() + QUIET_BEFORE_CHECK
            flower_status = run_status(flower_run, env)
            if flower_status.startswith("finished"):
                time.sleep(1)
                if run_dir.status().get("phase") in FINAL_PHASES:
                    continue
                raise RuntimeError(
                    f"the Flower run ended ({flower_status}) before fedmed finished; see {run_dir.path / 'server.log'}"
                )
        time.sleep(0.5)


def round_line(record: RoundRecord) -> str:
    parts = [f"round {record.round}/{record.rounds}: {len(record.trained)} sites trained"]
    for what, names in (
        ("budget exhausted", record.budget_exhausted),
        ("missing", record.missing),
        ("rejected", list(record.rejected)),
        ("failed", list(record.failed)),
    ):
        if names:
            parts.append(f"{what}: {', '.join(names)}")
    if not record.aggregated:
        parts.append("model unchanged (below --min-sites)")
    test = record.server_validation or {}
    auroc = test.get("auroc")
    if isinstance(auroc, float) and math.isfinite(auroc):
        parts.append(f"held-out AUROC {auroc:.3f}")
    return "; ".join(parts)


def progress_line(status: dict) -> str:
    phase = status.get("phase", "starting")
    rounds = status.get("rounds", "?")
    done = max(0, int(status.get("round", 1)) - (0 if phase in ("completed", "evaluating") else 1))
    bar = ""
    if isinstance(rounds, int) and rounds:
        filled = round(20 * done / rounds)
        bar = "[" + "#" * filled + "." * (20 - filled) + "] "
    text = f"{bar}{done}/{rounds} rounds, {phase}"
    if phase == "waiting":
        text += f" for sites: {status.get('connected', 0)} connected"
    elif phase == "training":
        text += f" round {status.get('round')}: {status.get('asked', 0)} sites asked"
    validation = status.get("validation") or {}
    auroc = validation.get("val-auroc")
    if isinstance(auroc, float) and math.isfinite(auroc):
        # the sites' summed noisy counts: one score for the federation, with its error bar
        text += (
            f", sites' validation AUROC {format_noisy(auroc, validation.get('val-auroc-se'))}, "
            "balanced accuracy "
            + format_noisy(validation.get("val-balanced-accuracy"), validation.get("val-balanced-accuracy-se"))
        )
    return text


def run_status(run_id: str, env: dict[str, str]) -> str:
    """Flower's status of a run, e.g. "running" or "finished:completed" ("" if unknown)."""
    result = subprocess.run(
        [flower_command("flwr"), "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
        capture_output=True,
        text=True,
        env=child_environ(env),
        timeout=60,
    )
    try:
        runs = json.loads(result.stdout).get("runs", [])
    except json.JSONDecodeError:
        return ""
    return str(runs[0].get("status", "")) if runs else ""
