"""Fuzzing the server's intake: nothing a client sends gets out of the decoders as anything but UpdateError,
and neither ``UplinkReceiver.receive`` nor anything the server does with a reply after it ever raises.

Four generators, each a function of a ``random.Random``, so that hypothesis drives them here (through
``st.randoms``, whose choices it records and shrinks) and ``benchmarks/fuzz.py`` runs the same ones from
plain seeds, by the hundred thousand:

- :func:`mutated_blob`: a valid blob of one of the codec pipelines, mutated (bytes flipped, truncated,
  inserted, spliced with another blob) at one of three depths: the envelope's bytes, the lossless
  payload, or the FastUpdate inside, wrapped again with a correct size and CRC-32 so that the mutation
  reaches the tensor decoders;
- :func:`random_update`: a FastUpdate built field by field with the generated ``update_pb2`` classes,
  with random shapes, counts, nnz, ranks, bits, seeds, index streams and declared sizes, each right more
  often than not so that every check is passed about as often as it is failed;
- :func:`random_round`: a round's train replies as Flower Messages, with random records, random metrics
  (num-examples of every type a MetricRecord holds), error replies, unasked and repeated nodes;
- :func:`random_server_case`: whole rounds of a ``ServerRun`` (the server path of both backends) whose nodes
  answer from :class:`FuzzGrid`: valid, huge (3e38), stale and mutated updates, every claim honest or hostile
  (2**63 - 1, 2**64 - 1, negative, NaN, inf, 1e300, wrong types), hostile metadata, missing, repeated, unasked
  and late replies; through the checks, the size screen (on and off), the log rows, a strategy's memory
  (FedVARP, MIFA), the check after aggregation and a checkpoint. The fast state and the memory stay finite.

:func:`random_evaluations` does the same for client-side evaluation replies, whose claims
``check_evaluations`` accepts only when they can be true, and whose log rows are written.
"""

from __future__ import annotations

import functools
import itertools
import lzma
import math
import pickle
import random
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
import zstandard
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.supercore.inflatable.inflatable_object import InflatableObject
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from hypothesis import find, given, settings
from hypothesis import strategies as st

from fedslim.adapters import check_fast_state
from fedslim.channel.accounting import RunWire, WireAccounting
from fedslim.channel.downlink import Downlink, ServerReplica
from fedslim.channel.protocol import (
    ANCHOR_METRIC,
    BASE_FINGERPRINT_KEY,
    BASE_STATUS_KEY,
    CLIENT_KEY,
    CONFIG_KEY,
    CPU_KEY,
    DELTA_KEY,
    DIGEST_KEY,
    EVAL_CORRECT_KEY,
    EVAL_EXAMPLES_KEY,
    EVAL_LOSS_KEY,
    EVALUATE_TYPE,
    EVALUATION_RECORD,
    FINAL_SYNC_TYPE,
    IDENTITY_KEY,
    NUM_EXAMPLES_KEY,
    PARTIAL_BYTES_KEY,
    PEAK_RSS_KEY,
    REPLICA_RECORD,
    REPLICA_VERSION_KEY,
    TRAIN_LOSS_KEY,
    TRAIN_TYPE,
    UPDATE_KEY,
    VERSION_KEY,
    Role,
)
from fedslim.channel.updates import Instruction
from fedslim.channel.uplink import Received, SizeScreen, UplinkReceiver, footprint
from fedslim.codecs import UpdateError, decode_update, encode_update, parse_codec
from fedslim.codecs.layouts import encode_varints
from fedslim.codecs.pipeline import DELTA, STATE, dense_update_limit
from fedslim.commlog import LOG_FILENAME, CommLog
from fedslim.config import RunConfig
from fedslim.protos.fedslim.v1 import update_pb2 as pb
from fedslim.server.checkpoint import CHECKPOINT_FORMAT, Arithmetic, Checkpoint, load_checkpoint, write_checkpoint
from fedslim.server.evaluation import check_evaluations, most_held_out
from fedslim.server.identity import IdentityQuery
from fedslim.server.loop import final_sync
from fedslim.server.nodes import OrderedGrid
from fedslim.server.round import ServerRun
from fedslim.strategies import MIFA, FedVARP
from fedslim.strategies.base import Federation
from fedslim.strategies.fedavg import FastFedAvg

FINGERPRINT = "base"
STATE_VERSION = 7
# A LoRA-like matrix, a bias, and a tensor of zeros (top-k sends it as a sparse tensor with nnz = 0).
SHAPES: dict[str, tuple[int, ...]] = {"w": (12, 10), "b": (10,), "z": (6,)}
VALUE_CODECS = ["fp32", "fp16", "bf16", *(f"q{bits}" for bits in range(1, 9)), "sign"]
LAYOUT_CODECS = ["topk:0.1", "topk:0.5+q8", "randk:0.2+q4", "ternary:0.1", "powersgd:2", "powersgd:3+fp16"]
PIPELINES = [
    f"{codec}+{stage}" if stage else codec
    for codec in VALUE_CODECS + LAYOUT_CODECS
    for stage in ("", "zlib", "lzma", "zstd")
]
MUTATIONS = ("flip", "truncate", "insert", "splice")
DEPTHS = ("envelope", "payload", "update")
# Lossless stages at their fastest settings, for wrapping generated updates (decoders accept any level).
QUICK_COMPRESS: dict[int, Callable[[bytes], bytes]] = {
    pb.LOSSLESS_NONE: bytes,
    pb.LOSSLESS_ZLIB: lambda data: zlib.compress(data, 1),
    pb.LOSSLESS_LZMA: lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE, preset=0),
    pb.LOSSLESS_ZSTD: lambda data: zstandard.ZstdCompressor(level=1).compress(data),
}


@dataclass(frozen=True)
class Seed:
    """A valid blob of one pipeline, and its parts: the lossless payload and the FastUpdate inside."""

    spec: str
    blob: bytes
    envelope: pb.Envelope
    raw: bytes


@dataclass(frozen=True)
class Case:
    """One blob for the decoders, and what made it: the generator's category and a description."""

    category: str
    detail: str
    blob: bytes
    shapes: dict[str, tuple[int, ...]]


@functools.cache
def corpus() -> tuple[Seed, ...]:
    """One valid blob of ``SHAPES`` per pipeline, built once."""
    seeds = []
    for index, spec in enumerate(PIPELINES):
        rng = np.random.default_rng(index)
        tensors = {
            "w": (0.1 * rng.standard_normal((12, 10))).astype(np.float32),
            "b": (0.01 * rng.standard_normal(10)).astype(np.float32),
            "z": np.zeros(6, np.float32),
        }
        blob = encode_update(
            tensors,
            parse_codec(spec),
            kind=DELTA,
            base_fingerprint=FINGERPRINT,
            state_version=STATE_VERSION,
            seed=index,
        ).blob
        envelope = pb.Envelope.FromString(blob)
        raw = decode_raw(envelope)
        seeds.append(Seed(spec, blob, envelope, raw))
    return tuple(seeds)


def decode_raw(envelope: pb.Envelope) -> bytes:
    """The serialized FastUpdate of a valid envelope."""
    decompress: dict[int, Callable[[bytes], bytes]] = {
        pb.LOSSLESS_NONE: bytes,
        pb.LOSSLESS_ZLIB: zlib.decompress,
        pb.LOSSLESS_LZMA: lambda data: lzma.decompress(data, format=lzma.FORMAT_ALONE),
        pb.LOSSLESS_ZSTD: zstandard.ZstdDecompressor().decompress,
    }
    return decompress[envelope.lossless](envelope.payload)


def wrap(raw: bytes, lossless: int) -> bytes:
    """An envelope around a serialized FastUpdate, with its true size and CRC-32."""
    payload = QUICK_COMPRESS[lossless](raw)
    return pb.Envelope(lossless=lossless, raw_size=len(raw), payload=payload, crc32=zlib.crc32(raw)).SerializeToString()


# ----------------------------------------------------------------------------------------- (a) mutated blobs


def mutate(data: bytes, other: bytes, operation: str, rng: random.Random) -> bytes:
    """``data`` with one mutation: a few bytes flipped, a truncation, an insertion, or a splice with ``other``."""
    if operation == "flip":
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(mutated))
            if rng.random() < 0.5:
                mutated[position] ^= 1 << rng.randrange(8)
            else:
                mutated[position] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF))
        return bytes(mutated)
    if operation == "truncate":
        return data[: rng.randrange(len(data))]
    if operation == "insert":
        position = rng.randint(0, len(data))
        inserted = rng.randbytes(rng.randint(1, 8)) if rng.random() < 0.7 else bytes([rng.choice((0x00, 0x80))])
        return data[:position] + inserted + data[position:]
    return data[: rng.randint(0, len(data))] + other[rng.randint(0, len(other)) :]


def mutated_blob(rng: random.Random) -> Case:
    """A valid blob of a random pipeline with one mutation, at the envelope, payload or FastUpdate depth."""
    seeds = corpus()
    seed, other = rng.choice(seeds), rng.choice(seeds)
    operation, depth = rng.choice(MUTATIONS), rng.choice(DEPTHS)
    if depth == "envelope":
        blob = mutate(seed.blob, other.blob, operation, rng)
    elif depth == "payload":
        envelope = pb.Envelope()
        envelope.CopyFrom(seed.envelope)
        envelope.payload = mutate(seed.envelope.payload, other.envelope.payload, operation, rng)
        blob = envelope.SerializeToString()
    else:
        blob = wrap(mutate(seed.raw, other.raw, operation, rng), seed.envelope.lossless)
    return Case(operation, f"{operation} at the {depth} depth of a {seed.spec} blob", blob, dict(SHAPES))


# ----------------------------------------------------------------------------------- (b) random field values

HUGE = (2**32 - 1, 2**63, 2**64 - 1)
ODD_FLOATS = (0.0, -0.0, 1.0, -1.0, 1e-45, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan"))


def often(rng: random.Random, right: int, p: float = 0.8) -> int:
    """``right`` with probability ``p``, else a wrong value below 2**64: off by one, zero, huge, or random."""
    if rng.random() < p:
        return right
    wrong = rng.choice((max(0, right - 1), right + 1, 0, rng.choice(HUGE), rng.getrandbits(rng.choice((8, 32, 64)))))
    return min(wrong, 2**64 - 1)


def near(rng: random.Random, right: int, p: float = 0.8) -> int:
    """A length: ``right`` with probability ``p``, else a wrong one (off by one, zero, up to twice as long)."""
    if rng.random() < p:
        return right
    return rng.choice((max(0, right - 1), right + 1, 0, rng.randint(0, 2 * right + 8)))


def noise(rng: random.Random, length: int) -> bytes:
    """``length`` random bytes from one draw of ``rng`` (hypothesis caps the bytes an example may draw)."""
    return np.random.default_rng(rng.getrandbits(64)).bytes(length)


def random_shapes(rng: random.Random) -> dict[str, tuple[int, ...]]:
    """One to three tensors of zero to three dimensions, each dimension 0 to 16 (up to 48 in a matrix)."""
    shapes = {}
    for index in range(rng.randint(1, 3)):
        ndim = rng.randint(0, 3)
        limit = 48 if ndim == 2 and rng.random() < 0.3 else 16
        shapes[f"t{index}"] = tuple(rng.randint(0, limit) for _ in range(ndim))
    return shapes


def random_values(rng: random.Random, count: int) -> pb.Values:
    """A Values message meant to hold ``count`` numbers, as floats or quantized codes, often slightly wrong."""
    declared = often(rng, count)
    real = count if count <= 1 << 16 else rng.randint(0, 64)
    choice = rng.random()
    if choice < 0.45:
        kind = often(rng, rng.choice((pb.FLOAT_TYPE_FLOAT32, pb.FLOAT_TYPE_FLOAT16, pb.FLOAT_TYPE_BFLOAT16)), 0.9)
        width = {pb.FLOAT_TYPE_FLOAT16: 2, pb.FLOAT_TYPE_BFLOAT16: 2}.get(kind, 4)
        if rng.random() < 0.7:
            numbers = np.random.default_rng(rng.getrandbits(64)).standard_normal(real).astype(np.float32)
            data = numbers.astype("<f2" if kind == pb.FLOAT_TYPE_FLOAT16 else "<f4").tobytes()
            data = data if kind != pb.FLOAT_TYPE_BFLOAT16 else (numbers.view("<u4") >> 16).astype("<u2").tobytes()
        else:
            data = noise(rng, real * width)
        if rng.random() < 0.1:
            data = data[: rng.randint(0, len(data))] + rng.randbytes(rng.randint(0, 3))
        return pb.Values(count=declared, floats=pb.Floats(type=kind % 2**31, data=data))
    if choice < 0.95:
        bits = rng.randint(1, 8) if rng.random() < 0.85 else rng.choice((0, 9, 12, 32, 2**32 - 1))
        length = (real * min(bits, 64) + 7) // 8
        codes = noise(rng, near(rng, length, 0.85) if length <= 1 << 20 else rng.randint(0, 64))
        offset, scale = (rng.choice(ODD_FLOATS) if rng.random() < 0.2 else rng.uniform(-1, 1) for _ in range(2))
        quantized = pb.Quantized(bits=bits, offset=offset, scale=scale, codes=codes)
        return pb.Values(count=declared, quantized=quantized)
    return pb.Values(count=declared)


def random_gaps(rng: random.Random, positions: np.ndarray) -> bytes:
    """Varint gaps of ``positions``, or a stream broken in one of the ways a decoder must catch."""
    gaps = encode_varints(np.diff(positions, prepend=0))
    flaw = rng.random()
    if flaw < 0.6:
        return gaps
    if flaw < 0.7:
        return gaps + bytes([rng.choice((0x00, 0x05, 0x80, 0xFF))])  # a stray byte (or an unfinished varint)
    if flaw < 0.8:
        return gaps[:-1]  # truncated
    if flaw < 0.9 and gaps:
        return gaps[:-1] + bytes([gaps[-1] | 0x80, 0x00])  # overlong: the last varint ends in a zero byte
    return noise(rng, rng.randint(0, 2 * len(gaps) + 2))


def random_sparse(rng: random.Random, size: int) -> pb.Sparse:
    """A Sparse message for a tensor of ``size`` entries: nnz, an index encoding and values, each maybe wrong."""
    kept = rng.randint(0, size) if size else 0
    positions = np.sort(np.random.default_rng(rng.getrandbits(64)).choice(size, kept, replace=False))
    if kept > 1 and rng.random() < 0.1:
        positions[rng.randrange(1, kept)] = positions[0]  # a repeated position
    nnz = often(rng, kept)
    sparse = pb.Sparse(nnz=nnz, values=random_values(rng, min(nnz, 1 << 17)))
    choice = rng.random()
    if choice < 0.45:
        sparse.gaps_varint = random_gaps(rng, positions)
    elif choice < 0.7:
        mask = np.zeros(size, np.uint8)
        mask[positions] = 1
        bitmask = np.packbits(mask, bitorder="little").tobytes()
        if rng.random() < 0.3:
            bitmask = noise(rng, near(rng, len(bitmask), 0.7))
        sparse.bitmask = bitmask
    elif choice < 0.95:
        sparse.random_seed = rng.getrandbits(64)
    return sparse


def random_low_rank(rng: random.Random, shape: tuple[int, ...]) -> pb.LowRank:
    """A LowRank message for ``shape``: a rank in or out of range, and factors of the sizes it implies (or not)."""
    rows = shape[0] if shape else rng.randint(1, 16)
    cols = math.prod(shape[1:]) if len(shape) > 1 else rng.randint(1, 16)
    bound = max(1, -(-rows * cols // (rows + cols)) - 1) if rows and cols else 1
    if rng.random() < 0.6:
        rank = rng.randint(1, bound)
    else:
        rank = rng.choice((0, bound, bound + 1, min(rows, cols), max(rows, cols), 2**32 - 1, rng.getrandbits(32)))
    factor = min(rank, 1 << 12)
    return pb.LowRank(rank=rank, left=random_values(rng, rows * factor), right=random_values(rng, cols * factor))


def random_tensor(rng: random.Random, name: str, shape: tuple[int, ...]) -> pb.Tensor:
    """A Tensor message meant for ``name`` of ``shape``, with a random encoding."""
    if rng.random() < 0.1:
        shape = tuple(rng.choice((0, 1, 3, 2**40, 2**64 - 1)) for _ in range(rng.randint(0, 4)))
    tensor = pb.Tensor(name=name, shape=shape)
    small = max(shape, default=0) <= 1 << 16  # huge dimensions are for the shape check: factors stay small
    size = math.prod(shape) if small else rng.randint(0, 64)
    encoding = rng.random()
    if encoding < 0.3:
        tensor.dense.CopyFrom(random_values(rng, size))
    elif encoding < 0.65:
        tensor.sparse.CopyFrom(random_sparse(rng, size))
    elif encoding < 0.97:
        tensor.low_rank.CopyFrom(random_low_rank(rng, shape if small else ()))
    return tensor


def random_update(rng: random.Random) -> Case:
    """A FastUpdate of random field values for random shapes, in an envelope whose fields may lie too."""
    shapes = random_shapes(rng)
    update = pb.FastUpdate(
        kind=often(rng, rng.choice((DELTA, STATE)), 0.95) % 2**31,
        base_fingerprint=FINGERPRINT if rng.random() < 0.9 else rng.randbytes(8).hex(),
        state_version=often(rng, STATE_VERSION, 0.9),
    )
    names = list(shapes)
    if rng.random() < 0.1:
        names = rng.choice((names[1:], [*names, names[0]], [*names, "unknown"]))
    for name in names:
        update.tensors.append(random_tensor(rng, name, shapes.get(name, (3,))))
    raw = update.SerializeToString()
    lossless = rng.choice(tuple(QUICK_COMPRESS)) if rng.random() < 0.98 else rng.randint(4, 99)
    limit = dense_update_limit(shapes)
    if rng.random() < 0.03:
        bomb = bytes(limit + rng.randint(1, 4096))  # inflates past the limit
        payload = QUICK_COMPRESS.get(lossless, bytes)(bomb)
    else:
        payload = QUICK_COMPRESS.get(lossless, bytes)(raw)
    envelope = pb.Envelope(
        lossless=lossless,
        raw_size=often(rng, len(raw), 0.9),
        payload=payload,
        crc32=zlib.crc32(raw) if rng.random() < 0.95 else rng.getrandbits(32),
    )
    kinds = "/".join(t.WhichOneof("encoding") or "none" for t in update.tensors)
    return Case("fields", f"{kinds} tensors for {shapes}", envelope.SerializeToString(), shapes)


def decode_case(case: Case) -> bool:
    """True if the case's blob decodes (to exactly its shapes, all finite), False if it is refused with
    UpdateError; any other exception propagates."""
    try:
        update = decode_update(case.blob, case.shapes)
    except UpdateError:
        return False
    assert {name: tensor.shape for name, tensor in update.tensors.items()} == case.shapes
    assert all(tensor.dtype == np.float32 and np.all(np.isfinite(tensor)) for tensor in update.tensors.values())
    return True


# ------------------------------------------------------------------------------------------- (c) replies


@dataclass(frozen=True)
class Round:
    """A round's replies, the instructions the server sent, and the receiver that takes them."""

    replies: list[Message]
    asked: dict[int, Instruction]
    receiver: UplinkReceiver
    detail: str


def local_steps(examples: int) -> int:
    """Two local epochs of batches of 32, as a run config would count them."""
    return 2 * -(-examples // 32)


def random_examples(rng: random.Random) -> ConfigRecordValues:
    """A num-examples claim of any type a ConfigRecord holds, in or out of range."""
    return rng.choice(
        (
            rng.randint(1, 5000),
            rng.randint(1, 5000),
            0,
            -rng.randint(1, 2**63),
            2**63 - 1,
            rng.choice(HUGE),
            float(rng.randint(1, 100)),
            rng.choice(ODD_FLOATS),
            [rng.randint(0, 100) for _ in range(rng.randint(0, 3))],
            [rng.uniform(0, 100) for _ in range(rng.randint(1, 3))],
            True,
            str(rng.randint(1, 5000)),
            rng.randbytes(2),
        )
    )


def random_blob(rng: random.Random) -> bytes:
    """A blob a client might send: a valid one of the round (often), a mutated one, random fields, random bytes."""
    choice = rng.random()
    if choice < 0.5:
        return rng.choice(corpus()).blob
    if choice < 0.75:
        return mutated_blob(rng).blob
    if choice < 0.9:
        return random_update(rng).blob
    return rng.randbytes(rng.randint(0, 64))


def random_content(rng: random.Random) -> RecordDict:
    """A train reply's records: the update and claims present, missing, malformed, or joined by others."""
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
    claims: dict[str, ConfigRecordValues] = {}
    update = rng.random()
    if update < 0.8:
        claims[UPDATE_KEY] = random_blob(rng)
    elif update < 0.85:
        claims[UPDATE_KEY] = rng.choice((rng.randbytes(4).hex(), [0.0] * rng.randint(0, 4), rng.randint(0, 9)))
    if rng.random() < 0.9:
        claims[NUM_EXAMPLES_KEY] = random_examples(rng)
    for key in ("train-loss", "cpu-s", "peak-rss-bytes", "anchor"):
        if rng.random() < 0.3:
            claims[key] = rng.choice(
                (rng.uniform(0, 10), rng.randint(0, 2**40), rng.choice(ODD_FLOATS), rng.randbytes(3), "x")
            )
    where = rng.random()
    if where < 0.85:
        records[DELTA_KEY] = ConfigRecord(claims)
    elif where < 0.9:  # the claims as Flower metrics, the update as an array: not a fedslim reply
        records[DELTA_KEY] = ArrayRecord({"update": Array(np.zeros(rng.randint(0, 4), np.float32))})
        numbers = {k: v for k, v in claims.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        records["metrics"] = MetricRecord(numbers)
    if rng.random() < 0.1:
        records["config"] = ConfigRecord({"role": rng.choice(list(Role)).value, "flag": rng.random() < 0.5})
    return RecordDict(records)


def random_round(rng: random.Random) -> Round:
    """One to five train replies, from asked, unasked and repeated nodes, some of them Flower error replies."""
    nodes = list(range(1, rng.randint(2, 5)))
    roles = (None, Role.TRAIN, Role.ANCHOR, Role.MINER)
    asked = {node: Instruction(f"client-{node}", rng.choice(roles)) for node in nodes if rng.random() < 0.85}
    replies = []
    for _ in range(rng.randint(1, 5)):
        request = Message(RecordDict(), dst_node_id=rng.choice([*nodes, 99]), message_type=TRAIN_TYPE)
        if rng.random() < 0.1:
            replies.append(Message(Error(code=rng.randint(0, 2000), reason=rng.randbytes(6).hex()), reply_to=request))
        else:
            replies.append(Message(random_content(rng), reply_to=request))
    screen = SizeScreen(rng.choice((0.0, 1.5, 10.0)), window=rng.randint(1, 20))
    receiver = UplinkReceiver(dict(SHAPES), FINGERPRINT, screen, local_steps)
    return Round(replies, asked, receiver, f"{len(replies)} replies, {len(asked)} of {len(nodes)} nodes asked")


def random_evaluations(rng: random.Random) -> tuple[list[Message], dict[int, str], dict[str, int], float]:
    """One to five evaluate replies with claims of every type a ConfigRecord holds, from asked, unasked and
    repeated nodes, some of them errors or without an evaluation record; and what the server asked."""
    nodes = list(range(1, rng.randint(2, 5)))
    asked = {node: f"client-{node}" for node in nodes if rng.random() < 0.85}
    declared = {client: rng.randint(0, 300) for client in asked.values() if rng.random() < 0.8}
    replies = []
    for _ in range(rng.randint(1, 5)):
        request = Message(RecordDict(), dst_node_id=rng.choice([*nodes, 99]), message_type="evaluate")
        if rng.random() < 0.1:
            replies.append(Message(Error(code=rng.randint(0, 2000), reason="x"), reply_to=request))
            continue
        claims: dict[str, ConfigRecordValues] = {}
        for key in (EVAL_EXAMPLES_KEY, EVAL_CORRECT_KEY, EVAL_LOSS_KEY, CPU_KEY, PEAK_RSS_KEY):
            if rng.random() < 0.9:
                claims[key] = rng.choice(
                    (rng.randint(0, 80), rng.randint(-5, 2**40), rng.uniform(-1, 10), rng.choice(ODD_FLOATS),
                     rng.random() < 0.5, rng.randbytes(3), "7", [1, 2], rng.choice(HOSTILE_VALUES))
                )  # fmt: skip
        record = EVALUATION_RECORD if rng.random() < 0.9 else "metrics"
        replies.append(Message(RecordDict({record: ConfigRecord(claims)}), reply_to=request))
    return replies, asked, declared, rng.choice((0.1, 0.2, 0.5, 0.9))


def receive_round(round_: Round) -> list[Received]:
    """What the receiver makes of the round: one Received per reply, accepted ones whole and finite."""
    received = round_.receiver.receive(round_.replies, round_.asked, STATE_VERSION)
    assert len(received) == len(round_.replies)
    for item in received:
        assert (item.update is None) == (item.reason is not None)
        if item.update is not None:
            assert {name: delta.shape for name, delta in item.update.delta.items()} == SHAPES
            assert all(np.all(np.isfinite(delta)) for delta in item.update.delta.values())
    return received


# ------------------------------------------------------------------------------------------------- tests

randoms = st.randoms(use_true_random=False)


@pytest.fixture(scope="module", autouse=True)
def built_corpus() -> None:
    """Encode the valid blobs before hypothesis starts timing examples."""
    corpus()


@settings(max_examples=1000, deadline=500, derandomize=True, database=None)
@given(randoms)
def test_mutated_blobs_are_decoded_or_refused_with_update_error(rng: random.Random) -> None:
    decode_case(mutated_blob(rng))


@settings(max_examples=800, deadline=500, derandomize=True, database=None)
@given(randoms)
def test_random_field_values_are_decoded_or_refused_with_update_error(rng: random.Random) -> None:
    decode_case(random_update(rng))


@settings(max_examples=300, deadline=500, derandomize=True, database=None)
@given(randoms)
def test_receive_never_raises_whatever_the_replies(rng: random.Random) -> None:
    receive_round(random_round(rng))


@settings(max_examples=300, deadline=500, derandomize=True, database=None)
@given(randoms)
def test_evaluation_claims_are_accepted_only_when_they_can_be_true(rng: random.Random) -> None:
    replies, asked, declared, holdout = random_evaluations(rng)
    checked = check_evaluations(replies, asked, declared, holdout)
    assert len(checked) == len(replies)
    wire = WireAccounting(RunWire(fuzz_log(), "evaluations", 0, 0, "none", "none", {}), 1)
    for reply, (client, evaluation, reason) in zip(replies, checked):
        wire.record_reply(reply, reason, footprint(reply))  # the log row of every reply, whatever it claims
        if evaluation is not None:
            fuzz_log().record_client_evaluation("evaluations", 1, evaluation)
        assert (evaluation is None) == (reason is not None)
        if evaluation is not None:
            assert client == asked[reply.metadata.src_node_id] == evaluation.client
            assert type(evaluation.examples) is int and type(evaluation.correct) is int
            assert 0 <= evaluation.correct <= evaluation.examples and 0.0 <= evaluation.accuracy <= 1.0
            assert evaluation.loss is None or (math.isfinite(evaluation.loss) and evaluation.loss >= 0)
            if client in declared:
                assert evaluation.examples <= most_held_out(declared[client], holdout)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(randoms)
def test_the_inline_server_path_never_raises_whatever_the_replies(rng: random.Random) -> None:
    run_server_case(random_server_case(rng, "inline"))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(randoms)
def test_flowers_server_path_never_raises_whatever_the_replies(rng: random.Random) -> None:
    run_server_case(random_server_case(rng, "flower"))


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(randoms)
def test_identity_and_final_sync_replies_never_stop_the_server(rng: random.Random) -> None:
    run = server_run(random_server_case(rng))
    grid = cast(FuzzGrid, run.grid.grid)
    query = IdentityQuery({}, Path(__file__), FINGERPRINT, 1.0, 1024)
    requests = query.requests(grid.nodes)
    for request in requests:
        request.metadata.__dict__["_message_id"] = rng.randbytes(32).hex()
    answers = [grid.delivered(hostile_identity(rng, r)) for r in requests if rng.random() < 0.9]
    found = query.settle(run.grid, requests, [a for a in answers if a is not None], WireAccounting(run.wire, 0))
    assert all(0 < examples < 2**63 for examples in found.declared.values())
    assert 0 <= final_sync(run) <= len(run.grid.admitted)


def test_the_corpus_holds_every_pipeline_and_decodes() -> None:
    assert [seed.spec for seed in corpus()] == PIPELINES
    assert all(decode_case(Case("valid", seed.spec, seed.blob, dict(SHAPES))) for seed in corpus())


def test_mutations_reach_a_truncated_lzma_payload_and_it_is_refused() -> None:
    case = find(
        randoms.map(mutated_blob),
        lambda case: case.detail.startswith("truncate at the payload depth") and case.detail.endswith("+lzma blob"),
        settings=settings(derandomize=True, database=None, max_examples=2000),
    )
    with pytest.raises(UpdateError, match="truncated lzma stream"):
        decode_update(case.blob, case.shapes)


# ----------------------------------------------------------------------------------- (d) the server path

BACKENDS = ("inline", "flower")
FUZZ_STRATEGIES = ("fedvarp", "mifa", "fedavg")
MEMORY_FORMS = ("wire", "fp32", "fp16", "bf16")
# Values a claim of any key may take, honest or not: huge integers where the wire allows them (Flower's records
# carry signed 64 bits; in-process nothing stops a larger one), negative, NaN, inf, 1e300, and wrong types.
HOSTILE_VALUES: tuple[ConfigRecordValues, ...] = (
    2**63 - 1,
    2**64 - 1,
    2**70,
    -1,
    -(2**63),
    0,
    1,
    math.nan,
    math.inf,
    -math.inf,
    1e300,
    -1e300,
    5e-324,
    True,
    "12",
    "\ud800",
    b"\x00",
    [1, 2],
    [math.nan],
)
HUGE_VALUES = (3e38, -3e38, 3.4e38, 1e30, 7e4)  # finite float32s whose sum or half-precision storage overflows
CLAIM_KEYS = (NUM_EXAMPLES_KEY, TRAIN_LOSS_KEY, ANCHOR_METRIC, CPU_KEY, PEAK_RSS_KEY)


@functools.cache
def huge_corpus() -> tuple[bytes, ...]:
    """Serialized FastUpdates (of ``STATE_VERSION``) whose every entry is one of ``HUGE_VALUES``, in fp32."""
    return tuple(
        encode_update(
            {name: np.full(shape, value, np.float32) for name, shape in SHAPES.items()},
            parse_codec(spec),
            kind=DELTA,
            base_fingerprint=FINGERPRINT,
            state_version=STATE_VERSION,
        ).blob
        for value in HUGE_VALUES
        for spec in ("none", "topk:0.5")
    )


def versioned(blob: bytes, version: int, lossless: int) -> bytes:
    """A valid update blob with its FastUpdate's state version set to ``version``, wrapped again."""
    update = pb.FastUpdate.FromString(decode_raw(pb.Envelope.FromString(blob)))
    update.state_version = version
    return wrap(update.SerializeToString(), lossless)


def hostile_value(rng: random.Random, honest: ConfigRecordValues) -> ConfigRecordValues:
    """``honest`` (more often than not), or a value no honest client sends."""
    return honest if rng.random() < 0.9 else rng.choice(HOSTILE_VALUES)


def train_reply_content(rng: random.Random, version: int) -> RecordDict:
    """A train reply of the round's ``version``: an update (valid, huge, mutated or stale) and claims, each honest
    or hostile; now and then a reply of the earlier generator's random records instead."""
    if rng.random() < 0.2:
        return random_content(rng)
    choice = rng.random()
    if choice < 0.8:  # a valid update, small or huge, of the round's version (most of the time)
        source = rng.choice(corpus()).blob if choice < 0.55 else rng.choice(huge_corpus())
        named = often(rng, version, 0.85) if rng.random() < 0.9 else 2**64 - 1
        blob = versioned(source, named, rng.choice(tuple(QUICK_COMPRESS)))
    else:
        blob = random_blob(rng)
    honest: dict[str, ConfigRecordValues] = {
        NUM_EXAMPLES_KEY: rng.randint(1, 100),
        TRAIN_LOSS_KEY: rng.uniform(0, 3),
        CPU_KEY: rng.uniform(0, 5),
        PEAK_RSS_KEY: rng.randint(2**20, 2**32),
    }
    claims = {key: hostile_value(rng, value) for key, value in honest.items() if rng.random() < 0.95}
    if rng.random() < 0.1:
        claims[ANCHOR_METRIC] = hostile_value(rng, 1)
    if rng.random() < 0.05:
        claims[rng.choice(("extra", "metric", "x" * 40))] = rng.choice(HOSTILE_VALUES)
    return RecordDict({DELTA_KEY: ConfigRecord({UPDATE_KEY: blob, **claims})})


class FuzzGrid:
    """A grid whose nodes answer with generated replies, as the inline grid or Flower's engine delivers them.

    Inline: node ids from 1000, message ids given as the inline grid gives them, replies as built (values the
    wire could not carry included). Flower: random 64-bit node ids, 64-hex message ids, every reply deflated
    and inflated as the SuperLink's grid does (one the wire cannot carry never arrives), metadata as a hostile
    SuperNode may set it (source node, reply-to id, creation time, type), unanswered instructions answered
    late in a later round's pull.
    """

    def __init__(self, rng: random.Random, backend: str, num_nodes: int) -> None:
        self.rng = rng
        self.flower = backend == "flower"
        self.nodes = (
            [rng.getrandbits(64) or 1 for _ in range(num_nodes)]
            if self.flower
            else [1000 + k for k in range(num_nodes)]
        )
        self.unanswered: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        rng, replies = self.rng, []
        for message in messages:
            message.metadata.__dict__["_message_id"] = rng.randbytes(32).hex()
            if rng.random() < 0.1:
                self.unanswered.append(message)
                continue
            replies.append(self.reply_to(message))
        if replies and rng.random() < 0.2:
            replies.append(rng.choice(replies))  # a second reply from the same node
        if rng.random() < 0.1:  # a reply from a node nobody asked (or one outside the federation)
            stranger = Message(
                RecordDict(), dst_node_id=rng.choice([*self.nodes, rng.getrandbits(64)]), message_type=TRAIN_TYPE
            )
            replies.append(self.reply_to(stranger))
        return [reply for reply in (self.delivered(reply) for reply in replies) if reply is not None]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Flower: late replies to some of the unanswered instructions (and, now and then, to none asked)."""
        if not self.flower:
            return []
        wanted = set(message_ids)
        late = [
            self.reply_to(m) for m in self.unanswered if m.metadata.message_id in wanted and self.rng.random() < 0.5
        ]
        if self.rng.random() < 0.1:
            late.append(
                self.reply_to(Message(RecordDict(), dst_node_id=self.rng.choice(self.nodes), message_type=TRAIN_TYPE))
            )
        return [reply for reply in (self.delivered(reply) for reply in late) if reply is not None]

    def reply_to(self, message: Message) -> Message:
        rng = self.rng
        if message.metadata.message_type == FINAL_SYNC_TYPE:
            return Message(hostile_report(rng), reply_to=message)
        if rng.random() < 0.08:
            return Message(
                Error(code=rng.choice((1004, 1005, 1006, 0, 2**31 - 1)), reason=rng.choice(("x", "\x00" * 500))),
                reply_to=message,
            )
        config = message.content.config_records.get(CONFIG_KEY, {})
        version = config.get(REPLICA_VERSION_KEY, STATE_VERSION)
        reply = Message(train_reply_content(rng, version if isinstance(version, int) else 0), reply_to=message)
        if rng.random() < 0.15:
            self.hostile_metadata(reply)
        return reply

    def hostile_metadata(self, reply: Message) -> None:
        """One metadata field as a hostile node may set it."""
        rng, fields = self.rng, reply.metadata.__dict__
        field = rng.choice(("src", "reply-to", "created", "type"))
        if field == "src":
            fields["_src_node_id"] = rng.choice((0, 2**64 - 1, rng.getrandbits(64), rng.choice(self.nodes)))
        elif field == "reply-to":
            fields["_reply_to_message_id"] = rng.choice(("", rng.randbytes(32).hex(), "x" * 1000))
        elif field == "created":
            reply.metadata.created_at = rng.choice((math.nan, math.inf, -1.0, 1e300, 0.0))
        else:
            reply.metadata.message_type = rng.choice((EVALUATE_TYPE, "query", "train.x"))

    def delivered(self, reply: Message) -> Message | None:
        """The reply as the server's grid hands it over (None: it could not have crossed Flower's wire)."""
        if not self.flower:
            return reply
        contents: dict[str, bytes] = {}

        def deflate(obj: InflatableObject) -> None:
            for child in (obj.children or {}).values():
                deflate(child)
            contents[obj.object_id] = obj.deflate()

        try:
            deflate(reply)
        except (ValueError, TypeError, OverflowError, UnicodeEncodeError):
            return None
        return cast(Message, inflate_object_from_contents(reply.object_id, contents))


def hostile_report(rng: random.Random) -> RecordDict:
    """A final-sync confirmation: a digest (maybe the wrong one, a long text, another type) and a version."""
    digest = rng.choice(("0" * 64, "z" * 10_000, "\x00\ud800", 5, b"digest", 2**64 - 1))
    return RecordDict({REPLICA_RECORD: ConfigRecord({VERSION_KEY: hostile_value(rng, 1), DIGEST_KEY: digest})})


def hostile_identity(rng: random.Random, request: Message) -> Message:
    """An identity reply whose key, declared examples, base status, fingerprint and partial bytes may lie (never
    ``missing``: provisioning is a conversation of its own)."""
    identity = {
        CLIENT_KEY: rng.choice((f"client-{rng.randint(0, 9)}", "", "\ud800", "k" * 1000, "a\nb", 5)),
        NUM_EXAMPLES_KEY: hostile_value(rng, rng.randint(1, 300)),
        BASE_STATUS_KEY: rng.choice(("ok", "ok", "mismatch", "bogus", 3)),
        BASE_FINGERPRINT_KEY: rng.choice((FINGERPRINT, "f" * 5000, "\ud800", 2**64 - 1)),
        PARTIAL_BYTES_KEY: hostile_value(rng, 0),
    }
    kept = {key: value for key, value in identity.items() if rng.random() < 0.9}
    return Message(RecordDict({IDENTITY_KEY: ConfigRecord(kept)}), reply_to=request)


class FastLayer:
    """The part of the server's model that a round uses when it does not evaluate: loading the checked fast state."""

    def load_fast_state(self, state: Mapping[str, np.ndarray]) -> None:
        check_fast_state(state, SHAPES)


@dataclass(frozen=True)
class ServerCase:
    """A run of the server: its backend, strategy, screen and rounds, and the generator of its replies."""

    backend: str
    strategy: str
    memory: str
    screen_factor: float
    num_nodes: int
    rounds: int
    rng: random.Random
    detail: str


def random_server_case(rng: random.Random, backend: str | None = None) -> ServerCase:
    """A server run on one backend (random if not given) with a random strategy, memory form and screen."""
    backend = backend or rng.choice(BACKENDS)
    strategy, memory = rng.choice(FUZZ_STRATEGIES), rng.choice(MEMORY_FORMS)
    factor, nodes, rounds = rng.choice((0.0, 0.0, 10.0, 1.5)), rng.randint(2, 5), rng.randint(1, 3)
    detail = f"{backend} server path: {strategy} ({memory} memory), screen {factor:g}, {nodes} nodes, {rounds} rounds"
    return ServerCase(backend, strategy, memory, factor, nodes, rounds, random.Random(rng.getrandbits(64)), detail)


RUN_IDS = itertools.count()


@functools.cache
def fuzz_log() -> CommLog:
    """One communication log for every server case of the process (each case is a run of its own)."""
    folder = Path(tempfile.mkdtemp(prefix="fedslim-fuzz-"))
    return CommLog(folder / LOG_FILENAME)


def server_run(case: ServerCase) -> ServerRun:
    """A ServerRun of ``case``: the channel, strategy, log and checkpoint of a real run; a grid of generated replies."""
    run_dir = fuzz_log().path.parent / "run"
    config = RunConfig(
        task="synthetic",
        num_clients=case.num_nodes,
        rounds=10**6,  # central evaluation (which needs a model and data) is never due
        eval_every=10**6,
        codec="none",
        downstream_codec="none",
        screen_factor=case.screen_factor,
        out=str(run_dir),
    )
    grid = FuzzGrid(case.rng, case.backend, case.num_nodes)
    keys = {node: f"client-{k}" for k, node in enumerate(grid.nodes)}
    declared = {node: case.rng.randint(50, 300) for node in grid.nodes if case.rng.random() < 0.8}
    ordered = OrderedGrid(grid, keys, declared=declared)  # type: ignore[arg-type]
    strategy = {"fedvarp": FedVARP, "mifa": MIFA, "fedavg": FastFedAvg}[case.strategy](
        fraction_train=case.rng.choice((0.5, 1.0))
    )
    if case.strategy != "fedavg":
        strategy.memory_form = case.memory
    strategy.bind(Federation(ordered.admitted, dict(SHAPES)))
    state = {name: np.full(shape, 0.5, np.float32) for name, shape in SHAPES.items()}
    run_id = f"case-{next(RUN_IDS)}"  # hypothesis may run a case twice: each run has its own rows
    log_ = fuzz_log()
    log_.start_run(run_id, {}, FINGERPRINT, 1, 1, 1, 1)
    wire = RunWire(log_, run_id, 4 * sum(math.prod(s) for s in SHAPES.values()), 1000, "none", "none", dict(keys))
    screen = SizeScreen(case.screen_factor)
    return ServerRun(
        config=config,
        grid=ordered,
        strategy=strategy,
        model=FastLayer(),  # type: ignore[arg-type]
        task=None,  # type: ignore[arg-type]
        test=[],
        fast_state=state,
        downlink=Downlink(
            ServerReplica(state, config.downlink, FINGERPRINT),
            {**config.client_task(), BASE_FINGERPRINT_KEY: FINGERPRINT},
        ),
        uplink=UplinkReceiver(dict(SHAPES), FINGERPRINT, screen, local_steps, ordered.declared_by_client()),
        wire=wire,
    )


def run_server_case(case: ServerCase) -> tuple[int, int]:
    """Run the case's rounds and write a checkpoint; returns (train replies rejected, accepted). The fast state
    and the strategy's memory stay finite, and the checkpoint reads back."""
    run = server_run(case)
    rejected = accepted = 0
    for server_round in range(1, case.rounds + 1):
        totals = run.run_round(server_round)
        rejected, accepted = rejected + totals.rejected + totals.late, accepted + totals.accepted
    assert all(np.all(np.isfinite(value)) for value in run.fast_state.values())
    assert run.strategy.memory_problem() is None
    checkpoint = Checkpoint(
        format=CHECKPOINT_FORMAT,
        run_id=run.wire.run_id,
        config=run.config,
        completed_round=case.rounds,
        fast_state=run.fast_state,
        replica=run.downlink.replica,
        client_versions=run.client_versions,
        rejected=run.rejected,
        strategy=run.strategy,
        screen=run.uplink.screen,
        node_states=None,
        arithmetic=Arithmetic(1, "fuzz", torch.__version__, np.__version__, "cpu"),
    )
    if case.rng.random() < 0.2:  # the run's own writer (fsync, rename) now and then; its pickle every time
        run.config.run_dir.mkdir(parents=True, exist_ok=True)
        write_checkpoint(checkpoint, run.config.run_dir)
        restored = load_checkpoint(run.config.run_dir)
    else:
        restored = pickle.loads(pickle.dumps(checkpoint, protocol=pickle.HIGHEST_PROTOCOL))
    assert all(np.array_equal(restored.fast_state[n], v) for n, v in run.fast_state.items())
    return rejected, accepted
