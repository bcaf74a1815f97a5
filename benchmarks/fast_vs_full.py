"""Fast layer vs full-model FedAvg on Fashion-MNIST, side by side from one run.

Setup (issue 2 acceptance): Dirichlet(0.3) label split over 50 clients, 20% of
clients per round, 30 rounds, the same pretrained base for every row. Each row
is one `simulate` run; bytes come from the communication log. Per-round test
accuracy under Dirichlet(0.3) with 10 clients a round swings by a point or two,
so rows are compared on the mean of the last five rounds as well as the last.

    python benchmarks/fast_vs_full.py              # full@0.05 full@0.1 lora@0.1 lora@0.2, 2 local epochs
    python benchmarks/fast_vs_full.py --rows full@0.05 lora@0.1 head@0.1 sparse@0.1

A row is FAST_KIND@CLIENT_LR. LoRA-style fast layers are usually run with a
larger step than full fine-tuning, so full-model FedAvg gets the same two
learning rates and the best full row is the reference.

Prints a table and writes benchmarks/results/fast_vs_full.{json,md}, stamped
with commit, command, seed and the base.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

from fmnist_setup import add_setup_arguments, base_config
from provenance import base_used, provenance, write_results
from rich.console import Console
from rich.table import Table

from fedslim.config import FastSpec
from fedslim.simulation.simulate import simulate


def results_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> Table:
    """Rows side by side; gaps are against the full-model row with the best last-5 mean."""
    full_rows = [r for r in rows if r["fast"] == "full"] or rows
    reference = max(full_rows, key=lambda r: r["last5_mean_accuracy"])
    table = Table(
        title=f"Fashion-MNIST, Dir({args.alpha}), {args.clients} clients, {args.fraction:.0%}/round, "
        f"{args.rounds} rounds; 'vs full': against full-model FedAvg at lr {reference['lr']:g} (best last-5 mean)"
    )
    for column in (
        "fast layer",
        "lr",
        "final acc",
        "vs full",
        "best acc",
        "vs full",
        "last-5 mean",
        "vs full",
        "KiB/round (up+down)",
        "bytes vs full",
        "wall s",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        for measure in ("final", "best", "last5_mean"):
            row[f"{measure}_gap_to_full"] = row[f"{measure}_accuracy"] - reference[f"{measure}_accuracy"]
        row["byte_reduction_vs_full"] = reference["bytes_per_round"] / row["bytes_per_round"]
        table.add_row(
            row["fast"],
            f"{row['lr']:g}",
            *(
                cell
                for measure in ("final", "best", "last5_mean")
                for cell in (f"{row[f'{measure}_accuracy']:.4f}", f"{100 * row[f'{measure}_gap_to_full']:+.2f} pt")
            ),
            f"{row['bytes_per_round'] / 1024:,.1f}",
            f"{row['byte_reduction_vs_full']:,.1f}x",
            f"{row['wall_s']:.0f}",
        )
    return table


def points_below(row: dict[str, Any]) -> list[float]:
    """How far a row is below the reference, in points: final, best and last-5 mean accuracy."""
    return [-100 * row[f"{measure}_gap_to_full"] for measure in ("final", "best", "last5_mean")]


def where_against(below: list[float]) -> str:
    """Gaps in points below the reference (negative: above) in words: ``1.4-1.6 points below``."""
    low, high = min(below), max(below)
    if low < 0 < high:
        return f"between {-low:.1f} points above and {high:.1f} below"
    near, far = sorted((f"{abs(low):.1f}", f"{abs(high):.1f}"), key=float)
    if far == "0.0":
        return "level with"
    return f"{near if near == far else f'{near}-{far}'} points {'below' if high > 0 else 'above'}"


def quoted_values(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The numbers docs/results.md quotes, formatted once, here (after :func:`results_table` set the gaps).

    The LoRA row quoted is the one that stays closest to the reference: the smallest worst gap.
    ``lora_gaps``: how far it ends from the reference over final, best and last-5 mean, as words.
    """
    quoted = {"base_accuracy": f"{rows[0]['base_accuracy']:.4f}"}
    lora_rows = [r for r in rows if r["fast"] == "lora"]
    if lora_rows:
        closest = min(lora_rows, key=lambda r: max(points_below(r)))
        quoted |= {
            "lora_row": f"lora@{closest['lr']:g}",
            "lora_gaps": where_against(points_below(closest)),
            "lora_x_fewer": f"{closest['byte_reduction_vs_full']:,.1f}x",
        }
    return quoted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rows", nargs="+", default=["full@0.05", "full@0.1", "lora@0.1", "lora@0.2"], help="FAST_KIND@LR"
    )
    add_setup_arguments(parser, out="runs/bench-fast-vs-full")
    args = parser.parse_args()

    console = Console(width=max(Console().width, 160))
    base = base_config(args)
    bases = [base_used(base)]  # every row trains on the same base
    stamp = provenance([args.seed], bases)  # before the runs: the code that ran
    rows = []
    for row_spec in args.rows:
        kind, _, lr = row_spec.partition("@")
        config = replace(
            base,
            fast=FastSpec(kind=kind, rank=args.rank, seed=args.seed),
            lr=float(lr or base.lr),
            out=f"{args.out}/{kind}-lr{lr}",
        )
        started = time.monotonic()
        result = simulate(
            config, on_round=lambda t, row=row_spec: console.print(f"  {row} round {t.round}: acc {t.accuracy:.4f}")
        )
        trained = [r for r in result.rounds if r.round > 0]
        moved = sum(r.bytes_up + r.bytes_down for r in trained)
        rows.append(
            {
                "fast": kind,
                "lr": config.lr,
                "final_accuracy": trained[-1].accuracy,
                "best_accuracy": max(r.accuracy for r in trained),
                "last5_mean_accuracy": sum(r.accuracy for r in trained[-5:]) / len(trained[-5:]),
                "base_accuracy": result.rounds[0].accuracy,
                "bytes_per_round": moved / len(trained),
                "bytes_up_per_round": sum(r.bytes_up for r in trained) / len(trained),
                "bytes_down_per_round": sum(r.bytes_down for r in trained) / len(trained),
                "full_model_equivalent_per_round": sum(r.full_model_bytes for r in trained) / len(trained),
                "wall_s": time.monotonic() - started,
                "log": result.log_path,
            }
        )

    table = results_table(rows, args)
    console.print(table)

    record = {"setup": {**vars(args), "results": str(args.results)}, "rows": rows}
    write_results(args.results, "fast_vs_full", stamp, record, table, width=160, values=quoted_values(rows))
    console.print(f"results written to {args.results}/fast_vs_full.{{json,md}}")


if __name__ == "__main__":
    main()
