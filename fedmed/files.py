"""Crash-safe, owner-only file writes.

Readers see the old file or the new one, never half of one (``write_atomic``). Files
written here are their owner's alone, created 0600 (``mkstemp``, ``open_append``), and
``private_dir`` makes a folder 0700, whatever the process's umask would allow.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def write_atomic(path: Path, content: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``content`` (bytes, or a function writing to a binary handle) to ``path``.

    The data goes to a temporary file beside ``path``, is flushed to disk, then renamed
    over ``path``; the folder entry is flushed too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner can enter (0700): created so, with any missing
    parents (they were made for it), or made so if it exists. Returns ``path``."""
    missing = [folder for folder in path.parents if not folder.exists()]
    for folder in [*reversed(missing), path]:
        folder.mkdir(mode=PRIVATE_DIR, exist_ok=True)  # refuses a file in the way
        os.chmod(folder, PRIVATE_DIR)  # mkdir's mode passes the umask; an existing folder keeps its own
    return path


def open_append(path: Path) -> BinaryIO:
    """``path`` opened for appending bytes, created owner-only (0600) and made so if it
    already existed (a run directory written by an earlier fedmed)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
