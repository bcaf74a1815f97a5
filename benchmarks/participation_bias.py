"""What label-correlated participation does to the objective, and what that costs in accuracy, without federation.

FedAvg over participants converges towards the participation-weighted
objective sum_i p_i n_i f_i; FedAU and the 1/p-reweighted rules divide p_i
out and aim at (1/N) sum_i f_i (every client counts once), and the test set
is the balanced union of all data, sum_i n_i f_i. This script takes the
participation benchmark's federations (FMNIST Dir(0.1), 100 clients, FedAU's
label-correlated p_i with mean 0.1, one per seed) and, for each of the three
objectives:

- its class mixture: the share of each class in the objective, and the total
  variation distance from the balanced test set;
- the accuracy its own optimum reaches: the fast layer of the participation
  benchmark (LoRA r=4 on the pretrained CNN, plus the head) trained centrally
  by SGD on the pooled client data, each example drawn with probability
  proportional to its weight in that objective.

The second column bounds what any reweighting rule can gain over FedAvg
over participants once both have converged.

    python benchmarks/participation_bias.py            # 3 seeds
    python benchmarks/participation_bias.py --seeds 0 --steps 500

Writes benchmarks/results/participation_bias.{json,md}, stamped with commit,
command, seeds and the bases.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from fmnist_setup import RESULTS  # noqa: E402
from provenance import base_used, provenance, write_results  # noqa: E402

from fedslim.config import FastSpec, RunConfig  # noqa: E402
from fedslim.task import prepared_base  # noqa: E402

OBJECTIVES = {
    "balanced: sum_i n_i f_i (the test set)": "data",
    "every client once: (1/N) sum_i f_i (FedAU, 1/p)": "client",
    "FedAvg over participants: sum_i p_i n_i f_i": "participation",
}


def example_weights(kind: str, sizes: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-client weight of each of its examples in objective ``kind``."""
    if kind == "data":
        return np.ones_like(p)
    if kind == "client":
        return 1.0 / sizes
    return p


def federation(seed: int) -> RunConfig:
    """The participation benchmark's label-correlated federation of ``seed``."""
    return RunConfig(
        overwrite=True,  # a benchmark's run directories are its own: a rerun replaces them
        task="fmnist",
        codec="none",
        downstream_codec="none",
        num_clients=100,
        rounds=1,
        dirichlet_alpha=0.1,
        seed=seed,
        fast=FastSpec("lora", rank=4, seed=seed),
        participation="label",
        participation_mean=0.1,
    )


def run_seed(seed: int, steps: int, lr: float, batch_size: int) -> dict[str, Any]:
    import torch

    from fedslim.data.datasets import load_federation
    from fedslim.data.participation import participation_schedule

    torch.set_num_threads(1)
    config = federation(seed)
    data = load_federation(config)
    counts = np.array([np.bincount(c.y, minlength=10) for c in data.clients], dtype=np.float64)
    p = participation_schedule("label", counts, 1, 0.1, seed).probabilities
    sizes = counts.sum(axis=1)
    x = torch.from_numpy(np.concatenate([c.x for c in data.clients]))
    y = torch.from_numpy(np.concatenate([c.y for c in data.clients]))
    owner = np.repeat(np.arange(len(sizes)), sizes.astype(np.int64))
    base = prepared_base(config)

    results: dict[str, Any] = {"seed": seed, "p_min": float(p.min()), "p_max": float(p.max())}
    for label, kind in OBJECTIVES.items():
        client_weight = example_weights(kind, sizes, p)
        mixture = (client_weight[:, None] * counts).sum(axis=0)
        mixture /= mixture.sum()
        draw = client_weight[owner]
        draw = torch.from_numpy(draw / draw.sum())
        model = base.build(config.fast)
        params = model.fast_parameters()
        optimizer = torch.optim.SGD(params, lr=lr)
        generator = torch.Generator().manual_seed(seed)
        model.module.train()
        for _ in range(steps):
            batch = torch.multinomial(draw, batch_size, replacement=True, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model.module(x[batch]), y[batch]).backward()
            optimizer.step()
        result = base.task.evaluate(model.module, data.test)
        with torch.no_grad():
            predicted = model.module(torch.from_numpy(data.test.x)).argmax(1).numpy()
        recall = [float((predicted[data.test.y == c] == c).mean()) for c in range(10)]
        results[label] = {
            "mixture": mixture.tolist(),
            "tv_from_balanced": float(0.5 * np.abs(mixture - 0.1).sum()),
            "accuracy": result.accuracy,
            "recall": recall,
        }
        print(f"seed {seed}: {label}: accuracy {result.accuracy:.4f}", flush=True)
    return results


def summarize(runs: list[dict[str, Any]], steps: int) -> str:
    def mean_std(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {spread:.4f}"

    lines = [
        f"Central SGD on the pooled client data ({steps} steps), {len(runs)} seeds, mean ± std\n",
        "| objective | TV distance from balanced | rarest / commonest class share | accuracy of its optimum "
        "| worst class recall |",
        "|---|---|---|---|---|",
    ]
    for label in OBJECTIVES:
        rows = [run[label] for run in runs]
        shares = f"{statistics.mean(min(r['mixture']) for r in rows):.3f} / "
        shares += f"{statistics.mean(max(r['mixture']) for r in rows):.3f}"
        lines.append(
            f"| {label} | {mean_std([r['tv_from_balanced'] for r in rows])} | {shares} | "
            f"{mean_std([r['accuracy'] for r in rows])} | {mean_std([min(r['recall']) for r in rows])} |"
        )
    return "\n".join(lines)


def quoted_values(runs: list[dict[str, Any]]) -> dict[str, str]:
    """The numbers docs/results.md quotes, formatted once, here: per objective (data, client, participation)
    the means over the seeds, and what reweighting can gain at most (client over participation optimum)."""
    quoted: dict[str, str] = {}
    accuracy: dict[str, float] = {}
    for label, kind in OBJECTIVES.items():
        rows = [run[label] for run in runs]
        accuracy[kind] = statistics.mean(r["accuracy"] for r in rows)
        quoted |= {
            f"{kind}_accuracy": f"{accuracy[kind]:.4f}",
            f"{kind}_tv": f"{statistics.mean(r['tv_from_balanced'] for r in rows):.2f}",
            f"{kind}_worst_recall": f"{statistics.mean(min(r['recall']) for r in rows):.2f}",
        }
    quoted["reweighting_gain"] = f"{100 * (accuracy['client'] - accuracy['participation']):.1f} points"
    return quoted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        runs = list(pool.map(run_seed, args.seeds, *zip(*[(args.steps, args.lr, args.batch_size)] * len(args.seeds))))
    table = summarize(runs, args.steps)
    settings = {k: v for k, v in vars(args).items() if k != "results"}
    stamp = provenance(args.seeds, [base_used(federation(seed)) for seed in args.seeds])
    record = {"settings": settings, "runs": runs}
    write_results(args.results, "participation_bias", stamp, record, table, values=quoted_values(runs))
    print(table)


if __name__ == "__main__":
    main()
