"""The model travels as one flat float32 vector in an ArrayRecord under the key ``model``.

Flower moves every array of a message as a separate object, one request per array on
each hop (coordinator, SuperLink, SuperNode, ClientApp and back); a ResNet's ~60 tensors
cost seconds per round that way. Both ends build the same model from the run's settings,
so the order and shapes of its tensors are known on each side and one vector suffices.

A received vector is checked against the run's model size (``fedmed.vector.packed_size``) on what its
``Array`` declares and on its byte count before it is deserialised: the sender chooses
what arrives, and a vector larger than the model must cost the receiver no copy or hash.
The vector itself is built by ``fedmed.vector``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from fedmed.vector import DTYPE

MODEL = "model"
STYPE = "numpy.ndarray"  # Flower's name for np.save'd bytes (flwr's SType.NUMPY)
NPY_HEADER_MAX = 4096  # np.save's header of a float32 vector is 128 bytes; anything beyond is not a vector


def vector_to_record(vector: np.ndarray) -> ArrayRecord:
    return ArrayRecord({MODEL: Array(vector)})


def record_to_vector(record: ArrayRecord, size: int | None = None) -> np.ndarray:
    """The packed vector of a received record. With ``size`` (the run's ``packed_size``),
    anything but a float32 vector of that many numbers is refused before deserialising;
    without it the caller must check the result itself (the coordinator unpacks it against
    its reference)."""
    if list(record.keys()) != [MODEL]:
        raise ValueError(f"expected one array named {MODEL!r}, got {', '.join(record.keys()) or 'none'}")
    array = record[MODEL]
    if size is None:
        return array.numpy()
    check_declared(array, size)
    vector = array.numpy()
    if vector.dtype != DTYPE or vector.shape != (size,):
        raise ValueError(
            f"the model vector holds {vector.dtype}{list(vector.shape)} though it declares "
            f"{array.dtype}{list(array.shape)}; this run's model is float32[{size}]"
        )
    return vector


def check_declared(array: Array, size: int, dtype: type = DTYPE) -> None:
    """Refuse an array that is not, by its declared type and shape and by its byte count,
    a vector of ``size`` numbers of ``dtype`` (float32: a model; uint64: a masked update):
    checked before ``Array.numpy()`` copies it."""
    item = np.dtype(dtype).itemsize
    expected = f"expected {np.dtype(dtype).name}[{size}] ({size * item} bytes) for this run's model"
    shape = tuple(array.shape) if isinstance(array.shape, (list, tuple)) else (array.shape,)
    if array.stype != STYPE or array.dtype != np.dtype(dtype).name or shape != (size,):
        raise ValueError(
            f"the model vector declares {array.dtype}{list(shape)} ({array.stype}); {expected} "
            "(a different model or settings)"
        )
    if not size * item < len(array.data) <= size * item + NPY_HEADER_MAX:
        raise ValueError(
            f"the model vector has {len(array.data)} bytes; {expected} plus a header of at most {NPY_HEADER_MAX} bytes"
        )
