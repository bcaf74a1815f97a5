"""Per-client memory of the fast layer on the server (stale updates, anchor gradients), stored compactly.

FedVARP, MIFA, FedStale and FedAMD keep one fast-layer-shaped tensor set per
client. :class:`ClientMemory` stores each in one of these forms:

- ``wire``: the update's blob exactly as the client sent it, decoded when
  read. Exact (the strategy aggregated that very decoding) and as small as
  the uplink codec made it.
- ``fp16`` / ``bf16``: half-precision copies (2 bytes per number).
- ``fp32``: full copies (4 bytes per number).

It also keeps the sum over clients of what it stores (float64, updated on
every write), so rules that need ``sum_j h_j`` never decode the whole memory.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch

from fedslim.codecs.pipeline import decode_update
from fedslim.config import StrategyConfigError

MEMORY_FORMS = ("wire", "fp32", "fp16", "bf16")


class ClientMemory:
    """One stored tensor set per client, and their running sum.

    Parameters
    ----------
    shapes : Mapping[str, tuple[int, ...]]
        Shape of each fast tensor.
    form : str (default: "wire")
        How entries are stored: ``wire``, ``fp32``, ``fp16`` or ``bf16``.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], form: str = "wire") -> None:
        if form not in MEMORY_FORMS:
            raise StrategyConfigError(f"unknown memory form {form!r}; choose one of {', '.join(MEMORY_FORMS)}")
        self.shapes = dict(shapes)
        self.form = form
        self._entries: dict[str, bytes | dict[str, np.ndarray]] = {}
        self._sum = {name: np.zeros(shape, np.float64) for name, shape in self.shapes.items()}

    def __contains__(self, client: str) -> bool:
        return client in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, client: str) -> dict[str, np.ndarray]:
        """The stored tensors of ``client`` as float32 (zeros if nothing is stored)."""
        entry = self._entries.get(client)
        if entry is None:
            return {name: np.zeros(shape, np.float32) for name, shape in self.shapes.items()}
        if isinstance(entry, bytes):
            return decode_update(entry, self.shapes).tensors
        return {name: _widen(value) for name, value in entry.items()}

    def put(self, client: str, tensors: Mapping[str, np.ndarray], blob: bytes = b"") -> None:
        """Store ``tensors`` for ``client`` (``blob`` is their encoded form, required by ``wire``)."""
        old = self.get(client)
        if self.form == "wire":
            if not blob:
                raise StrategyConfigError("memory form 'wire' needs the update's blob; use fp32/fp16/bf16 otherwise")
            self._entries[client] = blob
        else:
            self._entries[client] = {name: _narrow(np.asarray(tensors[name]), self.form) for name in self.shapes}
        new = self.get(client)
        for name in self._sum:
            self._sum[name] += new[name].astype(np.float64) - old[name]

    def snapshot(self) -> ClientMemory:
        """A copy to go back to: it shares the stored entries (:meth:`put` replaces an entry, never changes one)
        and copies the running sum, so it costs one fast state, whatever the number of clients."""
        copied = copy.copy(self)
        copied._entries = dict(self._entries)
        copied._sum = {name: value.copy() for name, value in self._sum.items()}
        return copied

    def non_finite(self) -> bool:
        """Whether a stored entry holds NaN or Inf (one that overflowed its form: fp16 above 65504): the sum does."""
        return not all(np.all(np.isfinite(value)) for value in self._sum.values())

    def total(self) -> dict[str, np.ndarray]:
        """sum over clients of the stored tensors (float64; zeros for clients with nothing stored)."""
        return {name: value.copy() for name, value in self._sum.items()}

    def bytes_of(self, client: str) -> int:
        entry = self._entries.get(client)
        if entry is None:
            return 0
        if isinstance(entry, bytes):
            return len(entry)
        return sum(value.nbytes for value in entry.values())

    def nbytes(self) -> int:
        """Bytes held: every stored entry plus the running sum."""
        return sum(self.bytes_of(c) for c in self._entries) + sum(v.nbytes for v in self._sum.values())


def _narrow(value: np.ndarray, form: str) -> np.ndarray:
    if form == "fp32":
        return value.astype(np.float32)
    if form == "fp16":
        return value.astype(np.float16)
    # bfloat16: numpy has no such dtype; keep torch's rounding and store the raw 16-bit words.
    return torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy()


def _widen(value: np.ndarray) -> np.ndarray:
    if value.dtype == np.int16:
        return torch.from_numpy(value).view(torch.bfloat16).to(torch.float32).numpy()
    return value.astype(np.float32)
