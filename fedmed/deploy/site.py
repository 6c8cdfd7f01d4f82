"""``fedmed-client``'s work: the site's settings with its paths resolved, and a Flower
SuperNode that connects out to the coordinator until the site is stopped, whose tasks
this process serves itself (``fedmed.deploy.site_runtime``)."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from fedmed.config import ClientSettings, SiteSettings
from fedmed.data.cache import default_cache_dir
from fedmed.deploy.launch import write_node_config
from fedmed.deploy.processes import ManagedProcess, free_port
from fedmed.deploy.site_runtime import SiteRuntime, write_secret
from fedmed.flower import client_app
from fedmed.site.work import SiteWork

ACTIVATION_RETRY = 10.0  # seconds between attempts while the coordinator refuses this site
# A SuperNode ends itself, with exit code 0, when the coordinator it was registered with
# is gone and a coordinator started afresh (a new run) refuses its heartbeat; fedmed-client
# then starts a new SuperNode, which registers again, after this pause (seconds).
REJOIN_PAUSE = 1.0
SHUT_DOWN = "SuperNode terminated gracefully"  # what a SuperNode logs when it ends itself
SHUTDOWN_LOG_LINES = 500  # how far back an exited SuperNode's log is searched for its shutdown
EXIT_HANG = 3.0  # seconds a SuperNode that has shut down may take to exit before it is stopped
RUNTIME_STOP_WAIT = 5.0  # seconds a stopping site gives the round it is serving to finish


def state_dir(site: SiteSettings, client: ClientSettings) -> Path:
    return Path(client.state_dir or Path.home() / ".fedmed" / "sites" / site.name).resolve()


def site_settings(site: SiteSettings, client: ClientSettings, device: str | None = None) -> SiteSettings:
    """The site's settings with absolute paths, its ledger in the state directory and, when
    given, its device (its own ``resources.device``, resolved)."""
    return replace(
        site,
        device=site.device if device is None else device,
        data=str(Path(site.data).resolve()),
        ledger=str(state_dir(site, client) / "ledger.jsonl"),
        cache_dir=str(Path(site.cache_dir or default_cache_dir()).resolve()),
        coordinator_key=str(Path(site.coordinator_key).resolve()) if site.coordinator_key else "",
    )


def serve(work: SiteWork, client: ClientSettings) -> int:
    """Serve rounds until stopped; returns an exit code. A coordinator that does not (yet)
    accept this site is asked again every ``ACTIVATION_RETRY`` seconds."""
    site, state = work.site, state_dir(work.site, client)
    client_app.serve_site(work)
    secret = write_secret(state)
    port = free_port()
    runtime = SiteRuntime(f"127.0.0.1:{port}", secret.read_bytes(), client_app.app, site)
    runtime.start()
    try:
        return _run_supernode(site, client, state, port, secret)
    finally:
        runtime.stop(timeout=RUNTIME_STOP_WAIT)
        secret.unlink(missing_ok=True)


def _run_supernode(site: SiteSettings, client: ClientSettings, state: Path, port: int, secret: Path) -> int:
    """The SuperNode leaves each task on its runtime API at ``port`` for the holder of ``secret``."""
    node_config = write_node_config(state / "node-config.toml", site.to_flower())
    command = [
        sys.executable,
        "-m",
        "fedmed.deploy.supernode",
        "--superlink",
        client.server,
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        str(node_config),
    ]
    command += ["--insecure"] if client.insecure else ["--root-certificates", client.root_certificates]
    if client.auth_key:
        command += ["--auth-supernode-private-key", client.auth_key]
    env = {"FLWR_HOME": str(state / "flwr")}
    print(
        f"site {site.name} connecting to {client.server} (log {state / 'logs' / 'supernode.log'}); "
        "it reconnects by itself if the coordinator restarts",
        flush=True,
    )
    supernode = None
    try:
        while True:
            supernode = ManagedProcess(command, state / "logs" / "supernode.log", env)
            code = _wait_for_exit(supernode)
            log = supernode.log_tail()
            supernode.stop()
            if code == 0:  # it ended itself: the coordinator no longer knows this site
                print(
                    "the coordinator no longer knows this site (it started afresh, e.g. for a new run); "
                    "joining it again",
                    flush=True,
                )
                time.sleep(REJOIN_PAUSE)
                continue
            if "Failed to activate SuperNode" not in log:
                print(f"error: the SuperNode exited with code {code}:\n{log}", file=sys.stderr)
                return 1
            # Not (yet) accepted: the coordinator may still be starting or registering keys.
            hint = (
                f"is {site.name}'s public key in its --authorized-keys folder?"
                if client.auth_key
                else "it may require site keys: ask for --authorized-keys and pass --auth-key"
            )
            print(
                f"the coordinator did not accept this site ({hint}); trying again in {ACTIVATION_RETRY:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(ACTIVATION_RETRY)
    finally:
        if supernode is not None:
            supernode.stop()


def _wait_for_exit(supernode: ManagedProcess) -> int:
    """The SuperNode's exit code. One that has shut down counts as having ended itself (0):
    one whose process does not exit (a download thread of Flower's keeps retrying a
    coordinator that is gone) is stopped after ``EXIT_HANG`` seconds, and one that a second
    interrupt of Flower's own cut short while it was shutting down (exit code -2, after a
    traceback) still said so first."""
    shut_down_at = None
    while (code := supernode.process.poll()) is None:
        if shut_down_at is None and SHUT_DOWN in supernode.log_tail(lines=10):
            shut_down_at = time.monotonic()
        if shut_down_at is not None and time.monotonic() - shut_down_at > EXIT_HANG:
            supernode.stop(grace=1.0)
            return 0
        time.sleep(0.5)
    return 0 if code != 0 and SHUT_DOWN in supernode.log_tail(lines=SHUTDOWN_LOG_LINES) else code
