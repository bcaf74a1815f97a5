"""Tensor layouts: which numbers of a tensor are sent (all, top-k, random-k, low-rank factors).

A layout turns one tensor into a ``fedslim.v1.Tensor`` message, handing the
numbers it keeps to a value coding; ``decode_tensor`` inverts any of them and
checks every field against the shape the receiver expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedslim.codecs.values import ValueCoding, WireFormatError, decode_values
from fedslim.protos.fedslim.v1 import update_pb2 as pb


class Layout(Protocol):
    @property
    def spec(self) -> str: ...

    @property
    def biased(self) -> bool: ...

    def encode(self, name: str, tensor: np.ndarray, values: ValueCoding, seed: int) -> pb.Tensor: ...


@dataclass(frozen=True)
class Dense:
    """Every entry."""

    spec: str = "dense"
    biased: bool = False

    def encode(self, name: str, tensor: np.ndarray, values: ValueCoding, seed: int) -> pb.Tensor:
        return pb.Tensor(name=name, shape=tensor.shape, dense=values.encode(tensor.reshape(-1)))


def keep_count(density: float, size: int) -> int:
    return min(size, max(1, round(density * size))) if size else 0


@dataclass(frozen=True)
class TopK:
    """The ``density`` fraction of entries largest in magnitude (at least one; never a zero entry)."""

    density: float
    biased: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"top-k density must be in (0, 1], got {self.density}")

    @property
    def spec(self) -> str:
        return f"topk:{self.density:g}"

    def encode(self, name: str, tensor: np.ndarray, values: ValueCoding, seed: int) -> pb.Tensor:
        flat = tensor.reshape(-1)
        k = keep_count(self.density, flat.size)
        nonzero = int(np.count_nonzero(flat))
        if nonzero <= k:
            positions = np.flatnonzero(flat)  # a zero is not worth a position
        elif 2 * nonzero < flat.size:
            # Deltas of fine-tuned layers are often mostly exact zeros (dead inputs); ties that many
            # slow introselect down badly, so select among the nonzero entries.
            candidates = np.flatnonzero(flat)
            top = np.argpartition(np.abs(flat[candidates]), nonzero - k)[nonzero - k :]
            positions = np.sort(candidates[top])
        else:
            positions = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
        sparse = pb.Sparse(nnz=positions.size, values=values.encode(flat[positions]))
        _set_positions(sparse, positions, flat.size)
        return pb.Tensor(name=name, shape=tensor.shape, sparse=sparse)


@dataclass(frozen=True)
class RandK:
    """A uniformly random ``density`` fraction of entries, drawn from a seed that travels instead of indices.

    Not rescaled: decode gives x on the kept entries and 0 elsewhere, which is
    contractive (use it with error feedback), unlike the n/k-rescaled form.
    """

    density: float
    biased: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"random-k density must be in (0, 1], got {self.density}")

    @property
    def spec(self) -> str:
        return f"randk:{self.density:g}"

    def encode(self, name: str, tensor: np.ndarray, values: ValueCoding, seed: int) -> pb.Tensor:
        flat = tensor.reshape(-1)
        k = keep_count(self.density, flat.size)
        positions = seeded_positions(seed, flat.size, k)
        sparse = pb.Sparse(nnz=k, random_seed=seed, values=values.encode(flat[positions]))
        return pb.Tensor(name=name, shape=tensor.shape, sparse=sparse)


def seeded_positions(seed: int, size: int, count: int) -> np.ndarray:
    """The sorted positions random-k keeps: both sides regenerate them from the seed."""
    return np.sort(np.random.default_rng(seed).choice(size, size=count, replace=False))


@dataclass(frozen=True)
class PowerSGD:
    """Rank-``rank`` factors from one power iteration (Vogels et al., 2019, Alg. 1), fresh seeded start.

    A tensor is viewed as shape[0] x rest. P = M Q is orthonormalised and
    Q = M^T P, so P Q^T is the projection of M onto span(P): the error is
    never larger than M. Tensors where the factors would not be smaller than
    the tensor (biases, thin matrices) are sent dense.
    """

    rank: int
    biased: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"PowerSGD rank must be >= 1, got {self.rank}")

    @property
    def spec(self) -> str:
        return f"powersgd:{self.rank}"

    def encode(self, name: str, tensor: np.ndarray, values: ValueCoding, seed: int) -> pb.Tensor:
        if tensor.ndim < 2:
            return Dense().encode(name, tensor, values, seed)
        matrix = tensor.reshape(tensor.shape[0], -1).astype(np.float64)
        rows, cols = matrix.shape
        rank = min(self.rank, rows, cols)
        if rank * (rows + cols) >= rows * cols:
            return Dense().encode(name, tensor, values, seed)
        start = np.random.default_rng(seed).standard_normal((cols, rank))
        left, _ = np.linalg.qr(matrix @ start)  # Alg. 1 lines 3-4: P = M Q, orthogonalise
        right = matrix.T @ left  # line 6: Q = M^T P
        low_rank = pb.LowRank(
            rank=rank,
            left=values.encode(left.astype(np.float32).reshape(-1)),
            right=values.encode(right.astype(np.float32).reshape(-1)),
        )
        return pb.Tensor(name=name, shape=tensor.shape, low_rank=low_rank)


def _set_positions(sparse: pb.Sparse, positions: np.ndarray, size: int) -> None:
    """Store sorted positions as varint gaps or as a bitmask, whichever is smaller."""
    gaps = np.diff(positions, prepend=0)
    varint = encode_varints(gaps)
    if len(varint) <= (size + 7) // 8:
        sparse.gaps_varint = varint
    else:
        mask = np.zeros(size, dtype=np.uint8)
        mask[positions] = 1
        sparse.bitmask = np.packbits(mask, bitorder="little").tobytes()


def encode_varints(numbers: np.ndarray) -> bytes:
    """Unsigned LEB128 of each number, vectorised."""
    numbers = numbers.astype(np.uint64)
    widths = np.ones(numbers.size, dtype=np.int64)
    for shift in range(7, 64, 7):
        widths += numbers >= np.uint64(1 << shift)
    out = np.empty(int(widths.sum()), dtype=np.uint8)
    starts = np.cumsum(widths) - widths
    for byte in range(int(widths.max(initial=0))):
        has = widths > byte
        chunk = ((numbers[has] >> np.uint64(7 * byte)) & np.uint64(0x7F)).astype(np.uint8)
        chunk[widths[has] > byte + 1] |= 0x80
        out[starts[has] + byte] = chunk
    return out.tobytes()


def decode_varints(data: bytes, count: int) -> np.ndarray:
    """Inverse of encode_varints; WireFormatError unless ``data`` is exactly ``count`` minimal varints below 2**63."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size and raw[-1] >= 0x80:
        raise WireFormatError("index stream is truncated: its last varint has no final byte")
    ends = np.flatnonzero(raw < 0x80)
    if ends.size != count:
        raise WireFormatError(f"index stream holds {ends.size} varints, expected {count}")
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if np.max(lengths) > 9:
        raise WireFormatError("index varint longer than 9 bytes")
    if np.any((raw[ends] == 0) & (lengths > 1)):
        raise WireFormatError("index varint is overlong (ends in a zero byte)")
    offsets = np.arange(raw.size) - np.repeat(starts, lengths)
    shifted = (raw & 0x7F).astype(np.uint64) << (7 * offsets).astype(np.uint64)
    return np.add.reduceat(shifted, starts)


def decode_tensor(message: pb.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 tensor of ``shape`` a Tensor message encodes; WireFormatError if anything disagrees."""
    if tuple(message.shape) != tuple(shape):
        raise WireFormatError(f"tensor {message.name!r} has shape {tuple(message.shape)}, expected {tuple(shape)}")
    size = int(np.prod(shape, dtype=np.int64))
    encoding = message.WhichOneof("encoding")
    if encoding is None:
        raise WireFormatError(f"tensor {message.name!r} has no known encoding")
    try:
        # Values that overflow, or NaNs (signalling ones warn when cast), are refused below, not warned about.
        with np.errstate(over="ignore", invalid="ignore"):
            if encoding == "dense":
                flat = decode_values(message.dense, size)
            elif encoding == "sparse":
                flat = _decode_sparse(message.sparse, size)
            else:
                flat = _decode_low_rank(message.low_rank, shape)
    except WireFormatError as exc:
        raise WireFormatError(f"tensor {message.name!r}: {exc}") from exc
    if not np.all(np.isfinite(flat)):
        raise WireFormatError(f"tensor {message.name!r} decodes to non-finite values (NaN or Inf)")
    return flat.reshape(shape)


def _decode_sparse(sparse: pb.Sparse, size: int) -> np.ndarray:
    if sparse.nnz > size:
        raise WireFormatError(f"sparse tensor declares {sparse.nnz} entries, more than its {size}")
    nnz = int(sparse.nnz)
    positions: np.ndarray
    kind = sparse.WhichOneof("indices")
    if kind == "gaps_varint":
        gaps = decode_varints(sparse.gaps_varint, nnz)
        if nnz and (np.any(gaps >= size) or np.any(gaps[1:] == 0)):
            raise WireFormatError("sparse indices are out of range or not strictly increasing")
        positions = np.cumsum(gaps, dtype=np.uint64)
        if nnz and positions[-1] >= size:
            raise WireFormatError(f"sparse index {int(positions[-1])} out of range for {size} entries")
    elif kind == "bitmask":
        if len(sparse.bitmask) != (size + 7) // 8:
            raise WireFormatError(f"bitmask is {len(sparse.bitmask)} bytes, expected {(size + 7) // 8}")
        bits = np.unpackbits(np.frombuffer(sparse.bitmask, dtype=np.uint8), bitorder="little")
        if np.any(bits[size:]):
            raise WireFormatError("bitmask marks entries beyond the tensor")
        positions = np.flatnonzero(bits[:size])
        if positions.size != nnz:
            raise WireFormatError(f"bitmask marks {positions.size} entries, the message declares {nnz}")
    elif kind == "random_seed":
        positions = seeded_positions(sparse.random_seed, size, nnz)
    else:
        raise WireFormatError("sparse tensor has no known index encoding")
    flat = np.zeros(size, dtype=np.float32)
    flat[positions.astype(np.int64)] = decode_values(sparse.values, nnz)
    return flat


def _decode_low_rank(low_rank: pb.LowRank, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) < 2:
        raise WireFormatError(f"low-rank factors for a tensor of shape {shape}")
    rows = shape[0]
    cols = int(np.prod(shape[1:], dtype=np.int64))
    rank = int(low_rank.rank)
    if not 1 <= rank <= min(rows, cols):
        raise WireFormatError(f"low-rank rank {rank} invalid for a {rows} x {cols} matrix")
    if rank * (rows + cols) >= rows * cols:
        # PowerSGD sends such a tensor dense; refuse it before paying the rows * cols * rank of decoding it.
        raise WireFormatError(
            f"low-rank rank {rank} for a {rows} x {cols} matrix: its factors ({rank * (rows + cols)} numbers) "
            f"are not smaller than the matrix ({rows * cols}), which is sent dense"
        )
    left = decode_values(low_rank.left, rows * rank).reshape(rows, rank).astype(np.float64)
    right = decode_values(low_rank.right, cols * rank).reshape(cols, rank).astype(np.float64)
    # Sum of outer products in a fixed order, not BLAS: server and clients must reconstruct identical bits.
    product = np.zeros((rows, cols), dtype=np.float64)
    for j in range(rank):
        product += np.multiply.outer(left[:, j], right[:, j])
    return product.astype(np.float32).reshape(-1)
