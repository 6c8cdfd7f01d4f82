"""A Flower reply message seen as ``fedmed.coordinator.replies.ReplyView``: plain values for
the checks, arrays read only on request and only after their declared size is checked."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message

from fedmed import protocol
from fedmed.flower import records
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
        return record_to_vector(records.record(self.content, protocol.ARRAYS, ArrayRecord), size)

    def masked_vector(self, size: int) -> np.ndarray | None:
        found = self.content.get(protocol.MASKED)
        if found is None or list(found.keys()) != [protocol.MASKED]:
            return None
        array = records.record(self.content, protocol.MASKED, ArrayRecord)[protocol.MASKED]
        check_declared(array, size, np.uint64)  # before deserialising
        return array.numpy()

    def array_shapes(self) -> dict[str, list]:
        arrays = [self.content.get(protocol.ARRAYS), self.content.get(protocol.MASKED)]
        return {
            k: [list(a.shape), str(a.dtype)]
            for record in arrays
            if isinstance(record, ArrayRecord)
            for k, a in record.items()
        }
