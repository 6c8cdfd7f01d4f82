"""The site's last trained update, kept on its disk so that a round asked again is
answered without training (and spending privacy) twice, even after the site restarts.

A round the site trained is paid for once. A coordinator that crashed repeats the round
it lost, and a hostile one may repeat it with a slightly changed model to have the site
train and pay again; either way the site recognises the request by (run, round) alone,
whatever model comes with it, and resends the update it already paid for. One update is
kept, in ``resend.npz`` beside the ledger, readable by the site's user only (it is a
function of the site's data); the model's hash is stored with it for the record only.

A ``resend.npz`` that cannot be read (truncated, empty, not a zip, wrong contents) is
moved aside as ``resend.npz.damaged-<time>`` with a warning and counts as absent: it must
never block the site, and the ledger still keeps a trained round from being trained again.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fedmed.files import write_atomic
from fedmed.protocol import SiteReply

FILE_NAME = "resend.npz"
log = logging.getLogger("fedmed")


class ResendCache:
    """Stores and finds the last update for one site; ``folder`` is the site's state folder."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / FILE_NAME

    def get(self, key: tuple[str, int]) -> SiteReply | None:
        """The update stored for ``key`` (run id, round), if it is the last one kept."""
        if not self.path.is_file():
            return None
        try:
            request, reply = self._read()
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
            self._set_aside(exc)
            return None
        return reply if tuple(request[:2]) == tuple(key) else None

    def put(self, request: tuple[str, int, str], reply: SiteReply) -> None:
        """Keep ``reply`` for ``request`` (run id, round, model hash); raises OSError (a full
        disk, say) when it cannot be written."""
        meta = {"request": list(request), "site": reply.site, "metrics": reply.metrics, "message": reply.message}
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
        if reply.model is not None:
            arrays["model"] = reply.model
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **arrays)  # every reader loads with allow_pickle=False too
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.path, buffer.getvalue())  # created owner-only (0600, mkstemp)

    def _read(self) -> tuple[list, SiteReply]:
        """The stored request and reply; any damage raises (see ``get``)."""
        data = np.load(io.BytesIO(self.path.read_bytes()), allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with data:
            meta = json.loads(bytes(data["meta"]).decode("utf-8"))
            model = data["model"] if "model" in data.files else None
        request = meta["request"]
        if not isinstance(request, list) or len(request) < 2 or not isinstance(meta["metrics"], dict):
            raise ValueError("its request or metrics are not what fedmed writes")
        return request, SiteReply(str(meta["site"]), meta["metrics"], str(meta["message"]), model)

    def _set_aside(self, problem: Exception) -> None:
        """Move a damaged file out of the way, so the site neither trusts nor trips on it again."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = self.path.with_name(f"{FILE_NAME}.damaged-{stamp}")
        try:
            self.path.rename(aside)
        except OSError as exc:
            log.warning(
                "%s cannot be read (%s: %s) nor moved aside (%s); it is ignored, and the next "
                "trained round replaces it",
                self.path,
                type(problem).__name__,
                problem,
                exc,
            )
            return
        log.warning(
            "%s cannot be read (%s: %s); moved aside to %s and treated as absent (a trained round "
            "is still never trained again: the ledger holds it)",
            self.path,
            type(problem).__name__,
            problem,
            aside.name,
        )
