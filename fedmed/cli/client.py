"""``fedmed-client``: one hospital. Validates the site's data, then runs a Flower SuperNode
that connects out to the coordinator and trains privately when asked (the work itself:
``fedmed.deploy.site``)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedmed.config import ClientSettings, DeviceSettings, RunSettings, SiteSettings
from fedmed.config.command_line import add_options, load_settings
from fedmed.flower.waits import check_flower
from fedmed.runtime import entry_point, keep_freed_memory

if TYPE_CHECKING:
    from fedmed.site.data import SiteSplit

# resources: where this site trains, its own choice (the coordinator's run settings cannot set it)
PARTS = {"client": ClientSettings, "site": SiteSettings, "data": RunSettings, "resources": DeviceSettings}
ONLY = {"data": ("classes", "image_size")}  # what the site needs of the run before the first round


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmed-client",
        description="Join fedmed training as one hospital. Images never leave this machine: only "
        "model weights and a few whitelisted numbers are sent, after differentially "
        "private training whose spending is kept in this site's ledger.",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="TOML",
        help="site config file with [site], [connection], [privacy], [data] and [resources] sections (see "
        "client/site.toml); options given here override it",
    )
    add_options(p, SiteSettings, "this hospital")
    add_options(p, ClientSettings, "the connection to the coordinator")
    add_options(p, DeviceSettings, "this machine")
    add_options(p, RunSettings, "as the coordinator's (fills the cache before the first round)", only=ONLY["data"])
    return p


def check_pin(site: SiteSettings, client: ClientSettings) -> None:
    """A site over TLS serves only runs its coordinator signed: it must pin that
    coordinator's public key (``coordinator.pub``), and the key must be readable."""
    if not site.coordinator_key:
        if not client.insecure:
            raise ValueError(
                "give --coordinator-key FILE (the coordinator's coordinator.pub): the site serves only "
                "runs whose settings that coordinator signed"
            )
        print(
            "WARNING: no --coordinator-key: this site serves any run the coordinator's SuperLink hands it",
            file=sys.stderr,
        )
        return
    from fedmed.run_signing import load_public_key

    load_public_key(Path(site.coordinator_key))


def print_site_data(split: SiteSplit, site: SiteSettings) -> None:
    """The site's validation report and split. Every name passes ``printable``: a file name
    that is not UTF-8 must not end the site with a UnicodeEncodeError on a strict stdout."""
    from fedmed.data.report import printable  # the data package loads pydicom: only once data is read

    print(split.data.report.to_text(), flush=True)
    print(
        f"site {printable(site.name)}: {len(split.train)} training and {len(split.val)} validation images; "
        f"ledger {printable(site.ledger)}; computing on {site.device}",
        flush=True,
    )


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_flower()
        settings = load_settings(args, PARTS, args.config, ONLY)
        from fedmed.device import resolve_device  # torch: once the settings are read

        device = str(resolve_device(settings["resources"].device))  # before the site connects
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    client: ClientSettings = settings["client"]
    if client.insecure == bool(client.root_certificates):
        print(
            "error: give --root-certificates CA_FILE for TLS (the default), or --insecure to connect "
            "without encryption on a trusted test network",
            file=sys.stderr,
        )
        return 2
    if client.root_certificates and not Path(client.root_certificates).is_file():
        print(f"error: root certificate {client.root_certificates} not found", file=sys.stderr)
        return 2
    try:
        check_pin(settings["site"], client)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from fedmed.deploy.site import serve, site_settings  # Flower's runtime internals: after check_flower
    from fedmed.site.work import SiteWork

    site = site_settings(settings["site"], client, device)
    work = SiteWork(site)
    try:
        split = work.split(settings["data"])
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_site_data(split, site)
    if not site.dp:
        print("WARNING: --no-dp: this site trains WITHOUT differential privacy.", file=sys.stderr)
    if client.insecure:
        print("WARNING: --insecure: the connection to the coordinator is NOT encrypted.", file=sys.stderr)
    keep_freed_memory()  # this process is the site's worker: it trains every round (fedmed.runtime)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds like Ctrl-C: the SuperNode is stopped
    try:
        return serve(work, client)
    except KeyboardInterrupt:
        return 130
