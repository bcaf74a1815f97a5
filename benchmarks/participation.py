"""Strategies under uneven participation on Fashion-MNIST: final and best accuracy over seeds.

Setup (FedAU's, on fedslim's fast layer): Dirichlet(0.1) over 100 clients,
participation with mean p = 0.1 from FedAU's label-correlated model
(Bernoulli), and the same probabilities under Markov and cyclic dynamics;
every available client trains 5 minibatch steps of 16 examples at lr 0.1
(FedAMD also at its reference code's 0.01; at lr 0.1, which diverges, it runs on the
label-correlated model only);
the fast layer is the foundation's (LoRA r=4 on the pretrained CNN, plus the
head). Runs use the inline backend (same loop and client code as Flower's
engine, in one process) two at a time; each finished run is saved at once
and skipped when the script is run again.

    python benchmarks/participation.py                 # everything, 3 seeds
    python benchmarks/participation.py --models label --seeds 0 --rounds 50
    python benchmarks/participation.py --rounds 1000 --eval-every 20 --models label --name participation-long

Writes benchmarks/results/participation.{json,md} (NAME.{json,md} with
--name) after every finished run: all saved runs, their table, and the stamp
of the command that wrote it (commit, seeds, the bases). Runs saved by an
earlier invocation stay in the table; --redo or --fresh measures them again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from fmnist_setup import RESULTS  # noqa: E402
from provenance import base_used, provenance, write_results  # noqa: E402

from fedslim.config import FastSpec, RunConfig  # noqa: E402

MODELS = ("label", "markov", "cyclic")


@dataclass(frozen=True)
class Row:
    """One strategy configuration of the table; ``key`` names it in the quoted values."""

    label: str
    key: str
    strategy: str
    args: str = ""
    p_known: bool = False
    codec: str = "none"
    lr: float = 0.1
    models: tuple[str, ...] = MODELS


LABEL_ONLY = ("label",)

ROWS = [
    Row("FedAvg over participants", "fedavg", "fedavg"),
    Row(
        "FedAvg over participants, equal weights (FedAU's baseline)",
        "fedavg-equal",
        "fedavg",
        "weighting=uniform",
        models=LABEL_ONLY,
    ),
    Row("FedAvg 1/p, p known", "fedavg-1p", "fedavg", "p-estimate=known", p_known=True),
    Row("FedAU (K=inf)", "fedau", "fedau"),
    Row("FedAU (K=50)", "fedau-k50", "fedau", "cutoff=50", models=LABEL_ONLY),
    Row("FedVARP", "fedvarp", "fedvarp"),
    Row("MIFA", "mifa", "mifa"),
    Row("FedStale beta=0.5, FedAU weights", "fedstale", "fedstale", "beta=0.5,p-estimate=fedau"),
    Row("FedAMD p_anchor=0.2", "fedamd", "fedamd", "anchor-probability=0.2", models=LABEL_ONLY),
    Row("FedAMD p_anchor=0.2, lr 0.01 (its paper's)", "fedamd-lr001", "fedamd", "anchor-probability=0.2", lr=0.01),
    Row("FedVARP, topk:0.1+q8+lzma both ways", "fedvarp-topk", "fedvarp", codec="topk:0.1+q8+lzma"),
    Row(
        "FedStale beta=0.5, FedAU weights, topk:0.1+q8+lzma both ways",
        "fedstale-topk",
        "fedstale",
        "beta=0.5,p-estimate=fedau",
        codec="topk:0.1+q8+lzma",
        models=LABEL_ONLY,
    ),
]


def run_one(config: RunConfig) -> dict[str, Any]:
    import torch

    from fedslim.simulation.simulate import simulate

    torch.set_num_threads(1)
    shutil.rmtree(config.out, ignore_errors=True)  # a run killed earlier left a log this run must not append to
    started = time.monotonic()
    result = simulate(config, backend="inline")
    evaluated = [r for r in result.rounds if r.accuracy is not None]
    return {
        "final": evaluated[-1].accuracy,
        "best": max(r.accuracy for r in evaluated if r.round > 0 and r.accuracy is not None),
        "initial": evaluated[0].accuracy,
        "curve": [(r.round, r.accuracy) for r in evaluated],
        "bytes_up": sum(r.bytes_up for r in result.rounds),
        "bytes_down": sum(r.bytes_down for r in result.rounds),
        "updates": sum(r.accepted for r in result.rounds),
        "wall_s": time.monotonic() - started,
        **aggregation_diagnostics(result.log_path, result.run_id),
    }


def config_for(row: Row, model: str, seed: int, args: argparse.Namespace) -> RunConfig:
    return replace(
        RunConfig(
            overwrite=True,  # a benchmark's run directories are its own: a rerun replaces them
            task="fmnist",
            num_clients=args.clients,
            rounds=args.rounds,
            fraction=1.0,
            dirichlet_alpha=args.alpha,
            fast=FastSpec("lora", rank=4, seed=seed),
            seed=seed,
            local_steps=5,
            batch_size=16,
            lr=row.lr,
            participation=model,
            participation_mean=0.1,
            eval_every=args.eval_every,
        ),
        strategy=row.strategy,
        strategy_args=row.args,
        p_known=row.p_known,
        codec=row.codec,
        downstream_codec=row.codec,
        out=str(Path(args.out) / model / f"{row.label.replace(' ', '_').replace('/', '-')}" / f"seed{seed}"),
    )


def aggregation_diagnostics(log_path: str, run_id: str) -> dict[str, float]:
    """What the communication log says about a run's aggregation.

    ``memory_kib``: the most per-client state the strategy held.
    ``effective``: mean over rounds of (sum_i w_i)^2 / sum_i w_i^2 over the
    fresh updates' weights, how many equally weighted updates a round is worth.
    ``max_weight``: the largest weight any single fresh update got.
    ``screened``: updates the server's size screen rejected (diverged local runs).
    """
    with sqlite3.connect(f"file:{log_path}?mode=ro", uri=True) as db:
        (held,) = db.execute("SELECT MAX(strategy_memory_bytes) FROM rounds WHERE run_id = ?", (run_id,)).fetchone()
        (screened,) = db.execute(
            "SELECT COUNT(*) FROM messages WHERE run_id = ? AND reason LIKE 'update too large%'", (run_id,)
        ).fetchone()
        rows = db.execute(
            "SELECT SUM(weight) * SUM(weight) / SUM(weight * weight), MAX(weight) FROM messages "
            "WHERE run_id = ? AND direction = 'up' AND weight > 0 GROUP BY round",
            (run_id,),
        ).fetchall()
    return {
        "memory_kib": (held or 0) / 1024,
        "effective": statistics.mean(r[0] for r in rows) if rows else 0.0,
        "max_weight": max(r[1] for r in rows) if rows else 0.0,
        "screened": screened,
    }


def last5(run: dict[str, Any]) -> float:
    """Mean of a run's last five evaluations, steadier than the final one."""
    return statistics.mean(a for _, a in run["curve"][-5:])


def row_stats(results: dict[str, dict[str, Any]], model: str, row: Row, seeds: list[int]) -> dict[str, Any] | None:
    """A row's saved runs under ``model`` over ``seeds``, with accuracy gaps in points to FedAvg's run of the
    same seed (same split, same participation); None when the row has no run there."""
    by_seed = {s: results[key] for s in seeds if (key := f"{model}|{row.label}|{s}") in results}
    if model not in row.models or not by_seed:
        return None
    baseline = {s: results.get(f"{model}|{ROWS[0].label}|{s}") for s in seeds}
    paired = [(d, baseline[s]) for s, d in by_seed.items() if baseline[s] is not None]
    done = list(by_seed.values())
    return {
        "by_seed": by_seed,
        "final": [float(d["final"]) for d in done],
        "best": [float(d["best"]) for d in done],
        "last5": [last5(d) for d in done],
        "gap_final": [100 * (float(d["final"]) - float(b["final"])) for d, b in paired],
        "gap_last5": [100 * (last5(d) - last5(b)) for d, b in paired],
        "moved_kib": statistics.mean(d["bytes_up"] + d["bytes_down"] for d in done) / 1024,
        **{k: statistics.mean(d[k] for d in done) for k in ("memory_kib", "effective", "max_weight")},
        "screened": [d["screened"] for d in done if "screened" in d],
    }


def spread(values: list[float]) -> float:
    """Sample standard deviation, 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: dict[str, dict[str, Any]], rows: list[Row], models: list[str], seeds: list[int]) -> str:
    def mean_std(values: list[float]) -> str:
        return f"{statistics.mean(values):.4f} ± {spread(values):.4f}"

    def points(gaps: list[float]) -> str:
        """Accuracy differences to FedAvg on the same seed (same split, same participation), in points."""
        if not gaps:
            return "-"
        return f"{statistics.mean(gaps):+.2f} ± {spread(gaps):.2f} pt"

    lines = []
    for model in models:
        lines += [
            f"\n### participation: {model} (mean p = 0.1), {len(seeds)} seeds, mean ± std\n",
            "| strategy | final | best | last-5 mean | vs FedAvg, paired: final | paired: last-5 "
            "| KiB moved / run | server memory KiB | eff. updates / round | max weight |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            stats = row_stats(results, model, row, seeds)
            if stats is None:
                continue
            done = len(stats["by_seed"])
            label = row.label if done == len(seeds) else f"{row.label} ({done} of {len(seeds)} seeds)"
            lines.append(
                f"| {label} | {mean_std(stats['final'])} | {mean_std(stats['best'])} | {mean_std(stats['last5'])} | "
                f"{points(stats['gap_final'])} | {points(stats['gap_last5'])} | {stats['moved_kib']:,.0f} | "
                f"{stats['memory_kib']:,.0f} | {stats['effective']:.1f} | {stats['max_weight']:.3f} |"
            )
    return "\n".join(lines)


def uncompressed(row: Row) -> Row | None:
    """The row of the same strategy configuration without a codec, if the table has one."""
    same = (row.strategy, row.args, row.p_known, row.lr)
    return next((r for r in ROWS if r.codec == "none" and (r.strategy, r.args, r.p_known, r.lr) == same), None)


def quoted_values(results: dict[str, dict[str, Any]], seeds: list[int]) -> dict[str, str]:
    """The numbers the README and docs quote, formatted once, here: MODEL_ROWKEY_MEASURE for every cell.

    Means over the seeds (accuracies to 4 digits; gaps to FedAvg, paired by seed, in points with their
    sd); bytes moved and server memory in KiB; x_fewer and x_fedavg_bytes against FedAvg's bytes; for
    a compressed row, memory_x_less against the same strategy uncompressed; the final of each seed.
    """
    quoted: dict[str, str] = {}
    for model in MODELS:
        cells = {row: stats for row in ROWS if (stats := row_stats(results, model, row, seeds)) is not None}
        fedavg = cells.get(ROWS[0])
        for row, stats in cells.items():
            key = f"{model}_{row.key}"
            quoted |= {
                f"{key}_final": f"{statistics.mean(stats['final']):.4f}",
                f"{key}_best": f"{statistics.mean(stats['best']):.4f}",
                f"{key}_last5": f"{statistics.mean(stats['last5']):.4f}",
                f"{key}_kib": f"{stats['moved_kib']:,.0f}",
                f"{key}_memory_kib": f"{stats['memory_kib']:,.0f}",
                f"{key}_effective": f"{stats['effective']:.1f}",
                f"{key}_max_weight": f"{stats['max_weight']:.2f}",
                **{f"{key}_final_seed{s}": f"{float(run['final']):.4f}" for s, run in stats["by_seed"].items()},
            }
            for gap in ("final", "last5"):
                if stats[f"gap_{gap}"]:
                    quoted[f"{key}_{gap}_gap"] = f"{statistics.mean(stats[f'gap_{gap}']):+.2f}"
                    quoted[f"{key}_{gap}_gap_sd"] = f"{spread(stats[f'gap_{gap}']):.2f}"
            if stats["screened"]:
                low, high = min(stats["screened"]), max(stats["screened"])
                quoted[f"{key}_screened"] = f"{low} to {high}" if low != high else f"{low}"
            if fedavg is not None:
                quoted[f"{key}_x_fewer"] = f"{fedavg['moved_kib'] / stats['moved_kib']:,.1f}x"
                quoted[f"{key}_x_fedavg_bytes"] = f"{stats['moved_kib'] / fedavg['moved_kib']:,.1f}x"
            dense = cells.get(uncompressed(row)) if row.codec != "none" else None
            if dense is not None:
                quoted[f"{key}_memory_x_less"] = f"{dense['memory_kib'] / stats['memory_kib']:,.0f}x"
    return quoted


def save(args: argparse.Namespace, setup: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    """Write NAME.{json,md}: every saved run, their table, the stamp of this command, the quoted values.

    Returns the table.
    """
    seeds = sorted({int(key.rsplit("|", 1)[1]) for key in results})
    bases = [base_used(config_for(ROWS[0], "label", seed, args)) for seed in seeds]  # a seed's runs share a base
    header = (
        f"FMNIST Dir({args.alpha}), {args.clients} clients, {args.rounds} rounds, 5 local steps x 16, lr 0.1, "
        f"LoRA r=4 fast layer; accuracy evaluated every {args.eval_every} rounds\n"
    )
    models = [model for model in MODELS if any(key.startswith(f"{model}|") for key in results)]
    table = header + summarize(results, ROWS, models, seeds)
    record = {"setup": setup, "runs": results}
    write_results(
        args.results, args.name, provenance(seeds, bases), record, table, values=quoted_values(results, seeds)
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rows", nargs="+", metavar="LABEL", help="only these rows (their labels in the table)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default="runs/bench-participation")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--name", default="participation", help="results file name")
    parser.add_argument("--fresh", action="store_true", help="discard the saved runs and start over")
    parser.add_argument(
        "--redo", action="store_true", help="run the selected rows, models and seeds again, replacing saved results"
    )
    parser.add_argument("--table-only", action="store_true", help="write the table of the saved runs, run nothing")
    args = parser.parse_args()

    store = args.results / f"{args.name}.json"
    setup = {"rounds": args.rounds, "clients": args.clients, "alpha": args.alpha, "eval_every": args.eval_every}
    saved = json.loads(store.read_text()) if store.exists() and not args.fresh else {}
    if saved and saved.get("setup") != setup:
        sys.exit(
            f"{store} holds runs of another setup ({saved.get('setup')}, this one is {setup}); "
            "pass --fresh to discard them, or --name NAME or --results DIR to keep both"
        )
    results: dict[str, dict[str, Any]] = saved.get("runs", {})
    unknown = set(args.rows or []) - {row.label for row in ROWS}
    if unknown:
        sys.exit(f"no such rows: {', '.join(sorted(unknown))}")
    rows = [row for row in ROWS if not args.rows or row.label in args.rows]
    todo = {
        f"{model}|{row.label}|{seed}": config_for(row, model, seed, args)
        for model in args.models
        for seed in args.seeds
        for row in rows
        if model in row.models and (args.redo or f"{model}|{row.label}|{seed}" not in results) and not args.table_only
    }
    print(f"{len(todo)} runs to do, {len(results)} already saved in {store}", flush=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(run_one, config): key for key, config in todo.items()}
        failed = []
        for done, future in enumerate(as_completed(futures), 1):
            key = futures[future]
            try:
                results[key] = future.result()
            except Exception as exc:  # one failed run must not lose the others
                failed.append(key)
                print(f"[{done}/{len(todo)}] {key}: FAILED: {exc!r}", flush=True)
                continue
            save(args, setup, results)
            print(
                f"[{done}/{len(todo)}] {key}: final {results[key]['final']:.4f} best {results[key]['best']:.4f} "
                f"screened {results[key]['screened']} ({results[key]['wall_s']:.0f} s)",
                flush=True,
            )
    print(save(args, setup, results))  # the table shows every saved run, whatever subset this invocation ran
    if failed:
        sys.exit(f"{len(failed)} runs failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
