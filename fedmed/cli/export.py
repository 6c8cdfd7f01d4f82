"""``fedmed export MODEL``: the model as a file another inference stack can load."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmed.export import EXPORT_FORMATS, TOLERANCE, export_model


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "export",
        help="write a finished model as TorchScript or ONNX",
        description=(
            "Write the model in MODEL (a run's model folder) as a file that loads without fedmed: "
            "TorchScript (torch.jit.load) or ONNX (needs the onnx extra; not for the scattering "
            "front-end). It takes float32 images (N, 1, S, S) preprocessed as preprocessing.json, written "
            "beside it, says, and returns each class's probability. Before writing, the export is checked "
            f"to give fedmed's probabilities within {TOLERANCE:g}."
        ),
    )
    p.add_argument("model", type=Path, metavar="MODEL", help="a run's model folder (RUN_DIR/model)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="torchscript", help="default torchscript")
    p.add_argument("--out", type=Path, default=None, help="output folder (default MODEL/export)")
    p.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    for path in export_model(args.model, args.format, args.out):
        print(f"wrote {path}")
    return 0
