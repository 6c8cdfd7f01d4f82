"""The coordinator's side of secure aggregation (see ``fedmed.flower.secagg``).

``SecureSum`` is the protocol's state for one round, separate from how messages travel:
each stage turns the previous stage's replies into the next stage's messages, and the
last one into the sum. The coordinator sends them with its Grid; a test can hand them to
sites directly. What the coordinator ever holds of one site is its public keys, sealed
shares it cannot read, its metrics and its masked vector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.app.typing import ConfigRecordValues

from fedmed.flower import records, secagg

Fields = dict[str, ConfigRecordValues]  # a stage's message to a site


class SecureRoundFailed(RuntimeError):
    """Too few sites at some stage: nothing was unmasked, and the round changes nothing."""


@dataclass
class SecureSum:
    round: int
    chosen: list[int]
    threshold: int = 0
    publics1: dict[int, bytes] = field(default_factory=dict)
    publics2: dict[int, bytes] = field(default_factory=dict)
    sealed: dict[int, dict[int, bytes]] = field(default_factory=dict)  # addressee -> sender -> shares
    masked: dict[int, np.ndarray] = field(default_factory=dict)  # survivor -> its masked vector
    dropped: list[int] = field(default_factory=list)  # shared its secrets, then sent no masked vector

    def __post_init__(self) -> None:
        self.threshold = secagg.threshold(len(self.chosen))

    def keys_messages(self) -> list[Message]:
        return [self._message(node, {"round": self.round, "threshold": self.threshold}, "keys") for node in self.chosen]

    def take_keys(self, replies: dict[int, Message]) -> None:
        for node, reply in self._answers(replies, single={"public1": bytes, "public2": bytes}).items():
            self.publics1[node] = records.value(reply, "public1", bytes)
            self.publics2[node] = records.value(reply, "public2", bytes)
        self._enough(self.publics1, "sent keys")

    def shares_messages(self) -> list[Message]:
        nodes = sorted(self.publics1)
        fields: Fields = {
            "nodes": nodes,
            "publics1": [self.publics1[n] for n in nodes],
            "publics2": [self.publics2[n] for n in nodes],
        }
        return [self._message(node, fields, "shares") for node in nodes]

    def take_shares(self, replies: dict[int, Message]) -> None:
        senders = self._answers(replies, lists={"addressees": int, "sealed": bytes})
        self._enough(senders, "shared their secrets")
        self.sealed = {node: {} for node in senders}
        for sender, reply in senders.items():
            addressees, sealed_shares = records.values(reply, "addressees", int), records.values(reply, "sealed", bytes)
            for addressee, sealed in zip(addressees, sealed_shares, strict=True):
                if addressee in self.sealed:
                    self.sealed[addressee][sender] = sealed

    def train_messages(self, model_message: Callable[[int], Message]) -> list[Message]:
        """Each sharing site's train message (``model_message(node)``: the usual one, with
        the global model) with the shares sealed for it."""
        messages = []
        for node, shares in self.sealed.items():
            message = model_message(node)
            senders = sorted(shares)
            message.content[secagg.RECORD] = ConfigRecord(
                {secagg.STAGE: "train", "round": self.round, "senders": senders, "sealed": [shares[s] for s in senders]}
            )
            messages.append(message)
        return messages

    def take_masked(self, vectors: dict[int, np.ndarray]) -> None:
        """The masked vectors that arrived; every other sharing site has dropped out."""
        self.masked = dict(vectors)
        self.dropped = sorted(set(self.sealed) - set(self.masked))
        self._enough(self.masked, "sent masked updates")

    def unmask_messages(self) -> list[Message]:
        fields: Fields = {"alive": sorted(self.masked), "dropped": self.dropped}
        return [self._message(node, fields, "unmask") for node in sorted(self.masked)]

    def unmask(self, replies: dict[int, Message]) -> tuple[np.ndarray, int]:
        """The sum of the survivors' vectors (dequantized), and how many they are."""
        answers = self._answers(replies, lists={"nodes": int, "shares": bytes})
        self._enough(answers, "sent their shares for unmasking")
        shares: dict[int, list[bytes]] = {}
        for reply in answers.values():
            nodes, node_shares = records.values(reply, "nodes", int), records.values(reply, "shares", bytes)
            for node, share in zip(nodes, node_shares, strict=True):
                shares.setdefault(node, []).append(share)
        size = next(iter(self.masked.values())).size
        total = np.zeros(size, dtype=np.uint64)
        for vector in self.masked.values():
            total += vector
        for node in self.masked:  # each survivor's own mask
            total -= secagg.mask(secagg.join(self._needed(shares, node)), size)
        for gone in self.dropped:  # the pairwise masks the survivors shared with a dropped site
            secret = secagg.join(self._needed(shares, gone))
            for node in self.masked:
                pair = secagg.mask(secagg.agreed_key(secret, self.publics1[node]), size)
                total = total - pair if secagg.pairwise_sign(node, gone) > 0 else total + pair
        return secagg.dequantize(total, len(self.masked)), len(self.masked)

    def _needed(self, shares: dict[int, list[bytes]], node: int) -> list[bytes]:
        if len(shares.get(node, [])) < self.threshold:
            raise SecureRoundFailed(
                f"{len(shares.get(node, []))} shares for node {node}, fewer than the threshold of {self.threshold}"
            )
        return shares[node][: self.threshold]

    def _enough(self, nodes: dict, what: str) -> None:
        if len(nodes) < self.threshold:
            raise SecureRoundFailed(
                f"{len(nodes)} of {len(self.chosen)} sites {what}, fewer than the threshold "
                f"of {self.threshold}: nothing was unmasked"
            )

    def _answers(
        self, replies: dict[int, Message], single: dict[str, type] | None = None, lists: dict[str, type] | None = None
    ) -> dict[int, ConfigRecord]:
        """The answers that carry every field of ``single`` (one value of its type) and of
        ``lists`` (lists of their types, all of one length). An error reply, a missing field
        or a value of another type counts as a dropout, like a site that never answered:
        one hostile site cannot abort the round for the others."""
        answers = {}
        for node, reply in replies.items():
            if reply.has_error():
                continue
            fields = reply.content.get(secagg.RECORD)
            if not isinstance(fields, ConfigRecord):
                continue
            try:
                for name, kind in (single or {}).items():
                    records.value(fields, name, kind)
                lengths = {len(records.values(fields, name, kind)) for name, kind in (lists or {}).items()}
            except (KeyError, ValueError):
                continue
            if len(lengths) <= 1:
                answers[node] = fields
        return answers

    def _message(self, node: int, fields: Fields, stage: str) -> Message:
        content = RecordDict({secagg.RECORD: ConfigRecord({secagg.STAGE: stage, **fields})})
        return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(self.round))
