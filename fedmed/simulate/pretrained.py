"""A scenario's public starting model: pre-trained once on the scenario's public data, then
the start of the federation and of every baseline, so all rows begin from the same weights."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

from fedmed.model import ModelConfig
from fedmed.rundir import MODEL_FILE
from fedmed.simulate.scenario import Scenario
from fedmed.simulate.sites import write_public_pool

SYNTHETIC = "synthetic"  # pretrain.data: the synthetic generator's public pool


def public_data(scenario: Scenario, out: Path) -> Path:
    """The scenario's public data file or folder (the synthetic pool is written on first use)."""
    if scenario.pretrain.data == SYNTHETIC:
        return write_public_pool(out / "public", scenario.simulation.seed)
    path = Path(scenario.pretrain.data).resolve()
    if not path.exists():
        raise FileNotFoundError(f"pretrain.data {path} not found")
    return path


def pretrained_model(scenario: Scenario, out: Path, device: str = "cpu") -> Path:
    """The public model for ``scenario``: trained now on ``device``, or reused from an
    earlier simulation under ``out`` with the same public data, pre-training settings and
    architecture."""
    data = public_data(scenario, out)
    settings = replace(scenario.pretrain, data=str(data))
    stat = data.stat()
    key = json.dumps(
        {
            "pretrain": asdict(settings),
            "data": [stat.st_size, stat.st_mtime_ns],
            "model": asdict(ModelConfig.from_settings(scenario.run)),
            "classes": scenario.run.classes,
            "seed": scenario.run.seed,
        },
        sort_keys=True,
    )
    folder = out / "pretrained" / hashlib.sha256(key.encode()).hexdigest()[:12]
    if (folder / MODEL_FILE).is_file():
        print(f"public model: reusing {folder} (pre-trained earlier on {data.name})", flush=True)
        return folder
    from fedmed.pretrain import pretrain_public  # torch: only when pre-training

    print(f"pre-training on public data {data} ({settings.epochs} epochs, no site data) ...", flush=True)

    def show(record) -> None:
        val = f", public validation AUROC {record.val_auroc:.3f}" if record.val_auroc is not None else ""
        print(f"  public epoch {record.epoch}/{settings.epochs}: loss {record.train_loss:.4f}{val}", flush=True)

    return pretrain_public(scenario.run, settings, folder, show, device=device)
