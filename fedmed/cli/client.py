"""``fedmed-client``: one hospital. Validates the site's data, then runs a Flower SuperNode
that connects out to the coordinator and trains privately when asked."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from fedmed.data.cache import default_cache_dir
from fedmed.deploy.launch import node_config_text
from fedmed.deploy.processes import ManagedProcess, free_port
from fedmed.flower.settings import RunSettings, SiteSettings
from fedmed.flower.site_work import SiteWork
from fedmed.flower.site_worker import SiteWorker, worker_address

DEFAULT_RUN = RunSettings()
ACTIVATION_RETRY = 10.0  # seconds between attempts while the coordinator refuses this site


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmed-client", fromfile_prefix_chars="@",
        description="Join fedmed training as one hospital. Images never leave this machine: only "
                    "model weights and a few whitelisted numbers are sent, after differentially "
                    "private training whose spending is kept in this site's ledger.")
    p.add_argument("--server", required=True, help="the coordinator, HOST:PORT")
    p.add_argument("--data", required=True, type=Path,
                   help="folder with one sub-folder per class, or a CSV manifest (path,label[,patient_id])")
    p.add_argument("--site", required=True, help="this hospital's name, as shown in reports")
    p.add_argument("--max-epsilon", type=float, default=8.0,
                   help="the site's lifetime privacy budget; rounds that would pass it are refused")
    p.add_argument("--target-epsilon", type=float, default=0.0,
                   help="cumulative epsilon to reach by the end of this run (default: --max-epsilon)")
    p.add_argument("--delta", type=float, default=0.0, help="default: a power of ten below 1/(10 n)")
    p.add_argument("--no-dp", action="store_true",
                   help="train WITHOUT differential privacy (non-private baselines only)")
    p.add_argument("--state-dir", type=Path,
                   help="where the site's privacy ledger and logs live (default ~/.fedmed/sites/SITE)")
    p.add_argument("--cache-dir", type=Path, help="preprocessing cache (default ~/.cache/fedmed)")
    p.add_argument("--root-certificates", type=Path, help="CA certificate that signed the server's")
    p.add_argument("--insecure", action="store_true", help="no TLS: trusted test networks only")
    p.add_argument("--auth-key", type=Path, help="this site's private key, if the server requires node keys")
    p.add_argument("--classes", default=DEFAULT_RUN.classes, help="as the coordinator's --classes")
    p.add_argument("--image-size", type=int, default=DEFAULT_RUN.image_size,
                   help="as the coordinator's --image-size (fills the cache before the first round)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.insecure == (args.root_certificates is not None):
        print("error: give --root-certificates CA_FILE for TLS (the default), or --insecure to connect "
              "without encryption on a trusted test network", file=sys.stderr)
        return 2
    if args.root_certificates is not None and not args.root_certificates.is_file():
        print(f"error: root certificate {args.root_certificates} not found", file=sys.stderr)
        return 2
    state_dir = (args.state_dir or Path.home() / ".fedmed" / "sites" / args.site).resolve()
    site = SiteSettings(
        data=str(args.data.resolve()), site=args.site, ledger=str(state_dir / "ledger.jsonl"),
        cache_dir=str((args.cache_dir or default_cache_dir()).resolve()), max_epsilon=args.max_epsilon,
        target_epsilon=args.target_epsilon, delta=args.delta, dp=not args.no_dp,
    )
    work = SiteWork(site)
    try:
        split = work.split(RunSettings(classes=args.classes, image_size=args.image_size))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(split.data.report.to_text(), flush=True)
    print(f"site {args.site}: {len(split.train)} training and {len(split.val)} validation images; "
          f"ledger {site.ledger}", flush=True)
    if args.no_dp:
        print("WARNING: --no-dp: this site trains WITHOUT differential privacy.", file=sys.stderr)
    if args.insecure:
        print("WARNING: --insecure: the connection to the coordinator is NOT encrypted.", file=sys.stderr)
    worker = SiteWorker(work, worker_address(state_dir))
    worker.start()
    try:
        return _run_supernode(args, site, state_dir, worker.address)
    finally:
        worker.close()


def _run_supernode(args: argparse.Namespace, site: SiteSettings, state_dir: Path, worker: Path) -> int:
    node_config = replace(site, worker=str(worker)).to_node_config()
    command = [sys.executable, "-m", "fedmed.deploy.supernode", "--superlink", args.server,
               "--host", "127.0.0.1", "--port", str(free_port()),
               "--node-config", node_config_text(node_config)]
    command += ["--insecure"] if args.insecure else ["--root-certificates", str(args.root_certificates)]
    if args.auth_key is not None:
        command += ["--auth-supernode-private-key", str(args.auth_key)]
    # The SuperNode hands each message to a fresh ClientApp process, which passes it to the
    # worker above; let it look for work often.
    env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1", "FLWR_HOME": str(state_dir / "flwr")}
    print(f"site {args.site} connecting to {args.server} (log {state_dir / 'logs' / 'supernode.log'}); "
          "it reconnects by itself if the coordinator restarts", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    supernode = None
    try:
        while True:
            supernode = ManagedProcess(command, state_dir / "logs" / "supernode.log", env)
            code = supernode.process.wait()
            log = supernode.log_tail()
            supernode.stop()
            if "Failed to activate SuperNode" not in log:
                print(f"error: the SuperNode exited with code {code}:\n{log}", file=sys.stderr)
                return 1
            # Not (yet) accepted: the coordinator may still be starting or registering keys.
            hint = (f"is {args.site}'s public key in its --authorized-keys folder?" if args.auth_key else
                    "it may require site keys: ask for --authorized-keys and pass --auth-key")
            print(f"the coordinator did not accept this site ({hint}); trying again in "
                  f"{ACTIVATION_RETRY:.0f} s", file=sys.stderr, flush=True)
            time.sleep(ACTIVATION_RETRY)
    except KeyboardInterrupt:
        return 130
    finally:
        if supernode is not None:
            supernode.stop()
