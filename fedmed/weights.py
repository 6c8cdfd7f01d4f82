"""The model state that leaves a site: plain named float arrays, checked on arrival."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class InvalidWeights(ValueError):
    """An incoming model state that must not be loaded or averaged."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside an Opacus GradSampleModule (whose keys start "_module.")."""
    return getattr(model, "_module", model)


def model_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The network's parameters and buffers as named arrays, under the plain model's keys."""
    return {name: t.detach().cpu().numpy().copy() for name, t in unwrap(model).state_dict().items()}


def check_state(state: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> list[str]:
    """Every way ``state`` differs from ``reference`` in keys, shapes, dtypes or finiteness."""
    problems = []
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing:
        problems.append(f"missing arrays: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected arrays: {', '.join(extra)}")
    for name in sorted(set(state) & set(reference)):
        array, expected = np.asarray(state[name]), reference[name]
        if array.shape != expected.shape:
            problems.append(f"{name}: shape {array.shape}, expected {expected.shape}")
        elif array.dtype != expected.dtype:
            problems.append(f"{name}: dtype {array.dtype}, expected {expected.dtype}")
        elif np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            problems.append(f"{name}: {int((~np.isfinite(array)).sum())} non-finite values")
    return problems


def load_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Load ``state`` into ``model`` after checking it; raise InvalidWeights if it does not fit."""
    problems = check_state(state, model_state(model))
    if problems:
        raise InvalidWeights("; ".join(problems))
    unwrap(model).load_state_dict({name: torch.from_numpy(np.asarray(array)) for name, array in state.items()})
