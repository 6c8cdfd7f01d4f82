"""Public pre-training data in the formats people have it: ``.npz``, DICOM, PNG/JPEG.

Public data carries no site's privacy budget, but a model pre-trained on it must see its
images prepared exactly as the sites' DICOM files (see :mod:`fedmed.data.dicom` and
:mod:`fedmed.data.picture`). :func:`load_public` detects the format:

* a ``.npz`` file: MedMNIST-style (``train_images``/``train_labels`` with ``val_*`` and
  ``test_*``: train and val are used, **never test**, which stays for evaluation), or
  ``images``/``labels`` with an optional ``filename`` (NIH ChestX-ray8 names,
  ``PPPPPPPP_SSS.png``: the first 8 digits are the patient) or ``patient_ids``;
* a ``.csv`` manifest, or a folder whose files are DICOM: read by
  :func:`fedmed.data.site.load_site`, as a site would;
* a folder of PNG/JPEG files by class, ``DIR/<class>/**/*.png|jpg|jpeg``: files that
  fail are skipped and counted, never fatal; hidden files are ignored.

Source files are only ever read.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmed.data.dicom import LUMA_WEIGHTS, DicomReadError, ReadOptions, resize_square
from fedmed.data.npz import load_npz
from fedmed.data.picture import PICTURE_SUFFIXES, is_picture, read_picture, sniff
from fedmed.data.report import FileOutcome, SkipReason, printable
from fedmed.data.site import SiteSource, load_site
from fedmed.data.split import split_by_patient

PRETRAINING_SPLITS = ("train", "val")  # a MedMNIST file's test split is never trained on
NIH_FILENAME = re.compile(r"(\d{8})_\d{3}\.png", re.IGNORECASE)
DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True)
class PublicData:
    """Public images prepared as fedmed prepares a site's, with labels and patient ids."""

    images: np.ndarray  # (n, size, size) float32 in [0, 1]
    labels: np.ndarray  # (n,) int64, indexes into ``classes``
    classes: tuple[str, ...]
    patient_ids: tuple[str, ...]  # "" where unknown (the image is then a patient of its own)
    source: str  # what was read: file name, format, image count
    skipped: int  # files that could not be used
    skipped_files: tuple[FileOutcome, ...] = ()  # each with its reason, where files were read one by one

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.images.ndim != 3 or self.images.shape[1] != self.images.shape[2] or self.images.dtype != np.float32:
            raise ValueError(
                f"images must be float32 shaped (n, size, size), got {self.images.dtype} {self.images.shape}"
            )
        if len(self.images) != n or len(self.patient_ids) != n:
            raise ValueError(
                f"{len(self.images)} images, {n} labels and {len(self.patient_ids)} patient ids must match"
            )
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1} for classes {self.classes}")

    def __len__(self) -> int:
        return len(self.labels)

    def split_by_patient(self, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Train and validation indices with no patient on both sides (unknown patients are
        images of their own), stratified by label."""
        return split_by_patient(self.labels, list(self.patient_ids), val_fraction, seed)


def load_public(path: Path | str, classes: tuple[str, ...] | None = None, image_size: int = 64) -> PublicData:
    """Read public data at ``path`` (format detected, see the module docstring), every
    image resized to ``image_size``. ``classes`` names the labels in order; without it they
    are the class folders (sorted) or, for ``.npz`` files, ``class-0``, ``class-1``, ..."""
    path = Path(path)
    options = ReadOptions(image_size=image_size)
    if not path.exists():
        raise FileNotFoundError(
            f"public data not found: {path} (give a .npz file, a .csv manifest, or a folder "
            "of DICOM or PNG/JPEG files in one folder per class)"
        )
    if path.is_file() and path.suffix.lower() == ".npz":
        data = _load_npz(path, classes, image_size)
    elif path.is_file() and path.suffix.lower() == ".csv":
        data = _load_dicom(path, classes, options)
    elif path.is_dir():
        kind = _folder_kind(path)
        data = _load_pictures(path, classes, options) if kind == "pictures" else _load_dicom(path, classes, options)
    else:
        raise ValueError(
            f"{path}: public data must be a .npz file, a .csv manifest or a folder; "
            f"{path.suffix or 'a file without suffix'} is none of these"
        )
    if not len(data):
        reasons = Counter(o.reason.value for o in data.skipped_files if o.reason)
        why = f" ({', '.join(f'{r}: {n}' for r, n in reasons.most_common())})" if reasons else ""
        raise ValueError(
            f"{path}: no usable images ({data.skipped} files skipped{why}); check the layout "
            "DIR/<class>/<image> and the class names"
        )
    return data


# --- .npz -------------------------------------------------------------------------------


def _load_npz(path: Path, classes: tuple[str, ...] | None, image_size: int) -> PublicData:
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
    if "train_images" in keys:
        return _load_medmnist(path, keys, classes, image_size)
    if {"images", "labels"} <= keys:
        return _load_plain_npz(path, classes, image_size)
    raise ValueError(
        f"{path}: neither a MedMNIST file (train_images, train_labels, ...) nor one with images and "
        f"labels arrays; the file holds: {', '.join(sorted(keys))}"
    )


def _load_medmnist(path: Path, keys: set[str], classes: tuple[str, ...] | None, image_size: int) -> PublicData:
    splits = [s for s in PRETRAINING_SPLITS if f"{s}_images" in keys]
    sets = [load_npz(path, split) for split in splits]
    labels = np.concatenate([s.labels for s in sets])
    names = _class_names(path, labels, classes)
    patients: list[str] = []
    for split, images in zip(splits, sets):  # load_npz numbers images without ids; fedmed says "unknown"
        known = f"{split}_patient_ids" in keys
        patients += list(images.patient_ids) if known else [""] * len(images)
    pixels = _to_unit(np.concatenate([s.images for s in sets]), path, "images", image_size)
    return PublicData(
        pixels,
        labels,
        names,
        tuple(patients),
        f"{path.name} (MedMNIST npz, {'+'.join(splits)}: {len(labels)} images; test not used)",
        0,
    )


def _load_plain_npz(path: Path, classes: tuple[str, ...] | None, image_size: int) -> PublicData:
    with np.load(path, allow_pickle=False) as data:
        images, raw_labels = data["images"], data["labels"]
        if "patient_ids" in data.files:
            patients = tuple(str(p) for p in data["patient_ids"])
        elif "filename" in data.files:
            patients = tuple(_nih_patient(str(name)) for name in data["filename"])
        else:
            patients = ("",) * len(raw_labels)
    labels = raw_labels.reshape(len(raw_labels), -1)
    if labels.shape[1] != 1:
        raise ValueError(f"{path}: labels has {labels.shape[1]} columns; fedmed reads single-label files")
    labels = labels[:, 0].astype(np.int64)
    if len(images) != len(labels) or len(patients) != len(labels):
        raise ValueError(
            f"{path}: {len(images)} images, {len(labels)} labels and {len(patients)} patient ids (filename) must match"
        )
    names = _class_names(path, labels, classes)
    pixels = _to_unit(images, path, "images", image_size)
    return PublicData(pixels, labels, names, patients, f"{path.name} (npz, {len(labels)} images)", 0)


def _nih_patient(filename: str) -> str:
    """The NIH patient number of a ChestX-ray8 file name, or "" for any other name."""
    match = NIH_FILENAME.fullmatch(os.path.basename(filename))
    return match.group(1) if match else ""


def _class_names(path: Path, labels: np.ndarray, classes: tuple[str, ...] | None) -> tuple[str, ...]:
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{path}: labels must be 0 or more, found {labels.min()}")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    if classes:
        if len(classes) < n_classes:
            raise ValueError(
                f"{path}: labels go up to {n_classes - 1} but only {len(classes)} class names were "
                f"given ({', '.join(classes)})"
            )
        return tuple(classes)
    return tuple(f"class-{i}" for i in range(n_classes))


def _to_unit(images: np.ndarray, path: Path, key: str, image_size: int) -> np.ndarray:
    """8- or 16-bit images over their depth's maximum (as picture.py reads PNG files),
    colour through fedmed's luma weights, resized when their size differs."""
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(images.dtype)
    if scale is None:
        raise ValueError(f"{path}: {key} are {images.dtype}; fedmed reads 8-bit (uint8) or 16-bit (uint16) images")
    if images.ndim == 4 and images.shape[-1] == 3:
        images = images.astype(np.float64) @ LUMA_WEIGHTS
    if images.ndim != 3:
        raise ValueError(f"{path}: {key} has shape {images.shape}; expected (n, height, width[, 3])")
    unit = (images / scale).astype(np.float32)
    if unit.shape[1:] == (image_size, image_size):
        return np.ascontiguousarray(unit)
    out = np.empty((len(unit), image_size, image_size), dtype=np.float32)
    for i, image in enumerate(unit):
        out[i] = resize_square(image, image_size)
    return out


# --- folders and manifests -----------------------------------------------------------------


def _load_dicom(path: Path, classes: tuple[str, ...] | None, options: ReadOptions) -> PublicData:
    site = load_site(SiteSource.from_path(path, classes), options)  # no cache: public data is not a site's
    skipped = tuple(site.report.skipped)
    source = f"{path.name} (DICOM {'manifest' if path.is_file() else 'folders'}, {len(site)} images)"
    return PublicData(
        np.asarray(site.images, dtype=np.float32),
        site.labels,
        site.classes,
        tuple(site.patient_ids),
        source,
        len(skipped),
        skipped,
    )


def _folder_kind(root: Path) -> str:
    """``"pictures"`` when the folder's files are PNG/JPEG, ``"dicom"`` when they are DICOM
    (or neither: the DICOM reader then reports each); both at once is refused."""
    pictures = dicom = 0
    for file in _visible_files(root):
        if is_picture(file):
            pictures += 1
        elif sniff(file) == "dicom" or file.suffix.lower() in DICOM_SUFFIXES:
            dicom += 1
    if pictures and dicom:
        raise ValueError(
            f"{root} holds {dicom} DICOM and {pictures} PNG/JPEG files; public data is read in one "
            "format: put them in separate folders and load each"
        )
    return "pictures" if pictures else "dicom"


def _visible_files(root: Path) -> Iterator[Path]:
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(directory) / name


def _load_pictures(root: Path, classes: tuple[str, ...] | None, options: ReadOptions) -> PublicData:
    """Every PNG/JPEG file under ``root/<class>/``; what fails is skipped with its reason."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = tuple(classes) if classes else tuple(folders)
    images: list[np.ndarray] = []
    labels: list[int] = []
    patients: list[str] = []
    skipped: list[FileOutcome] = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in [d for d in subdirs if os.path.islink(os.path.join(directory, d))]:
            subdirs.remove(name)  # never followed: no loops, no files from elsewhere
            parts = (Path(directory) / name).relative_to(root).parts
            skipped.append(
                FileOutcome(
                    printable("/".join(parts)),
                    parts[0],
                    SkipReason.NOT_A_REGULAR_FILE,
                    "a link to a folder; linked folders are not followed",
                )
            )
        for name in sorted(files):
            path = Path(directory) / name
            parts = path.relative_to(root).parts
            shown = printable("/".join(parts))
            label = parts[0] if len(parts) > 1 else None
            outcome = _check_place(path, parts, shown, label, classes)
            if outcome is None:
                try:
                    images.append(read_picture(path, options))
                except DicomReadError as exc:  # PictureReadError, or the shared file checks
                    outcome = FileOutcome(shown, label, exc.reason, exc.detail)
                else:
                    labels.append(classes.index(label))
                    patients.append(_nih_patient(name))
                    continue
            skipped.append(outcome)
    stacked = np.stack(images) if images else np.empty((0, options.image_size, options.image_size), np.float32)
    source = f"{root.name} (PNG/JPEG folders, {len(images)} images, {len(skipped)} skipped)"
    return PublicData(
        stacked, np.asarray(labels, dtype=np.int64), classes, tuple(patients), source, len(skipped), tuple(skipped)
    )


def _check_place(
    path: Path, parts: tuple[str, ...], shown: str, label: str | None, classes: tuple[str, ...]
) -> FileOutcome | None:
    """Why a file is not read (hidden, outside a class folder, another class, not a picture)."""
    if any(part.startswith(".") for part in parts):
        return FileOutcome(shown, None, SkipReason.HIDDEN_FILE, "hidden files are ignored")
    if label is None:
        return FileOutcome(
            shown, None, SkipReason.OUTSIDE_CLASS_FOLDER, "files must sit inside a folder named after their class"
        )
    if label not in classes:
        return FileOutcome(
            shown, label, SkipReason.UNKNOWN_LABEL, f"folder {label!r} is not one of the classes ({', '.join(classes)})"
        )
    if not is_picture(path):
        return FileOutcome(
            shown,
            label,
            SkipReason.DECODE_FAILED,
            f"not a PNG or JPEG file (suffix and first bytes); read: {', '.join(PICTURE_SUFFIXES)}",
        )
    return None
