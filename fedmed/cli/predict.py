"""``fedmed predict MODEL DATA``: a finished model on a hospital's own studies."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmed.config import DeviceSettings
from fedmed.config.command_line import add_options, given
from fedmed.config.fields import build
from fedmed.device import resolve_device
from fedmed.inference import FORMATS, list_studies, load_model_dir, predict_studies, write_predictions
from fedmed.numbers import format_number


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "predict",
        help="score DICOM (or PNG/JPEG) studies with a finished model",
        description=(
            "Score every DICOM, PNG or JPEG file of DATA with the model in MODEL (a run's model folder, "
            "RUN_DIR/model). "
            "DATA is a folder of any layout, a CSV manifest with a 'path' column and an optional 'label' "
            "column, or one file. Files are read and preprocessed as in training; files that cannot be "
            "used are listed with their reason and never stop the others; source files are only read. "
            "When every file is in a folder named after one of the model's classes, or the manifest "
            "labels every file, the metrics are computed too: AUROC, balanced accuracy, sensitivity, "
            "specificity, the confusion matrix and the expected calibration error, with a reliability plot."
        ),
    )
    p.add_argument("model", type=Path, metavar="MODEL", help="a run's model folder (RUN_DIR/model)")
    p.add_argument(
        "data", type=Path, metavar="DATA", help="folder of DICOM/PNG/JPEG files, CSV manifest or one such file"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("predictions.csv"),
        help="where the predictions go; each format gets its own suffix, and the skipped files, "
        "metrics and reliability plot are written beside it (default predictions.csv)",
    )
    p.add_argument(
        "--format", default="csv", help=f"comma-separated output formats: {', '.join(FORMATS)} (default csv)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_options(p, DeviceSettings, "this machine")
    p.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"--format takes {', '.join(FORMATS)} (comma-separated), got {args.format!r}")
    device = resolve_device(build(DeviceSettings, given(args, DeviceSettings), "command line").device)
    loaded = load_model_dir(args.model, device)
    studies, skipped, labels_from = list_studies(args.data, loaded.classes)
    if not args.quiet:
        print(
            f"scoring {len(studies)} files from {args.data} with {loaded.path} "
            f"({', '.join(loaded.classes)}; labels: {labels_from or 'none'}) on {device}",
            file=sys.stderr,
        )

    def progress(done: int, total: int) -> None:
        if not args.quiet:
            print(f"  {done}/{total} files read and scored", file=sys.stderr)

    result = predict_studies(loaded, studies, skipped, labels_from, progress)
    written = write_predictions(result, args.out, formats)
    print(f"{len(result.rows)} files scored, {len(result.skipped)} skipped")
    for outcome in result.skipped:
        print(f"  skipped {outcome.path}: {outcome.reason.value if outcome.reason else ''} {outcome.detail}".rstrip())
    if result.metrics is not None:
        m = result.metrics
        print(
            f"labels from {labels_from}: AUROC {format_number(m['auroc'], 3)}, balanced accuracy "
            f"{format_number(m['balanced_accuracy'], 3)}, sensitivity {format_number(m.get('sensitivity'), 3)}, "
            f"specificity {format_number(m.get('specificity'), 3)}, expected calibration error "
            f"{format_number(m['calibration']['expected_calibration_error'], 3)}"
        )
        print(
            f"confusion matrix (rows: label, columns: decision; {', '.join(loaded.classes)}): {m['confusion_matrix']}"
        )
    for path in written:
        print(f"wrote {path}")
    return 0 if result.rows else 1
