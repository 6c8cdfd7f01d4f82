"""The coordinator's own held-out set (``run.server_eval_data``), scored exactly and at no
privacy cost: no site's data is involved. It is scored where the coordinator's model is,
on the coordinator's own ``resources.device`` (``RunDirectory.device``): the run's
settings, which every site receives, carry no device."""

from __future__ import annotations

import numpy as np
from torch import nn

from fedmed.config import RunSettings
from fedmed.model import fixed_inputs
from fedmed.weights import load_state


def load_server_eval(run: RunSettings, model: nn.Module) -> tuple[np.ndarray, np.ndarray] | None:
    """The coordinator's own held-out set, if it has one, as ``model`` is fed it
    (``fedmed.model.fixed_inputs``, computed on the model's device), with its labels."""
    if not run.server_eval_data:
        return None
    from fedmed.data.cache import default_cache_dir
    from fedmed.data.dicom import ReadOptions
    from fedmed.data.site import SiteSource, load_site

    data = load_site(
        SiteSource.from_path(run.server_eval_data, run.class_names),
        ReadOptions(image_size=run.image_size),
        default_cache_dir(),
    )
    if len(data) == 0:
        raise ValueError(f"server evaluation data {run.server_eval_data} has no usable images")
    return fixed_inputs(model, np.asarray(data.images)), data.labels


def evaluate_held_out(model: nn.Module, state: dict[str, np.ndarray], held_out: tuple[np.ndarray, np.ndarray]) -> dict:
    """``state``'s scores on the held-out set, with its size, computed on ``model``'s device."""
    from fedmed.train import evaluate

    load_state(model, state)
    images, labels = held_out
    scores = evaluate(model, images, labels)
    return {k: v for k, v in scores.items() if isinstance(v, float)} | {"examples": int(len(labels))}
