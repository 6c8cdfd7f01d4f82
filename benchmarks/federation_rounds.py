"""A coordinator and hospitals on loopback over TLS, then the round overhead table.

Usage: python benchmarks/federation_rounds.py [--sites 3] [--rounds 4] [--images 240] [--width 8]
       [--secure-aggregation] [--out DIR]

Creates synthetic DICOM sites and development certificates, starts ``fedmed-server`` and
one ``fedmed-client`` per site (releasing their timing, which round_overhead.py needs),
waits for the run to finish, stops every process by its process group, and prints
``benchmarks/round_overhead.py`` for the run directory. With ``--secure-aggregation`` every
round runs SecAgg+ (three more exchanges with every site, and the masking).

Each site trains with one thread: three sites share this machine's cores, where in a
deployment each has its own machine. (With torch's default of one thread per core, the
three sites' six threads on two cores made training 4-20 times slower and its timing
meaningless.)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from round_overhead import main as overhead_table  # noqa: E402

from fedmed.deploy.certificates import make_dev_certificates  # noqa: E402
from fedmed.deploy.processes import ManagedProcess, free_port  # noqa: E402

BIN = Path(sys.executable).parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--images", type=int, default=240, help="images over all sites")
    parser.add_argument("--secure-aggregation", action="store_true", help="run every round under SecAgg+")
    parser.add_argument("--width", type=int, default=8, help="the model's width (fedmed's default is 16)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/output/federation"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    env = {"FEDMED_CACHE_DIR": str(args.out / "cache"), "FLWR_HOME": str(args.out / "flwr-home")}
    sites = [f"site-{i}" for i in range(1, args.sites + 1)]
    subprocess.run([str(BIN / "fedmed"), "data", "make-sites", "--synthetic", "--sites", str(args.sites), "--images",
                    str(args.images), "--seed", "3", "--out", str(args.out / "sites")], check=True,
                   stdout=subprocess.DEVNULL)
    make_dev_certificates(args.out / "certs", ["localhost", "127.0.0.1"])
    port = free_port()
    run_dir = args.out / "run"
    secure = ["--secure-aggregation", "--max-site-examples", "10000"] if args.secure_aggregation else []
    server = ManagedProcess(
        [str(BIN / "fedmed-server"), "--rounds", str(args.rounds), "--min-sites", str(args.sites), "--host",
         "127.0.0.1", "--port", str(port), "--certificates", str(args.out / "certs"), "--run-dir", str(run_dir),
         "--width", str(args.width), "--image-size", "28", *secure],
        args.out / "server.out", env)
    clients = [
        ManagedProcess(
            [str(BIN / "fedmed-client"), "--server", f"localhost:{port}", "--site", site,
             "--data", str(args.out / "sites" / site), "--root-certificates", str(args.out / "certs" / "ca.crt"),
             "--coordinator-key", str(args.out / "certs" / "coordinator.pub"),
             "--state-dir", str(args.out / "state" / site), "--image-size", "28", "--release-exact", "timing"],
            args.out / f"{site}.out", {**env, "OMP_NUM_THREADS": "1"})
        for site in sites
    ]
    started = time.monotonic()
    try:
        code = server.process.wait(timeout=60 * 30)
    finally:
        for process in [server, *clients]:
            process.stop()
    print(f"fedmed-server exited with {code} after {time.monotonic() - started:.0f} s")
    if code != 0:
        print(server.log_tail(40), file=sys.stderr)
        return 1
    return overhead_table(str(run_dir))


if __name__ == "__main__":
    sys.exit(main())
