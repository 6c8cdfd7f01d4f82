"""A hospital's training data: its DICOM files, their labels, and what was skipped.

Two layouts are read:

* folder per class: ``DIR/<label>/**/<file>`` (any file name, ``.dcm`` or none);
* a CSV manifest with a header ``path,label[,patient_id]``; relative paths start at the
  manifest's folder, and a path leading out of it (``..``, absolute, a link) is skipped
  unless the site allows it (site.allow_outside_paths): a manifest must not make a site
  read files that are not its data.

Every file ends up in the site's :class:`ValidationReport`, used or skipped with a reason.
Source files are only ever opened for reading, and only regular files within the size
limit are opened at all (see :func:`fedmed.data.dicom.check_file`).
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmed.data.cache import decode_files
from fedmed.data.dicom import ReadOptions
from fedmed.data.report import FileOutcome, SkipReason, ValidationReport, printable
from fedmed.data.split import split_by_patient

MANIFEST_COLUMNS = ("path", "label")


@dataclass(frozen=True)
class SiteSource:
    """Where a site's files and labels come from.

    ``classes`` fixes the label set (and its order, which gives the label numbers); files
    with any other label are skipped. Without it the classes are the labels found, sorted.
    ``allow_outside_paths`` lets a manifest name files outside its own folder.
    """

    root: Path
    manifest: Path | None = None
    classes: tuple[str, ...] | None = None
    allow_outside_paths: bool = False

    @classmethod
    def from_path(
        cls, path: Path | str, classes: tuple[str, ...] | None = None, allow_outside_paths: bool = False
    ) -> SiteSource:
        """A folder means folder-per-class; a ``.csv`` file means a manifest."""
        path = Path(path)
        if path.is_dir():
            return cls(root=path, classes=classes, allow_outside_paths=allow_outside_paths)
        if path.is_file() and path.suffix.lower() == ".csv":
            return cls(root=path.parent, manifest=path, classes=classes, allow_outside_paths=allow_outside_paths)
        if not path.exists():
            raise FileNotFoundError(f"site data not found: {path} (give a folder or a .csv manifest)")
        raise ValueError(f"{path} is neither a folder nor a .csv manifest")


@dataclass(frozen=True)
class _Candidate:
    path: Path
    shown: str  # the path as the report shows it
    label: str
    patient_id: str = ""


@dataclass
class SiteData:
    """A site's usable images with their labels, and the report of every file."""

    images: np.ndarray  # (n, size, size) float32 in [0, 1]
    labels: np.ndarray  # (n,) int64, indexes into ``classes``
    classes: tuple[str, ...]
    patient_ids: list[str]  # "" where unknown
    paths: list[str]
    report: ValidationReport

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Train and validation indices; no patient appears on both sides."""
        return split_by_patient(self.labels, self.patient_ids, val_fraction, seed)


def load_site(source: SiteSource, options: ReadOptions = ReadOptions(), cache_dir: Path | None = None) -> SiteData:
    """Read every file of ``source``; bad files are reported and skipped, never fatal.

    With ``cache_dir``, decoded images are kept in a folder of their own for this site
    under it, and later loads decode only new or changed files. ``options.max_file_bytes``
    is the size limit (site.max_file_mb); larger files are skipped unread.
    """
    if source.manifest is not None:
        candidates, skipped, classes = _list_manifest(source.manifest, source.classes, source.allow_outside_paths)
    else:
        candidates, skipped, classes = _list_folders(source.root, source.classes)
    site_cache = cache_dir / site_cache_key(source) if cache_dir is not None else None
    result = decode_files([c.path for c in candidates], options, site_cache)

    outcomes = list(skipped)
    keep_rows: list[int] = []
    labels: list[int] = []
    patients: list[str] = []
    paths: list[str] = []
    first_seen: dict[str, str] = {}
    for candidate, decoded in zip(candidates, result.files):
        if decoded.row is None:
            assert decoded.reason is not None
            outcomes.append(FileOutcome(candidate.shown, candidate.label, decoded.reason, decoded.detail))
            continue
        uid = decoded.sop_instance_uid
        if uid and uid in first_seen:
            detail = f"SOP Instance UID {uid} already used by {first_seen[uid]}"
            outcomes.append(FileOutcome(candidate.shown, candidate.label, SkipReason.DUPLICATE_SOP_INSTANCE, detail))
            continue
        if uid:
            first_seen[uid] = candidate.shown
        outcomes.append(FileOutcome(candidate.shown, candidate.label))
        keep_rows.append(decoded.row)
        labels.append(classes.index(candidate.label))
        patients.append(candidate.patient_id or decoded.patient_id)
        paths.append(candidate.shown)

    images = result.images
    if keep_rows != list(range(len(images))):
        images = np.asarray(images[keep_rows])
    report = ValidationReport(
        root=str(source.manifest or source.root),
        classes=classes,
        outcomes=sorted(outcomes, key=lambda o: o.path),
        decoded=result.decoded,
        from_cache=result.from_cache,
    )
    return SiteData(
        images=images,
        labels=np.asarray(labels, dtype=np.int64),
        classes=classes,
        patient_ids=patients,
        paths=paths,
        report=report,
    )


def site_cache_key(source: SiteSource) -> str:
    """A short, stable name for a site's cache folder."""
    where = f"{source.root.resolve()}|{source.manifest.resolve() if source.manifest else ''}"
    return hashlib.sha256(where.encode()).hexdigest()[:16]


def _list_folders(
    root: Path, classes: tuple[str, ...] | None
) -> tuple[list[_Candidate], list[FileOutcome], tuple[str, ...]]:
    """Every file under ``root``; linked folders are reported, never followed (no loops)."""
    if not root.is_dir():
        raise FileNotFoundError(f"site data folder not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = tuple(classes) if classes else tuple(folders)
    candidates: list[_Candidate] = []
    skipped: list[FileOutcome] = []

    def shown_parts(path: Path) -> tuple[str, tuple[str, ...]]:
        parts = path.relative_to(root).parts
        return printable("/".join(parts)), parts

    def unreadable_folder(error: OSError) -> None:
        shown, parts = shown_parts(Path(error.filename))
        detail = f"folder not listed: {error.strerror or error}"
        skipped.append(FileOutcome(shown, parts[0] if parts else None, SkipReason.UNREADABLE, detail))

    for directory, subdirs, files in os.walk(root, onerror=unreadable_folder):
        subdirs.sort()
        for name in [d for d in subdirs if os.path.islink(os.path.join(directory, d))]:
            subdirs.remove(name)
            shown, parts = shown_parts(Path(directory) / name)
            detail = "a link to a folder; linked folders are not followed (put the files in the site folder)"
            skipped.append(FileOutcome(shown, parts[0], SkipReason.NOT_A_REGULAR_FILE, detail))
        for name in sorted(files):
            path = Path(directory) / name
            shown, parts = shown_parts(path)
            if any(part.startswith(".") for part in parts):
                skipped.append(FileOutcome(shown, None, SkipReason.HIDDEN_FILE, "hidden files are ignored"))
            elif len(parts) == 1:
                detail = "files must sit inside a folder named after their class"
                skipped.append(FileOutcome(shown, None, SkipReason.OUTSIDE_CLASS_FOLDER, detail))
            elif parts[0] not in classes:
                detail = f"folder {parts[0]!r} is not one of the site's classes ({', '.join(classes)})"
                skipped.append(FileOutcome(shown, parts[0], SkipReason.UNKNOWN_LABEL, detail))
            else:
                candidates.append(_Candidate(path, shown, parts[0]))
    return candidates, skipped, classes


def _list_manifest(
    manifest: Path, classes: tuple[str, ...] | None, allow_outside_paths: bool = False
) -> tuple[list[_Candidate], list[FileOutcome], tuple[str, ...]]:
    rows = _read_manifest(manifest)
    labels = sorted({row["label"] for row in rows if row["label"]})
    classes = tuple(classes) if classes else tuple(labels)
    folder = manifest.parent.resolve()
    candidates: list[_Candidate] = []
    skipped: list[FileOutcome] = []
    for line, row in enumerate(rows, start=2):
        shown, label = printable(row["path"]), row["label"]
        path = Path(row["path"]) if Path(row["path"]).is_absolute() else manifest.parent / row["path"]
        outside = None if allow_outside_paths else _outside(path, folder)
        if label not in classes:
            detail = f"manifest line {line}: label {label!r} is not one of the site's classes ({', '.join(classes)})"
            skipped.append(FileOutcome(shown, label or None, SkipReason.UNKNOWN_LABEL, detail))
        elif outside is not None:
            detail = (
                f"manifest line {line}: {outside}; files must be inside the manifest's folder {folder} "
                "(set site.allow_outside_paths, --allow-outside-paths, to read files elsewhere)"
            )
            skipped.append(FileOutcome(shown, label, SkipReason.OUTSIDE_SITE_FOLDER, detail))
        elif not os.path.exists(path):
            detail = f"manifest line {line}: no such file {path}"
            skipped.append(FileOutcome(shown, label, SkipReason.MISSING_FILE, detail))
        else:
            candidates.append(_Candidate(path, shown, label, row.get("patient_id") or ""))
    return candidates, skipped, classes


def _outside(path: Path, folder: Path) -> str | None:
    """Why ``path`` (links followed) is not inside ``folder``, or None when it is."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop (RuntimeError before Python 3.13)
        return f"{path} cannot be resolved ({exc})"
    if resolved.is_relative_to(folder):
        return None
    return f"{path} leads to {resolved}"


def _read_manifest(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [col for col in MANIFEST_COLUMNS if col not in header]
        if missing:
            raise ValueError(
                f"{manifest}: the manifest needs a header line with columns path,label[,patient_id]; "
                f"missing {', '.join(missing)} (found: {', '.join(header) or 'nothing'})"
            )
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
