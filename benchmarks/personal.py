"""Isolation against averaging: a head of each client's own, under strong label skew, side by side.

Setup (Fashion-MNIST by default, ``--task text`` for fortunes): Dirichlet(0.1)
over the clients, so most hold two or three classes; each client holds out 20%
of its examples and every client evaluates at the end, on its own held-out
examples. Arms, one run each:

- ``averaged``: LoRA r=4 + the head, every fast tensor averaged (FedAvg);
- ``personal-head``: the same LoRA averaged, each client keeps a head of its own
  (``--personal head``): it trains there and never travels;
- ``local``: each client trains LoRA + head on its own examples alone, nothing
  exchanged, for as many local epochs as a client gets in the federation on
  average (rounds x fraction x local epochs).

Columns: personalised accuracy (each client's model on its own held-out
examples; for ``averaged`` that model is the global one) as the mean over the
clients and the worst decile (10th percentile), the global model's accuracy on
the central test set (the server keeps the base's head under
``personal-head``, so its number there says little), and the bytes moved.

    python benchmarks/personal.py                  # Fashion-MNIST, about 15 minutes on 2 cores
    python benchmarks/personal.py --task text --lr 2e-3 --batch-size 16 --rounds 30 --local-epochs 1 --clients 30 \\
        --fraction 0.3 --device cuda

Prints a table and writes benchmarks/results/personal[-TASK].{json,md}, stamped
with the commit, command, seed and base.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from fmnist_setup import RESULTS
from provenance import base_used, provenance, write_results

from fedslim.client.app import partition_split
from fedslim.commlog import percentile
from fedslim.config import FastSpec, RunConfig
from fedslim.simulation.simulate import simulate
from fedslim.task import prepared_base, task_for
from fedslim.training import train_epochs

ARMS = {
    "averaged": "LoRA r=4 + head, all averaged",
    "personal-head": "LoRA r=4 averaged + a personal head",
    "local": "LoRA r=4 + head, local training only",
}


def config_for(arm: str, args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        task=args.task,
        num_clients=args.clients,
        rounds=args.rounds,
        fraction=args.fraction,
        dirichlet_alpha=args.alpha,
        local_epochs=args.local_epochs,
        lr=args.lr if args.lr is not None else RunConfig.lr,
        batch_size=args.batch_size,
        fast=FastSpec("lora", rank=4, seed=args.seed, personal="head" if arm == "personal-head" else "none"),
        seed=args.seed,
        codec="none",
        downstream_codec="none",
        client_holdout=0.2,
        fraction_evaluate=1.0,
        eval_every=args.rounds,
        device=args.device,
        overwrite=True,
        out=str(Path(args.out) / arm),
    )


def federated(config: RunConfig) -> dict[str, Any]:
    result = simulate(config, backend="inline")
    final = result.rounds[-1]
    return {
        "personalised_mean": final.client_accuracy,
        "personalised_p10": final.client_accuracy_p10,
        "clients_evaluated": final.clients_evaluated,
        "global_central": final.accuracy,
        "mib_moved": sum(r.bytes_up + r.bytes_down for r in result.rounds) / 2**20,
    }


def local_only(config: RunConfig) -> dict[str, Any]:
    """Every client alone: the fast layer trained on its own examples from the base, evaluated on its held-out ones."""
    base, task = prepared_base(config), task_for(config)
    epochs = max(1, round(config.rounds * config.fraction * config.local_epochs))
    accuracies = []
    for client in range(config.num_clients):
        train, held_out = partition_split(task, config, client)
        model = base.build(config.fast)
        model.module.to(config.torch_device())
        optimizer = task.optimizer(model.fast_parameters(), config)
        train_epochs(model.module, train, task, optimizer, epochs, config.batch_size, [config.seed, client])
        accuracies.append(task.evaluate(model.module, held_out).accuracy)
        print(f"  local client {client}: {accuracies[-1]:.4f}", flush=True)
    return {
        "personalised_mean": statistics.mean(accuracies),
        "personalised_p10": percentile(accuracies, 10),
        "clients_evaluated": len(accuracies),
        "local_epochs": epochs,
        "global_central": None,
        "mib_moved": 0.0,
        "per_client": accuracies,
    }


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"{args.task}, {args.clients} clients, Dir({args.alpha}), {args.fraction:.0%} per round, {args.rounds} rounds, "
        f"{args.local_epochs} local epoch(s), 20% of each client's examples held out, seed {args.seed}\n",
        "| arm | personalised accuracy: mean | worst 10% | global model, central test set | MiB moved |",
        "|---|---|---|---|---|",
    ]
    for arm, run in results.items():
        central = f"{run['global_central']:.4f}" if run["global_central"] is not None else "-"
        lines.append(
            f"| {ARMS[arm]} | {run['personalised_mean']:.4f} | {run['personalised_p10']:.4f} | {central} | "
            f"{run['mib_moved']:,.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="fmnist")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="default: the run config's")
    parser.add_argument("--batch-size", type=int, default=RunConfig.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--out", default="runs/bench-personal")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    name = "personal" if args.task == "fmnist" else f"personal-{args.task}"
    stamp = provenance([args.seed], [base_used(config_for(args.arms[0], args))])
    results: dict[str, dict[str, Any]] = {}
    for arm in args.arms:
        print(f"{arm}: {ARMS[arm]}", flush=True)
        config = config_for(arm, args)
        results[arm] = local_only(config) if arm == "local" else federated(config)
        text = table(results, args)
        record = {"setup": vars(args) | {"results": str(args.results)}, "runs": results}
        write_results(args.results, name, stamp, record, text)
    print(text)


if __name__ == "__main__":
    main()
