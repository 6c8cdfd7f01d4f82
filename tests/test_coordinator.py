"""The coordinator's checks on site replies, with real Flower messages."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedmed.config import RunSettings
from fedmed.flower import protocol
from fedmed.flower.coordinator import FederatedRun
from fedmed.flower.fedavg import SiteUpdate, server_step, weighted_average
from fedmed.flower.packing import pack, unpack, vector_to_record
from fedmed.flower.protocol import RoundStatus
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity():
    """Inside a ServerApp, Flower sets the run and node ids that new messages carry."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def _reply(run: FederatedRun, node: int, name: str, arrays: ArrayRecord | None, **metrics) -> Message:
    request = run._message(MessageType.TRAIN, node, run.reference, 1)
    request.metadata.__dict__["_message_id"] = f"m{node}"
    content = RecordDict({
        protocol.METRICS: MetricRecord({"status": RoundStatus.TRAINED, "examples": 10, **metrics}),
        protocol.SITE: ConfigRecord({"name": name, "message": ""}),
    })
    if arrays is not None:
        content[protocol.ARRAYS] = arrays
    reply = Message(content, reply_to=request)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def test_poisoned_updates_are_dropped_and_the_average_stays_finite(tmp_path):
    run = FederatedRun(grid=None, run=RunSettings(run_dir=str(tmp_path), width=8, image_size=16))
    vector = pack(run.reference)
    good = vector_to_record(vector + 0.01)
    nan = vector.copy()
    nan[-1] = np.nan
    extra = ArrayRecord({"model": Array(vector), "secret": Array(np.zeros((16, 16), dtype=np.float32))})
    replies = [
        _reply(run, 1, "good", good),
        _reply(run, 2, "nan", vector_to_record(nan)),
        _reply(run, 3, "short", vector_to_record(vector[:-3])),
        _reply(run, 4, "float64", vector_to_record(vector.astype(np.float64))),
        _reply(run, 5, "extra", extra),
        _reply(run, 6, "leaky", good, **{"per-sample-loss-0": 0.3}),
        _reply(run, 7, "no-count", good, examples=0),
    ]
    outcome = run._collect(1, {reply.metadata.src_node_id: reply for reply in replies}, missing=[8])
    assert [u.site for u in outcome.updates] == ["good"]
    assert "non-finite" in outcome.rejected["nan"]
    assert f"expected float32[{vector.size}]" in outcome.rejected["short"]
    assert "float64" in outcome.rejected["float64"]
    assert "expected one array named 'model'" in outcome.rejected["extra"]
    assert "whitelist" in outcome.rejected["leaky"]
    assert "example count" in outcome.rejected["no-count"]
    assert outcome.missing == ["node-8"]
    averaged = weighted_average(outcome.updates)
    assert all(np.isfinite(a).all() for a in averaged.values())
    audit = run.run_dir.received()
    assert len(audit) == len(replies)
    assert {r["site"] for r in audit} == {"good", "nan", "short", "float64", "extra", "leaky", "no-count"}


def test_the_model_travels_as_one_vector_and_unpacks_exactly(tmp_path):
    run = FederatedRun(grid=None, run=RunSettings(run_dir=str(tmp_path), width=8, image_size=16))
    message = run._message(MessageType.TRAIN, 1, run.reference, 1)
    assert list(message.content[protocol.ARRAYS].keys()) == ["model"]
    restored = unpack(message.content[protocol.ARRAYS]["model"].numpy(), run.reference)
    assert list(restored) == list(run.reference)
    assert all(np.array_equal(restored[k], run.reference[k]) for k in run.reference)


def test_budget_exhausted_sites_are_counted_not_failed(tmp_path):
    run = FederatedRun(grid=None, run=RunSettings(run_dir=str(tmp_path), width=8, image_size=16))
    refused = _reply(run, 1, "spent", None, status=RoundStatus.BUDGET_EXHAUSTED)
    outcome = run._collect(1, {1: refused}, missing=[])
    assert outcome.budget_exhausted == ["spent"] and not outcome.rejected and not outcome.failed


def test_fedavg_weights_by_examples():
    a = {"w": np.array([0.0, 1.0], dtype=np.float32)}
    b = {"w": np.array([4.0, 5.0], dtype=np.float32)}
    averaged = weighted_average([SiteUpdate("a", 30, a), SiteUpdate("b", 10, b)])
    np.testing.assert_allclose(averaged["w"], [1.0, 2.0])
    assert averaged["w"].dtype == np.float32


def test_the_server_step_is_fedavg_by_default_and_fedavgm_with_momentum():
    current = {"w": np.array([0.0, 0.0], dtype=np.float32), "n": np.array([3], dtype=np.int64)}
    average = {"w": np.array([1.0, -2.0], dtype=np.float32), "n": np.array([4], dtype=np.int64)}
    plain, velocity = server_step(current, average, None)
    assert plain is average and velocity is None
    first, velocity = server_step(current, average, None, learning_rate=2.0, momentum=0.5)
    np.testing.assert_allclose(first["w"], [2.0, -4.0])  # 2 x the move
    assert first["n"] is average["n"] and first["w"].dtype == np.float32
    second, velocity = server_step(first, {"w": first["w"] + 1.0, "n": average["n"]}, velocity,
                                   learning_rate=2.0, momentum=0.5)
    np.testing.assert_allclose(velocity["w"], [1.5, 0.0])  # 0.5 x (1, -2) + the new move (1, 1)
    np.testing.assert_allclose(second["w"], [5.0, -4.0])


def test_the_server_velocity_is_checkpointed_for_resume(tmp_path):
    settings = RunSettings(run_dir=str(tmp_path), width=8, image_size=16, rounds=3, server_momentum=0.9)
    first = FederatedRun(grid=None, run=settings)
    velocity = {name: np.full_like(array, 0.25) for name, array in first.reference.items()}
    first.run_dir.save_checkpoint(1, first.reference, velocity)
    resumed = FederatedRun(grid=None, run=dataclasses.replace(settings, start_round=2))
    state, start = resumed._starting_point()
    assert start == 2 and set(state) == set(first.reference)
    assert all(np.array_equal(resumed.velocity[k], velocity[k]) for k in velocity)


class _DwindlingGrid:
    """Flower's Grid as the coordinator uses it, with a site that leaves: two sites are
    connected when the run starts, one by the time the round begins; every message it is
    asked to send is kept (none should be, here)."""

    def __init__(self) -> None:
        self.calls = 0
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return [11, 12] if self.calls == 1 else [11]

    def push_messages(self, messages):
        self.sent += list(messages)
        return [f"id-{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        return []


def test_with_too_few_sites_connected_no_site_is_asked_to_train(tmp_path):
    """A round with fewer sites than min_sites would be discarded after the sites paid for
    it: the coordinator waits for sites instead, and gives up without sending anything."""
    grid = _DwindlingGrid()
    run = FederatedRun(grid=grid, run=RunSettings(run_dir=str(tmp_path), width=8, image_size=16, min_sites=2,
                                                  site_wait_timeout=1.0, round_timeout=1.0))
    run.names.update({11: "site-1", 12: "site-2"})  # known already: no name query either
    with pytest.raises(TimeoutError, match="only 1 of the minimum 2 sites connected"):
        run._rounds()
    assert grid.calls > 2, "the run started with two sites, then waited for the second to come back"
    assert grid.sent == []
    assert run.run_dir.status()["phase"] == "waiting"
