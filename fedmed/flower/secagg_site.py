"""A site's side of secure aggregation (see ``fedmed.flower.secagg``).

The coordinator drives four stages, each one train message with a ``secagg`` record;
between them the site keeps its protocol state in its Flower context (it survives from
message to message in ``fedmed-client`` and in a simulation alike). In the ``train``
stage the site trains its private round as usual, bounds and weights its move from the
global model, and sends that move only masked. Every request is checked: a site never
reveals both shares of one site's secrets, never answers for fewer sites than the
threshold, and splits its secrets only under a threshold above its own minimum share of
the round's sites (``privacy.min_secure_threshold``; the coordinator chooses the
threshold). The received model is checked against the run's model size before it is
deserialised (``fedmed.flower.packing``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues

from fedmed import protocol
from fedmed.config import RunSettings
from fedmed.coordinator.aggregation import honest_norm_bound, scale_to_bound, weight_cap
from fedmed.flower import records, secagg
from fedmed.flower.packing import record_to_vector
from fedmed.protocol import SiteReply
from fedmed.vector import packed_size

STATE = "secagg-state"  # the context record holding the site's protocol state
State = dict[str, ConfigRecordValues]  # the site's protocol state, kept as a ConfigRecord between stages
Fields = dict[str, ConfigRecordValues]  # a stage's answer to the coordinator


class ProtocolError(ValueError):
    """A secure-aggregation request the site refuses to answer."""


def handle(
    message: Message, context: Context, run: RunSettings, train: Callable[[], SiteReply], min_threshold: float
) -> Message:
    """Answer one stage of the protocol; ``train`` runs the site's private round, and
    ``min_threshold`` is the site's ``privacy.min_secure_threshold``."""
    fields = records.record(message.content, secagg.RECORD, ConfigRecord)
    stage = fields.get(secagg.STAGE)
    node = int(message.metadata.dst_node_id)
    if stage == "keys":
        state: State = {
            "round": records.value(fields, "round", int),
            "threshold": records.value(fields, "threshold", int),
            "node": node,
        }
        state["secret1"], state["public1"] = secagg.key_pair()
        state["secret2"], state["public2"] = secagg.key_pair()
        context.state[STATE] = ConfigRecord(state)
        return _reply(message, {"public1": state["public1"], "public2": state["public2"]})
    state = dict(context.state.config_records.get(STATE, ConfigRecord({})))
    if not state or state.get("node") != node:
        raise ProtocolError(f"stage {stage!r} arrived before this site's keys stage")
    if stage == "shares":
        answer = _share(state, fields, min_threshold)
    elif stage == "train":
        return _train(message, context, run, state, fields, train=train)
    elif stage == "unmask":
        answer = _unmask(state, fields)
    else:
        raise ProtocolError(f"unknown secure-aggregation stage {stage!r}")
    context.state[STATE] = ConfigRecord(state)
    return _reply(message, answer)


def _share(state: State, fields: ConfigRecord, min_threshold: float) -> Fields:
    """Split this site's mask seed and key-agreement secret among the sites that sent keys."""
    nodes = records.values(fields, "nodes", int)
    publics1, publics2 = records.values(fields, "publics1", bytes), records.values(fields, "publics2", bytes)
    own, threshold = records.value(state, "node", int), records.value(state, "threshold", int)
    check_threshold(threshold, len(nodes), min_threshold)
    if len(nodes) < threshold:
        raise ProtocolError(f"{len(nodes)} sites sent keys, fewer than the threshold of {threshold}")
    if (
        own not in nodes
        or publics1[nodes.index(own)] != state["public1"]
        or publics2[nodes.index(own)] != state["public2"]
    ):
        raise ProtocolError("the coordinator's key list does not hold this site's own keys")
    if len(set(publics1 + publics2)) != 2 * len(nodes) or len(set(nodes)) != len(nodes):
        raise ProtocolError("the key list repeats a node or a key")
    seed = os.urandom(32)
    seed_shares = secagg.split(seed, threshold, len(nodes))
    secret_shares = secagg.split(records.value(state, "secret1", bytes), threshold, len(nodes))
    secret2 = records.value(state, "secret2", bytes)
    addressees: list[int] = []
    sealed: list[bytes] = []
    for index, other in enumerate(nodes):
        if other == own:
            continue
        key = secagg.agreed_key(secret2, publics2[index])
        addressees.append(other)
        sealed.append(secagg.seal(key, own, other, seed_shares[index], secret_shares[index]))
    mine = nodes.index(own)
    state.update(
        seed=seed,
        nodes=nodes,
        publics1=publics1,
        publics2=publics2,
        sources=[own],
        seed_shares=[seed_shares[mine]],
        secret_shares=[secret_shares[mine]],
    )
    return {"addressees": addressees, "sealed": sealed}


def check_threshold(threshold: int, sites: int, min_threshold: float) -> None:
    """Refuse a threshold that is not more than ``min_threshold`` of the round's ``sites``,
    or below 2. Under a strict majority no two disjoint groups of sites can each unmask, so
    a coordinator that lists a site as alive to one group and as dropped to the other
    cannot learn both its seed and its secret, hence its update."""
    if threshold < 2 or threshold <= min_threshold * sites:
        raise ProtocolError(
            f"the coordinator's secure-aggregation threshold of {threshold} for {sites} sites is too low: this site "
            f"needs more than privacy.min_secure_threshold = {min_threshold:g} of the sites "
            f"({min_threshold * sites:g}) and at least 2"
        )


def _train(
    message: Message,
    context: Context,
    run: RunSettings,
    state: State,
    fields: ConfigRecord,
    *,
    train: Callable[[], SiteReply],
) -> Message:
    """Read the shares sent to this site, train, and send the bounded, weighted move masked."""
    senders = records.values(fields, "senders", int)
    own, nodes = records.value(state, "node", int), records.values(state, "nodes", int)
    threshold = records.value(state, "threshold", int)
    if len(set(senders)) != len(senders) or not set(senders) <= set(nodes) - {own}:
        raise ProtocolError("shares forwarded from sites outside the round's key list")
    if len(senders) + 1 < threshold:
        raise ProtocolError(f"shares from {len(senders) + 1} sites, fewer than the threshold of {threshold}")
    sources = [own]
    seed_shares = records.values(state, "seed_shares", bytes)
    secret_shares = records.values(state, "secret_shares", bytes)
    secret1, secret2 = records.value(state, "secret1", bytes), records.value(state, "secret2", bytes)
    publics1, publics2 = records.values(state, "publics1", bytes), records.values(state, "publics2", bytes)
    pair_keys: dict[int, bytes] = {}
    for sender, sealed in zip(senders, records.values(fields, "sealed", bytes), strict=True):
        index = nodes.index(sender)
        seed_share, secret_share = secagg.unseal(secagg.agreed_key(secret2, publics2[index]), sender, own, sealed)
        sources.append(sender)
        seed_shares.append(seed_share)
        secret_shares.append(secret_share)
        pair_keys[sender] = secagg.agreed_key(secret1, publics1[index])
    state.update(sources=sources, seed_shares=seed_shares, secret_shares=secret_shares)
    context.state[STATE] = ConfigRecord(state)
    reply = train()
    metrics = {k: v for k, v in reply.metrics.items() if k != "examples"}  # the weight travels inside the sum
    content = RecordDict(
        {
            protocol.METRICS: MetricRecord(metrics),
            protocol.SITE: ConfigRecord({"name": reply.site, "message": reply.message[: protocol.MAX_TEXT]}),
            secagg.RECORD: ConfigRecord({secagg.STAGE: "train"}),
        }
    )
    if reply.model is not None:
        received = record_to_vector(records.record(message.content, protocol.ARRAYS, ArrayRecord), packed_size(run))
        summand = weighted_move(run, records.value(fields, "round", int), reply, received)
        masked = secagg.add_masks(secagg.quantize(summand), own, records.value(state, "seed", bytes), pair_keys)
        content[secagg.MASKED] = ArrayRecord({secagg.MASKED: Array(masked)})
    return Message(content, reply_to=message)


def weighted_move(run: RunSettings, round_number: int, reply: SiteReply, received: np.ndarray) -> np.ndarray:
    """What this site adds to the sum: its move from the global model, bounded in norm
    (``max_update_norm``, else the honest bound for its own steps and noise), times its
    weight share (its record count over ``weight_cap``, at most 1), then that share."""
    from fedmed.model import ModelConfig, trained_parameter_count  # torch: the site has it loaded

    if reply.model is None:
        raise ValueError("a site that did not train has no move to add")
    move = reply.model.astype(np.float64) - received.astype(np.float64)
    bound = run.max_update_norm or honest_norm_bound(
        run,
        round_number,
        steps=float(reply.metrics.get("steps", 1)),
        noise_multiplier=float(reply.metrics.get("noise-multiplier", 0.0)),
        trained_parameters=trained_parameter_count(ModelConfig.from_settings(run)),
        model_norm=float(np.linalg.norm(received)),
    )
    if not reply.metrics.get("dp") and not run.max_update_norm:
        bound = math.inf  # nothing bounds a non-private move but a fixed setting
    scale_to_bound(move, bound)
    share = min(float(reply.metrics.get("examples", 1)), weight_cap(run)) / weight_cap(run)
    return np.append(share * move, share)


def _unmask(state: State, fields: ConfigRecord) -> Fields:
    """Shares of the surviving sites' seeds and of the dropped sites' secrets."""
    alive, dropped = records.values(fields, "alive", int), records.values(fields, "dropped", int)
    threshold = records.value(state, "threshold", int)
    if set(alive) & set(dropped):
        raise ProtocolError("a site is listed both as alive and as dropped: refusing to reveal both of its shares")
    if records.value(state, "node", int) not in alive or len(alive) < threshold:
        raise ProtocolError(
            f"unmasking for {len(alive)} sites, below the threshold of {threshold}, or without this site"
        )
    sources = records.values(state, "sources", int)
    if not set(alive + dropped) <= set(sources):
        raise ProtocolError("unmasking asks for sites this site holds no shares of")
    seed_shares = records.values(state, "seed_shares", bytes)
    secret_shares = records.values(state, "secret_shares", bytes)
    shares = [seed_shares[sources.index(n)] for n in alive] + [secret_shares[sources.index(n)] for n in dropped]
    state["unmasked"] = True
    return {"nodes": alive + dropped, "shares": shares}


def _reply(message: Message, fields: Fields) -> Message:
    return Message(RecordDict({secagg.RECORD: ConfigRecord(fields)}), reply_to=message)
