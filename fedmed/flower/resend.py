"""The site's last trained update, kept on its disk so that a round asked again is
answered without training (and spending privacy) twice, even after the site restarts.

A coordinator that crashed repeats the round it lost with the same model; the site
recognises the request by (run, round, SHA-256 of the received model) and resends the
update it already paid for. One update is kept, in ``resend.npz`` beside the ledger,
readable by the site's user only (it is a function of the site's data).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from fedmed.files import write_atomic
from fedmed.flower.protocol import SiteReply

FILE_NAME = "resend.npz"


class ResendCache:
    """Stores and finds the last update for one site; ``folder`` is the site's state folder."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / FILE_NAME

    def get(self, request: tuple[str, int, str]) -> SiteReply | None:
        """The update stored for ``request`` (run id, round, model hash), if it is the last."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode("utf-8"))
                model = data["model"] if "model" in data.files else None
        except (OSError, ValueError, KeyError):
            return None  # a damaged file: train again rather than send something wrong
        if tuple(meta["request"]) != tuple(request):
            return None
        return SiteReply(meta["site"], meta["metrics"], meta["message"], model)

    def put(self, request: tuple[str, int, str], reply: SiteReply) -> None:
        meta = {"request": list(request), "site": reply.site, "metrics": reply.metrics, "message": reply.message}
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
        if reply.model is not None:
            arrays["model"] = reply.model
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.path, buffer.getvalue())  # created owner-only (0600, mkstemp)
