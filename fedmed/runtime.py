"""Process settings that make CPU training faster."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Ask glibc to keep large freed blocks instead of returning them to the system.

    A training step allocates and frees the same large buffers (activations, per-sample
    gradients) every time; by default glibc unmaps them on free and the next step faults
    every page in again. Keeping them cut DP-SGD step time by about a fifth on a 2-core
    machine (see BENCHMARKS.md). The process then holds on to its peak memory. Returns
    True when the setting took effect (Linux with glibc), False elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False
