"""Flower's SuperNode with fedmed's shorter waits: ``python -m fedmed.deploy.supernode ARGS``.

The arguments are ``flower-supernode``'s. The waits and why they are shortened:
``fedmed.flower.waits``.
"""

from __future__ import annotations

import sys

from fedmed.flower.waits import shorten_object_retries, shorten_supernode_polls


def main() -> int:
    try:
        shorten_supernode_polls()
        shorten_object_retries()
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()  # returns (None) once the SuperNode stops: a clean exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
