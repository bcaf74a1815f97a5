"""Codec micro-benchmark on real fast deltas: encode+decode throughput on one core, and size vs entropy.

The deltas are real: one Fashion-MNIST client (Dirichlet 0.3 split, client 0)
trains 2 local epochs from the pretrained base, once with every parameter fast
(the full CNN, 417k parameters) and once with the LoRA fast layer. Pipelines
are timed on these (best of --repeats, single-threaded numpy and torch) and,
to show scaling, on a 10M-entry Gaussian vector.

Entropy: what a top-k + q8 update sends is two symbol streams per tensor, the
gaps between kept positions and the 8-bit codes. Their empirical (order-0)
entropy, summed over tensors, is the size an ideal entropy coder would reach
on these symbols; "x entropy" is the whole encoded blob (framing included)
over that. The information in the set of positions under a uniform model,
log2 C(n, k), is printed as a second reference.

    python benchmarks/codecs.py
Prints two tables and writes benchmarks/results/codecs.{json,md}, stamped
with commit, command, seed and the base.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from provenance import base_used, provenance, write_results  # noqa: E402
from rich.console import Console, Group  # noqa: E402
from rich.table import Table  # noqa: E402

from fedslim.codecs import decode_update, encode_update, parse_codec  # noqa: E402
from fedslim.codecs.layouts import decode_varints  # noqa: E402
from fedslim.codecs.pipeline import DELTA, Pipeline  # noqa: E402
from fedslim.codecs.values import unpack_bits  # noqa: E402
from fedslim.config import FastSpec, RunConfig  # noqa: E402
from fedslim.data.datasets import load_federation  # noqa: E402
from fedslim.protos.fedslim.v1 import update_pb2 as pb  # noqa: E402
from fedslim.task import prepared_base  # noqa: E402
from fedslim.training import train_epochs  # noqa: E402

RESULTS = Path(__file__).parent / "results"
THROUGHPUT_PIPELINES = [
    "none",
    "fp16",
    "q8",
    "topk:0.01+q8",
    "topk:0.01+q8+zstd",
    "topk:0.1+q4",
    "randk:0.05+q4",
    "ternary:0.1",
    "sign",
    "powersgd:2",
    "topk:0.01+q8+lzma",
]
ENTROPY_PIPELINES = ["topk:0.01+q8", "topk:0.01+q8+zstd", "topk:0.01+q8+lzma", "topk:0.1+q8+lzma", "topk:0.1+q4+zstd"]
CNN, GAUSSIAN = "full CNN delta (417k)", "Gaussian 10M"


def real_delta(kind: str, config: RunConfig) -> dict[str, np.ndarray]:
    """A client's 2-epoch delta from the pretrained base, for the ``kind`` fast layer."""
    base = prepared_base(config)
    model = base.build(FastSpec(kind=kind, seed=config.seed))
    start = model.fast_state()
    data = load_federation(config).clients[0]
    optimizer = torch.optim.SGD(model.fast_parameters(), lr=0.1)
    train_epochs(model.module, data, base.task, optimizer, epochs=2, batch_size=32, seed=[0])
    trained = model.fast_state()
    return {name: trained[name] - start[name] for name in start}


def throughput(tensors: dict[str, np.ndarray], spec: str, repeats: int) -> float:
    """MB/s of float32 input through encode + decode, best of ``repeats``."""
    pipeline = parse_codec(spec)
    shapes = {n: v.shape for n, v in tensors.items()}
    size = sum(v.nbytes for v in tensors.values())
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        encoded = encode_update(tensors, pipeline, kind=DELTA, base_fingerprint="", state_version=1)
        decode_update(encoded.blob, shapes)
        best = min(best, time.perf_counter() - started)
    return size / best / 1e6


def _h0(symbols: np.ndarray) -> float:
    """Empirical order-0 entropy in bits of a symbol sequence (total, not per symbol)."""
    if symbols.size == 0:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / symbols.size
    return float(-(counts * np.log2(p)).sum())


def entropy_row(tensors: dict[str, np.ndarray], spec: str) -> dict[str, Any]:
    pipeline = parse_codec(spec)
    encoded = encode_update(tensors, pipeline, kind=DELTA, base_fingerprint="", state_version=1)
    symbols = encode_update(
        tensors, Pipeline(pipeline.layout, pipeline.values), kind=DELTA, base_fingerprint="", state_version=1
    )
    update = pb.FastUpdate.FromString(pb.Envelope.FromString(symbols.blob).payload)
    entropy_bits = 0.0
    uniform_bits = 0.0
    kept = 0
    for tensor in update.tensors:
        sparse = tensor.sparse
        nnz, size = int(sparse.nnz), int(np.prod(tensor.shape))
        if sparse.WhichOneof("indices") == "gaps_varint":
            gaps = decode_varints(sparse.gaps_varint, nnz)
        else:
            positions = np.flatnonzero(np.unpackbits(np.frombuffer(sparse.bitmask, np.uint8), bitorder="little")[:size])
            gaps = np.diff(positions, prepend=0)
        quantized = sparse.values.quantized
        codes = unpack_bits(quantized.codes, quantized.bits, nnz)
        entropy_bits += _h0(gaps) + _h0(codes)
        uniform_bits += (math.lgamma(size + 1) - math.lgamma(nnz + 1) - math.lgamma(size - nnz + 1)) / math.log(2)
        uniform_bits += _h0(codes)
        kept += nnz
    return {
        "pipeline": spec,
        "kept": kept,
        "blob_bytes": len(encoded.blob),
        "entropy_bytes": entropy_bits / 8,
        "ratio_to_entropy": len(encoded.blob) / (entropy_bits / 8),
        "uniform_positions_bytes": uniform_bits / 8,
        "ratio_to_uniform_positions": len(encoded.blob) / (uniform_bits / 8),
    }


def quoted_values(speed_rows: list[dict[str, Any]], entropy_rows: list[dict[str, Any]]) -> dict[str, str]:
    """The numbers docs/results.md quotes, formatted once, here (topk1: top 1%, topk10: top 10%)."""
    speed = {row["pipeline"]: row for row in speed_rows}
    ratio = {row["pipeline"]: row["ratio_to_entropy"] for row in entropy_rows}
    return {
        "topk1_q8_throughput_cnn": f"{speed['topk:0.01+q8'][CNN]:,.0f} MB/s",
        "topk1_q8_throughput_gaussian": f"{speed['topk:0.01+q8'][GAUSSIAN]:,.0f} MB/s",
        "topk1_q8_x_entropy": f"{ratio['topk:0.01+q8']:.2f}x",
        "topk1_q8_zstd_x_entropy": f"{ratio['topk:0.01+q8+zstd']:.2f}x",
        "topk1_q8_lzma_x_entropy": f"{ratio['topk:0.01+q8+lzma']:.3f}x",
        "topk10_q8_lzma_x_entropy": f"{ratio['topk:0.1+q8+lzma']:.3f}x",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console(width=max(Console().width, 140))

    config = RunConfig(task="fmnist", num_clients=50, dirichlet_alpha=0.3)
    with console.status("training one client to get real deltas"):
        inputs = {
            CNN: real_delta("full", config),
            "LoRA fast delta": real_delta("lora", config),
            GAUSSIAN: {"x": np.random.default_rng(0).standard_normal(10_000_000).astype(np.float32)},
        }

    speed = Table(title=f"encode + decode throughput, MB/s of float32 input, one core (best of {args.repeats})")
    speed.add_column("pipeline")
    for name in inputs:
        speed.add_column(name, justify="right")
    speed_rows = []
    for spec in THROUGHPUT_PIPELINES:
        values = {name: throughput(t, spec, args.repeats) for name, t in inputs.items()}
        speed_rows.append({"pipeline": spec, **values})
        speed.add_row(spec, *(f"{v:,.0f}" for v in values.values()))
    console.print(speed)

    sizes = Table(title="encoded size vs empirical entropy of the sent symbols (gaps + codes), full CNN delta")
    for column in ("pipeline", "kept", "blob B", "entropy B", "x entropy", "log2 C(n,k) + codes B", "x that"):
        sizes.add_column(column, justify="right")
    entropy_rows = []
    for spec in ENTROPY_PIPELINES:
        row = entropy_row(inputs[CNN], spec)
        entropy_rows.append(row)
        sizes.add_row(
            spec,
            f"{row['kept']:,}",
            f"{row['blob_bytes']:,}",
            f"{row['entropy_bytes']:,.0f}",
            f"{row['ratio_to_entropy']:.3f}",
            f"{row['uniform_positions_bytes']:,.0f}",
            f"{row['ratio_to_uniform_positions']:.3f}",
        )
    console.print(sizes)

    record = {"throughput": speed_rows, "entropy": entropy_rows}
    stamp = provenance([config.seed], [base_used(config)])
    quoted = quoted_values(speed_rows, entropy_rows)
    write_results(args.results, "codecs", stamp, record, Group(speed, sizes), width=160, values=quoted)
    console.print(f"results written to {args.results}/codecs.{{json,md}}")


if __name__ == "__main__":
    main()
