"""A run's per-round results in the tools people already open: ``metrics.csv`` (one row
per round) and, when the ``tensorboard`` package is installed, TensorBoard event files in
``RUN_DIR/tensorboard``. Both are derived from ``metrics.jsonl``, which stays the record,
and are owner-only like all of a run directory (``fedmed.rundir``)."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedmed.files import PRIVATE_FILE, private_dir, write_atomic
from fedmed.records import Record, RoundRecord, ValidationRecord
from fedmed.rundir import RunDirectory

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter  # loaded only when tensorboard is installed

log = logging.getLogger("fedmed.coordinator")
SCORES = ("auroc", "balanced_accuracy", "sensitivity", "specificity", "accuracy", "loss")
COLUMNS = (
    "round",
    "aggregated",
    "trained",
    "budget_exhausted",
    "rejected",
    "failed",
    "missing",
    "examples",
    "train_loss",
    "seconds",
    *(f"held_out_{s}" for s in SCORES),
    *(f"sites_val_{s}" for s in SCORES),
    "sites_val_examples",
)


def round_rows(records: Sequence[Record]) -> list[dict]:
    """One row per round; the sites' validation of the model after round r arrives with
    round r + 1's replies (or the final evaluation) and fills row r when it does."""
    validations = {r.round: r.weighted for r in records if isinstance(r, ValidationRecord)}
    rows: dict[int, dict] = {}
    for record in records:
        if not isinstance(record, RoundRecord):
            continue
        held_out = record.server_validation or {}
        row = {
            "round": record.round,
            "aggregated": int(bool(record.aggregated)),
            "examples": record.examples,
            "train_loss": record.train_loss,
            "seconds": record.seconds,
        }
        row |= {
            "trained": len(record.trained),
            "budget_exhausted": len(record.budget_exhausted),
            "rejected": len(record.rejected),
            "failed": len(record.failed),
            "missing": len(record.missing),
        }
        row |= {f"held_out_{s}": held_out.get(s) for s in SCORES}
        sites = validations.get(record.round, {})
        row |= {f"sites_val_{s}": sites.get(f"val-{s.replace('_', '-')}") for s in SCORES}
        row["sites_val_examples"] = sites.get("val-examples")
        rows[record.round] = row  # a round repeated after a restart: the last record holds
    return [rows[number] for number in sorted(rows)]


class RunResults:
    """Keeps ``metrics.csv`` and the TensorBoard log up to date as records are appended."""

    def __init__(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir
        self._writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional extra: fedmed[tensorboard]
            return
        folder = private_dir(run_dir.private(run_dir.path / "tensorboard"))
        self._writer = SummaryWriter(log_dir=str(folder))
        for events in folder.iterdir():  # the writer opens its one event file at once, with the umask's mode
            os.chmod(events, PRIVATE_FILE)

    def record(self, record: Record) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(round_rows(self.run_dir.records()))
        write_atomic(self.run_dir.private(self.run_dir.path / "metrics.csv"), buffer.getvalue().encode("utf-8"))
        if self._writer is not None:
            self._log(self._writer, record)

    @staticmethod
    def _log(writer: SummaryWriter, record: Record) -> None:
        step = record.round
        if isinstance(record, RoundRecord):
            scalars = {
                "train/loss": record.train_loss,
                "train/examples": record.examples,
                "sites/trained": len(record.trained),
                "round/seconds": record.seconds,
            }
            scalars |= {f"held_out/{s}": (record.server_validation or {}).get(s) for s in SCORES}
        else:
            scalars = {f"sites_validation/{s}": record.weighted.get(f"val-{s.replace('_', '-')}") for s in SCORES}
        for tag, value in scalars.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(tag, value, step)
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
