"""The coordinator's checks on site replies, with real Flower messages."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedmed.flower import protocol
from fedmed.flower.client_app import state_to_arrays
from fedmed.flower.coordinator import FederatedRun
from fedmed.flower.fedavg import SiteUpdate, weighted_average
from fedmed.flower.settings import RunSettings
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity():
    """Inside a ServerApp, Flower sets the run and node ids that new messages carry."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def _reply(run: FederatedRun, node: int, name: str, state: dict | None, **metrics) -> Message:
    request = run._message(MessageType.TRAIN, node, run.reference, 1)
    request.metadata.__dict__["_message_id"] = f"m{node}"
    content = RecordDict({
        protocol.METRICS: MetricRecord({"status": protocol.TRAINED, "examples": 10, **metrics}),
        protocol.SITE: ConfigRecord({"name": name, "message": ""}),
    })
    if state is not None:
        content[protocol.ARRAYS] = state_to_arrays(state)
    reply = Message(content, reply_to=request)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def test_poisoned_updates_are_dropped_and_the_average_stays_finite(tmp_path):
    run = FederatedRun(grid=None, run=RunSettings(run_dir=str(tmp_path), model_width=8, image_size=16))
    good = {k: v + 0.01 for k, v in run.reference.items()}
    nan = {k: v.copy() for k, v in run.reference.items()}
    nan["fc.weight"][0, 0] = np.nan
    wrong_shape = dict(run.reference, **{"fc.bias": np.zeros(3, dtype=np.float32)})
    extra_key = dict(run.reference, secret=np.zeros((16, 16), dtype=np.float32))
    replies = [
        _reply(run, 1, "good", good),
        _reply(run, 2, "nan", nan),
        _reply(run, 3, "shape", wrong_shape),
        _reply(run, 4, "extra", extra_key),
        _reply(run, 5, "leaky", good, **{"per-sample-loss-0": 0.3}),
        _reply(run, 6, "no-count", good, examples=0),
    ]
    outcome = run._collect(1, replies, missing=[7])
    assert [u.site for u in outcome.updates] == ["good"]
    assert "non-finite" in outcome.rejected["nan"]
    assert "shape (3,)" in outcome.rejected["shape"]
    assert "unexpected arrays: secret" in outcome.rejected["extra"]
    assert "whitelist" in outcome.rejected["leaky"]
    assert "example count" in outcome.rejected["no-count"]
    assert outcome.missing == ["node-7"]
    averaged = weighted_average(outcome.updates)
    assert all(np.isfinite(a).all() for a in averaged.values())
    audit = run.run_dir.received()
    assert len(audit) == len(replies) and {r["site"] for r in audit} == {"good", "nan", "shape", "extra",
                                                                        "leaky", "no-count"}


def test_budget_exhausted_sites_are_counted_not_failed(tmp_path):
    run = FederatedRun(grid=None, run=RunSettings(run_dir=str(tmp_path), model_width=8, image_size=16))
    refused = _reply(run, 1, "spent", None, status=protocol.BUDGET_EXHAUSTED)
    outcome = run._collect(1, [refused], missing=[])
    assert outcome.budget_exhausted == ["spent"] and not outcome.rejected and not outcome.failed


def test_fedavg_weights_by_examples():
    a = {"w": np.array([0.0, 1.0], dtype=np.float32)}
    b = {"w": np.array([4.0, 5.0], dtype=np.float32)}
    averaged = weighted_average([SiteUpdate("a", 30, a), SiteUpdate("b", 10, b)])
    np.testing.assert_allclose(averaged["w"], [1.0, 2.0])
    assert averaged["w"].dtype == np.float32
