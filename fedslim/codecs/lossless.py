"""Lossless stages applied to a serialized update, each refusing to inflate past a limit."""

from __future__ import annotations

import lzma
import zlib
from dataclasses import dataclass
from typing import Protocol

import zstandard

from fedslim.codecs.values import WireFormatError
from fedslim.protos.fedslim.v1 import update_pb2 as pb


class LosslessStage(Protocol):
    @property
    def spec(self) -> str: ...

    @property
    def kind(self) -> pb.Lossless: ...

    def compress(self, data: bytes) -> bytes: ...

    def decompress(self, data: bytes, limit: int) -> bytes:
        """The original bytes; WireFormatError if corrupt or longer than ``limit``."""
        ...


@dataclass(frozen=True)
class NoLossless:
    spec: str = ""
    kind: pb.Lossless = pb.LOSSLESS_NONE

    def compress(self, data: bytes) -> bytes:
        return data

    def decompress(self, data: bytes, limit: int) -> bytes:
        return data


@dataclass(frozen=True)
class Zlib:
    level: int = 9
    spec: str = "zlib"
    kind: pb.Lossless = pb.LOSSLESS_ZLIB

    def compress(self, data: bytes) -> bytes:
        return zlib.compress(data, self.level)

    def decompress(self, data: bytes, limit: int) -> bytes:
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(data, limit + 1)
        except zlib.error as exc:
            raise WireFormatError(f"corrupt zlib stream: {exc}") from exc
        if len(out) > limit or inflater.unconsumed_tail:
            raise WireFormatError(f"zlib stream inflates past the {limit}-byte limit")
        if not inflater.eof:
            raise WireFormatError("truncated zlib stream")
        if inflater.unused_data:
            raise WireFormatError(f"trailing data after the zlib stream ({len(inflater.unused_data)} bytes)")
        return out


_LZMA_UNKNOWN_SIZE = (1 << 64) - 1


@dataclass(frozen=True)
class Lzma:
    """LZMA in the 13-byte-header ``.lzma`` container, tuned for update payloads.

    lc=lp=pb=0 makes the literal coder order-0 (no previous-byte or position
    contexts): the streams it sees (index gaps, quantization codes) are close
    to memoryless, and the contexts only dilute their statistics. The header
    declares the dictionary size, the buffer a decoder allocates: decoding
    refuses one larger than both the update limit and ``DICT_SIZE``, and
    caps memory at ``MEMLIMIT``.
    """

    spec: str = "lzma"
    kind: pb.Lossless = pb.LOSSLESS_LZMA
    DICT_SIZE = 1 << 20
    FILTERS = (
        {"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": DICT_SIZE, "lc": 0, "lp": 0, "pb": 0},
    )
    MEMLIMIT = 1 << 26

    def compress(self, data: bytes) -> bytes:
        return lzma.compress(data, format=lzma.FORMAT_ALONE, filters=list(self.FILTERS))

    def decompress(self, data: bytes, limit: int) -> bytes:
        # Header: properties (1 byte), dictionary size (4), uncompressed size (8; all ones: unknown), little-endian.
        if len(data) >= 13:
            dictionary, declared = int.from_bytes(data[1:5], "little"), int.from_bytes(data[5:13], "little")
            if dictionary > max(limit, self.DICT_SIZE):
                raise WireFormatError(
                    f"lzma stream declares a {dictionary}-byte dictionary, above the {max(limit, self.DICT_SIZE)}-byte "
                    "limit"
                )
            if declared != _LZMA_UNKNOWN_SIZE and declared > limit:
                raise WireFormatError(f"lzma stream declares {declared} bytes, above the {limit}-byte limit")
        inflater = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=self.MEMLIMIT)
        try:
            out = inflater.decompress(data, max_length=limit + 1)
        except lzma.LZMAError as exc:
            raise WireFormatError(f"corrupt lzma stream: {exc}") from exc
        if len(out) > limit:
            raise WireFormatError(f"lzma stream inflates past the {limit}-byte limit")
        if not inflater.eof:
            raise WireFormatError("truncated lzma stream")
        if inflater.unused_data:
            raise WireFormatError(f"trailing data after the lzma stream ({len(inflater.unused_data)} bytes)")
        return out


@dataclass(frozen=True)
class Zstd:
    level: int = 19
    spec: str = "zstd"
    kind: pb.Lossless = pb.LOSSLESS_ZSTD

    def compress(self, data: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(data)

    def decompress(self, data: bytes, limit: int) -> bytes:
        try:
            declared = zstandard.frame_content_size(data)
            if declared > limit:
                raise WireFormatError(f"zstd stream declares {declared} bytes, above the {limit}-byte limit")
            # A frame's window is a buffer the decoder allocates; a valid update's is at most its own size.
            inflater = zstandard.ZstdDecompressor(max_window_size=min(max(limit, 1 << 10), 1 << 31))
            # Without a declared size the output buffer holds limit + 1 bytes; a frame needing more is refused.
            out = inflater.decompress(data, max_output_size=limit + 1, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise WireFormatError(f"corrupt zstd stream: {exc}") from exc
        if len(out) > limit:
            raise WireFormatError(f"zstd stream inflates past the {limit}-byte limit")
        return out


LOSSLESS_STAGES: dict[str, LosslessStage] = {"zlib": Zlib(), "lzma": Lzma(), "zstd": Zstd()}
_BY_KIND: dict[int, LosslessStage] = {stage.kind: stage for stage in (NoLossless(), *LOSSLESS_STAGES.values())}


def stage_for(kind: int) -> LosslessStage:
    if kind not in _BY_KIND:
        raise WireFormatError(f"unknown lossless stage {kind}")
    return _BY_KIND[kind]
