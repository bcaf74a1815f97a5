"""Value codings: a flat float32 vector to a ``fedslim.v1.Values`` message and back.

Each coding states its error bound (``max_abs_error``) so that property tests
can hold it to it; ``Values.ByteSize()`` is its exact cost on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedslim.protos.fedslim.v1 import update_pb2 as pb


class WireFormatError(ValueError):
    """An encoded message is malformed: the text names what is wrong."""


class ValueCoding(Protocol):
    @property
    def spec(self) -> str: ...

    @property
    def biased(self) -> bool: ...

    @property
    def wire_bits(self) -> int:
        """Bits each value takes on the wire (a Values message adds a few bytes to ``count * wire_bits / 8``)."""
        ...

    def encode(self, values: np.ndarray) -> pb.Values: ...

    def max_abs_error(self, values: np.ndarray) -> float:
        """Bound on max |decode(encode(values)) - values| for this input."""
        ...


def _check_finite(values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError("cannot encode non-finite values (NaN or Inf)")


@dataclass(frozen=True)
class Float32:
    """Uncompressed IEEE float32: exact."""

    spec: str = "fp32"
    biased: bool = False
    wire_bits: int = 32

    def encode(self, values: np.ndarray) -> pb.Values:
        _check_finite(values)
        data = np.ascontiguousarray(values, dtype="<f4").tobytes()
        return pb.Values(count=values.size, floats=pb.Floats(type=pb.FLOAT_TYPE_FLOAT32, data=data))

    def max_abs_error(self, values: np.ndarray) -> float:
        return 0.0


@dataclass(frozen=True)
class Float16:
    """IEEE half precision (round to nearest): relative error <= 2^-11 for |x| >= 2^-14, refuses |x| > 65504."""

    spec: str = "fp16"
    biased: bool = False
    wire_bits: int = 16

    def encode(self, values: np.ndarray) -> pb.Values:
        _check_finite(values)
        if values.size and float(np.max(np.abs(values))) > float(np.finfo(np.float16).max):
            raise ValueError("values exceed the float16 range (|x| > 65504); use bf16 or fp32")
        data = values.astype("<f2").tobytes()
        return pb.Values(count=values.size, floats=pb.Floats(type=pb.FLOAT_TYPE_FLOAT16, data=data))

    def max_abs_error(self, values: np.ndarray) -> float:
        # Normal range: half an ulp (2^-11 relative); subnormals: absolute spacing 2^-24.
        return float(np.max(np.abs(values), initial=0.0)) * 2.0**-11 + 2.0**-25


@dataclass(frozen=True)
class BFloat16:
    """bfloat16 (the top 16 bits of float32, round to nearest even): relative error <= 2^-8 (above 2^-126)."""

    spec: str = "bf16"
    biased: bool = False
    wire_bits: int = 16

    def encode(self, values: np.ndarray) -> pb.Values:
        _check_finite(values)
        bits = np.ascontiguousarray(values, dtype="<f4").view("<u4").astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        if np.any((rounded & 0x7F80) == 0x7F80):
            raise ValueError("values overflow bfloat16")
        data = rounded.astype("<u2").tobytes()
        return pb.Values(count=values.size, floats=pb.Floats(type=pb.FLOAT_TYPE_BFLOAT16, data=data))

    def max_abs_error(self, values: np.ndarray) -> float:
        # Normal range: half an ulp (2^-8 relative); subnormals: absolute spacing 2^-133.
        return float(np.max(np.abs(values), initial=0.0)) * 2.0**-8 + 2.0**-134


@dataclass(frozen=True)
class Quantize:
    """Uniform quantization to ``bits`` bits over [min, max], round to nearest: error <= scale / 2."""

    bits: int = 8
    biased: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"quantization bits must be 1..8, got {self.bits}")

    @property
    def spec(self) -> str:
        return f"q{self.bits}"

    @property
    def wire_bits(self) -> int:
        return self.bits

    def _range(self, values: np.ndarray) -> tuple[np.float32, np.float32]:
        low = np.float32(values.min()) if values.size else np.float32(0.0)
        high = np.float32(values.max()) if values.size else np.float32(0.0)
        return low, np.float32((high - low) / np.float32(2**self.bits - 1))

    def encode(self, values: np.ndarray) -> pb.Values:
        _check_finite(values)
        offset, scale = self._range(values)
        if scale > 0:
            codes = np.rint((values - offset) / scale)
            codes = np.clip(codes, 0, 2**self.bits - 1).astype(np.uint8)
        else:
            codes = np.zeros(values.size, dtype=np.uint8)
        quantized = pb.Quantized(
            bits=self.bits, offset=float(offset), scale=float(scale), codes=pack_bits(codes, self.bits)
        )
        return pb.Values(count=values.size, quantized=quantized)

    def max_abs_error(self, values: np.ndarray) -> float:
        if not values.size:
            return 0.0
        offset, scale = self._range(values)
        # Half a step, plus float32 rounding of offset + code * scale; a scale below float32's subnormals rounds
        # (to 0, say) by up to 2^-150, so up to 255 codes err by 2^-142 at most.
        return float(scale) / 2 + float(np.max(np.abs(values))) * 2.0**-22 + float(scale) * 2.0**-20 + 2.0**-142


@dataclass(frozen=True)
class Sign:
    """One bit per value: scale * sign(x) with scale = mean |x| (the L2-optimal scale; EF-signSGD)."""

    spec: str = "sign"
    biased: bool = True
    wire_bits: int = 1

    def encode(self, values: np.ndarray) -> pb.Values:
        _check_finite(values)
        scale = np.float32(np.mean(np.abs(values), dtype=np.float64)) if values.size else np.float32(0.0)
        codes = (values >= 0).astype(np.uint8)
        quantized = pb.Quantized(bits=1, offset=float(-scale), scale=float(2 * scale), codes=pack_bits(codes, 1))
        return pb.Values(count=values.size, quantized=quantized)

    def max_abs_error(self, values: np.ndarray) -> float:
        if not values.size:
            return 0.0
        scale = float(np.mean(np.abs(values)))
        return float(np.max(np.abs(np.abs(values) - scale))) * (1 + 2.0**-20) + 2.0**-30


def decode_values(message: pb.Values, expected_count: int) -> np.ndarray:
    """The float32 vector a Values message holds; raises WireFormatError if it is malformed."""
    if message.count != expected_count:
        raise WireFormatError(f"expected {expected_count} values, the message declares {message.count}")
    kind = message.WhichOneof("kind")
    if kind == "floats":
        return _decode_floats(message.floats, expected_count)
    if kind == "quantized":
        return _decode_quantized(message.quantized, expected_count)
    raise WireFormatError("values have no known encoding (neither floats nor quantized)")


_FLOAT_WIDTH = {pb.FLOAT_TYPE_FLOAT32: 4, pb.FLOAT_TYPE_FLOAT16: 2, pb.FLOAT_TYPE_BFLOAT16: 2}


def _decode_floats(floats: pb.Floats, count: int) -> np.ndarray:
    width = _FLOAT_WIDTH.get(floats.type)
    if width is None:
        raise WireFormatError(f"unknown float type {floats.type}")
    if len(floats.data) != count * width:
        raise WireFormatError(f"float data is {len(floats.data)} bytes, expected {count * width} for {count} values")
    if floats.type == pb.FLOAT_TYPE_FLOAT32:
        return np.frombuffer(floats.data, dtype="<f4").astype(np.float32)
    if floats.type == pb.FLOAT_TYPE_FLOAT16:
        return np.frombuffer(floats.data, dtype="<f2").astype(np.float32)
    widened = np.frombuffer(floats.data, dtype="<u2").astype(np.uint32) << 16
    return widened.view(np.float32)


def _decode_quantized(quantized: pb.Quantized, count: int) -> np.ndarray:
    if not 1 <= quantized.bits <= 8:
        raise WireFormatError(f"quantization bits must be 1..8, got {quantized.bits}")
    codes = unpack_bits(quantized.codes, quantized.bits, count)
    offset, scale = np.float32(quantized.offset), np.float32(quantized.scale)
    return offset + codes.astype(np.float32) * scale


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack uint8 codes below 2**bits into a little-endian bit stream (``bits`` bits each)."""
    if bits == 8:
        return codes.astype(np.uint8).tobytes()
    planes = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    expected = (count * bits + 7) // 8
    if len(data) != expected:
        raise WireFormatError(f"packed codes are {len(data)} bytes, expected {expected} for {count} x {bits} bits")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    stream = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
    return (stream.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)
