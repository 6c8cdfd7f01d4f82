"""A finished model on new studies: ``fedmed predict``.

Files go through the reader, checks and preprocessing of training (``fedmed.data``), a
bounded number at a time, so a folder of any size fits in memory. PNG and JPEG files are
read too (:mod:`fedmed.data.picture`, the same preprocessing), so public images and exports
can be scored beside DICOM studies. A file that cannot be used is listed with its reason and
the others go on; source files are only read.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedmed.data.cache import PREPROCESSING_VERSION, Decoded, decode_files
from fedmed.data.dicom import DicomReadError, ReadOptions
from fedmed.data.picture import is_picture, read_picture
from fedmed.data.report import FileOutcome, SkipReason
from fedmed.device import resolve_device
from fedmed.metrics import calibration, classification_metrics
from fedmed.model import ModelConfig, build_model, card_architecture
from fedmed.rundir import CARD_FILE, MODEL_FILE, load_arrays
from fedmed.train import predict
from fedmed.weights import load_state

CHUNK = 256  # files decoded and scored at a time
FORMATS = ("csv", "json")


@dataclass
class LoadedModel:
    """A run's final model, ready to score images, with its model card."""

    model: nn.Module
    card: dict
    path: Path

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.card["classes"])

    @property
    def image_size(self) -> int:
        return int(self.card["input"]["image_size"])


def load_model_dir(path: Path | str, device: str | torch.device = "cpu") -> LoadedModel:
    """The model in ``path`` (a run's ``model`` folder, or its ``model.npz``), on ``device``
    (a ``resources.device`` name or a torch device), where it then scores."""
    path = Path(path)
    folder = path.parent if path.is_file() and path.name == MODEL_FILE else path
    missing = [name for name in (MODEL_FILE, CARD_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a fedmed model: {' and '.join(missing)} not found there "
            "(give a run's model folder, RUN_DIR/model)"
        )
    card = json.loads((folder / CARD_FILE).read_text())
    version = card.get("input", {}).get("preprocessing_version")
    if version != PREPROCESSING_VERSION:
        raise ValueError(
            f"{folder / CARD_FILE}: the model was trained with preprocessing version {version}, this "
            f"fedmed reads images with version {PREPROCESSING_VERSION}; use the fedmed release that "
            "trained it"
        )
    model = build_model(ModelConfig(**card_architecture(card["architecture"])))
    try:
        load_state(model, load_arrays(folder / MODEL_FILE))
    except ValueError as exc:
        raise ValueError(f"{folder / MODEL_FILE} does not fit the architecture in its model card: {exc}") from exc
    return LoadedModel(model.to(resolve_device(device) if isinstance(device, str) else device).eval(), card, folder)


@dataclass(frozen=True)
class Study:
    """One file to score, with its label when the data gives one."""

    path: Path
    shown: str
    label: str | None = None


def list_studies(data: Path | str, classes: tuple[str, ...]) -> tuple[list[Study], list[FileOutcome], str]:
    """The files under ``data`` (a folder of any layout, a CSV manifest with a ``path``
    column and an optional ``label`` column, or one file), the ones left out, and where
    labels came from ("" when there are none)."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(
            f"{data} not found (give a folder of DICOM, PNG or JPEG files, a .csv manifest or one such file)"
        )
    if data.is_file() and data.suffix.lower() == ".csv":
        return _manifest_studies(data, classes)
    if data.is_file():
        return [Study(data, data.name)], [], ""
    studies, skipped = [], []
    for directory, subdirs, files in os.walk(data):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(directory) / name
            shown = path.relative_to(data).as_posix()
            if name.startswith("."):
                skipped.append(FileOutcome(shown, None, SkipReason.HIDDEN_FILE, "hidden files are ignored"))
            else:
                studies.append(Study(path, shown))
    labelled = bool(studies) and all(
        len(Path(s.shown).parts) > 1 and Path(s.shown).parts[0] in classes for s in studies
    )
    if not labelled:
        return studies, skipped, ""
    return (
        [Study(s.path, s.shown, Path(s.shown).parts[0]) for s in studies],
        skipped,
        f"class folders ({', '.join(classes)})",
    )


def _manifest_studies(manifest: Path, classes: tuple[str, ...]) -> tuple[list[Study], list[FileOutcome], str]:
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise ValueError(
                f"{manifest}: a prediction manifest needs a 'path' column (and may have 'label'); "
                f"found {', '.join(reader.fieldnames or []) or 'no header'}"
            )
        rows = list(reader)
    labelled = "label" in (reader.fieldnames or [])
    studies, skipped = [], []
    for line, row in enumerate(rows, start=2):
        shown, label = row["path"], (row.get("label") or None) if labelled else None
        path = Path(shown) if Path(shown).is_absolute() else manifest.parent / shown
        if label is not None and label not in classes:
            skipped.append(
                FileOutcome(
                    shown,
                    label,
                    SkipReason.UNKNOWN_LABEL,
                    f"manifest line {line}: label {label!r} is not one of the model's classes ({', '.join(classes)})",
                )
            )
        elif not path.is_file():
            skipped.append(
                FileOutcome(shown, label, SkipReason.MISSING_FILE, f"manifest line {line}: no such file {path}")
            )
        else:
            studies.append(Study(path, shown, label))
    if labelled and any(s.label is None for s in studies):
        return [Study(s.path, s.shown) for s in studies], skipped, ""  # partly labelled: no metrics
    return studies, skipped, ("manifest column 'label'" if labelled and studies else "")


@dataclass
class Predictions:
    """Every scored file, every skipped one, and the metrics when labels were given."""

    classes: tuple[str, ...]
    rows: list[dict] = field(default_factory=list)
    skipped: list[FileOutcome] = field(default_factory=list)
    labels_from: str = ""
    metrics: dict | None = None


def predict_studies(
    loaded: LoadedModel,
    studies: list[Study],
    skipped: list[FileOutcome],
    labels_from: str,
    progress: Callable[[int, int], None] | None = None,
) -> Predictions:
    """Score ``studies`` ``CHUNK`` files at a time; ``progress(done, total)`` after each chunk."""
    classes = loaded.classes
    result = Predictions(classes, skipped=list(skipped), labels_from=labels_from)
    options = ReadOptions(image_size=loaded.image_size)
    all_probabilities, all_labels = [], []
    for start in range(0, len(studies), CHUNK):
        chunk = studies[start : start + CHUNK]
        images, files = decode_studies([s.path for s in chunk], options)
        kept = [(s, d, d.row) for s, d in zip(chunk, files) if d.row is not None]  # with its image index
        for study, outcome in zip(chunk, files):
            if outcome.row is None:
                result.skipped.append(FileOutcome(study.shown, study.label, outcome.reason, outcome.detail))
        if kept:
            probabilities = predict(loaded.model, images[[index for _, _, index in kept]])
            for (study, outcome, _), p in zip(kept, probabilities):
                row: dict[str, str | float | None] = {"path": study.shown, "sop_instance_uid": outcome.sop_instance_uid}
                row |= {f"p_{name}": float(value) for name, value in zip(classes, p)}
                row["decision"] = classes[int(p.argmax())]
                if labels_from:
                    row["label"] = study.label
                result.rows.append(row)
            all_probabilities.append(probabilities)
            all_labels += [classes.index(s.label) for s, _, _ in kept] if labels_from else []
        if progress is not None:
            progress(min(start + CHUNK, len(studies)), len(studies))
    if labels_from and all_labels:
        probabilities, labels = np.concatenate(all_probabilities), np.asarray(all_labels)
        result.metrics = classification_metrics(labels, probabilities) | {
            "calibration": calibration(labels, probabilities),
            "labels_from": labels_from,
        }
    return result


def decode_studies(paths: list[Path], options: ReadOptions) -> tuple[np.ndarray, list[Decoded]]:
    """The preprocessed images of ``paths`` and one :class:`Decoded` per path, in order:
    PNG/JPEG files (by their first bytes, or by suffix when those say neither picture nor
    DICOM) through :func:`read_picture`, the rest through the DICOM reader. Nothing is
    cached or written: these are studies to score, not a site's training data."""
    pictures = [is_picture(path) for path in paths]
    dicom = decode_files([p for p, picture in zip(paths, pictures) if not picture], options)
    from_dicom = iter(dicom.files)
    images: list[np.ndarray] = []
    files: list[Decoded] = []
    for path, picture in zip(paths, pictures):
        if picture:
            try:
                image, outcome = read_picture(path, options), Decoded(len(images))
            except DicomReadError as exc:  # PictureReadError, or the shared file checks
                image, outcome = None, Decoded(None, exc.reason, exc.detail)
        else:
            outcome = next(from_dicom)
            image = None if outcome.row is None else dicom.images[outcome.row]
            if image is not None:
                outcome = replace(outcome, row=len(images))
        if image is not None:
            images.append(image)
        files.append(outcome)
    stacked = np.stack(images) if images else np.empty((0, options.image_size, options.image_size), np.float32)
    return stacked, files


def write_predictions(result: Predictions, out: Path, formats: tuple[str, ...]) -> list[Path]:
    """The predictions as ``out`` with each format's suffix, the skipped files beside
    them, and with labels the metrics and a reliability plot; returns the files written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    columns = ["path", "sop_instance_uid", *(f"p_{c}" for c in result.classes), "decision"]
    columns += ["label"] if result.labels_from else []
    if "csv" in formats:
        written.append(_write_csv(out.with_suffix(".csv"), columns, result.rows))
    if "json" in formats:
        document = {
            "classes": list(result.classes),
            "predictions": result.rows,
            "skipped": [_skipped_row(s) for s in result.skipped],
            "metrics": result.metrics,
        }
        path = out.with_suffix(".json")
        path.write_text(json.dumps(document, indent=2, allow_nan=True) + "\n")
        written.append(path)
    skipped = out.with_name(f"{out.stem}-skipped.csv")
    written.append(
        _write_csv(skipped, ["path", "label", "reason", "detail"], [_skipped_row(s) for s in result.skipped])
    )
    if result.metrics is not None:
        metrics = out.with_name(f"{out.stem}-metrics.json")
        metrics.write_text(json.dumps(result.metrics, indent=2, allow_nan=True) + "\n")
        plot = out.with_name(f"{out.stem}-reliability.png")
        plot.write_bytes(reliability_plot(result.metrics["calibration"]))
        written += [metrics, plot]
    return written


def _skipped_row(outcome: FileOutcome) -> dict:
    return {
        "path": outcome.path,
        "label": outcome.label or "",
        "reason": outcome.reason.value if outcome.reason else "",
        "detail": outcome.detail,
    }


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def reliability_plot(table: dict) -> bytes:
    """Accuracy against confidence per bin (the diagonal is perfect calibration), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in table["bins"] if b["count"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    ax.bar(
        [b["low"] for b in bins],
        [b["accuracy"] for b in bins],
        width=[b["high"] - b["low"] for b in bins],
        align="edge",
        alpha=0.6,
        edgecolor="black",
        label="accuracy in bin",
    )
    ax.plot(
        [b["confidence"] for b in bins],
        [b["accuracy"] for b in bins],
        marker="o",
        color="C1",
        label="mean confidence in bin",
    )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence (probability of the decided class)",
        ylabel="accuracy",
        title=f"Reliability, ECE {table['expected_calibration_error']:.3f}",
    )
    ax.legend(loc="upper left", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
