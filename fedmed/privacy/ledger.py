"""The site's privacy ledger: every round the hospital trained, kept on its own disk.

One JSON object per line, in the order the rounds happened. Each entry carries the
mechanism parameters of its round, the site's budget at the time, and the accountant's
state (the site's whole composed history) after it, so a restarted site continues
composing from the last entry. A round the site refused (its budget would be exceeded) is
recorded too, as a line with ``"kind": "refusal"``; it spends nothing. Every statistic the
site sent besides its model updates is a line with ``"kind": "release"`` (see
``fedmed.privacy.release``): a noisy one with its Gaussian mechanism composed into the
history and its noisy values, so the same release asked again is resent and not drawn and
paid again, an exact one marked as a non-private release.

A round trained with adaptive clipping (``fedmed.privacy.adaptive_clipping``) also records
how its joint noise multiplier was split between the gradient and the count, and its clip
norm at the end, where the run's next round starts (``clip_norm``).

A spend is never lost and never repeated:

* a (run, round) the ledger holds as trained is never trained again (``trained``); the
  site resends the update it kept, or refuses (``fedmed.site.work``);
* a release of a (run, round, statistic) the ledger holds is answered from its line
  (``release``), never drawn and paid again;
* ``run_history`` is what one run's own mechanisms compose to, for the site's per-run
  ceiling (``max_epsilon_per_run``, ``fedmed.privacy.budget``).

The lines form a hash chain, so an edited, inserted or removed line shows: each line
written by this version carries ``"previous"``, the SHA-256 (hex) of the line before it
exactly as stored (its UTF-8 bytes without the newline), and the first line carries
``GENESIS``. Old lines are therefore never re-serialized: an append writes every earlier
line back byte for byte. Lines written before the chain existed have no ``previous``; a
ledger may start with such lines and continue chained (a site that upgraded fedmed), the
first chained line linking to the last old one, but those old lines are not protected. The
chain cannot show that the last lines were removed or the last line edited (nothing follows
them): keep backups. ``verify_chain`` checks a ledger's text.

Each line names the accountant that computed its epsilon (``accountant``; release lines
written before the field existed read as ``"rdp"``, the only accountant then). When the
accountant changes (RDP to PLD, issue 27), the ledger continues: the site's epsilon is the
new accountant's composition of the whole stored history, but never less than an epsilon
the ledger already recorded (``PrivacyLedger.epsilon``). Both are sound upper bounds, so
their maximum is one too, and the recorded spend never decreases.

Writes are atomic: the new ledger is written to a temporary file, flushed to disk and
renamed over the old one, so a crash leaves either the old ledger or the new one. A line
that cannot be read, the last one included (a torn write from another tool, a copy cut
short), counts as spent: what it spent is unknown, so it counts as the whole remaining
budget. Loading such a ledger raises ``LedgerError`` and the file is never rewritten
without the line; a broken chain stops the site the same way, because it can no longer
prove what it spent. Either way a person restores the ledger from a backup. A lock file
keeps two processes of one site from spending the same budget at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from fedmed.files import write_atomic
from fedmed.privacy.accounting import ACCOUNTANT, History, HistoryLike, epsilon, extend

LEDGER_VERSION = 1
GENESIS = "0" * 64  # the ``previous`` of a ledger's first line
OLD_RELEASE_ACCOUNTANT = "rdp"  # what a release line without an ``accountant`` was computed with
# A round line's adaptive clipping fields, written only for an adaptively clipped round
ADAPTIVE_FIELDS = ("clip_quantile", "gradient_noise_multiplier", "count_noise", "clip_norm_after", "clip_norm_ceiling")


def timestamp_now() -> str:
    """When a record is written: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LedgerError(Exception):
    """The ledger cannot be trusted; the site must not train until a person looks at it."""


@dataclass(frozen=True)  # no fields of its own: a dataclass so that asdict(self) type-checks, as each record is
class _LedgerLine:
    """A record as one ledger line: JSON with sorted keys, so the same record is the same bytes."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)


@dataclass(frozen=True)
class LedgerEntry(_LedgerLine):
    """One completed round at one site."""

    site: str
    run_id: str
    round: int
    timestamp: str
    dp: bool
    examples: int
    steps: int
    sample_rate: float
    noise_multiplier: float  # 0.0 for a non-private round; under adaptive clipping the joint z_eff
    max_grad_norm: float  # the clip norm at the round's start
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
    max_epsilon_per_run: float | None = None  # the site's per-run ceiling when the round ran (None: none)
    # Adaptive clipping (``fedmed.privacy.adaptive_clipping``); all None for a fixed clip norm
    # and in lines written before it existed. ``noise_multiplier`` is then the joint mechanism's
    # z_eff, what the accountant composes, split into these two:
    clip_quantile: float | None = None  # the target share of unclipped records
    gradient_noise_multiplier: float | None = None  # z_grad: the update's noise std over the clip norm
    count_noise: float | None = None  # sigma_b: the noisy count's std (sensitivity 1/2)
    clip_norm_after: float | None = None  # after the round's last step: where the run's next round starts
    clip_norm_ceiling: float | None = None  # the run's max_grad_norm, which no step clipped above
    previous: str | None = None  # hash of the line before; None: written before the chain existed

    @classmethod
    def from_dict(cls, data: dict) -> LedgerEntry:
        return cls(**_with_history(data))

    def to_json(self) -> str:
        """The line; a fixed-clip round's has no adaptive fields, so it stays readable by a
        fedmed older than them (which refuses a ledger with fields it does not know)."""
        data = {k: v for k, v in asdict(self).items() if not (k in ADAPTIVE_FIELDS and v is None)}
        return json.dumps(data, sort_keys=True, allow_nan=False)

    @property
    def update_noise_multiplier(self) -> float:
        """The noise on the model update over the clip norm: z_grad under adaptive clipping."""
        return self.noise_multiplier if self.gradient_noise_multiplier is None else self.gradient_noise_multiplier


@dataclass(frozen=True)
class LedgerRefusal(_LedgerLine):
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
    previous: str | None = None  # hash of the line before; None: written before the chain existed

    @classmethod
    def from_dict(cls, data: dict) -> LedgerRefusal:
        return cls(**data)


@dataclass(frozen=True)
class LedgerRelease(_LedgerLine):
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
    accountant: str = ACCOUNTANT  # that computed ``epsilon``
    accountant_state: History = field(default_factory=list)
    privacy_unit: str = "image"
    value: float | None = None  # the noisy record count, resent in the run's later rounds
    # The noisy values sent (private releases): the same release asked again is answered with
    # them, never drawn and paid again. None in lines written before the field existed.
    values: list[float] | None = None
    kind: str = "release"
    version: int = LEDGER_VERSION
    previous: str | None = None  # hash of the line before; None: written before the chain existed

    @classmethod
    def from_dict(cls, data: dict) -> LedgerRelease:
        return cls(**_with_history({"accountant": OLD_RELEASE_ACCOUNTANT, **data}))


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


def line_hash(line: str) -> str:
    """What the next line's ``previous`` must be: SHA-256 of ``line``'s stored bytes (no newline)."""
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChainCheck:
    """What a ledger's hash chain shows."""

    chained: int  # lines carrying a link
    unchained: int  # lines written before the chain existed (all before the first chained line)
    first_bad_line: int | None = None  # 1-based; None while the chain holds
    problem: str | None = None  # the break, in words for a privacy officer

    @property
    def intact(self) -> bool:
        return self.first_bad_line is None

    @property
    def status(self) -> str:
        """broken, chained, partly-chained (older unchained lines, then chained ones), unchained or empty."""
        if not self.intact:
            return "broken"
        if self.chained:
            return "partly-chained" if self.unchained else "chained"
        return "unchained" if self.unchained else "empty"


def verify_chain(text: str) -> ChainCheck:
    """Check that every line of a ledger's ``text`` links to the line before it.

    A line that is not a JSON object (damaged, or a torn last line: ``parse_ledger`` reports
    those) has no readable link of its own, but the line after it must still link to its
    bytes. Lines without a link are legitimate only before the first linked line."""
    chained = unchained = 0
    expected = GENESIS
    for number, line in enumerate(_lines(text), start=1):
        readable, link = _link(line)
        problem = _link_problem(number, readable, link, expected, chained)
        if problem:
            return ChainCheck(chained, unchained, number, problem)
        chained += int(readable and link is not None)
        unchained += int(readable and link is None)
        expected = line_hash(line)
    return ChainCheck(chained, unchained)


def _link(line: str) -> tuple[bool, object]:
    """(whether ``line`` is a JSON object, its ``previous`` or None)."""
    try:
        data = json.loads(line)
    except ValueError:
        return False, None
    return (True, data.get("previous")) if isinstance(data, dict) else (False, None)


def _link_problem(number: int, readable: bool, link: object, expected: str, chained: int) -> str | None:
    """Why line ``number`` breaks the chain, or None when it does not."""
    if not readable or (link is None and not chained) or link == expected:
        return None
    if link is None:
        what = "has no link to the line before it, although earlier lines have one"
    else:
        what = "does not follow from " + (f"line {number - 1}" if number > 1 else "the start of the ledger")
    return f"line {number} {what}: a line was edited, inserted or removed at or before line {number}"


class PrivacyLedger:
    """Append-only record of a site's privacy spending."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.records, self.lines = self._load()

    def _load(self) -> tuple[list[LedgerRecord], list[str]]:
        """The records and, to write back verbatim, the text of their lines. Any unreadable
        line, the last one too, stops the site: what it spent is unknown."""
        if not self.path.exists():
            return [], []
        text = self.path.read_text(encoding="utf-8")
        records, problems = parse_ledger(text)
        lines = _lines(text)
        for number, problem in problems:
            if number == len(lines):
                raise LedgerError(
                    f"{self.path}: line {number}, the last, cannot be read ({problem}): a write was cut short "
                    "or the file was damaged. What that line spent is unknown, so it counts as the whole remaining "
                    "budget and the site will not train or release anything. The file is left as it is: restore "
                    "the ledger from a backup (one holding that line complete) before training again."
                )
            raise LedgerError(
                f"{self.path}: line {number} of {len(lines)} is damaged ({problem}); the site cannot "
                "prove what it has spent. Restore the ledger from a backup before training again."
            )
        chain = verify_chain(text)
        if not chain.intact:
            raise LedgerError(
                f"{self.path}: {chain.problem}; the site cannot prove what it has spent. Restore the ledger "
                "from a backup before training again."
            )
        return records, lines

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
        return math.inf if self.non_private_rounds else self.epsilon_of(self.history, delta)

    def epsilon_of(self, history: HistoryLike, delta: float) -> float:
        """The epsilon this ledger records for ``history`` (its own history, perhaps with a
        round or release more): the accountant's composition of all of it, raised to the
        largest epsilon already recorded (``recorded_epsilon``), so the spend never decreases,
        also across a change of accountant."""
        return max(epsilon(history, delta), self.recorded_epsilon(delta))

    def recorded_epsilon(self, delta: float) -> float:
        """The largest epsilon a round or release line recorded at ``delta`` or a smaller
        delta (each a sound bound at ``delta`` too, whichever accountant computed it); 0.0 if none."""
        return max(
            (
                r.epsilon
                for r in self.records
                if isinstance(r, (LedgerEntry, LedgerRelease)) and r.epsilon is not None and r.delta <= delta
            ),
            default=0.0,
        )

    def run_entries(self, run_id: str) -> list[LedgerEntry]:
        return [e for e in self.entries if e.run_id == run_id]

    def clip_norm(self, run_id: str, ceiling: float) -> float:
        """Where run ``run_id``'s next round's clip norm starts: where its last adaptive round
        left it (also across a restart), else at ``ceiling``; never above it."""
        left = [e.clip_norm_after for e in self.run_entries(run_id) if e.clip_norm_after is not None]
        return min(left[-1], ceiling) if left else ceiling

    def trained(self, run_id: str, round_number: int) -> LedgerEntry | None:
        """The entry of round ``round_number`` of run ``run_id`` if the site trained it: such
        a round is paid for and never trained again."""
        return next((e for e in self.entries if e.run_id == run_id and e.round == round_number), None)

    def release(self, run_id: str, round_number: int, statistic: str, private: bool) -> LedgerRelease | None:
        """The first release of ``statistic`` in round ``round_number`` of run ``run_id``, if
        made: the same release asked again is answered from it."""
        return next(
            (
                r
                for r in self.releases
                if (r.run_id, r.round, r.statistic, r.private) == (run_id, round_number, statistic, private)
            ),
            None,
        )

    def run_history(self, run_id: str) -> History:
        """Run ``run_id``'s own mechanisms, composed alone: its DP-SGD rounds and noisy
        releases, from their recorded parameters (the per-run ceiling bounds this)."""
        history: History = []
        for record in self.records:
            if isinstance(record, LedgerEntry) and record.run_id == run_id and record.dp:
                history = extend(history, record.noise_multiplier, record.sample_rate, record.steps)
            elif isinstance(record, LedgerRelease) and record.run_id == run_id and record.private:
                history = extend(history, record.noise_multiplier, 1.0, 1)
        return history

    def append(self, record: LedgerRecord) -> None:
        """Add ``record`` atomically, linked to the last line (whatever ``previous`` it came
        with); earlier lines are written back byte for byte, so their links still hold."""
        linked = replace(record, previous=line_hash(self.lines[-1]) if self.lines else GENESIS)
        line = linked.to_json()
        write_atomic(self.path, "".join(f"{kept}\n" for kept in [*self.lines, line]).encode("utf-8"))
        self.records.append(linked)
        self.lines.append(line)

    @contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Hold the site's ledger lock and work on freshly loaded entries."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.records, self.lines = self._load()
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
