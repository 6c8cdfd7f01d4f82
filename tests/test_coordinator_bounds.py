"""What a coordinator can ask of a site: a model vector is refused on what it declares and
on its byte count before it is deserialised or hashed, in every kind of request."""

from __future__ import annotations

import resource
import time
from unittest import mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedmed import protocol
from fedmed.config import RunSettings
from fedmed.flower import client_app, packing
from fedmed.flower.packing import record_to_vector, vector_to_record
from fedmed.model import ModelConfig, build_model
from fedmed.vector import pack, packed_size
from fedmed.weights import model_state
from tests.test_coordinator import task_identity  # noqa: F401 - the fixture sets Flower's ids

RUN = RunSettings(width=8, image_size=16)


def _size(run: RunSettings) -> int:
    """The run's packed model size, the slow way: a real model with its weights."""
    return pack(model_state(build_model(ModelConfig.from_settings(run)))).size


def _message(array: Array, kind: str = MessageType.TRAIN) -> Message:
    content = RecordDict({protocol.ARRAYS: ArrayRecord({packing.MODEL: array}),
                          protocol.CONFIG: ConfigRecord({"round": 1})})
    return Message(content, dst_node_id=7, message_type=kind)


def _context(run: RunSettings) -> Context:
    return Context(1, 7, {}, RecordDict(), run.to_flower())


def _never_deserialised():
    return mock.patch.object(Array, "numpy", autospec=True,
                             side_effect=AssertionError("the vector was deserialised before its size was checked"))


# A vector that declares 100 M numbers (381 MiB), as a hostile coordinator's: it carries a
# few bytes only, so deserialising it would fail differently from the size check.
HUGE = Array(dtype="float32", shape=(100_000_000,), stype="numpy.ndarray", data=b"\x93NUMPY" + bytes(200))


def test_packed_size_counts_the_real_models_numbers_for_every_front_end():
    for run in (RUN, RunSettings(width=8, image_size=28, depth=10, frontend="scattering",
                                 classes="a,b,c")):
        assert packed_size(run) == _size(run)


def test_packed_size_is_counted_once_per_architecture_without_building_the_weights():
    run = RunSettings(width=256, depth=50, image_size=1024)  # the largest model the settings allow
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    started = time.perf_counter()
    size = packed_size(run)
    assert size == 375_369_474 and time.perf_counter() - started < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 * 1024, "its 1.4 GiB of weights were built"
    with mock.patch("fedmed.model.build_model", side_effect=AssertionError("built again")):
        assert packed_size(run) == size  # cached per architecture: no model built per message


def test_an_oversized_train_request_is_refused_before_it_is_deserialised():
    expected = _size(RUN)
    with _never_deserialised(), pytest.raises(ValueError, match=rf"declares float32\[100000000\].*"
                                                                rf"expected float32\[{expected}\]"):
        client_app._train_request(RUN, _message(HUGE))


def test_an_oversized_evaluate_request_is_refused_before_it_reaches_the_site():
    with _never_deserialised(), mock.patch.object(client_app, "_do", side_effect=AssertionError("site work ran")), \
            pytest.raises(ValueError, match=rf"expected float32\[{_size(RUN)}\]"):
        client_app.evaluate_global(_message(HUGE, MessageType.EVALUATE), _context(RUN))


def test_a_vector_that_understates_its_size_is_refused_on_its_bytes():
    """Flower's declared shape is the sender's word; the bytes are what deserialising copies."""
    size = _size(RUN)
    honest = Array(np.zeros(size, dtype=np.float32))
    lying = Array(dtype=honest.dtype, shape=honest.shape, stype=honest.stype, data=honest.data + bytes(4 * 10**6))
    with _never_deserialised(), pytest.raises(ValueError, match=rf"has {len(lying.data)} bytes; expected "
                                                                rf"float32\[{size}\] \({4 * size} bytes\)"):
        record_to_vector(ArrayRecord({packing.MODEL: lying}), size)


def test_other_types_and_shapes_are_refused_and_the_run_s_model_is_accepted():
    size = _size(RUN)
    for wrong in (np.zeros(size, np.float64), np.zeros((1, size), np.float32), np.zeros(size - 1, np.float32)):
        with pytest.raises(ValueError, match=rf"expected float32\[{size}\]"):
            record_to_vector(vector_to_record(wrong), size)
    vector = np.random.default_rng(0).normal(size=size).astype(np.float32)
    request = client_app._train_request(RUN, _message(Array(vector)))
    assert np.array_equal(request.model, vector) and request.round == 1


def test_a_declared_shape_that_hides_a_larger_array_is_refused_after_loading():
    """Bytes of the right length whose own header names another shape: np.load reads the
    header, not Flower's fields."""
    size = _size(RUN)
    other = Array(np.zeros((2, size // 2), dtype=np.float32)) if size % 2 == 0 else \
        Array(np.zeros((size,), dtype=">f4"))
    disguised = Array(dtype="float32", shape=(size,), stype="numpy.ndarray", data=other.data)
    with pytest.raises(ValueError, match=rf"holds .* though it declares float32\[{size}\]"):
        record_to_vector(ArrayRecord({packing.MODEL: disguised}), size)
