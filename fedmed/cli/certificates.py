"""``fedmed certificates``: development TLS certificates and site keys."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmed.deploy.certificates import make_dev_certificates, make_site_key
from fedmed.run_signing import make_coordinator_key


def register(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("certificates", help="development TLS certificates and site keys")
    sub = group.add_subparsers(dest="certificates_command", required=True, metavar="COMMAND")
    dev = sub.add_parser(
        "dev",
        help="a throw-away CA and a server certificate, for trials only",
        description="Write ca.crt, server.crt and server.key to OUT, and the coordinator's "
        "signing key pair (coordinator.key, coordinator.pub). The CA key is "
        "discarded. Give the server's host names and IP addresses as the "
        "hospitals will dial them.",
    )
    dev.add_argument("--out", type=Path, required=True)
    dev.add_argument(
        "--host",
        action="append",
        dest="hosts",
        help="host name or IP address (repeat); default localhost and 127.0.0.1",
    )
    dev.add_argument("--days", type=int, default=365)
    dev.set_defaults(handler=_dev)
    signing = sub.add_parser(
        "coordinator-key",
        help="the coordinator's key pair for signing run settings",
        description="Write OUT/coordinator.key (keep it with the coordinator; fedmed-server "
        "finds it in its --certificates folder or takes --signing-key) and "
        "OUT/coordinator.pub (give it to every site's --coordinator-key).",
    )
    signing.add_argument("--out", type=Path, required=True)
    signing.set_defaults(handler=_coordinator_key)
    key = sub.add_parser(
        "site-key",
        help="a site's key pair for SuperNode authentication",
        description="Write OUT/SITE.key (keep it at the hospital) and OUT/SITE.pub "
        "(give it to the coordinator's --authorized-keys folder).",
    )
    key.add_argument("--out", type=Path, required=True)
    key.add_argument("--site", required=True)
    key.set_defaults(handler=_site_key)


def _dev(args: argparse.Namespace) -> int:
    paths = make_dev_certificates(args.out, args.hosts or ["localhost", "127.0.0.1"], args.days)
    for path in paths.values():
        print(f"wrote {path}")
    print("development use only: a real deployment gets its server certificate from a proper CA")
    return 0


def _coordinator_key(args: argparse.Namespace) -> int:
    for path in make_coordinator_key(args.out):
        print(f"wrote {path}")
    return 0


def _site_key(args: argparse.Namespace) -> int:
    for path in make_site_key(args.out, args.site):
        print(f"wrote {path}")
    return 0
