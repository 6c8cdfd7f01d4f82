"""``fedmed-client``'s work: the site's settings with its paths resolved, its long-lived
worker, and a Flower SuperNode that connects out to the coordinator until the site is
stopped."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from fedmed.config import ClientSettings, SiteSettings
from fedmed.data.cache import default_cache_dir
from fedmed.deploy.launch import write_node_config
from fedmed.deploy.processes import ManagedProcess, free_port
from fedmed.flower.site_work import SiteWork
from fedmed.flower.site_worker import SiteWorker, worker_address

ACTIVATION_RETRY = 10.0  # seconds between attempts while the coordinator refuses this site


def state_dir(site: SiteSettings, client: ClientSettings) -> Path:
    return Path(client.state_dir or Path.home() / ".fedmed" / "sites" / site.name).resolve()


def site_settings(site: SiteSettings, client: ClientSettings) -> SiteSettings:
    """The site's settings with absolute paths and its ledger in the state directory."""
    return replace(site, data=str(Path(site.data).resolve()), ledger=str(state_dir(site, client) / "ledger.jsonl"),
                   cache_dir=str(Path(site.cache_dir or default_cache_dir()).resolve()))


def serve(work: SiteWork, client: ClientSettings) -> int:
    """Serve rounds until stopped; returns an exit code. A coordinator that does not (yet)
    accept this site is asked again every ``ACTIVATION_RETRY`` seconds."""
    site, state = work.site, state_dir(work.site, client)
    worker = SiteWorker(work, worker_address(state))
    worker.start()
    try:
        return _run_supernode(site, client, state, worker.address)
    finally:
        worker.close()


def _run_supernode(site: SiteSettings, client: ClientSettings, state: Path, worker: Path) -> int:
    node_config = write_node_config(state / "node-config.toml", replace(site, worker=str(worker)).to_flower())
    command = [sys.executable, "-m", "fedmed.deploy.supernode", "--superlink", client.server,
               "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", str(node_config)]
    command += ["--insecure"] if client.insecure else ["--root-certificates", client.root_certificates]
    if client.auth_key:
        command += ["--auth-supernode-private-key", client.auth_key]
    # The SuperNode hands each message to a fresh ClientApp process, which passes it to the
    # worker above; let it look for work often.
    env = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1", "FLWR_HOME": str(state / "flwr")}
    print(f"site {site.name} connecting to {client.server} (log {state / 'logs' / 'supernode.log'}); "
          "it reconnects by itself if the coordinator restarts", flush=True)
    supernode = None
    try:
        while True:
            supernode = ManagedProcess(command, state / "logs" / "supernode.log", env)
            code = supernode.process.wait()
            log = supernode.log_tail()
            supernode.stop()
            if "Failed to activate SuperNode" not in log:
                print(f"error: the SuperNode exited with code {code}:\n{log}", file=sys.stderr)
                return 1
            # Not (yet) accepted: the coordinator may still be starting or registering keys.
            hint = (f"is {site.name}'s public key in its --authorized-keys folder?" if client.auth_key else
                    "it may require site keys: ask for --authorized-keys and pass --auth-key")
            print(f"the coordinator did not accept this site ({hint}); trying again in "
                  f"{ACTIVATION_RETRY:.0f} s", file=sys.stderr, flush=True)
            time.sleep(ACTIVATION_RETRY)
    finally:
        if supernode is not None:
            supernode.stop()
