"""Bytes on the wire vs accuracy on Fashion-MNIST, side by side from one run.

Setup (issue 3 acceptance, same as the foundation benchmark): Dirichlet(0.3)
label split over 50 clients, 20% of clients per round, 30 rounds, 2 local
epochs, the same pretrained base for every row. Each row is one `simulate`
run; bytes are whole serialised Flower messages in both directions, from the
communication log. "x fewer" is the total bytes of the first row (the
reference: full-model FedAvg, dense) over the row's.

A row is FAST@LR followed by comma-separated options:
    up=SPEC      uplink codec (default none)
    down=SPEC    downstream codec (default none)
    ef=off|D     error feedback off, or on with decay D per missed round (default 0.9)
    rank=R       LoRA rank (default --rank); alpha=A LoRA alpha (default 2 * rank)
    biases       fast biases; lora-min=N  layers under N weight entries fast as a whole
    epochs=E     local epochs of this row (default --local-epochs)

    python benchmarks/wire.py --preset fast          # full dense, fast dense, fast + the two best pipelines
    python benchmarks/wire.py --preset codec-only    # full-model FedAvg under top-k, with and without EF
    python benchmarks/wire.py --rows "full@0.1" "lora@0.1,up=topk:0.1+q8+zstd,down=topk:0.05+q8+zstd"

Prints a table and writes benchmarks/results/wire-<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fmnist_setup import add_setup_arguments, base_config
from rich.console import Console
from rich.table import Table

from fedslim.config import FastSpec, RunConfig
from fedslim.simulation.simulate import simulate

PRESETS = {
    "fast": [
        "full@0.1",
        "lora@0.2,biases,lora-min=20000",
        "lora@0.2,biases,lora-min=20000,up=topk:0.1+q8+lzma,down=topk:0.05+q8+lzma",
        "lora@0.2,biases,lora-min=20000,up=topk:0.1+q4+lzma,down=topk:0.05+q4+lzma",
    ],
    "codec-only": [
        "full@0.1",
        "full@0.1,up=topk:0.2,ef=off",
        "full@0.1,up=topk:0.1,ef=off",
        "full@0.1,up=topk:0.01,ef=off",
        "full@0.1,up=topk:0.01,ef=1",
        "full@0.1,up=topk:0.01,ef=0.9",
    ],
}


def parse_row(spec: str, base: RunConfig, rank: int, out: str) -> RunConfig:
    head, *options = spec.split(",")
    kind, _, lr = head.partition("@")
    config = replace(
        base, fast=FastSpec(kind=kind, rank=rank, lora_alpha=2.0 * rank, seed=base.seed), lr=float(lr or base.lr)
    )
    for option in options:
        key, _, value = option.partition("=")
        if key == "rank":
            config = replace(config, fast=replace(config.fast, rank=int(value), lora_alpha=2.0 * int(value)))
        elif key == "alpha":
            config = replace(config, fast=replace(config.fast, lora_alpha=float(value)))
        elif key == "biases":
            config = replace(config, fast=replace(config.fast, biases=True))
        elif key == "epochs":
            config = replace(config, local_epochs=int(value))
        elif key == "lora-min":
            config = replace(config, fast=replace(config.fast, lora_min_params=int(value)))
        elif key == "up":
            config = replace(config, codec=value)
        elif key == "down":
            config = replace(config, downstream_codec=value)
        elif key == "ef":
            config = (
                replace(config, error_feedback=False)
                if value == "off"
                else replace(config, error_feedback=True, error_feedback_decay=float(value))
            )
        else:
            raise SystemExit(f"unknown row option {key!r} in {spec!r}")
    safe = spec.replace("/", "_").replace(",", "_").replace(":", "").replace("+", "-").replace("=", "")
    return replace(config, out=f"{out}/{safe}")


def run_row(spec: str, config: RunConfig, console: Console) -> dict[str, Any]:
    started = time.monotonic()
    result = simulate(config, on_round=lambda t: console.print(f"  {spec} round {t.round}: acc {t.accuracy:.4f}"))
    trained = [r for r in result.rounds if r.round > 0]
    return {
        "row": spec,
        "fast": config.fast.kind,
        "lr": config.lr,
        "codec": config.uplink.spec,
        "downstream_codec": config.downlink.spec,
        "error_feedback": config.error_feedback and config.uplink.biased,
        "error_feedback_decay": config.error_feedback_decay,
        "final_accuracy": trained[-1].accuracy,
        "best_accuracy": max(r.accuracy for r in trained),
        "last5_mean_accuracy": sum(r.accuracy for r in trained[-5:]) / len(trained[-5:]),
        "base_accuracy": result.rounds[0].accuracy,
        "bytes_up": sum(r.bytes_up for r in trained),
        "bytes_down": sum(r.bytes_down for r in trained),
        "wall_s": time.monotonic() - started,
        "log": result.log_path,
    }


def results_table(rows: list[dict[str, Any]], title: str) -> Table:
    reference = rows[0]
    table = Table(title=title)
    for column in ("row", "final", "vs ref", "best", "last-5 mean", "vs ref", "up KiB", "down KiB", "x fewer", "s"):
        table.add_column(column, justify="right")
    for row in rows:
        total = row["bytes_up"] + row["bytes_down"]
        row["final_gap"] = row["final_accuracy"] - reference["final_accuracy"]
        row["last5_gap"] = row["last5_mean_accuracy"] - reference["last5_mean_accuracy"]
        row["bytes_reduction"] = (reference["bytes_up"] + reference["bytes_down"]) / total
        table.add_row(
            row["row"],
            f"{row['final_accuracy']:.4f}",
            f"{100 * row['final_gap']:+.2f} pt",
            f"{row['best_accuracy']:.4f}",
            f"{row['last5_mean_accuracy']:.4f}",
            f"{100 * row['last5_gap']:+.2f} pt",
            f"{row['bytes_up'] / 1024:,.0f}",
            f"{row['bytes_down'] / 1024:,.0f}",
            f"{row['bytes_reduction']:,.1f}x",
            f"{row['wall_s']:.0f}",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fast")
    parser.add_argument("--rows", nargs="+", help="rows instead of the preset's; the first is the reference")
    parser.add_argument("--name", help="results file name (default: the preset)")
    add_setup_arguments(parser, out="runs/bench-wire")
    args = parser.parse_args()

    console = Console(width=max(Console().width, 160))
    base = base_config(args)
    specs = args.rows or PRESETS[args.preset]
    rows = [run_row(spec, parse_row(spec, base, args.rank, args.out), console) for spec in specs]
    title = (
        f"Fashion-MNIST, Dir({args.alpha}), {args.clients} clients, {args.fraction:.0%}/round, {args.rounds} rounds, "
        f"{args.local_epochs} local epochs; reference: {specs[0]}"
    )
    table = results_table(rows, title)
    console.print(table)

    name = f"wire-{args.name or args.preset}"
    args.results.mkdir(parents=True, exist_ok=True)
    setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.results / f"{name}.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    with (args.results / f"{name}.md").open("w") as handle:
        Console(file=handle, width=180, color_system=None).print(table)
    console.print(f"results written to {args.results}/{name}.{{json,md}}")


if __name__ == "__main__":
    main()
