"""Round orchestration overhead of a finished fedmed run.

overhead = round wall time (coordinator) - slowest site's local training time (site-reported)

Usage: python benchmarks/round_overhead.py RUN_DIR
Produce RUN_DIR with fedmed-server and fedmed-client on loopback (see server/README.md),
the clients started with `--release-exact timing`: a site's seconds are a non-private
release it sends only when its settings name it.
The sites also report their set-up time (receiving the model to validation done), shown
separately because it is part of the overhead; "site transport" is, per site, the time from
sending its message to its reply arriving minus the site's own set-up and training.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedmed.rundir import RunDirectory


def main(run_dir: str) -> int:
    rounds = [r for r in RunDirectory(Path(run_dir)).metrics() if r.get("event") == "round"]
    if not rounds:
        print(f"error: no finished rounds in {run_dir}", file=sys.stderr)
        return 2
    if not any("seconds-train" in s for r in rounds for s in r["sites"].values()):
        print(f"error: the sites of {run_dir} did not release their timing (start them with --release-exact timing)",
              file=sys.stderr)
        return 2
    print("round  sites  wall s  slowest train s  overhead s  max site set-up s  site transport s")
    overheads = []
    for r in rounds:
        overhead = r["seconds"] - r["slowest_site_train_seconds"]
        overheads.append(overhead)
        setup = max((s.get("seconds-setup", 0.0) for s in r["sites"].values()), default=0.0)
        # per site: time from sending to its reply, minus its own set-up and training
        transport = [seconds - r["sites"][name].get("seconds-setup", 0.0) - r["sites"][name].get("seconds-train", 0.0)
                     for name, seconds in r.get("reply_seconds", {}).items() if name in r["sites"]]
        spread = f"{min(transport):.1f}-{max(transport):.1f}" if transport else "n/a"
        print(f"{r['round']:>5}  {len(r['sites']):>5}  {r['seconds']:>6.1f}  {r['slowest_site_train_seconds']:>15.1f}"
              f"  {overhead:>10.1f}  {setup:>17.1f}  {spread:>16}")
    print(f"mean overhead per round: {sum(overheads) / len(overheads):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]) if len(sys.argv) == 2 else 2)
