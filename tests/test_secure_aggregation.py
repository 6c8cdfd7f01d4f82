"""Secure aggregation's protocol, run by the coordinator's real round code and the sites'
real stage handler, with messages handed over in process instead of by Flower's
processes (tests/test_federation.py runs it over TLS with real sites)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from fedmed.config import RunSettings, SiteSettings
from fedmed.flower import client_app, secagg, secagg_site
from fedmed.flower.coordinator import FederatedRun
from fedmed.flower.packing import record_to_vector
from fedmed.flower.secagg_coordinator import SecureSum
from fedmed.flower.secagg_site import ProtocolError
from fedmed.protocol import RoundStatus, SiteReply
from fedmed.vector import pack
from tests.test_coordinator import task_identity  # noqa: F401 - the fixture sets Flower's ids

NODES = [101, 202, 303, 404]
CAP = 1000


class LoopbackGrid:
    """Flower's Grid as the coordinator uses it: each message goes straight to the site
    handler of its node, whose Flower context lives from message to message."""

    def __init__(self, handlers: dict[int, Callable[[Message, Context], Message]]) -> None:
        self.handlers = handlers
        self.contexts = {node: Context(1, node, {}, RecordDict(), {}) for node in handlers}
        self.replies: dict[str, Message] = {}
        self.stages: list[str] = []

    def get_node_ids(self) -> list[int]:
        return list(self.handlers)

    def push_messages(self, messages):
        ids = []
        for index, message in enumerate(messages):
            message_id = f"m{len(self.replies)}-{index}"
            message.metadata.__dict__["_message_id"] = message_id
            self.stages.append(str(message.content[secagg.RECORD][secagg.STAGE]))
            node = message.metadata.dst_node_id
            try:
                reply = self.handlers[node](message, self.contexts[node])
            except Exception:  # a site whose work fails answers nothing in this test
                reply = None
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = node
                self.replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]


def _site(run: RunSettings, name: str, move: np.ndarray, examples: int, drops: bool = False):
    """A site whose private round moves the received model by ``move``."""

    def handler(message: Message, context: Context) -> Message:
        def train() -> SiteReply:
            if drops:
                raise RuntimeError(f"{name} went offline while training")
            received = record_to_vector(message.content["arrays"])
            metrics = {"status": RoundStatus.TRAINED, "dp": 1, "steps": 5, "epsilon": 1.0, "delta": 1e-5,
                       "noise-multiplier": 1.0, "privacy-unit": 1, "examples": examples}
            return SiteReply(name, metrics, model=(received + move).astype(np.float32))

        return secagg_site.handle(message, context, run, train, SiteSettings.min_secure_threshold)

    return handler


def _federation(tmp_path, drop: set[int]):
    settings = RunSettings(run_dir=str(tmp_path), width=8, image_size=16, secure_aggregation=True,
                           max_site_examples=CAP, max_update_norm=50.0, min_sites=2, round_timeout=5.0)
    size = pack(FederatedRun(grid=None, run=settings).reference).size
    rng = np.random.default_rng(3)
    moves = {node: rng.normal(0.0, 0.01, size) for node in NODES}
    counts = {node: int(rng.integers(50, 500)) for node in NODES}
    grid = LoopbackGrid({node: _site(settings, f"site-{node}", moves[node], counts[node], node in drop)
                         for node in NODES})
    run = FederatedRun(grid=grid, run=settings)
    run.names.names.update({node: f"site-{node}" for node in NODES})
    return run, grid, moves, counts


def test_the_secure_sum_is_the_weighted_average_with_one_site_dropped_mid_protocol(tmp_path):
    run, grid, moves, counts = _federation(tmp_path, drop={404})
    state = run.reference
    outcome, combined = run.kind.play(run, 1, NODES, state)
    assert combined is not None, outcome.secure
    assert outcome.secure == {"threshold": 3, "summed": 3, "dropped": ["site-404"]}
    survivors = [101, 202, 303]
    expected = sum(counts[n] * moves[n] for n in survivors) / sum(counts[n] for n in survivors)
    moved = pack(combined).astype(np.float64) - pack(state).astype(np.float64)
    np.testing.assert_allclose(moved, expected, atol=1e-6)  # float32 model, quantization steps of 2e-9
    assert outcome.examples == pytest.approx(sum(counts[n] for n in survivors))
    assert grid.stages.count("unmask") == 3
    # what the coordinator held of each site: a masked vector that says nothing of the site's move
    for node, vector in outcome.masked.items():
        summand = np.append(counts[node] / CAP * moves[node], counts[node] / CAP)
        assert np.abs(secagg.dequantize(vector, 1) - summand).mean() > 10.0
    assert sorted(outcome.trained) == ["site-101", "site-202", "site-303"]


def test_beyond_the_threshold_the_round_fails_and_nothing_is_unmasked(tmp_path):
    run, grid, _, _ = _federation(tmp_path, drop={303, 404})
    outcome, combined = run.kind.play(run, 1, NODES, run.reference)
    assert combined is None
    assert "2 of 4 sites sent masked updates, fewer than the threshold of 3" in outcome.secure["failed"]
    assert "unmask" not in grid.stages


def test_a_site_answering_a_stage_with_the_wrong_types_is_a_dropout_not_an_aborted_round(tmp_path):
    run, grid, moves, counts = _federation(tmp_path, drop=set())
    honest = grid.handlers[404]

    def hostile(message: Message, context: Context) -> Message:
        reply = honest(message, context)
        if message.content[secagg.RECORD][secagg.STAGE] == "keys":
            reply.content[secagg.RECORD]["public1"] = 5  # a number where a key's bytes belong
        return reply

    grid.handlers[404] = hostile
    outcome, combined = run.kind.play(run, 1, NODES, run.reference)
    assert combined is not None, outcome.secure
    assert outcome.secure["summed"] == 3 and "failed" not in outcome.secure
    survivors = [101, 202, 303]
    expected = sum(counts[n] * moves[n] for n in survivors) / sum(counts[n] for n in survivors)
    moved = pack(combined).astype(np.float64) - pack(run.reference).astype(np.float64)
    np.testing.assert_allclose(moved, expected, atol=1e-6)


def test_a_site_never_reveals_both_shares_of_one_site(tmp_path):
    run, grid, _, _ = _federation(tmp_path, drop=set())
    from fedmed.flower.secagg_coordinator import SecureSum

    secure = SecureSum(1, NODES)
    secure.take_keys({m.metadata.dst_node_id: grid.handlers[m.metadata.dst_node_id](
        m, grid.contexts[m.metadata.dst_node_id]) for m in secure.keys_messages()})
    secure.take_shares({m.metadata.dst_node_id: grid.handlers[m.metadata.dst_node_id](
        m, grid.contexts[m.metadata.dst_node_id]) for m in secure.shares_messages()})
    secure.masked, secure.dropped = {101: None, 202: None, 303: None}, [303]
    request = secure.unmask_messages()[0]
    with pytest.raises(ProtocolError, match="both as alive and as dropped"):
        grid.handlers[101](request, grid.contexts[101])


def test_a_site_bounds_its_own_move_before_masking():
    run = RunSettings(secure_aggregation=True, max_site_examples=CAP, max_update_norm=0.5)
    received = np.zeros(10, dtype=np.float32)
    reply = SiteReply("hostile", {"dp": 1, "steps": 5, "noise-multiplier": 1.0, "examples": 10**9},
                      model=np.full(10, 100.0, dtype=np.float32))
    summand = secagg_site.weighted_move(run, 1, reply, received)
    assert summand[-1] == 1.0  # the weight share is capped at the declared maximum
    assert np.linalg.norm(summand[:-1]) == pytest.approx(0.5)


def _keys_then_shares(secure: SecureSum, handler, contexts: dict[int, Context]) -> dict[int, Message]:
    """The keys and shares stages of ``secure``, each site answering through ``handler``;
    returns each site's answer to the shares stage (the site's error, if it refused)."""
    secure.take_keys({m.metadata.dst_node_id: handler(m, contexts[m.metadata.dst_node_id])
                      for m in secure.keys_messages()})
    answers = {}
    for message in secure.shares_messages():
        node = message.metadata.dst_node_id
        try:
            answers[node] = handler(message, contexts[node])
        except ProtocolError as error:
            answers[node] = error
    return answers


def test_a_site_splits_its_secrets_only_under_a_strict_majority_threshold(tmp_path):
    """The coordinator chooses the threshold; a site's ClientApp checks it against the site's
    own minimum (its node config) once it knows how many sites the round has."""
    nodes = list(range(1, 11))
    run = RunSettings(secure_aggregation=True)
    site = SiteSettings(name="st-mary", data=str(tmp_path), ledger=str(tmp_path / "ledger.jsonl"))
    contexts = {n: Context(1, n, site.to_flower(), RecordDict(), run.to_flower()) for n in nodes}
    for threshold in (1, 5, 6):
        secure = SecureSum(1, nodes)
        assert secure.threshold == 6  # fedmed's own coordinator asks for a strict majority
        secure.threshold = threshold  # a coordinator that may ask for less
        answers = _keys_then_shares(secure, client_app.train, contexts)
        if threshold <= 5:
            assert all(isinstance(a, ProtocolError) for a in answers.values()), threshold
            assert f"threshold of {threshold} for 10 sites is too low" in str(answers[1])
            assert "privacy.min_secure_threshold = 0.5 of the sites (5)" in str(answers[1])
        else:
            assert all(isinstance(a, Message) and a.content[secagg.RECORD]["sealed"] for a in answers.values())


def test_a_site_may_ask_for_a_larger_threshold_than_a_majority(tmp_path):
    nodes = list(range(1, 11))
    run = RunSettings(secure_aggregation=True)
    site = SiteSettings(name="st-mary", data=str(tmp_path), ledger=str(tmp_path / "ledger.jsonl"),
                        min_secure_threshold=0.7)
    contexts = {n: Context(1, n, site.to_flower(), RecordDict(), run.to_flower()) for n in nodes}
    answers = _keys_then_shares(SecureSum(1, nodes), client_app.train, contexts)
    assert "threshold of 6 for 10 sites is too low" in str(answers[3])
    assert "privacy.min_secure_threshold = 0.7 of the sites (7)" in str(answers[3])
