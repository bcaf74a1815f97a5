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
        return out


@dataclass(frozen=True)
class Lzma:
    """LZMA in the 13-byte-header ``.lzma`` container, tuned for update payloads.

    lc=lp=pb=0 makes the literal coder order-0 (no previous-byte or position
    contexts): the streams it sees (index gaps, quantization codes) are close
    to memoryless, and the contexts only dilute their statistics. The header
    declares the dictionary size, so decoding caps memory at ``MEMLIMIT``.
    """

    spec: str = "lzma"
    kind: pb.Lossless = pb.LOSSLESS_LZMA
    FILTERS = (
        {"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 20, "lc": 0, "lp": 0, "pb": 0},
    )
    MEMLIMIT = 1 << 26

    def compress(self, data: bytes) -> bytes:
        return lzma.compress(data, format=lzma.FORMAT_ALONE, filters=list(self.FILTERS))

    def decompress(self, data: bytes, limit: int) -> bytes:
        inflater = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=self.MEMLIMIT)
        try:
            out = inflater.decompress(data, max_length=limit + 1)
        except lzma.LZMAError as exc:
            raise WireFormatError(f"corrupt lzma stream: {exc}") from exc
        if len(out) > limit:
            raise WireFormatError(f"lzma stream inflates past the {limit}-byte limit")
        if not inflater.eof:
            raise WireFormatError("truncated lzma stream")
        return out


@dataclass(frozen=True)
class Zstd:
    level: int = 19
    spec: str = "zstd"
    kind: pb.Lossless = pb.LOSSLESS_ZSTD

    def compress(self, data: bytes) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(data)

    def decompress(self, data: bytes, limit: int) -> bytes:
        out = bytearray()
        try:
            with zstandard.ZstdDecompressor().stream_reader(data) as reader:
                while len(out) <= limit:
                    chunk = reader.read(min(1 << 20, limit + 1 - len(out)))
                    if not chunk:
                        break
                    out += chunk
        except zstandard.ZstdError as exc:
            raise WireFormatError(f"corrupt zstd stream: {exc}") from exc
        if len(out) > limit:
            raise WireFormatError(f"zstd stream inflates past the {limit}-byte limit")
        return bytes(out)


LOSSLESS_STAGES: dict[str, LosslessStage] = {"zlib": Zlib(), "lzma": Lzma(), "zstd": Zstd()}
_BY_KIND: dict[int, LosslessStage] = {stage.kind: stage for stage in (NoLossless(), *LOSSLESS_STAGES.values())}


def stage_for(kind: int) -> LosslessStage:
    if kind not in _BY_KIND:
        raise WireFormatError(f"unknown lossless stage {kind}")
    return _BY_KIND[kind]
