"""Decode a site's DICOM files once and keep the results on the site's disk.

Each file is keyed by its identity (absolute path, size, modification time); the whole
cache is keyed by the preprocessing options, so a changed file is decoded again and a
changed option starts a fresh cache. Decoded images live in one ``.npy`` file that later
loads memory-map; failures are cached too, so an unchanged bad file is not retried. What
a stat tells (no such file, not a regular file, above the size limit) is checked on every
load before the cache is looked at, and such a file is neither decoded nor cached.
Every write goes to a temporary file first and is moved into place, so a crash never
leaves a half-written cache behind.

The cache holds images derived from patients' studies: its folders are readable by their
owner only (0700, files 0600), and ``fedmed data purge-cache`` removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedmed.data.dicom import DicomReadError, ReadOptions, check_file, read_dicom
from fedmed.data.report import SkipReason
from fedmed.files import write_atomic

# Bump when the preprocessing in fedmed.data.dicom changes what an image looks like.
PREPROCESSING_VERSION = 1
INDEX_NAME = "index.json"
# Outcomes that say nothing about a file's content (a permission fixed later keeps its mtime;
# a file swapped between the stat and the read): asked again on every load.
NOT_CACHED = frozenset(
    {SkipReason.MISSING_FILE, SkipReason.UNREADABLE, SkipReason.NOT_A_REGULAR_FILE, SkipReason.TOO_LARGE}
)


@dataclass(frozen=True)
class Decoded:
    """What one file gave: a row of the image array, or the reason it has none."""

    row: int | None
    reason: SkipReason | None = None
    detail: str = ""
    sop_instance_uid: str = ""
    patient_id: str = ""


@dataclass(frozen=True)
class DecodeResult:
    images: np.ndarray  # (rows, size, size) float32; may be a read-only memory map
    files: list[Decoded]  # one per requested path, in order
    decoded: int  # files decoded by this call
    from_cache: int  # files answered from the cache


def decode_files(paths: list[Path], options: ReadOptions, cache_dir: Path | None = None) -> DecodeResult:
    """Decode ``paths`` (in order), reusing and refreshing the cache in ``cache_dir``."""
    store = _CacheStore(cache_dir, options) if cache_dir is not None else None
    old_entries, old_images = store.load() if store else ({}, None)

    entries: dict[str, dict] = {}
    files: list[Decoded] = []
    rows: list[int | np.ndarray] = []  # an old row number, or a freshly decoded image
    decoded = from_cache = 0
    for path in paths:
        try:  # before the cache: what a file is and the size limit can change between loads
            stat = check_file(path, options.max_file_bytes)
        except DicomReadError as exc:
            files.append(Decoded(None, exc.reason, exc.detail))  # never decoded, never cached
            continue
        key = str(path.resolve())
        identity = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        old = old_entries.get(key)
        if old is not None and all(old[k] == v for k, v in identity.items()):
            from_cache += 1
            result = _from_entry(old, len(rows))
            if result.row is not None:
                rows.append(old["row"])
        else:
            decoded += 1
            result, image = _decode_one(path, options, len(rows))
            if image is not None:
                rows.append(image)
        files.append(result)
        if result.reason not in NOT_CACHED:
            entries[key] = {**identity, **_to_entry(result)}

    images = _assemble(rows, old_images, options.image_size)
    if store is not None and (decoded or entries.keys() != old_entries.keys() or images is not old_images):
        store.save(entries, images)
    return DecodeResult(images=images, files=files, decoded=decoded, from_cache=from_cache)


def _decode_one(path: Path, options: ReadOptions, row: int) -> tuple[Decoded, np.ndarray | None]:
    try:
        image = read_dicom(path, options)
    except DicomReadError as exc:
        return Decoded(None, exc.reason, exc.detail), None
    return Decoded(row, None, "", image.sop_instance_uid, image.patient_id), image.pixels


def _to_entry(result: Decoded) -> dict:
    entry = asdict(result)
    entry["reason"] = result.reason.value if result.reason else None
    return entry


def _from_entry(entry: dict, row: int) -> Decoded:
    reason = SkipReason(entry["reason"]) if entry["reason"] else None
    return Decoded(
        row=None if reason else row,
        reason=reason,
        detail=entry["detail"],
        sop_instance_uid=entry["sop_instance_uid"],
        patient_id=entry["patient_id"],
    )


def _assemble(rows: list[int | np.ndarray], old_images: np.ndarray | None, size: int) -> np.ndarray:
    """Stack the images in order; hand back the memory map untouched when nothing moved."""
    if old_images is not None and len(rows) == len(old_images):
        if all(isinstance(r, int) and r == i for i, r in enumerate(rows)):
            return old_images
    images = np.empty((len(rows), size, size), dtype=np.float32)
    for i, source in enumerate(rows):
        if not isinstance(source, int):
            images[i] = source
        elif old_images is None:  # a row number comes only with a loaded cache
            raise ValueError(f"image {i} is row {source} of a cache whose images were not loaded")
        else:
            images[i] = old_images[source]
    return images


OPTIONS_FOLDER = re.compile(r"size\d+-[a-z]+-v\d+")  # _CacheStore's folder names


class _CacheStore:
    """The cache folder of one site and one set of preprocessing options."""

    def __init__(self, cache_dir: Path, options: ReadOptions) -> None:
        key = f"size{options.image_size}-{options.multiframe}-v{PREPROCESSING_VERSION}"
        self.directory = Path(cache_dir) / key

    def load(self) -> tuple[dict[str, dict], np.ndarray | None]:
        index_path = self.directory / INDEX_NAME
        try:
            index = json.loads(index_path.read_text())
            images = np.load(self.directory / index["images"], mmap_mode="r")
        except (OSError, ValueError, KeyError):
            return {}, None  # no cache yet, or an unreadable one: start afresh
        return index["files"], images

    def save(self, entries: dict[str, dict], images: np.ndarray) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for folder in (self.directory.parent, self.directory):  # the site's folder and this one's
            os.chmod(folder, 0o700)
        digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]
        images_name = f"images-{digest}.npy"
        self._write_atomic(images_name, lambda handle: np.save(handle, images))
        index = {"images": images_name, "files": entries}
        self._write_atomic(INDEX_NAME, lambda handle: handle.write(json.dumps(index).encode()))
        for stale in self.directory.glob("images-*.npy"):
            if stale.name != images_name:
                stale.unlink(missing_ok=True)

    def _write_atomic(self, name: str, write) -> None:
        write_atomic(self.directory / name, write)


def default_cache_dir() -> Path:
    """``$FEDMED_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedmed``, else ``~/.cache/fedmed``."""
    if os.environ.get("FEDMED_CACHE_DIR"):
        return Path(os.environ["FEDMED_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedmed"


def purge_cache(cache_dir: Path, site_folder: str | None = None) -> list[Path]:
    """Remove the decoded images under ``cache_dir`` (every site's, or the folder named
    ``site_folder`` only) and return what was removed. Only folders laid out as fedmed's
    cache are touched; anything else there is left as it is."""
    candidates = [cache_dir / site_folder] if site_folder else sorted(p for p in cache_dir.iterdir() if p.is_dir())
    removed = []
    for folder in candidates:
        if folder.is_dir() and any(
            OPTIONS_FOLDER.fullmatch(p.name) and (p / INDEX_NAME).is_file() for p in folder.iterdir()
        ):
            shutil.rmtree(folder)
            removed.append(folder)
    return removed
