"""A site's long-lived worker and how the ClientApp reaches it.

Flower starts a fresh ClientApp process for every message. Loading torch, the model code
and the site's data in each of them would cost seconds per round, so ``fedmed-client``
keeps one ``SiteWorker`` alive instead: it holds the site's data and libraries and serves
each round's work over a Unix socket in the site's state directory. The socket is
guarded by a random key in a file only the site's user can read.

This module imports no torch, so the ClientApp process stays light.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
import tempfile
import threading
import traceback
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path

from fedmed.flower.protocol import SiteReply, SiteRequest, TrainRequest

SOCKET_NAME = "worker.sock"
MAX_SOCKET_PATH = 100  # Unix socket paths are limited to about 108 bytes


def worker_address(state_dir: Path) -> Path:
    """Where the site's worker listens: in its state directory, or a private temporary
    directory when that path is too long for a Unix socket."""
    address = state_dir / SOCKET_NAME
    if len(os.fsencode(address)) <= MAX_SOCKET_PATH:
        return address
    return Path(tempfile.mkdtemp(prefix="fedmed-")) / SOCKET_NAME


def _key_path(address: Path) -> Path:
    return address.with_name(address.name + ".key")


class SiteWorker:
    """Serves a site's requests (``fedmed.flower.protocol``), one at a time."""

    def __init__(self, work, address: Path) -> None:
        self.work = work  # a fedmed.flower.site_work.SiteWork
        self.address = address
        address.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if address.exists() and stat.S_ISSOCK(address.stat().st_mode):
            address.unlink()  # left behind by a site that was killed
        key = secrets.token_bytes(32)
        key_path = _key_path(address)
        key_path.unlink(missing_ok=True)
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key)
        self._listener = Listener(str(address), family="AF_UNIX", authkey=key)
        os.chmod(address, 0o600)
        self._thread = threading.Thread(target=self._serve, name="fedmed-site-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._listener.close()
        self.address.unlink(missing_ok=True)
        _key_path(self.address).unlink(missing_ok=True)

    def _serve(self) -> None:
        while True:
            try:
                connection = self._listener.accept()
            except OSError:
                return  # closed
            except Exception:  # a caller without the key: refuse it and go on
                continue
            with connection:
                try:
                    request = connection.recv()
                    reply = self.work.handle(request)
                    connection.send({"reply": reply})
                except (EOFError, OSError):
                    continue
                except Exception as error:
                    print(f"round work failed: {error}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                    connection.send({"error": f"{type(error).__name__}: {error}"})
                    continue
                if isinstance(request, TrainRequest):
                    print(f"round {request.round}: {reply.message or 'trained'}; epsilon spent "
                          f"{reply.metrics.get('epsilon', float('nan')):.3f}", flush=True)


def ask_worker(address: str, request: SiteRequest) -> SiteReply:
    """Send one request to the site's worker and wait for its reply."""
    path = Path(address)
    try:
        key = _key_path(path).read_bytes()
        with Client(str(path), family="AF_UNIX", authkey=key) as connection:
            connection.send(request)
            answer = connection.recv()
    except AuthenticationError as error:
        raise RuntimeError(f"the site's worker at {address} refused the key in {_key_path(path)}") from error
    except (OSError, EOFError) as error:
        raise RuntimeError(f"the site's fedmed-client worker at {address} is not reachable: {error}") from error
    if "error" in answer:
        raise RuntimeError(f"the site's worker failed: {answer['error']}")
    return answer["reply"]
