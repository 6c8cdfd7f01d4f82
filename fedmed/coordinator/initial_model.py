"""Starting a run from an earlier model (``--initial-model``, ``data.initial_model``): a
previous run's model folder, or a ``model.npz`` of weights pre-trained on public data.

The architecture must be the run's: a mismatch is an error that names it, never a silent
change of architecture."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fedmed.config import RunSettings
from fedmed.coordinator.model_card import weights_sha256
from fedmed.model import ModelConfig, build_model, card_architecture
from fedmed.rundir import CARD_FILE, MODEL_FILE, load_arrays
from fedmed.weights import check_state, model_state


def load_initial_model(run: RunSettings) -> tuple[dict[str, np.ndarray], dict]:
    """The weights ``run.initial_model`` names, checked against the run's architecture,
    and a record of where they came from for the model card."""
    path = Path(run.initial_model)
    weights = path / MODEL_FILE if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(
            f"initial model {path} not found: give a run's model folder (RUN_DIR/model) or a model.npz file"
        )
    card_path = weights.parent / CARD_FILE
    card = json.loads(card_path.read_text()) if card_path.is_file() else None
    expected = asdict(ModelConfig.from_settings(run))
    if card is not None:
        stored = card_architecture(card["architecture"])  # a card without J: the rule's J for its size
        differences = [
            f"{key} {stored.get(key)!r} there, {value!r} in this run"
            for key, value in expected.items()
            if stored.get(key) != value
        ]
        if differences:
            raise ValueError(
                f"initial model {weights} has another architecture than this run: "
                f"{'; '.join(differences)} (set the run's model settings to match it)"
            )
    try:
        state = load_arrays(weights)
    except (OSError, ValueError) as exc:
        raise ValueError(f"initial model {weights} is not a readable .npz of named arrays: {exc}") from exc
    problems = check_state(state, model_state(build_model(ModelConfig(**expected))))
    if problems:
        raise ValueError(
            f"initial model {weights} does not fit this run's architecture ({expected}): {'; '.join(problems)}"
        )
    origin = {
        "source": str(weights.resolve()),
        "weights_sha256": weights_sha256(state),
        "run_id": card.get("run_id") if card else None,
    }
    public = card.get("public_pretraining") if card else None
    if public:  # carried forward: the federation's card names the public source it started from
        origin["public"] = {key: public[key] for key in ("data", "source", "terms", "citation")}
    return state, origin
