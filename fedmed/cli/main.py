"""The ``fedmed`` command."""

from __future__ import annotations

import argparse
import importlib
import sys

from fedmed import __version__
from fedmed.runtime import entry_point

# Each a module of fedmed.cli with a ``register(commands)``; only the one asked for is
# imported, so that ``fedmed data ...`` does not load torch for ``predict`` and ``export``.
COMMANDS = ("data", "predict", "export", "pretrain", "certificates", "audit")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for ``command`` alone, or for every command when it is None or unknown."""
    parser = argparse.ArgumentParser(
        prog="fedmed",
        description="fedmed: federated, differentially private medical-image classification.",
    )
    parser.add_argument("--version", action="version", version=f"fedmed {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if command not in COMMANDS else (command,):
        importlib.import_module(f"fedmed.cli.{name}").register(commands)
    return parser


@entry_point
def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(next((w for w in words if not w.startswith("-")), None)).parse_args(argv)
    try:
        return args.handler(args)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
