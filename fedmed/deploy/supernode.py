"""Flower's SuperNode with a shorter idle poll: ``python -m fedmed.deploy.supernode ARGS``.

Flower's SuperNode (flwr 1.41) waits a fixed 3 s whenever the SuperLink has no message for
it, so every round starts up to 3 s late at each site. fedmed runs the same SuperNode with
that wait capped at ``FEDMED_SUPERNODE_POLL`` seconds (default 0.5). On a Flower release
whose SuperNode is organised differently, the cap is not applied and the SuperNode runs
unchanged.
"""

from __future__ import annotations

import os
import sys
import time
import types

DEFAULT_POLL = 0.5


def capped_sleep_clock(cap: float) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep`` never waits longer than ``cap``."""
    clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    clock.sleep = lambda seconds: time.sleep(min(seconds, cap))
    return clock


def main() -> int:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    cap = float(os.environ.get("FEDMED_SUPERNODE_POLL", DEFAULT_POLL))
    if getattr(start_client_internal, "time", None) is time:
        start_client_internal.time = capped_sleep_clock(cap)
    sys.argv[0] = "flower-supernode"
    return flower_supernode()


if __name__ == "__main__":
    sys.exit(main())
