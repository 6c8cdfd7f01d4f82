"""Child processes (SuperLink, SuperNode, flwr) that are always stopped with their parent."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1


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
    return {"FLWR_TELEMETRY_ENABLED": "0", **os.environ,
            "PATH": scripts + os.pathsep + os.environ.get("PATH", ""), **(extra or {})}


def _stop_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the parent dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class ManagedProcess:
    """A child in its own process group, logging to a file, stopped as a whole group."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.command = command
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=child_environ(env), start_new_session=True, preexec_fn=_stop_with_parent,
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
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


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
            raise RuntimeError(f"{process.command[0]} exited with code {process.process.returncode}:\n"
                               f"{process.log_tail()}")
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
    """Every living descendant of ``roots`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class ProcessWatch:
    """Remembers every process started under some roots, so that helpers which leave their
    parent's process group (e.g. Ray's) can still be stopped by pid at the end."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def look(self, roots: set[int]) -> None:
        self.seen |= roots | descendants(roots)

    def stop_survivors(self, grace: float = 10.0) -> list[int]:
        """SIGTERM, then SIGKILL, every remembered process still alive; returns those found."""
        survivors = [pid for pid in self.seen if alive(pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in survivors:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while any(alive(pid) for pid in survivors) and time.monotonic() < deadline:
                time.sleep(0.2)
        return survivors
