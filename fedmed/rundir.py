"""A federated run's directory: the coordinator's record of one training run.

    config.json            the run's settings as Flower run config (RunSettings.to_flower)
    status.json            phase, current round, connected sites (for live progress)
    metrics.jsonl          one JSON object per event: a round's training, a validation (fedmed.records)
    received.jsonl         what each site's reply contained (names, shapes, scalars)
    checkpoints/round-NNNN.npz   the global model after every round
    checkpoints/velocity-NNNN.npz the server momentum after that round (FedAvgM only)
    model/model.npz        the final model (named float arrays, no pickled code)
    model/model_card.json  architecture, preprocessing, classes, data and privacy per site
    model/model_card.md    the same for people
    metrics.csv            one row per round, for spreadsheets (fedmed.coordinator.results)
    tensorboard/           the same as TensorBoard event files, when tensorboard is installed
    flower-runs.jsonl      the Flower runs that carried this fedmed run (one per start or resume)
    identities.json        with site keys: the site name each registered key's node id is bound to
    device.json            where the coordinator scores its held-out set (its resources.device)
    logs/, server.log      the SuperLink's and the ServerApp's logs
    .flwr/, app/           Flower's config for this run and the app spec it submits

Everything in it is the coordinator operator's alone: every folder is 0700 and every file
fedmed writes 0600 (``fedmed.files``), made so on every write, so a run directory from an
earlier fedmed becomes private when it is resumed. The processes fedmed starts in it
(``fedmed.deploy.processes``) create their own files owner-only as well.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np

from fedmed.files import open_append, private_dir, write_atomic
from fedmed.records import Record, RoundRecord, ValidationRecord, read_record

CHECKPOINT = re.compile(r"round-(\d+)\.npz")

MODEL_FILE = "model.npz"  # the final model in RUN_DIR/model
CARD_FILE = "model_card.json"  # its model card


class RunDirectory:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def received_path(self) -> Path:
        return self.path / "received.jsonl"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def private(self, path: Path) -> Path:
        """``path``, in this run directory, with every folder from the run's own down to
        its parent made owner-only (created if missing)."""
        folder = private_dir(self.path)
        for part in path.parent.relative_to(self.path).parts:
            folder = private_dir(folder / part)
        return path

    def add_flower_run(self, flower_run: str, start_round: int) -> None:
        self._append_line(self.path / "flower-runs.jsonl", {"flower_run": flower_run, "start_round": start_round})

    def flower_runs(self) -> list[str]:
        return [str(r["flower_run"]) for r in _read_lines(self.path / "flower-runs.jsonl") if "flower_run" in r]

    def write_config(self, config: dict) -> None:
        write_atomic(self.private(self.config_path), _json_bytes(config))

    def read_config(self) -> dict:
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a fedmed run directory (no config.json)")
        return json.loads(self.config_path.read_text(encoding="utf-8"))

    def write_identities(self, names: dict[int, str]) -> None:
        """The site name bound to each node id at key registration (this SuperLink's ids)."""
        names_json = _json_bytes({str(node): name for node, name in names.items()})
        write_atomic(self.private(self.path / "identities.json"), names_json)

    def identities(self) -> dict[int, str]:
        """Node id -> bound site name; empty when sites are not authenticated by key."""
        path = self.path / "identities.json"
        if not path.is_file():
            return {}
        return {int(node): str(name) for node, name in json.loads(path.read_text(encoding="utf-8")).items()}

    def write_device(self, device: str) -> None:
        """The coordinator's device for its own held-out scoring, checked when the command
        started (``auto``, which cannot fail, is resolved by the ServerApp). The ServerApp
        reads it here because the run's settings go to every site, and a site's device is
        the site's own choice."""
        write_atomic(self.private(self.path / "device.json"), _json_bytes({"device": device}))

    def device(self) -> str:
        """The coordinator's device (the CPU for a run directory written without one)."""
        path = self.path / "device.json"
        if not path.is_file():
            return "cpu"
        return str(json.loads(path.read_text(encoding="utf-8"))["device"])

    def write_status(self, **status) -> None:
        write_atomic(self.private(self.status_path), _json_bytes(status))

    def status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def append_metrics(self, record: dict) -> None:
        self._append_line(self.metrics_path, record)

    def append_record(self, record: Record) -> None:
        """A round's or a validation's record, as a line of metrics.jsonl."""
        self.append_metrics(record.to_json())

    def append_received(self, record: dict) -> None:
        self._append_line(self.received_path, record)

    def _append_line(self, path: Path, record: dict) -> None:
        with open_append(self.private(path)) as handle:
            handle.write((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
            handle.flush()

    def metrics(self) -> list[dict]:
        """Every line of metrics.jsonl as written (``records`` reads them as records)."""
        return _read_lines(self.metrics_path)

    def records(self) -> list[Record]:
        """The round and validation records of metrics.jsonl, in the order they were written
        (a round repeated after a restart appears once per time it ran)."""
        return [record for line in self.metrics() if (record := read_record(line)) is not None]

    def rounds(self) -> list[RoundRecord]:
        return [record for record in self.records() if isinstance(record, RoundRecord)]

    def validations(self) -> list[ValidationRecord]:
        return [record for record in self.records() if isinstance(record, ValidationRecord)]

    def received(self) -> list[dict]:
        return _read_lines(self.received_path)

    def save_checkpoint(
        self, round_number: int, state: dict[str, np.ndarray], velocity: dict[str, np.ndarray] | None = None
    ) -> Path:
        """Save the global model after ``round_number`` (and the server velocity, if any).

        The velocity is written first, so a model checkpoint never lacks the velocity it needs.
        """
        if velocity is not None:
            write_atomic(self.private(self._velocity_path(round_number)), _npz_bytes(velocity))
        path = self.path / "checkpoints" / f"round-{round_number:04d}.npz"
        write_atomic(self.private(path), _npz_bytes(state))
        return path

    def server_velocity(self, round_number: int) -> dict[str, np.ndarray] | None:
        """The server momentum saved with the checkpoint of ``round_number``, if any."""
        path = self._velocity_path(round_number)
        return load_arrays(path) if path.is_file() else None

    def _velocity_path(self, round_number: int) -> Path:
        return self.path / "checkpoints" / f"velocity-{round_number:04d}.npz"

    def last_checkpoint(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """The latest round with a saved global model, and that model."""
        rounds = sorted(
            int(m.group(1))
            for p in (self.path / "checkpoints").glob("round-*.npz")
            if (m := CHECKPOINT.fullmatch(p.name))
        )
        if not rounds:
            return None
        return rounds[-1], load_arrays(self.path / "checkpoints" / f"round-{rounds[-1]:04d}.npz")

    def write_final_model(self, state: dict[str, np.ndarray], card: dict, card_text: str) -> None:
        self.private(self.model_dir / MODEL_FILE)
        write_model_folder(self.model_dir, state, card, card_text)


def write_model_folder(folder: Path, state: dict[str, np.ndarray], card: dict, card_text: str) -> None:
    """A model folder as ``fedmed predict`` and ``--initial-model`` read it: the weights,
    the model card and the card for people."""
    write_atomic(folder / MODEL_FILE, _npz_bytes(state))
    write_atomic(folder / CARD_FILE, _json_bytes(card))
    write_atomic(folder / "model_card.md", card_text.encode("utf-8"))


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Named arrays from a checkpoint or final model (never unpickles objects)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _npz_bytes(state: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **state)  # every reader loads with allow_pickle=False too
    return buffer.getvalue()


def _json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, allow_nan=True) + "\n").encode("utf-8")


def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return records
