"""Wall time, peak memory and simulation efficiency of one `fedmed-simulate` run, all of
its processes counted.

Usage: python benchmarks/simulation_scale.py [fedmed-simulate arguments ...] --out DIR
e.g.   python benchmarks/simulation_scale.py simulations/pneumonia-5-sites.toml \\
           --set data.path=pneumoniamnist.npz --set partition.sites=20 --out runs/scale-20

Peak memory is the largest sum of resident memory (RSS) over the run's whole process tree
(fedmed-simulate, the SuperLink, the ServerApp, Ray and its actors), sampled every 0.5 s.

Simulation efficiency = (sum of the sites' training seconds / CPUs in use) / wall time,
from the federated run's records under DIR. CPUs in use: this machine's CPUs, at most one
per virtual site (the scenarios' ``resources.cpus_per_site = 1``). The rest of the wall
time is shown by phase: before the first round (data, SuperLink, Ray, the ServerApp),
the rounds (of which the sites' validation of each received model, "set-up"), and after
the last round (final evaluation, model card, reports).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil

from fedmed.deploy.processes import ProcessWatch, alive

BIN = Path(sys.executable).parent


def resident_mib(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def main(arguments: list[str]) -> int:
    watch = ProcessWatch()
    started, started_wall = time.monotonic(), time.time()
    # The sites' seconds are a non-private release, sent only when the sites' settings name it.
    timing = ["--set", "privacy.release_exact=timing"]
    process = subprocess.Popen([str(BIN / "fedmed-simulate"), *arguments, *timing], start_new_session=True)
    peak = 0.0
    try:
        while process.poll() is None:
            watch.look({process.pid})
            peak = max(peak, resident_mib({pid for pid in watch.seen if alive(pid)}))
            time.sleep(0.5)
    finally:
        if process.poll() is None:
            process.kill()
        left = watch.stop_survivors()
    seconds = time.monotonic() - started
    print(f"\nfedmed-simulate exited with {process.returncode}: wall {seconds:.0f} s, peak resident memory "
          f"{peak:.0f} MiB over {len(watch.seen)} processes; {len(left)} left running afterwards")
    if "--out" in arguments and process.returncode == 0:
        efficiency(Path(arguments[arguments.index("--out") + 1]), started_wall, seconds)
    return process.returncode


def efficiency(out: Path, started: float, wall: float) -> None:
    """Print the efficiency and where the wall time went (``started``: time.time() at launch)."""
    (run_dir,) = sorted(out.glob("results-*/federated"))[-1:]
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r.get("event") == "round"]
    sites = [s for r in rounds for s in r["sites"].values()]
    train = sum(s.get("seconds-train", 0.0) for s in sites)
    setup = sum(s.get("seconds-setup", 0.0) for s in sites)
    cpus = min(os.cpu_count() or 1, len(rounds[0]["sites"]))
    ends = _round_ends(run_dir)
    print(f"simulation efficiency {train / cpus / wall:.2f}: sites' training {train:.1f} s over {cpus} CPUs, "
          f"wall {wall:.1f} s")
    print(f"  before round 1: {ends[0] - rounds[0]['seconds'] - started:.1f} s; {len(rounds)} rounds: "
          f"{sum(r['seconds'] for r in rounds):.1f} s (the sites' training {train:.1f} s and validation set-up "
          f"{setup:.1f} s, CPU seconds); after the last round: {started + wall - ends[-1]:.1f} s")


def _round_ends(run_dir: Path) -> list[float]:
    """When the coordinator logged each round's end (time.time() values)."""
    return [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for line in (run_dir / "server.log").read_text().splitlines() if "trained," in line]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
