"""Compression of fast updates: composable codec pipelines and the fedslim.v1 wire format.

A pipeline is a tensor layout (dense, top-k, random-k, low-rank) followed by
a value coding (fp32, fp16, bf16, q1-q8, sign) and optionally a lossless
stage (zlib, lzma, zstd); ``parse_codec("topk:0.01+q8+zstd")`` builds one.
"""

from fedslim.codecs.pipeline import (
    DecodeBudget,
    DecodedUpdate,
    EncodedUpdate,
    Pipeline,
    UpdateError,
    decode_budget,
    decode_update,
    encode_update,
    parse_codec,
)

__all__ = [
    "DecodeBudget",
    "DecodedUpdate",
    "EncodedUpdate",
    "Pipeline",
    "UpdateError",
    "decode_budget",
    "decode_update",
    "encode_update",
    "parse_codec",
]
