"""Codec pipelines and the fedslim.v1 update format: encode a set of tensors to one blob, and back.

A pipeline has up to three stages, written as a spec string joined by ``+``:

- layout: ``topk:D`` (largest-magnitude fraction D), ``randk:D`` (seeded
  random fraction D, no indices sent), ``powersgd:R`` (rank-R factors), or
  dense (the default);
- value coding: ``fp32`` (default), ``fp16``, ``bf16``, ``q1``..``q8``, ``sign``;
- lossless: ``zlib``, ``lzma`` or ``zstd``.

``ternary:D`` is ``topk:D+sign`` (ComPEFT: keep the top entries, send their
signs and one scale). ``none`` is dense fp32 with no lossless stage.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError

from fedslim.codecs.layouts import Dense, Layout, PowerSGD, RandK, TopK, decode_tensor, keep_count
from fedslim.codecs.lossless import LOSSLESS_STAGES, LosslessStage, NoLossless, stage_for
from fedslim.codecs.values import BFloat16, Float16, Float32, Quantize, Sign, ValueCoding, WireFormatError
from fedslim.protos.fedslim.v1 import update_pb2 as pb

DELTA = pb.FastUpdate.KIND_DELTA
STATE = pb.FastUpdate.KIND_STATE


class CodecSpecError(ValueError):
    """A codec spec string cannot be parsed."""


class UpdateError(ValueError):
    """An encoded update is rejected; the text says why."""


@dataclass(frozen=True)
class Pipeline:
    """Layout, then value coding, then an optional lossless stage.

    Parameters
    ----------
    layout : Layout
        Which numbers of each tensor are sent (default: all of them).
    values : ValueCoding
        How those numbers are written (default: float32).
    lossless : LosslessStage
        Compression of the whole serialized update (default: none).
    """

    layout: Layout = field(default_factory=Dense)
    values: ValueCoding = field(default_factory=Float32)
    lossless: LosslessStage = field(default_factory=NoLossless)

    @property
    def spec(self) -> str:
        if isinstance(self.layout, TopK) and isinstance(self.values, Sign):
            stages = [f"ternary:{self.layout.density:g}"]
        else:
            stages = [s for s in (self.layout.spec, self.values.spec) if s not in ("dense", "fp32")]
        stages += [self.lossless.spec] if self.lossless.spec else []
        return "+".join(stages) or "none"

    @property
    def biased(self) -> bool:
        """True if decode(encode(x)) is not x (or an unbiased estimate of it): error feedback applies."""
        return self.layout.biased or self.values.biased


def parse_codec(spec: str) -> Pipeline:
    """The pipeline a spec string names, e.g. ``topk:0.01+q8+zstd``; CodecSpecError if it is not one."""
    text = spec.strip().lower()
    if text == "none":
        return Pipeline()
    if not text:
        raise CodecSpecError("the codec spec is empty; none is dense float32")
    layout: Layout | None = None
    values: ValueCoding | None = None
    lossless: LosslessStage | None = None
    for stage in text.split("+"):
        name, _, arg = stage.partition(":")
        try:
            if not stage:
                raise CodecSpecError("an empty stage: '+' joins two stages")
            if name in ("topk", "randk", "ternary", "powersgd", "dense"):
                if layout is not None or values is not None or lossless is not None:
                    raise CodecSpecError(f"{stage!r} must come first, and only one layout is allowed")
                layout = _layout(name, arg)
                if name == "ternary":
                    values = Sign()
            elif name in ("fp32", "fp16", "bf16", "sign") or (name.startswith("q") and name[1:].isdigit()):
                if values is not None or lossless is not None:
                    raise CodecSpecError(f"{stage!r}: only one value coding is allowed, before the lossless stage")
                values = _values(name, arg)
            elif name in LOSSLESS_STAGES:
                if lossless is not None or arg:
                    raise CodecSpecError(f"{stage!r}: one lossless stage, last, without arguments")
                lossless = LOSSLESS_STAGES[name]
            else:
                raise CodecSpecError(
                    f"unknown codec stage {name!r}; stages are topk:D, randk:D, ternary:D, powersgd:R, "
                    "fp32, fp16, bf16, q1..q8, sign, zlib, lzma, zstd"
                )
        except ValueError as exc:
            raise CodecSpecError(f"bad codec spec {spec!r}: {exc}") from exc
    return Pipeline(layout or Dense(), values or Float32(), lossless or NoLossless())


def _layout(name: str, arg: str) -> Layout:
    if name == "dense":
        if arg:
            raise CodecSpecError("dense takes no argument")
        return Dense()
    if not arg:
        raise CodecSpecError(f"{name} needs an argument, e.g. {name}:{'2' if name == 'powersgd' else '0.01'}")
    if name == "powersgd":
        return PowerSGD(int(arg))
    density = float(arg)
    return RandK(density) if name == "randk" else TopK(density)


def _values(name: str, arg: str) -> ValueCoding:
    if arg:
        raise CodecSpecError(f"{name} takes no argument")
    if name.startswith("q"):
        return Quantize(int(name[1:]))
    codings: dict[str, ValueCoding] = {"fp32": Float32(), "fp16": Float16(), "bf16": BFloat16(), "sign": Sign()}
    return codings[name]


@dataclass(frozen=True)
class EncodedUpdate:
    """One blob ready for the wire, and what its receiver will decode from it.

    Attributes
    ----------
    blob : bytes
        The serialized Envelope.
    raw_bytes : int
        Size of the serialized FastUpdate before the lossless stage.
    decoded : dict
        The tensors the receiver reconstructs, computed by the same decoder it
        runs (the sender's error-feedback residual and the server's replica
        are updated with exactly these numbers).
    """

    blob: bytes
    raw_bytes: int
    decoded: dict[str, np.ndarray]


@dataclass(frozen=True)
class DecodedUpdate:
    kind: pb.FastUpdate.Kind
    base_fingerprint: str
    state_version: int
    tensors: dict[str, np.ndarray]


def encode_update(
    tensors: Mapping[str, np.ndarray],
    pipeline: Pipeline,
    *,
    kind: pb.FastUpdate.Kind,
    base_fingerprint: str,
    state_version: int,
    seed: int = 0,
) -> EncodedUpdate:
    """Encode ``tensors`` (float32, all finite) with ``pipeline``; ``seed`` drives random-k and PowerSGD starts."""
    update = pb.FastUpdate(kind=kind, base_fingerprint=base_fingerprint, state_version=state_version)
    seeds = np.random.SeedSequence([seed, state_version]).generate_state(max(1, len(tensors)), dtype=np.uint64)
    decoded = {}
    for (name, tensor), tensor_seed in zip(tensors.items(), seeds):
        message = pipeline.layout.encode(name, np.asarray(tensor, dtype=np.float32), pipeline.values, int(tensor_seed))
        update.tensors.append(message)
        decoded[name] = decode_tensor(message, tuple(tensor.shape))
    raw = update.SerializeToString()
    envelope = pb.Envelope(
        lossless=pipeline.lossless.kind,
        raw_size=len(raw),
        payload=pipeline.lossless.compress(raw),
        crc32=zlib.crc32(raw),
    )
    return EncodedUpdate(envelope.SerializeToString(), len(raw), decoded)


def apply_step(state: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """state + step in float32, tensor by tensor: the one addition that moves a replica, wherever it is held."""
    return {name: np.add(value, step[name], dtype=np.float32) for name, value in state.items()}


def dense_update_limit(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Largest serialized FastUpdate accepted for these shapes: any encoding of them fits well within it."""
    entries = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes.values())
    return 5 * entries + 256 * len(shapes) + 65536


# Bytes of a FastUpdate besides its tensors (kind, fingerprint, version), and of a Tensor besides its name, shape
# and numbers (tags, lengths, counts, a seed, a rank, a quantizer's offset and scale): generous upper bounds.
UPDATE_OVERHEAD_BYTES = 1024
TENSOR_OVERHEAD_BYTES = 128


@dataclass(frozen=True)
class DecodeBudget:
    """The most one update may cost to decode: what an update of the sender's codec can need, and no more.

    Attributes
    ----------
    codec : str or None
        The spec of that codec, which refusals name (None: not known).
    max_raw_bytes : int
        Largest serialized FastUpdate, after the lossless stage.
    max_rank : int or None
        Largest rank of a low-rank tensor (0: none; None: any rank the
        shape allows). Decoding rank-r factors of a rows x cols tensor costs
        rows x cols x r.
    """

    codec: str | None
    max_raw_bytes: int
    max_rank: int | None

    @property
    def bounds(self) -> str:
        """What the budget bounds, for refusals."""
        return f"any update of codec {self.codec}" if self.codec else "any encoding of the fast layer"


def any_update_budget(shapes: Mapping[str, tuple[int, ...]]) -> DecodeBudget:
    """The budget of a receiver that does not know the sender's codec: any encoding of these shapes."""
    return DecodeBudget(None, dense_update_limit(shapes), None)


def decode_budget(pipeline: Pipeline, shapes: Mapping[str, tuple[int, ...]]) -> DecodeBudget:
    """What any update ``pipeline`` encodes for ``shapes`` fits in: its largest serialized size and rank.

    The size counts every number the layout keeps at the value coding's bits
    (top-k's positions as a bitmask, the larger of its two forms), with
    generous bounds on the framing; PowerSGD's rank is its own, other layouts
    send no low-rank factors.
    """
    layout, bits = pipeline.layout, pipeline.values.wire_bits

    def value_bytes(count: int) -> int:
        return (count * bits + 7) // 8

    total = UPDATE_OVERHEAD_BYTES
    for name, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64))
        payload = value_bytes(size)
        if isinstance(layout, TopK | RandK):
            positions = (size + 7) // 8 if isinstance(layout, TopK) else 0
            payload = value_bytes(keep_count(layout.density, size)) + positions
        elif isinstance(layout, PowerSGD) and len(shape) >= 2:
            rows, cols = shape[0], int(np.prod(shape[1:], dtype=np.int64))
            rank = min(layout.rank, rows, cols)
            if rank * (rows + cols) < size:
                payload = value_bytes(rank * rows) + value_bytes(rank * cols)
        total += TENSOR_OVERHEAD_BYTES + len(name.encode()) + 11 * len(shape) + payload
    return DecodeBudget(pipeline.spec, total, layout.rank if isinstance(layout, PowerSGD) else 0)


def check_rank(tensor: pb.Tensor, budget: DecodeBudget) -> None:
    """WireFormatError if ``tensor`` comes as low-rank factors of a rank above ``budget``'s (before decoding them)."""
    if (
        budget.max_rank is None
        or tensor.WhichOneof("encoding") != "low_rank"
        or tensor.low_rank.rank <= budget.max_rank
    ):
        return
    sends = f"rank {budget.max_rank} at most" if budget.max_rank else "no low-rank factors"
    raise WireFormatError(
        f"tensor {tensor.name!r} comes as rank-{tensor.low_rank.rank} factors; codec {budget.codec} sends {sends}"
    )


def decode_update(
    blob: bytes, shapes: Mapping[str, tuple[int, ...]], budget: DecodeBudget | None = None
) -> DecodedUpdate:
    """Parse and decode a blob against the tensor names and shapes the receiver holds.

    Raises UpdateError, and nothing else, for any blob it does not accept,
    naming the problem: a corrupt or truncated blob, an unknown encoding or
    lossless stage, a blob or payload that declares or inflates past the
    ``budget`` (default: ``any_update_budget(shapes)``), low-rank factors of
    a rank above it, missing, unknown or duplicate tensors, a shape mismatch,
    counts, ranks, bits or index streams that disagree with the shape,
    non-finite values. Time and memory are bounded by the shapes and the
    budget: no field can make it decode more than the tensors hold, and a
    low-rank tensor, which costs rows x cols x rank, is refused before it is
    decoded if its rank is above the budget's (without one, at most
    rows x cols / (rows + cols)).
    """
    budget = budget or any_update_budget(shapes)
    limit = budget.max_raw_bytes
    # A lossless stage expands incompressible data by well under 1%; the envelope adds a few bytes.
    max_blob = 2 * limit + 1024
    if len(blob) > max_blob:
        raise UpdateError(f"update blob is {len(blob)} bytes, above the {max_blob} bytes {budget.bounds} fits in")
    envelope = pb.Envelope()
    try:
        envelope.ParseFromString(blob)
        if envelope.raw_size > limit:
            raise WireFormatError(
                f"update declares {envelope.raw_size} bytes, above the {limit} bytes {budget.bounds} fits in"
            )
        raw = stage_for(envelope.lossless).decompress(envelope.payload, limit)
        if len(raw) != envelope.raw_size:
            raise WireFormatError(f"payload is {len(raw)} bytes, the envelope declares {envelope.raw_size}")
        if zlib.crc32(raw) != envelope.crc32:
            raise WireFormatError("corrupt update: CRC-32 mismatch")
        update = pb.FastUpdate()
        update.ParseFromString(raw)
        if update.kind not in (DELTA, STATE):
            raise WireFormatError(f"unknown update kind {update.kind}")
        names = [t.name for t in update.tensors]
        if len(set(names)) != len(names):
            raise WireFormatError("a tensor appears twice")
        unknown = sorted(set(names) - set(shapes))
        missing = sorted(set(shapes) - set(names))
        if unknown or missing:
            raise WireFormatError(f"tensor names differ: unknown {unknown}, missing {missing}")
        for tensor in update.tensors:
            check_rank(tensor, budget)
        tensors = {t.name: decode_tensor(t, tuple(shapes[t.name])) for t in update.tensors}
    except DecodeError as exc:
        raise UpdateError(f"corrupt or truncated update blob: {exc}") from exc
    except WireFormatError as exc:
        raise UpdateError(str(exc)) from exc
    return DecodedUpdate(update.kind, update.base_fingerprint, update.state_version, tensors)
