"""A model as one flat float32 vector: how fedmed sends, stores and hashes weights.

Both ends of a run build the same model from the run's settings, so the order and shapes of
its tensors are known on each side and one vector of its numbers suffices. This module
loads torch only to count a model's numbers, and never at import.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from fedmed.config import RunSettings

if TYPE_CHECKING:
    from fedmed.model import ModelConfig

DTYPE = np.float32


def pack(state: dict[str, np.ndarray]) -> np.ndarray:
    """The state's tensors, in order, as one float32 vector."""
    odd = [name for name, array in state.items() if array.dtype != DTYPE]
    if odd:
        raise ValueError(f"only float32 models can be sent; not float32: {', '.join(odd)}")
    return np.concatenate([np.ravel(array) for array in state.values()]) if state else np.zeros(0, DTYPE)


def unpack(vector: np.ndarray, reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split a received vector into the reference model's tensors (copies)."""
    expected = sum(array.size for array in reference.values())
    if vector.dtype != DTYPE or vector.ndim != 1 or vector.size != expected:
        raise ValueError(
            f"the model vector is {vector.dtype}{list(vector.shape)}, expected float32[{expected}] "
            "(a different model or settings)"
        )
    state, start = {}, 0
    for name, array in reference.items():
        state[name] = vector[start : start + array.size].reshape(array.shape).copy()
        start += array.size
    return state


def packed_size(run: RunSettings) -> int:
    """How many numbers the packed model of ``run`` holds: its network's parameters and
    buffers, counted once per architecture."""
    from fedmed.model import ModelConfig  # torch: only a site or coordinator counting a model loads it

    return _packed_size(ModelConfig.from_settings(run))


@cache
def _packed_size(config: ModelConfig) -> int:
    """Counted on torch's "meta" device: shapes only, no memory for the weights, so an
    architecture at the settings' bounds costs nothing to count."""
    import torch

    from fedmed.model import build_model

    with torch.device("meta"):
        model = build_model(config)
    return sum(tensor.numel() for tensor in model.state_dict().values())
