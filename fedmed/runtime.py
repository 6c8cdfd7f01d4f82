"""Process-wide settings, taken only by entry points (each says where it calls them).

* ``keep_freed_memory``: fedmed-client's site worker, fedmed-simulate and a simulation's
  ClientApp actor call it at start; library code never does.
* ``entry_point``: wraps the ``main`` of every command (``fedmed``, ``fedmed-server``,
  ``fedmed-client``, ``fedmed-simulate``, ``fedmed-report``) so that it exits quickly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar, cast

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@lru_cache(maxsize=1)
def libc() -> ctypes.CDLL | None:
    """The C library, found by name through ctypes (None where there is none, e.g. macOS
    without the glibc calls fedmed uses)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Ask glibc to keep large freed blocks instead of returning them to the system.

    A training step allocates and frees the same large buffers (activations, per-sample
    gradients) every time; by default glibc unmaps them on free and the next step faults
    every page in again. Keeping them cut DP-SGD step time by about a fifth on a 2-core
    machine (see BENCHMARKS.md). The process then holds on to its peak memory. Returns
    True when the setting took effect (Linux with glibc), False elsewhere.
    """
    c = libc()
    try:
        return (
            c is not None
            and bool(c.mallopt(_M_MMAP_THRESHOLD, 1 << 30))
            and bool(c.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
        )
    except AttributeError:  # a C library without mallopt
        return False


Main = TypeVar("Main", bound=Callable[..., int])


def entry_point(main: Main) -> Main:
    """``main`` of a command, made to exit without a last garbage collection over the heap.

    While Python shuts down it collects garbage once more, and with torch, torchvision and
    opacus loaded that pass walks millions of objects that are about to vanish anyway:
    1-2 s of CPU at every exit on a 2-core machine, paid by each command and by each
    stopping site. ``gc.freeze`` on the way out moves them all out of the collector's sight.
    Nothing fedmed writes depends on that pass: its files are closed by ``with`` blocks and
    its processes stopped by their owners before ``main`` returns.
    """

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        finally:
            gc.freeze()

    return cast(Main, run)
