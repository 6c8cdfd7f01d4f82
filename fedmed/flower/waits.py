"""The Flower releases fedmed runs on, and the fixed waits it shortens in them.

A round trip through Flower's Deployment Runtime passes several waits that are written
into Flower's code, not settings (flwr 1.41):
- the SuperNode sleeps 3 s whenever the SuperLink has no message for it, and 0.5 s at a
  time while it waits for a reply (``flwr.supernode.start_client_internal``);
- the SuperNode's heartbeat comes every 20 s or so, and a SuperNode idle when the
  coordinator restarts learns only from it that it must register again;
- whoever downloads a message's contents (the SuperNode, the ServerApp, fedmed's site
  runtime) retries an object that has not arrived yet after 1 s, then 2 s, 4 s...
  (``flwr.supercore.inflatable.inflatable_utils``), and a message is announced before its
  contents arrive, so a fast reader often waits a full second.

fedmed shortens them in its own processes only, and only on the Flower minor releases it
is tested on (``TESTED_FLOWER``): every other release is refused with a clear message
(``check_flower``), because these are Flower's internals and move between releases.

Nothing is changed at import. The patches, and the entry points that apply them to their
own process:
- ``shorten_supernode_polls``: ``fedmed.deploy.supernode`` (the site's SuperNode process);
- ``shorten_object_retries``: ``fedmed.deploy.supernode``, ``fedmed.flower.server_app``
  (the run's ServerApp process) and ``fedmed.deploy.site_runtime.serve`` (the site's task
  runtime).
"""

from __future__ import annotations

import time
import types
from importlib.metadata import version

TESTED_FLOWER = ("1.41",)  # minor releases; pyproject.toml pins the same range
SUPERNODE_POLL = 0.1  # seconds the idle SuperNode waits before asking the SuperLink again
SUPERNODE_REPLY_WAIT = 0.02  # seconds between its looks for the site's reply (local, cheap)
# Flower's heartbeat period is (interval - 5 s) x 0.7-0.9, so 20 s by default. A SuperNode
# learns from its heartbeat that a restarted coordinator no longer knows it, and only then
# ends so that fedmed-client registers it again: 10 gives a beat every 4 s.
SUPERNODE_HEARTBEAT_INTERVAL = 10
# A message's contents not there yet are asked for again after OBJECT_RETRY seconds, then
# at doubling intervals up to OBJECT_RETRY_CAP, for up to Flower's overall limit (2 hours)
# rather than a fixed number of tries, so a slow link still gets a large model through.
OBJECT_RETRY = 0.02
OBJECT_RETRY_CAP = 0.1


def check_flower() -> str:
    """Flower's version, or a ``RuntimeError`` naming the releases fedmed supports."""
    installed = version("flwr")
    if ".".join(installed.split(".")[:2]) not in TESTED_FLOWER:
        raise RuntimeError(
            f"fedmed is tested with Flower {', '.join(v + '.x' for v in TESTED_FLOWER)}, and this environment has "
            f"flwr {installed}: fedmed's site runtime uses Flower internals that change between releases. "
            f"Install a supported release: pip install 'flwr[simulation]=={TESTED_FLOWER[-1]}.*'"
        )
    return installed


def shorter_sleep_clock(idle: float, reply: float) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module for the SuperNode's message loop: its 3 s idle poll
    sleeps ``idle`` seconds, its 0.5 s waits for a reply ``reply`` seconds."""
    clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    clock.sleep = lambda seconds: time.sleep(min(seconds, idle if seconds >= 1 else reply))
    return clock


def shorten_supernode_polls() -> None:
    """Shorten the waits of the SuperNode's message loop (``SUPERNODE_POLL``, ``SUPERNODE_REPLY_WAIT``)
    and its heartbeat period (``SUPERNODE_HEARTBEAT_INTERVAL``)."""
    check_flower()
    from flwr.supercore import heartbeat
    from flwr.supernode import start_client_internal

    if start_client_internal.time is not time or not hasattr(heartbeat, "HEARTBEAT_DEFAULT_INTERVAL"):
        raise RuntimeError("this Flower release's SuperNode waits differently; update fedmed.flower.waits")
    # the module's global ``time`` becomes a stand-in that is no module, hence set through vars()
    vars(start_client_internal)["time"] = shorter_sleep_clock(SUPERNODE_POLL, SUPERNODE_REPLY_WAIT)
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = SUPERNODE_HEARTBEAT_INTERVAL


def shorten_object_retries() -> None:
    """Ask again for a message's not-yet-arrived contents soon and often (``OBJECT_RETRY``,
    ``OBJECT_RETRY_CAP``) in every downloader of this process."""
    check_flower()
    from flwr.supercore.inflatable import inflatable_utils

    shorter = {"initial_backoff": OBJECT_RETRY, "backoff_cap": OBJECT_RETRY_CAP, "max_tries_per_object": None}
    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__ or {}
        if not set(shorter) <= set(defaults):
            raise RuntimeError(
                f"this Flower release's {function.__name__} retries differently; update fedmed.flower.waits"
            )
        defaults.update(shorter)
