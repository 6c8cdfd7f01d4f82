"""The validation report of a site: what happened to every file it holds."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum


class SkipReason(str, Enum):
    """Why a file was left out of a site's training data."""

    NOT_DICOM = "not-dicom"
    UNREADABLE = "unreadable"
    INVALID_HEADER = "invalid-header"
    NO_PIXEL_DATA = "no-pixel-data"
    UNSUPPORTED_PHOTOMETRIC = "unsupported-photometric-interpretation"
    MULTI_FRAME = "multi-frame"
    DECODE_FAILED = "decode-failure"
    UNKNOWN_LABEL = "unknown-label"
    OUTSIDE_CLASS_FOLDER = "outside-class-folder"
    MISSING_FILE = "missing-file"
    DUPLICATE_SOP_INSTANCE = "duplicate-sop-instance-uid"
    HIDDEN_FILE = "hidden-file"
    NOT_A_REGULAR_FILE = "not-a-regular-file"
    TOO_LARGE = "too-large"
    OUTSIDE_SITE_FOLDER = "outside-site-folder"


def printable(text: str) -> str:
    """``text`` safe to print and to write as JSON, whatever bytes a file name held.

    Names that are not UTF-8 reach Python as lone surrogates (``os.fsdecode``), which a
    strict UTF-8 stdout refuses with a UnicodeEncodeError; control characters could forge
    report lines. Both are shown as backslash escapes (``\\xff``, ``\\n``) instead.
    """
    try:  # undo Python's surrogate escaping: the name's real bytes, invalid ones as \xNN
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        pass  # other lone surrogates: escaped one by one below
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


@dataclass(frozen=True)
class FileOutcome:
    """One file of a site: used for training (``reason is None``) or skipped."""

    path: str
    label: str | None
    reason: SkipReason | None = None
    detail: str = ""

    @property
    def used(self) -> bool:
        return self.reason is None


@dataclass
class ValidationReport:
    """Every file of a site, used or skipped, with the classes it was read against."""

    root: str
    classes: tuple[str, ...]
    outcomes: list[FileOutcome] = field(default_factory=list)
    decoded: int = 0
    from_cache: int = 0

    @property
    def used(self) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.used]

    @property
    def skipped(self) -> list[FileOutcome]:
        return [o for o in self.outcomes if not o.used]

    def class_counts(self) -> dict[str, int]:
        """Usable images per class, every class listed (zero included)."""
        counts = Counter(o.label for o in self.used)
        return {name: counts.get(name, 0) for name in self.classes}

    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(o.reason.value for o in self.skipped if o.reason))

    def to_dict(self) -> dict:
        """The report as JSON-ready values; every name and detail passes :func:`printable`."""
        return {
            "root": printable(self.root),
            "classes": [printable(c) for c in self.classes],
            "files": len(self.outcomes),
            "used": len(self.used),
            "skipped": len(self.skipped),
            "class_counts": {printable(c): n for c, n in self.class_counts().items()},
            "skip_counts": self.skip_counts(),
            "decoded": self.decoded,
            "from_cache": self.from_cache,
            "skipped_files": [_outcome_dict(o) for o in self.skipped],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        """A human-readable summary: counts per class, then every skipped file and why."""
        lines = [
            f"Site data: {printable(self.root)}",
            f"  files found: {len(self.outcomes)}   used: {len(self.used)}   skipped: {len(self.skipped)}",
            f"  decoded now: {self.decoded}   read from cache: {self.from_cache}",
            "  usable images per class:",
        ]
        counts = {printable(c): n for c, n in self.class_counts().items()}
        width = max((len(c) for c in counts), default=5)
        for name, count in counts.items():
            lines.append(f"    {name:<{width}}  {count}")
        if self.skipped:
            lines.append("  skipped files:")
            for outcome in self.skipped:
                assert outcome.reason is not None
                detail = f": {printable(outcome.detail)}" if outcome.detail else ""
                lines.append(f"    {printable(outcome.path)}  [{outcome.reason.value}]{detail}")
        return "\n".join(lines)


def _outcome_dict(outcome: FileOutcome) -> dict:
    return {
        "path": printable(outcome.path),
        "label": printable(outcome.label) if outcome.label is not None else None,
        "reason": outcome.reason.value if outcome.reason else None,
        "detail": printable(outcome.detail),
    }
