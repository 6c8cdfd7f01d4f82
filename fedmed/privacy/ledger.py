"""The site's privacy ledger: every round the hospital trained, kept on its own disk.

One JSON object per line, in the order the rounds happened. Each entry carries the
mechanism parameters of its round, the site's budget at the time, and the accountant's
state (the site's whole composed history) after it, so a restarted site continues
composing from the last entry. A round the site refused (its budget would be exceeded) is
recorded too, as a line with ``"kind": "refusal"``; it spends nothing. Every statistic the
site sent besides its model updates is a line with ``"kind": "release"`` (see
``fedmed.privacy.release``): a noisy one with its Gaussian mechanism composed into the
history, an exact one marked as a non-private release.

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
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from fedmed.files import write_atomic
from fedmed.privacy.accounting import ACCOUNTANT, History, epsilon

LEDGER_VERSION = 1


def timestamp_now() -> str:
    """When a record is written: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
    max_epsilon: float | None = None  # the site's hard budget when the round ran (None: none set)
    target_epsilon: float | None = None
    # What one DP "record" is: "image" (each training image; a patient with k images is
    # protected by group privacy, about k x epsilon). Entries written before this field
    # existed were all image-level, which is what a missing value reads as.
    privacy_unit: str = "image"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict) -> LedgerEntry:
        return cls(**_with_history(data))


@dataclass(frozen=True)
class LedgerRefusal:
    """A round the site refused to train; nothing was spent."""

    site: str
    run_id: str
    round: int
    timestamp: str
    reason: str
    epsilon_before: float | None  # None once any round was non-private
    epsilon_after: float | None  # what the round would have reached; None when unknown
    delta: float
    max_epsilon: float | None
    kind: str = "refusal"
    version: int = LEDGER_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict) -> LedgerRefusal:
        return cls(**data)


@dataclass(frozen=True)
class LedgerRelease:
    """A statistic the site sent besides a model update."""

    site: str
    run_id: str
    round: int
    timestamp: str
    statistic: str  # "examples", "validation", "loss" or "timing"
    private: bool  # False: sent exactly, with no guarantee at all
    noise_multiplier: float  # of the Gaussian mechanism (noise std over sensitivity); 0.0 if exact
    sensitivity: float  # L2 change of the statistic by one record; 0.0 if exact
    delta: float
    epsilon: float | None  # the site's cumulative epsilon after it; None once any round was non-private
    accountant_state: History = field(default_factory=list)
    privacy_unit: str = "image"
    value: float | None = None  # the noisy record count, resent in the run's later rounds
    kind: str = "release"
    version: int = LEDGER_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict) -> LedgerRelease:
        return cls(**_with_history(data))


LedgerRecord = LedgerEntry | LedgerRefusal | LedgerRelease


def _with_history(data: dict) -> dict:
    """A record's fields as read from JSON, with its accountant state as (sigma, rate, steps) tuples."""
    return {**data, "accountant_state": [tuple(step) for step in data.get("accountant_state", [])]}


def parse_ledger(text: str) -> tuple[list[LedgerRecord], list[tuple[int, str]]]:
    """The records of a ledger file's text, and (line number, problem) for each bad line."""
    lines = _lines(text)
    records: list[LedgerRecord] = []
    problems = []
    for number, line in enumerate(lines, start=1):
        try:
            data = json.loads(line)
            kind = data.pop("kind", "round") if isinstance(data, dict) else None
            if kind == "round":
                records.append(LedgerEntry.from_dict(data))
            elif kind == "refusal":
                records.append(LedgerRefusal.from_dict(data))
            elif kind == "release":
                records.append(LedgerRelease.from_dict(data))
            else:
                raise ValueError(f"unknown record kind {kind!r}")
        except (ValueError, TypeError) as exc:
            problems.append((number, f"{type(exc).__name__}: {exc}"))
    return records, problems


def line_count(text: str) -> int:
    return len(_lines(text))


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


class PrivacyLedger:
    """Append-only record of a site's privacy spending."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.warnings: list[str] = []
        self.records: list[LedgerRecord] = self._load()

    def _load(self) -> list[LedgerRecord]:
        if not self.path.exists():
            return []
        text = self.path.read_text(encoding="utf-8")
        records, problems = parse_ledger(text)
        lines = line_count(text)
        for number, problem in problems:
            if number != lines:
                raise LedgerError(
                    f"{self.path}: line {number} of {lines} is damaged ({problem}); the site cannot "
                    "prove what it has spent. Restore the ledger from a backup before training again."
                )
            self.warnings.append(
                f"{self.path}: line {number} is incomplete and was ignored (a write cut short): {problem}"
            )
        return records

    @property
    def entries(self) -> list[LedgerEntry]:
        """The rounds the site trained, oldest first."""
        return [r for r in self.records if isinstance(r, LedgerEntry)]

    @property
    def refusals(self) -> list[LedgerRefusal]:
        return [r for r in self.records if isinstance(r, LedgerRefusal)]

    @property
    def releases(self) -> list[LedgerRelease]:
        """The statistics the site sent besides its model updates, oldest first."""
        return [r for r in self.records if isinstance(r, LedgerRelease)]

    @property
    def history(self) -> History:
        """The accountant state after the last round or release (empty for a new site)."""
        spent = [r for r in self.records if isinstance(r, (LedgerEntry, LedgerRelease))]
        return list(spent[-1].accountant_state) if spent else []

    @property
    def non_private_rounds(self) -> int:
        return sum(not e.dp for e in self.entries)

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta``; infinite once any round was non-private."""
        return math.inf if self.non_private_rounds else epsilon(self.history, delta)

    def run_entries(self, run_id: str) -> list[LedgerEntry]:
        return [e for e in self.entries if e.run_id == run_id]

    def append(self, record: LedgerRecord) -> None:
        """Add ``record`` atomically; earlier records are rewritten byte for byte."""
        text = "".join(r.to_json() + "\n" for r in [*self.records, record])
        write_atomic(self.path, text.encode("utf-8"))
        self.records.append(record)

    @contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Hold the site's ledger lock and work on freshly loaded entries."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.warnings = []
                self.records = self._load()
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
