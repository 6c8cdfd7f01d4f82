"""The model travels as one flat float32 vector in an ArrayRecord under the key ``model``.

Flower moves every array of a message as a separate object, one request per array on
each hop (coordinator, SuperLink, SuperNode, ClientApp and back); a ResNet's ~60 tensors
cost seconds per round that way. Both ends build the same model from the run's settings,
so the order and shapes of its tensors are known on each side and one vector suffices.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

MODEL = "model"
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
        raise ValueError(f"the model vector is {vector.dtype}{list(vector.shape)}, expected float32[{expected}] "
                         "(a different model or settings)")
    state, start = {}, 0
    for name, array in reference.items():
        state[name] = vector[start : start + array.size].reshape(array.shape).copy()
        start += array.size
    return state


def vector_to_record(vector: np.ndarray) -> ArrayRecord:
    return ArrayRecord({MODEL: Array(vector)})


def record_to_vector(record: ArrayRecord) -> np.ndarray:
    if list(record.keys()) != [MODEL]:
        raise ValueError(f"expected one array named {MODEL!r}, got {', '.join(record.keys()) or 'none'}")
    return record[MODEL].numpy()
