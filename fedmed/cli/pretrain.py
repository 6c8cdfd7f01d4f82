"""``fedmed pretrain DATA --out MODEL``: a starting model from public data (the work
itself: ``fedmed.pretrain``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmed.config import DeviceSettings, PretrainSettings, RunSettings
from fedmed.config.command_line import add_options, given
from fedmed.config.fields import build

MODEL_OPTIONS = ("classes", "image_size", "depth", "width", "frontend", "seed")  # what the run must match


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "pretrain",
        help="train a starting model on PUBLIC data (no privacy spent)",
        description="Train fedmed's network without differential privacy on a public data set (a MedMNIST-style "
        ".npz, a DICOM folder or manifest, or a folder of PNG/JPEG images by class) and write a model "
        "folder whose card names the public source. Start a federation from it with "
        "--initial-model MODEL; give the same model settings as the run. Never give a site's data: "
        "it would leave without any privacy protection.",
    )
    p.add_argument("data", type=Path, metavar="DATA", help="the public data")
    p.add_argument("--out", type=Path, required=True, metavar="MODEL", help="the model folder to write")
    add_options(p, RunSettings, "the model (as the federated run's)", only=MODEL_OPTIONS)
    add_options(
        p, PretrainSettings, "pre-training", only=tuple(f for f in PretrainSettings.__dataclass_fields__ if f != "data")
    )
    add_options(p, DeviceSettings, "this machine")
    p.set_defaults(handler=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    from fedmed.device import resolve_device
    from fedmed.pretrain import pretrain_public  # torch: only when pre-training

    run = build(RunSettings, given(args, RunSettings), "command line")
    settings = build(PretrainSettings, {**given(args, PretrainSettings), "data": str(args.data)}, "command line")
    device = resolve_device(build(DeviceSettings, given(args, DeviceSettings), "command line").device)
    if (args.out / "model.npz").exists():
        raise FileExistsError(f"{args.out} already holds a model; choose another --out")
    print(f"pre-training on {device}", flush=True)

    def show(record) -> None:
        val = (
            f"validation AUROC {record.val_auroc:.3f}, balanced accuracy {record.val_balanced_accuracy:.3f}"
            if record.val_auroc is not None
            else "no validation split"
        )
        print(
            f"epoch {record.epoch}/{settings.epochs}: loss {record.train_loss:.4f}, learning rate "
            f"{record.learning_rate:.4f}; {val}",
            flush=True,
        )

    out = pretrain_public(run, settings, args.out, show, device=device)
    print(
        f"public model: {out} (model card: {out / 'model_card.md'}); no privacy budget was spent.\n"
        f"Start a federation from it: fedmed-server --initial-model {out} (same model settings)"
    )
    return 0
