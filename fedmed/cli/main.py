"""The ``fedmed`` command."""

from __future__ import annotations

import argparse
import sys

from fedmed import __version__
from fedmed.cli import certificates, data, export, predict, pretrain
from fedmed.runtime import entry_point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmed",
        description="fedmed: federated, differentially private medical-image classification.",
    )
    parser.add_argument("--version", action="version", version=f"fedmed {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data.register(commands)
    predict.register(commands)
    export.register(commands)
    pretrain.register(commands)
    certificates.register(commands)
    return parser


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
