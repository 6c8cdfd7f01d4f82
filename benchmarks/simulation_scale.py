"""Wall time and peak memory of one `fedmed-simulate` run, all of its processes counted.

Usage: python benchmarks/simulation_scale.py [fedmed-simulate arguments ...]
e.g.   python benchmarks/simulation_scale.py simulations/pneumonia-5-sites.toml \\
           --set data.path=pneumoniamnist.npz --set partition.sites=20 --out runs/scale-20

Peak memory is the largest sum of resident memory (RSS) over the run's whole process tree
(fedmed-simulate, the SuperLink, the ServerApp, Ray and its actors), sampled every 0.5 s.
"""

from __future__ import annotations

import subprocess
import sys
import time
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
    started = time.monotonic()
    process = subprocess.Popen([str(BIN / "fedmed-simulate"), *arguments], start_new_session=True)
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
    return process.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
