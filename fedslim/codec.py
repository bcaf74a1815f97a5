"""Encoding of fast tensors into Flower records, with exact byte accounting."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from fedslim.adapters import check_fast_state


class DenseCodec:
    """Fast tensors as uncompressed float32 arrays in an ArrayRecord.

    ``decode`` is strict: names, shapes, dtype and finiteness are checked
    against what the receiver expects, and a ``ValueError`` names the problem.
    """

    spec = "none"

    def encode(self, tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
        record = ArrayRecord()
        for name, value in tensors.items():
            record[name] = Array(np.ascontiguousarray(value, dtype=np.float32))
        return record

    def decode(self, record: ArrayRecord, expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        tensors: dict[str, np.ndarray] = {}
        for name, array in record.items():
            if array.dtype != "float32":
                raise ValueError(f"fast tensor {name!r} has dtype {array.dtype}, expected float32")
            tensors[name] = array.numpy()
        check_fast_state(tensors, expected)
        return tensors

    @staticmethod
    def payload_bytes(record: ArrayRecord) -> int:
        """Bytes the record occupies in a serialised message."""
        return record.count_bytes()
