"""``fedmed export MODEL``: the model as a file another inference stack can load.

Only :mod:`fedmed.export`'s constants are read here; torch is imported when a model is
exported, so building ``fedmed``'s parser stays light."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmed.export import DEFAULT_FORMAT, EXPORT_FORMATS, LEGACY_FORMATS, TOLERANCE


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "export",
        help="write a finished model as a torch.export program (.pt2), ONNX or legacy TorchScript",
        description=(
            "Write the model in MODEL (a run's model folder) as a file that loads without fedmed: "
            "pt2, the default (torch.export.load(path).module()), ONNX through torch's dynamo-based "
            "exporter (needs the onnx extra), or TorchScript (legacy: deprecated by torch, offered only "
            "while the installed torch has it). It takes float32 images (N, 1, S, S) preprocessed as "
            "preprocessing.json, written beside it, says, and returns each class's probability. Before "
            f"writing, the export is checked to give fedmed's probabilities within {TOLERANCE:g}."
        ),
    )
    p.add_argument("model", type=Path, metavar="MODEL", help="a run's model folder (RUN_DIR/model)")
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default=DEFAULT_FORMAT,
        help=f"default {DEFAULT_FORMAT}; {', '.join(LEGACY_FORMATS)} is legacy",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default MODEL/export)")
    p.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from fedmed.export import export_model

    if args.format in LEGACY_FORMATS:
        print(f"note: {args.format} is legacy (deprecated by torch); --format pt2 is the default", file=sys.stderr)
    for path in export_model(args.model, args.format, args.out):
        print(f"wrote {path}")
    return 0
