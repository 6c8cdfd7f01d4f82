"""Real fedmed-server / fedmed-client processes on loopback, always stopped by pgid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from fedmed.deploy.processes import ProcessWatch, alive, descendants, free_port

BIN = Path(sys.executable).parent


def process_env(tmp: Path) -> dict[str, str]:
    """Keep Flower's and fedmed's files out of the user's home."""
    return {**os.environ, "FLWR_HOME": str(tmp / "flwr-home"), "FEDMED_CACHE_DIR": str(tmp / "cache"),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


class Federation:
    """A coordinator and sites started as separate processes, each in its own group."""

    def __init__(self, tmp: Path, sites_dir: Path, certificates: Path | None, server_name: str = "") -> None:
        self.tmp = tmp
        self.sites_dir = sites_dir
        self.certificates = certificates
        # the name sites dial: by default localhost over TLS, 127.0.0.1 without
        self.server_name = server_name or ("localhost" if certificates else "127.0.0.1")
        self.port = free_port()
        self.env = process_env(tmp)
        self.server: subprocess.Popen | None = None
        self.clients: dict[str, subprocess.Popen] = {}
        self.seen_pids: set[int] = set()

    def start_server(self, *extra: str, listen: str = "127.0.0.1") -> subprocess.Popen:
        tls = ["--certificates", str(self.certificates)] if self.certificates else ["--insecure"]
        command = [str(BIN / "fedmed-server"), "--host", listen, "--port", str(self.port), *tls,
                   "--width", "8", "--image-size", "16", "--batch-size", "32", *extra]
        self.server = self._start(command, self.tmp / "server.out")
        return self.server

    def start_client(self, site: str, *extra: str, program: list[str] | None = None) -> subprocess.Popen:
        """``fedmed-client`` for ``site``, or ``program`` given the same arguments."""
        tls = (["--root-certificates", str(self.certificates / "ca.crt"),
                "--coordinator-key", str(self.certificates / "coordinator.pub")] if self.certificates
               else ["--insecure"])
        command = [*(program or [str(BIN / "fedmed-client")]), "--server", f"{self.server_name}:{self.port}",
                   "--data", str(self.sites_dir / site), "--site", site, *tls,
                   "--state-dir", str(self.tmp / "state" / site), "--image-size", "16", *extra]
        self.clients[site] = self._start(command, self.tmp / f"{site}.out")
        return self.clients[site]

    def ledger(self, site: str) -> Path:
        return self.tmp / "state" / site / "ledger.jsonl"

    def _start(self, command: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                       start_new_session=True)
        self.seen_pids.add(process.pid)
        return process

    def remember_descendants(self) -> None:
        self.seen_pids |= descendants({p.pid for p in self.processes()})

    def processes(self) -> list[subprocess.Popen]:
        return [p for p in [self.server, *self.clients.values()] if p is not None]

    def wait_server(self, timeout: float, on_tick: Callable[[], None] | None = None, every: float = 1.0) -> int:
        """fedmed-server's exit code; ``on_tick`` is called every ``every`` seconds meanwhile."""
        deadline = time.monotonic() + timeout
        assert self.server is not None
        while self.server.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"fedmed-server still running after {timeout} s:\n{self.output('server')}")
            self.remember_descendants()
            if on_tick is not None:
                on_tick()
            time.sleep(every)
        return self.server.returncode

    def output(self, name: str) -> str:
        path = self.tmp / f"{name}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        self.remember_descendants()
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        process.wait(30)

    def crash(self, process: subprocess.Popen) -> None:
        """As a host crash: ``process`` and everything it started die at once (SIGKILL). A
        child in a session of its own (Flower's ServerApp) would otherwise outlive a killed
        coordinator for as long as it keeps retrying its dead parent."""
        children = descendants({process.pid})
        self.kill(process)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_all(self) -> None:
        """Stop every process this federation started, then check none of theirs survives."""
        self.remember_descendants()
        for process in self.processes():
            if process.poll() is None:
                self.kill(process, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while (living := [p for p in self.seen_pids if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        named = {pid: _command_line(pid) for pid in living}
        for pid in living:  # report, then clean up by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not living, f"processes outlived the federation: {named}"


def _command_line(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:200]
    except psutil.Error:
        return "?"


def run_simulate(command: list[str], tmp: Path, timeout: float = 900,
                 on_tick: Callable[[], None] | None = None) -> tuple[int | None, list[int], int]:
    """Run ``command`` (fedmed-simulate) in its own session with its output in
    ``tmp/simulate.out``, watching every process it starts (and calling ``on_tick`` as it
    looks). Returns its exit code (None if it ran past ``timeout`` and was killed), the
    processes it left alive when it ended, and how many processes it started; survivors
    are then stopped by pid."""
    watch = ProcessWatch()
    with open(tmp / "simulate.out", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=process_env(tmp),
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            watch.look({process.pid})
            if on_tick is not None:
                on_tick()
            time.sleep(0.3)
        code = process.poll()
        survivors = [pid for pid in watch.seen if alive(pid)] if code is not None else []
    finally:
        if process.poll() is None:
            process.kill()
        watch.stop_survivors()
    return code, survivors, len(watch.seen)
