"""A Flower reply message seen as ``fedmed.coordinator.replies.ReplyView``: plain values for
the checks, arrays read only on request and only after their declared size is checked."""

from __future__ import annotations

import numpy as np
from flwr.app import Message

from fedmed import protocol
from fedmed.flower.packing import check_declared, record_to_vector


class FlowerReply:
    def __init__(self, message: Message) -> None:
        self.content = message.content

    def records(self) -> set[str]:
        return set(self.content.keys())

    def text(self) -> dict[str, object]:
        return dict(self.content.get(protocol.SITE, {}))

    def metrics(self) -> dict[str, object]:
        return dict(self.content.get(protocol.METRICS, {}))

    def model_vector(self, size: int) -> np.ndarray:
        return record_to_vector(self.content[protocol.ARRAYS], size)

    def masked_vector(self, size: int) -> np.ndarray | None:
        record = self.content.get(protocol.MASKED)
        if record is None or list(record.keys()) != [protocol.MASKED]:
            return None
        check_declared(record[protocol.MASKED], size, np.uint64)  # before deserialising
        return record[protocol.MASKED].numpy()

    def array_shapes(self) -> dict[str, list]:
        return {k: [list(a.shape), str(a.dtype)] for record in (protocol.ARRAYS, protocol.MASKED)
                if record in self.content for k, a in self.content[record].items()}
