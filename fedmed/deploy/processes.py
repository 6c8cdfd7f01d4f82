"""Child processes (SuperLink, SuperNode, flwr) that are always stopped with their parent.

A managed child logs to an owner-only file (in an owner-only folder when it makes one)
and runs under the umask ``CHILD_UMASK``: what it and its own children create (Flower's
ServerApp writes server.log in the run directory, Flower its state under .flwr) is its
owner's alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from fedmed.files import open_append, private_dir
from fedmed.runtime import libc

_PR_SET_PDEATHSIG = 1
CHILD_UMASK = 0o077  # files 0600 and folders 0700 unless a child asks otherwise


def flower_command(name: str) -> str:
    """A Flower console script from the same environment as this Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def child_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment plus ``extra``, with this Python's scripts first on PATH (Flower
    starts its helpers, e.g. flower-superexec and flwr-clientapp, by name).

    Flower's usage telemetry (events sent to flower.ai) is off unless the user turned it
    on explicitly: a hospital's processes should not contact third parties."""
    scripts = str(Path(sys.executable).parent)
    return {
        "FLWR_TELEMETRY_ENABLED": "0",
        **os.environ,
        "PATH": scripts + os.pathsep + os.environ.get("PATH", ""),
        **(extra or {}),
    }


def _stop_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the parent dies, so that
    a coordinator or site killed outright leaves no SuperLink or SuperNode behind (psutil
    has no call for this; elsewhere than glibc Linux the parent's own clean-up remains)."""
    c = libc()
    if c is not None:
        c.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedProcess:
    """A child in its own process group, logging to a file, stopped as a whole group."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.command = command
        self.log_path = log_path
        if not log_path.parent.exists():  # an existing folder (a site's state, a run's logs) keeps its owner's mode
            private_dir(log_path.parent)
        self._log = open_append(log_path)
        self._log_start = self._log.tell()  # the log may hold earlier processes' output
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_environ(env),
            start_new_session=True,
            preexec_fn=_stop_with_parent,
            umask=CHILD_UMASK,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM to the group, SIGKILL after ``grace`` seconds; returns the exit code."""
        if self.running():
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait()
        _signal_group(self.process.pid, signal.SIGKILL)  # stragglers left in the group
        self._log.close()
        return self.process.returncode

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines this process wrote to its log."""
        try:
            with open(self.log_path, "rb") as log:
                end = log.seek(0, os.SEEK_END)
                log.seek(max(self._log_start, end - 200 * lines))  # lines are short
                own = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(own.splitlines()[-lines:])


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_port(host: str, port: int, timeout: float, process: ManagedProcess | None = None) -> None:
    """Wait until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.running():
            raise RuntimeError(
                f"{process.command[0]} exited with code {process.process.returncode}:\n{process.log_tail()}"
            )
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def descendants(roots: set[int]) -> set[int]:
    """Every living descendant of ``roots``."""
    found: set[int] = set()
    for pid in roots:
        try:
            found |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            continue
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ProcessWatch:
    """Remembers every process started under some roots, so that helpers which leave their
    parent's process group (e.g. Ray's) can still be stopped by pid at the end."""

    def __init__(self) -> None:
        self.seen: dict[int, psutil.Process] = {}

    def look(self, roots: set[int]) -> None:
        for pid in roots | descendants(roots):
            if pid not in self.seen:
                try:
                    self.seen[pid] = psutil.Process(pid)  # remembers its start time, so a reused pid is not ours
                except psutil.Error:
                    continue

    def survivors(self) -> list[int]:
        return [pid for pid, process in self.seen.items() if _running(process)]

    def stop_survivors(self, grace: float = 10.0) -> list[int]:
        """SIGTERM, then SIGKILL, every remembered process still alive; returns those found."""
        living = [process for process in self.seen.values() if _running(process)]
        for process in living:
            _send(process, signal.SIGTERM)
        _, remaining = psutil.wait_procs(living, timeout=grace)
        for process in remaining:
            _send(process, signal.SIGKILL)
        psutil.wait_procs(remaining, timeout=grace)
        return [process.pid for process in living]


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _send(process: psutil.Process, sig: int) -> None:
    try:
        process.send_signal(sig)
    except psutil.Error:
        pass
