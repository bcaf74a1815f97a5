"""A pretrained transformer that stays home: all-MiniLM-L6-v2 federated on fortunes-8, per row side by side.

Setup: the text task (``--task text``: the MiniLM encoder with a linear head on
mean-pooled embeddings, eight categories of Debian's fortunes, 20% held out),
30 clients, Dirichlet(0.5), 30% of the clients per round, one local epoch of
AdamW on batches of 16, at most 64 tokens, evaluation every 5 rounds, seed 0,
inline backend. Rows:

- ``full``: every parameter, FedAvg: the baseline of the byte ratio. Its
  messages carry the whole 22.7M-parameter model both ways, so a few rounds
  (``--full-rounds``) measure its bytes per round and its trend;
- ``head``: the linear head only;
- ``lora``: LoRA r=4 on the attention query and value projections, plus the
  head, sent dense;
- ``lora-codec``: the same fast layer, ``--codec`` up and ``--downstream-codec`` down.
  The default pipeline suits AdamW: its steps have nearly the same size on
  every entry, so one sign bit and a per-tensor scale keep most of a local
  update (top-k keeps a few entries and loses the rest). Downstream, a client
  that missed rounds receives every step since its version, so a step must be
  small: a seeded random 35% of entries, signs only, positions regenerated
  from the seed instead of sent. Both ends keep what they drop as
  error feedback.

With ``--client-holdout H`` each client keeps H of its texts out of training
and evaluates the global model on them at every evaluation (mean and worst
decile over the clients as two more columns).

Columns: final and best accuracy, the accuracy of every evaluation, bytes per
round up + down (whole Flower messages, mean over the rounds), how many times
fewer than the full row's, and the clients' CPU seconds and peak resident
memory per training reply. Each row runs in a fresh process, in which every
client of the inline backend runs: the peak is that process's, the server's
evaluation included, and no other row's.

    python benchmarks/text.py                                   # every row (about an hour on 2 cores)
    python benchmarks/text.py --rows lora lora-codec --rounds 10
    python benchmarks/text.py --device cuda                     # on a machine with a GPU

Prints a table and writes benchmarks/results/text.{json,md}, stamped with the
commit, command, seed and base before the first run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sqlite3
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmnist_setup import RESULTS
from provenance import base_used, provenance, write_results

from fedslim.config import FastSpec, RunConfig
from fedslim.simulation.simulate import simulate


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    fast: str
    lr: float
    compressed: bool = False


ROWS = {
    row.key: row
    for row in (
        Row("full", "full fine-tuning, FedAvg", "full", 5e-5),
        Row("head", "head only", "head", 2e-3),
        Row("lora", "LoRA r=4 query/value + head, dense", "lora", 2e-3),
        Row("lora-codec", "LoRA r=4 query/value + head, compressed both ways", "lora", 2e-3, compressed=True),
    )
}


def config_for(row: Row, args: argparse.Namespace) -> RunConfig:
    rounds = min(args.rounds, args.full_rounds) if row.fast == "full" else args.rounds
    return RunConfig(
        task="text",
        num_clients=args.clients,
        rounds=rounds,
        fraction=args.fraction,
        dirichlet_alpha=args.alpha,
        fast=FastSpec(row.fast, rank=4, seed=args.seed),
        seed=args.seed,
        lr=row.lr,
        batch_size=16,
        eval_every=args.eval_every,
        client_holdout=args.client_holdout,
        codec=args.codec if row.compressed else "none",
        downstream_codec=args.downstream_codec if row.compressed else "none",
        device=args.device,
        overwrite=True,
        out=str(Path(args.out) / row.key),
    )


def training_bytes_per_round(log: Path, rounds: int) -> float:
    """Train instructions and replies per round, whole Flower messages both ways (no evaluation traffic)."""
    with sqlite3.connect(f"file:{log}?mode=ro", uri=True) as db:
        (total,) = db.execute(
            "SELECT SUM(message_bytes) FROM messages WHERE round > 0 AND message_type = 'train'"
        ).fetchone()
    return float(total) / rounds


def client_costs(log: Path) -> tuple[float, int]:
    """Mean CPU seconds and the largest peak resident memory over the run's accepted training replies."""
    with sqlite3.connect(f"file:{log}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT client_cpu_s, client_peak_rss_bytes FROM messages "
            "WHERE message_type = 'train' AND direction = 'up' AND status = 'ok'"
        ).fetchall()
    return statistics.mean(r[0] for r in rows), max(r[1] for r in rows)


def run_row(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    config = config_for(row, args)
    started = time.monotonic()

    def progress(totals: Any) -> None:
        shown = f" accuracy {totals.accuracy:.4f}" if totals.accuracy is not None else ""
        print(f"  {row.key} round {totals.round}/{config.rounds}:{shown}", flush=True)

    result = simulate(config, on_round=progress, backend="inline")
    rounds = [r for r in result.rounds if r.round > 0]
    evaluated = [(r.round, r.accuracy) for r in result.rounds if r.accuracy is not None]
    cpu_s, peak_rss = client_costs(Path(result.log_path))
    on_clients = [r for r in result.rounds if r.client_accuracy is not None]
    return {
        "clients_final": on_clients[-1].client_accuracy if on_clients else None,
        "clients_p10_final": on_clients[-1].client_accuracy_p10 if on_clients else None,
        "rounds": config.rounds,
        "final": evaluated[-1][1],
        "best": max(a for r, a in evaluated if r > 0),
        "curve": evaluated,
        "bytes_per_round": training_bytes_per_round(Path(result.log_path), len(rounds)),
        "client_cpu_s": cpu_s,
        "client_peak_rss_bytes": peak_rss,
        "wall_s": time.monotonic() - started,
    }


def run_row_alone(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run_row` in a fresh process, so that the peak memory its clients claim is this row's alone."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_row, row, args).result()


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    full = results.get("full")
    held_out = f"; each client holds out {args.client_holdout:.0%} of its texts" if args.client_holdout else ""
    lines = [
        f"fortunes-8, all-MiniLM-L6-v2, {args.clients} clients, Dir({args.alpha}), {args.fraction:.0%} per round, "
        f"AdamW, 1 local epoch x 16, seed {args.seed}; compressed: up `{args.codec}`, down `{args.downstream_codec}`"
        f"{held_out}\n",
        "| row | rounds | final | best | accuracy by round | KiB / round (up + down) | x fewer than full "
        "| client CPU s / reply | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if args.client_holdout:
        lines[1] += " clients: final mean / worst 10% |"
        lines[2] += "---|"
    for key, run in sorted(results.items(), key=lambda item: list(ROWS).index(item[0])):
        curve = ", ".join(f"{r}: {a:.3f}" for r, a in run["curve"])
        fewer = f"{full['bytes_per_round'] / run['bytes_per_round']:,.0f}x" if full else "-"
        lines.append(
            f"| {ROWS[key].label} | {run['rounds']} | {run['final']:.4f} | {run['best']:.4f} | {curve} | "
            f"{run['bytes_per_round'] / 1024:,.1f} | {fewer} | {run['client_cpu_s']:.2f} | "
            f"{run['client_peak_rss_bytes'] / 2**20:,.0f} |"
        )
        if args.client_holdout and run.get("clients_final") is not None:
            lines[-1] += f" {run['clients_final']:.4f} / {run['clients_p10_final']:.4f} |"
    return "\n".join(lines)


def quoted_values(results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The numbers the docs quote: per row its final and best accuracy and KiB per round, and the byte ratio."""
    quoted: dict[str, str] = {}
    full = results.get("full")
    for key, run in results.items():
        quoted |= {
            f"{key}_final": f"{run['final']:.4f}",
            f"{key}_best": f"{run['best']:.4f}",
            f"{key}_kib_per_round": f"{run['bytes_per_round'] / 1024:,.1f}",
        }
        if full:
            quoted[f"{key}_x_fewer"] = f"{full['bytes_per_round'] / run['bytes_per_round']:,.0f}x"
    if "lora" in results and "lora-codec" in results:
        gap = 100 * (results["lora-codec"]["final"] - results["lora"]["final"])
        quoted["codec_vs_dense_lora"] = f"{gap:+.2f} points"
    return quoted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--full-rounds", type=int, default=5, help="rounds of the full row")
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument(
        "--client-holdout", type=float, default=0.0, help="each client's held-out share, to evaluate on clients too"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codec", default="sign+lzma")
    parser.add_argument("--downstream-codec", default="randk:0.35+sign+lzma")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--out", default="runs/bench-text")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--name", default="text")
    args = parser.parse_args()

    rows = [ROWS[key] for key in args.rows]
    stamp = provenance([args.seed], [base_used(config_for(rows[0], args))])  # before the runs: the code they ran
    results: dict[str, dict[str, Any]] = {}
    for row in rows:
        print(f"{row.key}: {row.label}", flush=True)
        results[row.key] = run_row_alone(row, args)
        text = table(results, args)
        write_results(
            args.results,
            args.name,
            stamp,
            {"setup": vars(args) | {"results": str(args.results)}, "runs": results},
            text,
            values=quoted_values(results),
        )
    print(text)


if __name__ == "__main__":
    main()
