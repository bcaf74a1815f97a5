"""Codecs: every stage holds its stated error bound, byte accounting is exact, bad blobs are refused."""

from __future__ import annotations

import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedslim.codecs import UpdateError, decode_budget, decode_update, encode_update, parse_codec
from fedslim.codecs.layouts import PowerSGD, RandK, TopK, decode_varints, encode_varints, seeded_positions
from fedslim.codecs.lossless import Lzma
from fedslim.codecs.pipeline import DELTA, TENSOR_OVERHEAD_BYTES, UPDATE_OVERHEAD_BYTES, CodecSpecError, Pipeline
from fedslim.codecs.values import BFloat16, Float16, Float32, Quantize, Sign, ValueCoding, pack_bits, unpack_bits
from fedslim.protos.fedslim.v1 import update_pb2 as pb

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
vectors = arrays(np.float32, st.integers(1, 300), elements=finite)
matrices = arrays(np.float32, st.tuples(st.integers(2, 24), st.integers(2, 24)), elements=finite)


def roundtrip(tensor: np.ndarray, pipeline: Pipeline, seed: int = 0) -> np.ndarray:
    encoded = encode_update({"t": tensor}, pipeline, kind=DELTA, base_fingerprint="b", state_version=1, seed=seed)
    decoded = decode_update(encoded.blob, {"t": tensor.shape})
    np.testing.assert_array_equal(decoded.tensors["t"], encoded.decoded["t"])  # sender knows what receiver gets
    return decoded.tensors["t"]


@settings(max_examples=60, deadline=None)
@given(vectors, st.sampled_from([Float32(), Float16(), BFloat16(), *[Quantize(b) for b in range(1, 9)], Sign()]))
def test_value_codings_hold_their_error_bound(x: np.ndarray, coding) -> None:
    y = roundtrip(x, Pipeline(values=coding))
    assert np.max(np.abs(y - x)) <= coding.max_abs_error(x)


@settings(max_examples=40, deadline=None)
@given(vectors)
def test_sign_is_the_l2_optimal_scaled_sign(x: np.ndarray) -> None:
    y = roundtrip(x, parse_codec("sign"))
    scale = np.mean(np.abs(x.astype(np.float64)))
    np.testing.assert_allclose(y, np.where(x >= 0, scale, -scale), rtol=1e-6, atol=1e-30)
    # ||x - s sign(x)||^2 = ||x||^2 - ||x||_1^2 / d for the optimal s.
    residual = np.sum((x.astype(np.float64) - y) ** 2)
    expected = np.sum(x.astype(np.float64) ** 2) - np.sum(np.abs(x.astype(np.float64))) ** 2 / x.size
    assert residual == pytest.approx(expected, rel=1e-4, abs=1e-3)


@settings(max_examples=60, deadline=None)
@given(vectors, st.floats(0.01, 1.0))
def test_topk_keeps_exactly_the_largest_entries(x: np.ndarray, density: float) -> None:
    y = roundtrip(x, Pipeline(layout=TopK(density)))
    k = min(x.size, max(1, round(density * x.size)))
    kept = np.flatnonzero(y)
    assert kept.size <= k
    np.testing.assert_array_equal(y[kept], x[kept])
    dropped = np.setdiff1d(np.arange(x.size), kept)
    if dropped.size and kept.size:
        assert np.max(np.abs(x[dropped])) <= np.min(np.abs(x[kept]))
    # Contractive: ||x - C(x)||^2 <= (1 - k/d) ||x||^2.
    assert np.sum((x - y) ** 2.0) <= (1 - k / x.size) * np.sum(x**2.0) * (1 + 1e-6) + 1e-30


@settings(max_examples=40, deadline=None)
@given(vectors, st.floats(0.01, 1.0), st.integers(0, 2**63))
def test_randk_sends_values_at_seeded_positions_and_no_indices(x: np.ndarray, density: float, seed: int) -> None:
    pipeline = Pipeline(layout=RandK(density))
    encoded = encode_update({"t": x}, pipeline, kind=DELTA, base_fingerprint="b", state_version=1, seed=seed)
    update = pb.FastUpdate.FromString(pb.Envelope.FromString(encoded.blob).payload)
    sparse = update.tensors[0].sparse
    assert sparse.WhichOneof("indices") == "random_seed"
    positions = seeded_positions(sparse.random_seed, x.size, int(sparse.nnz))
    y = decode_update(encoded.blob, {"t": x.shape}).tensors["t"]
    np.testing.assert_array_equal(y[positions], x[positions])
    assert not np.any(np.delete(y, positions))


@settings(max_examples=40, deadline=None)
@given(matrices, st.integers(1, 4))
def test_powersgd_is_a_projection_never_larger_than_its_input(m: np.ndarray, rank: int) -> None:
    y = roundtrip(m, Pipeline(layout=PowerSGD(rank)))
    m64 = m.astype(np.float64)
    error = np.sum((m64 - y) ** 2)
    assert error <= np.sum(m64**2) * (1 + 1e-5) + 1e-6


def test_powersgd_recovers_a_low_rank_matrix_exactly() -> None:
    rng = np.random.default_rng(0)
    m = (rng.standard_normal((40, 2)) @ rng.standard_normal((2, 30))).astype(np.float32)
    y = roundtrip(m, parse_codec("powersgd:2"))
    np.testing.assert_allclose(y, m, atol=1e-4)
    encoded = encode_update({"t": m}, parse_codec("powersgd:2"), kind=DELTA, base_fingerprint="b", state_version=0)
    assert len(encoded.blob) < 0.2 * m.nbytes


@settings(max_examples=30, deadline=None)
@given(vectors, st.sampled_from(["zlib", "lzma", "zstd"]))
def test_lossless_stages_are_exact(x: np.ndarray, stage: str) -> None:
    np.testing.assert_array_equal(
        roundtrip(x, parse_codec(f"topk:0.5+q8+{stage}")), roundtrip(x, parse_codec("topk:0.5+q8"))
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**62), max_size=50))
def test_varints_roundtrip(numbers: list[int]) -> None:
    data = encode_varints(np.array(numbers, dtype=np.uint64))
    np.testing.assert_array_equal(decode_varints(data, len(numbers)), np.array(numbers, dtype=np.uint64))


@given(arrays(np.uint8, st.integers(0, 100), elements=st.integers(0, 255)), st.integers(1, 8))
def test_bit_packing_roundtrip(codes: np.ndarray, bits: int) -> None:
    codes = codes & np.uint8(2**bits - 1)
    packed = pack_bits(codes, bits)
    assert len(packed) == (codes.size * bits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(packed, bits, codes.size), codes)


def test_sparse_indices_use_the_smaller_of_varint_gaps_and_bitmask() -> None:
    x = np.zeros(10_000, np.float32)
    x[::2] = 1.0  # half the entries: a bitmask (1,250 B) beats 5,000 one-byte gaps
    dense_positions = encode_update({"t": x}, parse_codec("topk:0.5"), kind=DELTA, base_fingerprint="", state_version=0)
    x[:] = 0
    x[::500] = 1.0  # 20 entries: gaps (2 B each) beat the bitmask
    few_positions = encode_update({"t": x}, parse_codec("topk:0.002"), kind=DELTA, base_fingerprint="", state_version=0)
    kinds = [
        pb.FastUpdate.FromString(pb.Envelope.FromString(e.blob).payload).tensors[0].sparse.WhichOneof("indices")
        for e in (dense_positions, few_positions)
    ]
    assert kinds == ["bitmask", "gaps_varint"]


def test_byte_accounting_is_exact() -> None:
    x = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    encoded = encode_update({"t": x}, parse_codec("topk:0.1+q4+zstd"), kind=DELTA, base_fingerprint="", state_version=0)
    envelope = pb.Envelope.FromString(encoded.blob)
    assert envelope.ByteSize() == len(encoded.blob)
    raw = zstandard.ZstdDecompressor().decompress(envelope.payload)
    assert envelope.raw_size == encoded.raw_bytes == len(raw)
    # 500 kept entries at 4 bits, their gaps at 1-2 bytes each.
    tensor = pb.FastUpdate.FromString(raw).tensors[0]
    assert len(tensor.sparse.values.quantized.codes) == 250
    assert 500 <= len(tensor.sparse.gaps_varint) <= 1000


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("none", "none"),
        (" None ", "none"),
        ("TopK:0.01+q8", "topk:0.01+q8"),
        ("ternary:0.1", "ternary:0.1"),
        ("topk:0.1+sign+zstd", "ternary:0.1+zstd"),
        ("randk:0.05+q4", "randk:0.05+q4"),
        ("powersgd:2+fp16+lzma", "powersgd:2+fp16+lzma"),
        ("fp32+zlib", "zlib"),
    ],
)
def test_codec_specs_parse_to_their_canonical_form(spec: str, canonical: str) -> None:
    assert parse_codec(spec).spec == canonical
    assert parse_codec(canonical).spec == canonical


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("topk", "needs an argument"),
        ("topk:2", "density"),
        ("q9", "bits"),
        ("q8+topk:0.1", "must come first"),
        ("zstd+q8", "only one value coding"),
        ("gzip", "unknown codec stage"),
        ("topk:0.1+randk:0.1", "only one layout"),
        ("powersgd:0", "rank"),
        ("", "the codec spec is empty; none is dense float32"),
        ("  ", "the codec spec is empty"),
        ("topk:0.1+", "an empty stage: '\\+' joins two stages"),
        ("+zstd", "an empty stage"),
        ("fp16++zstd", "an empty stage"),
        ("none+zstd", "unknown codec stage 'none'"),
        ("zstd+zstd", "one lossless stage"),
        ("fp16+fp16", "only one value coding"),
    ],
)
def test_bad_codec_specs_are_named(spec: str, message: str) -> None:
    with pytest.raises(CodecSpecError, match=message):
        parse_codec(spec)


def test_encoders_refuse_non_finite_and_out_of_range_input() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        encode_update(
            {"t": np.array([1.0, np.nan], np.float32)},
            parse_codec("topk:0.5+q8"),
            kind=DELTA,
            base_fingerprint="",
            state_version=0,
        )
    with pytest.raises(ValueError, match="float16 range"):
        encode_update(
            {"t": np.array([1e6], np.float32)}, parse_codec("fp16"), kind=DELTA, base_fingerprint="", state_version=0
        )


def _blob(pipeline: str = "topk:0.5+q8") -> tuple[bytes, dict[str, tuple[int, ...]]]:
    x = np.arange(-8, 8, dtype=np.float32).reshape(4, 4)
    return encode_update({"t": x}, parse_codec(pipeline), kind=DELTA, base_fingerprint="b", state_version=0).blob, {
        "t": (4, 4)
    }


def _with_update(edit) -> bytes:
    blob, _ = _blob()
    envelope = pb.Envelope.FromString(blob)
    update = pb.FastUpdate.FromString(envelope.payload)
    edit(update)
    envelope.payload = update.SerializeToString()
    envelope.raw_size, envelope.crc32 = len(envelope.payload), zlib.crc32(envelope.payload)
    return envelope.SerializeToString()


@pytest.mark.parametrize(
    ("make_blob", "message"),
    [
        (lambda: _blob()[0][:20], "corrupt or truncated"),
        (lambda: _blob("fp32")[0][:-9] + b"\x01" + _blob("fp32")[0][-8:], "CRC-32 mismatch"),
        (lambda: _blob("topk:0.5+q8+zstd")[0][:-6] + b"\0" * 6, "corrupt"),
        (lambda: _with_update(lambda u: u.tensors[0].ClearField("sparse")), "no known encoding"),
        (
            lambda: _with_update(lambda u: u.tensors[0].sparse.values.quantized.__setattr__("bits", 12)),
            "bits must be 1..8",
        ),
        (lambda: _with_update(lambda u: u.tensors[0].sparse.__setattr__("gaps_varint", b"\x05" * 8)), "out of range"),
        (
            lambda: _with_update(lambda u: u.tensors[0].sparse.__setattr__("gaps_varint", b"\x00" * 8)),
            "strictly increasing",
        ),
        (lambda: _with_update(lambda u: u.tensors[0].sparse.__setattr__("nnz", 99)), "more than its 16"),
        (
            lambda: _with_update(lambda u: u.tensors[0].sparse.values.quantized.__setattr__("offset", float("inf"))),
            "non-finite",
        ),
        (lambda: _with_update(lambda u: u.tensors.add().CopyFrom(u.tensors[0])), "twice"),
        (lambda: _with_update(lambda u: u.tensors[0].__setattr__("name", "s")), "unknown \\['s'\\], missing \\['t'\\]"),
        (lambda: _with_update(lambda u: u.__setattr__("kind", 5)), "unknown update kind"),
        (
            lambda: pb.Envelope(
                lossless=pb.LOSSLESS_LZMA, raw_size=100, payload=Lzma().compress(bytes(10**7))
            ).SerializeToString(),
            "inflates past",
        ),
        (lambda: pb.Envelope(raw_size=10**12).SerializeToString(), "above the"),
        (
            lambda: pb.Envelope(
                lossless=pb.LOSSLESS_ZSTD, raw_size=100, payload=zstandard.ZstdCompressor().compress(bytes(10**5))
            ).SerializeToString(),
            "zstd stream declares 100000 bytes",
        ),
        (
            lambda: _with_payload("topk:0.5+q8+lzma", lambda p: p + b"\0"),
            "trailing data after the lzma stream",
        ),
        (
            lambda: _with_payload("topk:0.5+q8+zlib", lambda p: p + b"\0"),
            "trailing data after the zlib stream",
        ),
        (lambda: _with_payload("topk:0.5+q8+zstd", lambda p: p[:-3]), "corrupt zstd stream"),
        (
            lambda: _with_payload("topk:0.5+q8+lzma", lambda p: p[:1] + (1 << 26).to_bytes(4, "little") + p[5:]),
            "lzma stream declares a 67108864-byte dictionary",
        ),
        (
            lambda: _with_payload("topk:0.5+q8+lzma", lambda p: p[:5] + (10**6).to_bytes(8, "little") + p[13:]),
            "lzma stream declares 1000000 bytes",
        ),
        (
            lambda: _with_update(lambda u: u.tensors[0].sparse.__setattr__("gaps_varint", b"\0" + b"\1" * 6 + b"\x81")),
            "tensor 't': index stream is truncated",
        ),
        (
            lambda: _with_update(lambda u: u.tensors[0].sparse.__setattr__("gaps_varint", b"\0\x81\0" + b"\1" * 6)),
            "overlong",
        ),
        (
            lambda: _with_update(
                lambda u: u.tensors[0].low_rank.CopyFrom(
                    pb.LowRank(rank=2, left=Float32().encode(np.ones(8)), right=Float32().encode(np.ones(8)))
                )
            ),
            "tensor 't': low-rank rank 2 for a 4 x 4 matrix: its factors \\(16 numbers\\) are not smaller",
        ),
        (lambda: b"\0" * 200_000, "update blob is 200000 bytes"),
    ],
)
def test_bad_blobs_are_refused_with_a_named_reason(make_blob, message: str) -> None:
    with pytest.raises(UpdateError, match=message):
        decode_update(make_blob(), {"t": (4, 4)})


def _with_payload(pipeline: str, edit) -> bytes:
    envelope = pb.Envelope.FromString(_blob(pipeline)[0])
    envelope.payload = edit(envelope.payload)
    return envelope.SerializeToString()


@pytest.mark.parametrize("stray", [b"\x80", b"\x05", b"\0"])
def test_a_sparse_tensor_with_no_entries_and_a_stray_index_byte_is_an_update_error(stray: bytes) -> None:
    def edit(update: pb.FastUpdate) -> None:
        update.tensors[0].sparse.CopyFrom(pb.Sparse(nnz=0, gaps_varint=stray, values=Float32().encode(np.zeros(0))))

    with pytest.raises(UpdateError, match="tensor 't': index stream"):
        decode_update(_with_update(edit), {"t": (4, 4)})


def test_a_maximum_rank_low_rank_tensor_is_refused_at_once() -> None:
    side = 1024
    codes = np.random.default_rng(0).integers(0, 256, side * side // 8, dtype=np.uint8).tobytes()
    factor = pb.Values(count=side * side, quantized=pb.Quantized(bits=1, offset=-1.0, scale=2.0, codes=codes))
    tensor = pb.Tensor(name="t", shape=(side, side), low_rank=pb.LowRank(rank=side, left=factor, right=factor))
    raw = pb.FastUpdate(kind=DELTA, base_fingerprint="b", tensors=[tensor]).SerializeToString()
    blob = pb.Envelope(raw_size=len(raw), payload=raw, crc32=zlib.crc32(raw)).SerializeToString()
    started = time.perf_counter()
    with pytest.raises(UpdateError, match="low-rank rank 1024 for a 1024 x 1024 matrix"):
        decode_update(blob, {"t": (side, side)})
    assert time.perf_counter() - started < 0.25


BUDGET_SHAPES = {"lora.a": (40, 30), "lora.b": (8, 30), "head.bias": (7,), "conv": (6, 3, 3, 3), "one": (1,)}


@pytest.mark.parametrize(
    "spec",
    [
        "none",
        "fp16",
        "bf16",
        "q1",
        "q4+zlib",
        "sign",
        "topk:0.01",
        "topk:0.3+q8+lzma",
        "topk:1",
        "ternary:0.1+zstd",
        "randk:0.05+q4",
        "randk:1+fp16",
        "powersgd:1",
        "powersgd:2+fp16+lzma",
        "powersgd:4+q2",
        "powersgd:64",
    ],
)
def test_every_update_a_codec_sends_fits_its_decode_budget(spec: str) -> None:
    pipeline = parse_codec(spec)
    budget = decode_budget(pipeline, BUDGET_SHAPES)
    rng = np.random.default_rng(7)
    for scale in (1e-6, 1.0, 1e3):  # every entry nonzero: top-k keeps its full count, positions as a bitmask
        tensors = {
            name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in BUDGET_SHAPES.items()
        }
        encoded = encode_update(tensors, pipeline, kind=DELTA, base_fingerprint="f" * 64, state_version=2**63)
        assert encoded.raw_bytes <= budget.max_raw_bytes
        decode_update(encoded.blob, BUDGET_SHAPES, budget)
        if not isinstance(pipeline.layout, TopK):  # top-k's bound counts the larger form of its positions
            framing = UPDATE_OVERHEAD_BYTES + len(BUDGET_SHAPES) * (TENSOR_OVERHEAD_BYTES + 64)
            assert budget.max_raw_bytes - encoded.raw_bytes <= framing
    assert budget.codec == pipeline.spec
    assert budget.max_rank == (pipeline.layout.rank if isinstance(pipeline.layout, PowerSGD) else 0)


def _low_rank_blob(rows: int, cols: int, rank: int, values: ValueCoding) -> bytes:
    """A well-formed update of one rows x cols tensor sent as rank-``rank`` factors."""
    rng = np.random.default_rng(0)
    factors = pb.LowRank(
        rank=rank,
        left=values.encode(rng.standard_normal(rows * rank).astype(np.float32)),
        right=values.encode(rng.standard_normal(cols * rank).astype(np.float32)),
    )
    update = pb.FastUpdate(kind=DELTA, base_fingerprint="b", state_version=1)
    update.tensors.append(pb.Tensor(name="embeddings", shape=(rows, cols), low_rank=factors))
    raw = update.SerializeToString()
    return pb.Envelope(raw_size=len(raw), payload=raw, crc32=zlib.crc32(raw)).SerializeToString()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("none", "tensor 'embeddings' comes as rank-379 factors; codec none sends no low-rank factors"),
        ("topk:0.1+q8+lzma", "comes as rank-379 factors; codec topk:0.1\\+q8\\+lzma sends no low-rank factors"),
        ("powersgd:4", "update blob is 14642.. bytes, above the 992384 bytes any update of codec powersgd:4 fits in"),
    ],
)
def test_a_maximum_rank_update_on_the_text_models_embedding_is_refused_by_the_runs_budget(
    spec: str, message: str
) -> None:
    # 30522 x 384 (all-MiniLM-L6-v2's embedding under --fast full): rank 379 is the largest the shape allows, and
    # decoding it took 15 to 70 s and 125 to 180 MiB. With 1-bit factors the blob fits a dense codec's byte budget.
    shapes = {"embeddings": (30522, 384)}
    blob = _low_rank_blob(30522, 384, 379, Quantize(1))
    started = time.perf_counter()
    with pytest.raises(UpdateError, match=message):
        decode_update(blob, shapes, decode_budget(parse_codec(spec), shapes))
    assert time.perf_counter() - started < 1.0


def test_a_low_rank_codec_takes_its_own_rank_and_no_more() -> None:
    shapes = {"embeddings": (300, 40)}
    budget = decode_budget(parse_codec("powersgd:4"), shapes)
    assert decode_update(_low_rank_blob(300, 40, 4, Quantize(1)), shapes, budget).tensors["embeddings"].shape == (
        300,
        40,
    )
    with pytest.raises(
        UpdateError, match="tensor 'embeddings' comes as rank-5 factors; codec powersgd:4 sends rank 4 at most"
    ):
        decode_update(_low_rank_blob(300, 40, 5, Quantize(1)), shapes, budget)
    decode_update(_low_rank_blob(300, 40, 35, Quantize(1)), shapes)  # without a budget: any rank the shape allows


def test_a_dense_update_is_beyond_a_sparse_codecs_budget() -> None:
    tensors = {name: np.ones(shape, np.float32) for name, shape in BUDGET_SHAPES.items()}
    dense = encode_update(tensors, parse_codec("none"), kind=DELTA, base_fingerprint="b", state_version=1)
    budget = decode_budget(parse_codec("topk:0.01+q8"), BUDGET_SHAPES)
    with pytest.raises(UpdateError, match="bytes any update of codec topk:0.01\\+q8 fits in"):
        decode_update(dense.blob, BUDGET_SHAPES, budget)


def test_checked_in_protobuf_code_is_not_stale() -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "generate_protos.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(("zeros", "density"), [(0.9, 0.05), (0.9, 0.5), (0.2, 0.1)])
def test_topk_never_spends_a_position_on_a_zero(zeros: float, density: float) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal(10_000).astype(np.float32)
    x[rng.random(10_000) < zeros] = 0.0
    y = roundtrip(x, Pipeline(layout=TopK(density)))
    kept = np.flatnonzero(y)
    k = round(density * x.size)
    assert kept.size == min(k, np.count_nonzero(x))
    threshold = np.sort(np.abs(x))[-kept.size]
    np.testing.assert_array_equal(kept, np.flatnonzero(np.abs(x) >= threshold))
