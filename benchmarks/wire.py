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
    strategy=S   the server's strategy (default fedavg)

    python benchmarks/wire.py --preset fast --seeds 0 1 2  # the headline: full-model FedAvg vs the best fast row
    python benchmarks/wire.py --preset codec-only    # full-model FedAvg under top-k, with and without EF
    python benchmarks/wire.py --preset levers        # seed 0: the issue's row, then one lever at a time
    python benchmarks/wire.py --rows "full@0.1" "lora@0.1,up=topk:0.1+q8+zstd,down=topk:0.05+q8+zstd"

With --seeds every row runs once per seed; the table gives mean ± sd over
the seeds, gaps and ratios paired by seed (each run against the reference's
run of the same seed). Prints the table and writes
benchmarks/results/wire-<name>.{json,md}, stamped with commit, command, seeds
and the bases.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fmnist_setup import add_setup_arguments, base_config
from provenance import base_used, provenance, write_results
from rich.console import Console
from rich.table import Table

from fedslim.config import FastSpec, RunConfig
from fedslim.simulation.simulate import simulate

PRESETS = {
    "fast": [
        "full@0.1",
        "lora@0.2,biases,lora-min=20000,strategy=fedvarp,epochs=3,up=topk:0.08+q4+lzma,down=topk:0.03+q4+lzma",
    ],
    # How the headline row was reached from the row (FedAvg, q8), one lever per row, then two not kept.
    "levers": [
        "full@0.1",
        "lora@0.2,biases,lora-min=20000,up=topk:0.1+q8+lzma,down=topk:0.05+q8+lzma",
        "lora@0.2,biases,lora-min=20000,strategy=fedvarp,up=topk:0.1+q8+lzma,down=topk:0.05+q8+lzma",
        "lora@0.2,biases,lora-min=20000,strategy=fedvarp,up=topk:0.1+q4+lzma,down=topk:0.03+q4+lzma",
        "lora@0.2,biases,lora-min=20000,strategy=fedvarp,epochs=3,up=topk:0.1+q4+lzma,down=topk:0.03+q4+lzma",
        "lora@0.2,biases,lora-min=20000,strategy=fedvarp,epochs=3,up=topk:0.08+q4+lzma,down=topk:0.03+q4+lzma",
        "lora@0.2,biases,lora-min=20000,strategy=fedvarp,epochs=3,rank=8,up=topk:0.04+q4+lzma,down=topk:0.03+q4+lzma",
        "lora@0.3,biases,lora-min=20000,strategy=fedvarp,epochs=3,up=topk:0.08+q4+lzma,down=topk:0.03+q4+lzma",
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
        elif key == "strategy":
            config = replace(config, strategy=value)
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
    return replace(config, out=f"{out}/{safe}-seed{config.seed}")


def run_row(spec: str, config: RunConfig, console: Console) -> dict[str, Any]:
    """One row for one seed: accuracies, whole-message bytes of the trained rounds, wall time, the base."""
    started = time.monotonic()
    label = f"{spec} seed {config.seed}"
    result = simulate(config, on_round=lambda t: console.print(f"  {label} round {t.round}: acc {t.accuracy:.4f}"))
    trained = [r for r in result.rounds if r.round > 0]
    return {
        "row": spec,
        "seed": config.seed,
        "fast": config.fast.kind,
        "lr": config.lr,
        "strategy": config.strategy,
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


def paired(rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """A row's runs over the seeds against the reference's runs of the same seeds: means and spreads."""
    by_seed = {r["seed"]: r for r in reference}
    final_gaps = [r["final_accuracy"] - by_seed[r["seed"]]["final_accuracy"] for r in rows]
    last5_gaps = [r["last5_mean_accuracy"] - by_seed[r["seed"]]["last5_mean_accuracy"] for r in rows]
    reductions = [
        (by_seed[r["seed"]]["bytes_up"] + by_seed[r["seed"]]["bytes_down"]) / (r["bytes_up"] + r["bytes_down"])
        for r in rows
    ]
    return {
        "row": rows[0]["row"],
        "seeds": [r["seed"] for r in rows],
        "final_accuracy": mean_spread([r["final_accuracy"] for r in rows]),
        "final_gap": mean_spread(final_gaps),
        "last5_mean_accuracy": mean_spread([r["last5_mean_accuracy"] for r in rows]),
        "last5_gap": mean_spread(last5_gaps),
        "bytes_up": statistics.fmean(r["bytes_up"] for r in rows),
        "bytes_down": statistics.fmean(r["bytes_down"] for r in rows),
        "bytes_reduction": mean_spread(reductions),
        "wall_s": statistics.fmean(r["wall_s"] for r in rows),
    }


def mean_spread(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single seed), with the extremes."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": spread, "min": min(values), "max": max(values)}


def pm(stat: dict[str, float], scale: float, digits: int, suffix: str = "", sign: bool = False) -> str:
    fmt = f"{{:{'+' if sign else ''},.{digits}f}}"
    text = fmt.format(scale * stat["mean"]) + suffix
    return text if stat["sd"] == 0 else f"{text} ± {fmt.format(scale * stat['sd']).lstrip('+')}"


def results_table(summaries: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("row", "final", "vs ref", "last-5 mean", "vs ref", "up KiB", "down KiB", "x fewer", "s"):
        table.add_column(column, justify="right")
    for row in summaries:
        table.add_row(
            row["row"],
            pm(row["final_accuracy"], 1, 4),
            pm(row["final_gap"], 100, 2, " pt", sign=True),
            pm(row["last5_mean_accuracy"], 1, 4),
            pm(row["last5_gap"], 100, 2, " pt", sign=True),
            f"{row['bytes_up'] / 1024:,.0f}",
            f"{row['bytes_down'] / 1024:,.0f}",
            pm(row["bytes_reduction"], 1, 1, "x"),
            f"{row['wall_s']:.0f}",
        )
    return table


def headline(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the largest mean reduction whose mean final and last-5 gaps are both within 1 point."""
    within = [s for s in summaries[1:] if s["final_gap"]["mean"] >= -0.01 and s["last5_gap"]["mean"] >= -0.01]
    return max(within or summaries[1:], key=lambda s: s["bytes_reduction"]["mean"])


def quoted_values(summaries: list[dict[str, Any]], fraction: float) -> dict[str, str]:
    """The numbers the README and docs quote, formatted once, here ({} without a row beside the reference).

    The headline row against the reference (:func:`headline`); for every other row, keys OPTIONS_final,
    OPTIONS_final_gap, OPTIONS_last5, OPTIONS_last5_gap and OPTIONS_x_fewer, OPTIONS its options with
    punctuation as dashes (``up-topk-0-01_ef-off_final_gap``), led by its FAST@LR where that is not the
    reference's (``lora-0-2_biases_..._final``); and, where rows differ only in error feedback, what it changes
    (:func:`feedback_values`).
    """
    if len(summaries) < 2:
        return {}
    best, reference = headline(summaries), summaries[0]
    quoted = {
        "headline_row": best["row"],
        "seeds": ", ".join(map(str, best["seeds"])),
        "x_fewer": f"{best['bytes_reduction']['mean']:,.1f}x",
        "x_fewer_min": f"{best['bytes_reduction']['min']:,.1f}x",
        "final": f"{best['final_accuracy']['mean']:.4f}",
        "reference_final": f"{reference['final_accuracy']['mean']:.4f}",
        "final_gap": points(best["final_gap"]["mean"]),
        "last5_gap": points(best["last5_gap"]["mean"]),
    }
    for row in summaries[1:]:
        fast, *options = row["row"].split(",")
        if fast != reference["row"].split(",")[0]:
            options.insert(0, fast)
        key = "_".join(re.sub(r"[^A-Za-z0-9]+", "-", option).strip("-") for option in options)
        quoted |= {
            f"{key}_final": f"{row['final_accuracy']['mean']:.4f}",
            f"{key}_final_gap": points(row["final_gap"]["mean"]),
            f"{key}_last5": f"{row['last5_mean_accuracy']['mean']:.4f}",
            f"{key}_last5_gap": points(row["last5_gap"]["mean"]),
            f"{key}_x_fewer": f"{row['bytes_reduction']['mean']:,.1f}x",
        }
    coded = [row for row in summaries[1:] if "up" in row_options(row["row"])]
    if coded:
        quoted["coded_last5_gap_max"] = points(max(abs(row["last5_gap"]["mean"]) for row in coded), sign=False)
    return quoted | feedback_values(summaries, fraction)


def points(gap: float, sign: bool = True) -> str:
    """An accuracy gap (a fraction) in points: ``-0.65 points``."""
    return f"{100 * gap:{'+' if sign else ''}.2f} points"


def row_options(spec: str) -> dict[str, str]:
    """A row's options by name (``biases`` -> ``""``); the FAST@LR head under ``head``."""
    head, *options = spec.split(",")
    return {"head": head} | {key: value for key, _, value in (option.partition("=") for option in options)}


def feedback_values(summaries: list[dict[str, Any]], fraction: float) -> dict[str, str]:
    """What error feedback changes, from the first rows that differ only in ``ef``: ``off``, ``1``, and a decay.

    ``ef_final_gain``: final accuracy with feedback (no decay) minus without; ``ef_decay_final_gain``: the
    same with the decay; ``decay_final_change`` and ``decay_last5_change``: with the decay minus without;
    ``away_rounds``: rounds a client sampled with probability ``fraction`` misses between two rounds it
    takes part in, on average (1/fraction - 1); ``decay_after_absence``: what the decay leaves after that many.
    """

    def change(row: dict[str, Any], against: dict[str, Any], measure: str) -> str:
        return points(row[f"{measure}_accuracy"]["mean"] - against[f"{measure}_accuracy"]["mean"])

    groups: dict[tuple[tuple[str, str], ...], dict[str, dict[str, Any]]] = {}
    for row in summaries:
        options = row_options(row["row"])
        if "ef" in options:
            rest = tuple(sorted((k, v) for k, v in options.items() if k != "ef"))
            groups.setdefault(rest, {})[options["ef"]] = row
    for by_ef in groups.values():
        decays = [ef for ef in by_ef if ef not in ("off", "1")]
        if "off" not in by_ef or "1" not in by_ef or not decays:
            continue
        off, plain, decayed = by_ef["off"], by_ef["1"], by_ef[decays[0]]
        decay, away = float(decays[0]), round(1 / fraction) - 1
        return {
            "ef_final_gain": change(plain, off, "final"),
            "ef_decay_final_gain": change(decayed, off, "final"),
            "decay_final_change": change(decayed, plain, "final"),
            "decay_last5_change": change(decayed, plain, "last5_mean"),
            "decay": f"{decay:g}",
            "away_rounds": f"{away}",
            "decay_after_absence": f"{decay:g}^{away} = {decay**away:.2f}",
        }
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fast")
    parser.add_argument("--rows", nargs="+", help="rows instead of the preset's; the first is the reference")
    parser.add_argument("--name", help="results file name (default: the preset)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: --seed); tables show mean ± sd")
    add_setup_arguments(parser, out="runs/bench-wire")
    args = parser.parse_args()

    console = Console(width=max(Console().width, 160))
    seeds = args.seeds or [args.seed]
    specs = args.rows or PRESETS[args.preset]
    configs = {
        spec: [parse_row(spec, base_config(args, seed), args.rank, args.out) for seed in seeds] for spec in specs
    }
    stamp = provenance(seeds, [base_used(config) for rows in configs.values() for config in rows])  # the code that ran
    runs = [[run_row(spec, config, console) for config in configs[spec]] for spec in specs]
    summaries = [paired(rows, runs[0]) for rows in runs]
    title = (
        f"Fashion-MNIST, Dir({args.alpha}), {args.clients} clients, {args.fraction:.0%}/round, {args.rounds} rounds, "
        f"{args.local_epochs} local epochs unless the row says, seeds {', '.join(map(str, seeds))} "
        "(mean ± sd, paired by seed); "
        f"reference: {specs[0]}"
    )
    table = results_table(summaries, title)
    console.print(table)
    name = f"wire-{args.name or args.preset}"
    setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = {"setup": setup, "rows": summaries, "runs": [run for rows in runs for run in rows]}
    values = quoted_values(summaries, args.fraction)
    write_results(args.results, name, stamp, record, table, width=260, values=values)
    console.print(f"results written to {args.results}/{name}.{{json,md}}")


if __name__ == "__main__":
    main()
