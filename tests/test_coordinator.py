"""The coordinator's checks on site replies, with real Flower messages."""

from __future__ import annotations

import dataclasses
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmed import protocol
from fedmed.config import RunSettings, SiteSettings
from fedmed.coordinator.fedavg import SiteUpdate, server_step, weighted_average
from fedmed.deploy.launch import write_app, write_flower_home
from fedmed.deploy.processes import ManagedProcess
from fedmed.flower import client_app
from fedmed.flower.coordinator import FederatedRun
from fedmed.flower.packing import vector_to_record
from fedmed.protocol import RoundStatus, SiteReply, SiteRequest, TrainRequest
from fedmed.rundir import RunDirectory
from fedmed.vector import pack, unpack


@pytest.fixture(autouse=True)
def task_identity():
    """Inside a ServerApp, Flower sets the run and node ids that new messages carry."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def _reply(run: FederatedRun, node: int, name: str, arrays: ArrayRecord | None, **metrics) -> Message:
    request = run.message(MessageType.TRAIN, node, run.reference, 1)
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
    outcome = run.collect(1, {reply.metadata.src_node_id: reply for reply in replies}, missing=[8])
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
    message = run.message(MessageType.TRAIN, 1, run.reference, 1)
    assert list(message.content[protocol.ARRAYS].keys()) == ["model"]
    restored = unpack(message.content[protocol.ARRAYS]["model"].numpy(), run.reference)
    assert list(restored) == list(run.reference)
    assert all(np.array_equal(restored[k], run.reference[k]) for k in run.reference)


def test_budget_exhausted_sites_are_counted_not_failed(tmp_path):
    run = FederatedRun(grid=None, run=RunSettings(run_dir=str(tmp_path), width=8, image_size=16))
    refused = _reply(run, 1, "spent", None, status=RoundStatus.BUDGET_EXHAUSTED)
    outcome = run.collect(1, {1: refused}, missing=[])
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
    state, start = resumed.starting_point()
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
    run.names.names.update({11: "site-1", 12: "site-2"})  # known already: no name query either
    with pytest.raises(TimeoutError, match="only 1 of the minimum 2 sites connected"):
        run.rounds()
    assert grid.calls > 2, "the run started with two sites, then waited for the second to come back"
    assert grid.sent == []
    assert run.run_dir.status()["phase"] == "waiting"


class _MovingSite:
    """A site's work that moves the received model a little each round (no data, no DP)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.site = SiteSettings(name=name)

    def handle(self, request: SiteRequest) -> SiteReply:
        if isinstance(request, TrainRequest):
            metrics = {"status": int(RoundStatus.TRAINED), "dp": 1, "steps": 1, "epsilon": 1.0, "delta": 1e-5,
                       "noise-multiplier": 1.0, "privacy-unit": 1, "examples": 50}
            return SiteReply(self.name, metrics, model=request.model + np.float32(0.001))
        return SiteReply(self.name, {})


class _SitesGrid:
    """Flower's Grid with each message answered at once by fedmed's ClientApp, serving the
    node's ``_MovingSite``."""

    def __init__(self, run: RunSettings, sites: dict[int, _MovingSite]) -> None:
        self.run, self.sites = run, sites
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            message_id = f"m{len(self.replies)}"
            message.metadata.__dict__["_message_id"] = message_id
            node = message.metadata.dst_node_id
            client_app.serve_site(self.sites[node])
            handler = client_app.evaluate_global if message.metadata.message_type == MessageType.EVALUATE \
                else client_app.train
            reply = handler(message, Context(1, node, {}, RecordDict(), self.run.to_flower()))
            reply.metadata.__dict__["_src_node_id"] = node
            self.replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies[m] for m in list(message_ids) if m in self.replies]


def test_a_run_directory_is_its_owner_s_alone(tmp_path):
    """A short run's directory, written by fedmed's coordinator and by a process started as
    the SuperLink is (Flower's ServerApp writes server.log under it): every folder 0700,
    every file 0600."""
    path = tmp_path / "runs" / "run-1"
    settings = RunSettings(run_dir=str(path), width=8, image_size=16, rounds=2, min_sites=2, max_update_norm=50.0,
                           server_momentum=0.5, round_timeout=5.0)
    run_dir = RunDirectory(path)
    run_dir.write_config(settings.to_flower())  # as fedmed-server's new_run
    child = ("import pathlib, sys; run = pathlib.Path(sys.argv[1]); (run / '.flwr' / 'state').mkdir(parents=True);"
             "(run / '.flwr' / 'state' / 'flower.db').write_text('x'); (run / 'server.log').write_text('log')")
    process = ManagedProcess([sys.executable, "-c", child, str(path)], path / "logs" / "superlink.log")
    assert process.process.wait(60) == 0, process.log_tail()
    process.stop()
    write_flower_home(path / ".flwr", "127.0.0.1:9093", None)
    write_app(path / "app" / "from-round-1", settings)
    run_dir.add_flower_run("4242", 1)
    run_dir.write_identities({11: "site-1", 12: "site-2"})
    grid = _SitesGrid(settings, {11: _MovingSite("site-1"), 12: _MovingSite("site-2")})
    try:
        run = FederatedRun(grid=grid, run=settings, poll_interval=0.01)
        run.names.names.update({11: "site-1", 12: "site-2"})
        assert run.execute() == "completed"
    finally:
        client_app.serve_site(None)
    folders, files = {}, {}
    for root, dirs, names in os.walk(path):
        folders.update({Path(root, d).relative_to(path): stat.S_IMODE(os.stat(Path(root, d)).st_mode) for d in dirs})
        files.update({Path(root, n).relative_to(path): stat.S_IMODE(os.stat(Path(root, n)).st_mode) for n in names})
    for expected in ("config.json", "status.json", "metrics.jsonl", "received.jsonl", "flower-runs.jsonl",
                     "identities.json", "metrics.csv", "server.log", "logs/superlink.log", "checkpoints/round-0002.npz",
                     "checkpoints/velocity-0002.npz", "model/model.npz", "model/model_card.json", ".flwr/state/flower.db"):
        assert Path(expected) in files, f"{expected} was not written: {sorted(map(str, files))}"
    assert {"tensorboard", "model", "checkpoints", "logs", ".flwr", "app", "app/from-round-1"} <= set(map(str, folders))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert {str(f): oct(m) for f, m in folders.items() if m != 0o700} == {}
    # Written by fedmed.deploy.launch with the umask's mode: private only through their 0700 folders.
    launch_files = {".flwr/config.toml", "app/from-round-1/pyproject.toml"}
    assert {str(f): oct(m) for f, m in files.items() if m != 0o600 and str(f) not in launch_files} == {}
