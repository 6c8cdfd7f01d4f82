"""The site's privacy ledger: every round the hospital trained, kept on its own disk.

One JSON object per line, in the order the rounds happened. Each entry carries the
mechanism parameters of its round and the accountant's state (the site's whole composed
history) after it, so a restarted site continues composing from the last entry.

Writes are atomic: the new ledger is written to a temporary file, flushed to disk and
renamed over the old one, so a crash leaves either the old ledger or the new one. A torn
last line (from a crash of another writer or a copy cut short) is reported and ignored;
damage anywhere before it stops the site, because it can no longer prove what it spent.
A lock file keeps two processes of one site from spending the same budget at once.
"""

from __future__ import annotations

import fcntl
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from fedmed.files import write_atomic
from fedmed.privacy.accounting import ACCOUNTANT, History, epsilon

LEDGER_VERSION = 1


class LedgerError(Exception):
    """The ledger cannot be trusted; the site must not train until a person looks at it."""


@dataclass(frozen=True)
class LedgerEntry:
    """One completed round at one site."""

    site: str
    run_id: str
    round: int
    timestamp: str
    dp: bool
    examples: int
    steps: int
    sample_rate: float
    noise_multiplier: float  # 0.0 for a non-private round
    max_grad_norm: float
    delta: float
    epsilon: float | None  # cumulative after this round; None once any round was non-private
    accountant: str = ACCOUNTANT
    accountant_state: History = field(default_factory=list)
    version: int = LEDGER_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict) -> LedgerEntry:
        data = dict(data)
        data["accountant_state"] = [tuple(step) for step in data.get("accountant_state", [])]
        return cls(**data)


class PrivacyLedger:
    """Append-only record of a site's privacy spending."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.warnings: list[str] = []
        self.entries: list[LedgerEntry] = self._load()

    def _load(self) -> list[LedgerEntry]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        entries = []
        for number, line in enumerate(lines, start=1):
            try:
                entries.append(LedgerEntry.from_dict(json.loads(line)))
            except (ValueError, TypeError) as exc:
                if number == len(lines):
                    self.warnings.append(
                        f"{self.path}: line {number} is incomplete and was ignored (a write cut short): {exc}"
                    )
                    continue
                raise LedgerError(
                    f"{self.path}: line {number} of {len(lines)} is damaged ({exc}); the site cannot "
                    "prove what it has spent. Restore the ledger from a backup before training again."
                ) from exc
        return entries

    @property
    def history(self) -> History:
        """The accountant state after the last round (empty for a new site)."""
        return list(self.entries[-1].accountant_state) if self.entries else []

    @property
    def non_private_rounds(self) -> int:
        return sum(not e.dp for e in self.entries)

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta``; infinite once any round was non-private."""
        return math.inf if self.non_private_rounds else epsilon(self.history, delta)

    def run_entries(self, run_id: str) -> list[LedgerEntry]:
        return [e for e in self.entries if e.run_id == run_id]

    def append(self, entry: LedgerEntry) -> None:
        """Add ``entry`` atomically; earlier entries are rewritten byte for byte."""
        text = "".join(e.to_json() + "\n" for e in [*self.entries, entry])
        write_atomic(self.path, text.encode("utf-8"))
        self.entries.append(entry)

    @contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Hold the site's ledger lock and work on freshly loaded entries."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.warnings = []
                self.entries = self._load()
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
