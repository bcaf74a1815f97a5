"""Robust aggregation against simulated attackers on Synthetic(1, 1): accuracy for each attack and defence.

Setup: the default run config (Synthetic(1, 1) over 30 clients, LoRA r=4 fast
layer, 1 local epoch at lr 0.05, FedAvg over participants weighted by the
examples each client claims), every client every round (--fraction 1.0), 15
rounds, seed 0, inline backend. Each attack makes 10% of the clients (3) its
attackers for the whole run (fedslim/simulation/attacks.py); each defence is
a ``robust`` spec in front of FedAvg (fedslim/strategies/robust.py). The
server's size screen is off (--screen-factor 0) so that the defences meet the
attacks alone; at its default (10) it rejects the 100x updates by itself.

Columns: final and last-3-mean accuracy, each also as the gap to the clean run
(no attack, no defence); the final test loss; rejected: train replies the
server rejected over the run (its declared-examples check turns away a reply
that claims more examples than its node declared when it joined; a client
whose local training diverged refuses to send its non-finite update).

The tiny federation (``--tables tiny``): ``fedslim simulate``'s defaults
(Synthetic transfer, LoRA r=4, ``topk:0.1+q8+lzma`` up and
``topk:0.05+q8+lzma`` down, the size screen at its default 10x) with 4
clients, 2 a round, 10 rounds, and one attacker sending 100x its update
(``scale:100@0.25``), on each of the first --tiny-seeds seeds whose attacker
is sampled in round 1 (where the screen has no earlier sizes to go by; two
updates a round leave the robust rules nothing to work with). Per seed: the
final accuracy without and with the attack, the gap, and the train replies
rejected in each run.

A run that already finished, with the same config, is read back from its
log in the run directory instead of run again (--fresh runs everything).

    python benchmarks/robust.py
    python benchmarks/robust.py --fraction 0.3 --rounds 30 --attacks none scale:100@0.1 --defences none median
    python benchmarks/robust.py --tables tiny

Prints the tables and writes benchmarks/results/robust.{json,md} (the attack
and defence grid) and robust-tiny.{json,md} (the tiny federation), stamped
with commit, command, seed(s) and the base(s).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fmnist_setup import RESULTS
from provenance import base_used, provenance, write_results
from rich.console import Console
from rich.table import Table

from fedslim.channel.protocol import partition_key
from fedslim.commlog import LOG_FILENAME, RoundTotals, open_log, read_round_totals
from fedslim.config import RunConfig
from fedslim.simulation.attacks import assign_attackers, parse_attacks
from fedslim.simulation.simulate import simulate
from fedslim.strategies.registry import strategy_for

ATTACKS = ["none", "scale:100@0.1", "sign-flip:4@0.1", "lie-examples@0.1"]
DEFENCES = ["none", "clip", "median", "trimmed:0.1", "clip+trimmed:0.1"]
LAST = 3
TINY_ATTACK = "scale:100@0.25"


def config_for(attack: str, defence: str, base: RunConfig, out: str) -> RunConfig:
    """The run of ``attack`` (``none``: no attacker) against ``defence`` (a robust spec), in its own directory."""
    name = f"{attack}_{defence}".replace(":", "").replace("@", "-").replace("+", "-")
    return replace(base, attack="" if attack == "none" else attack, robust=defence, out=f"{out}/{name}")


def finished_run(config: RunConfig) -> tuple[list[RoundTotals], float] | None:
    """The rounds and wall time of the latest finished run of exactly ``config`` in its directory's log, if any."""
    path = config.run_dir / LOG_FILENAME
    if not path.is_file():
        return None
    wanted = json.loads(json.dumps(config.to_dict(), default=str))
    db = open_log(path)
    try:
        for run_id, stored, started, finished in db.execute(
            "SELECT run_id, config, started_at, finished_at FROM runs WHERE finished_at IS NOT NULL "
            "ORDER BY started_at DESC"
        ):
            if json.loads(stored) == wanted:
                return read_round_totals(db, run_id), finished - started
    finally:
        db.close()
    return None


def run_row(attack: str, defence: str, base: RunConfig, out: str, fresh: bool, console: Console) -> dict[str, Any]:
    """One row: the run's accuracy, loss and rejected updates (read back from its log if it already finished)."""
    config = config_for(attack, defence, base, out)
    done = None if fresh else finished_run(config)
    if done is None:
        started = time.monotonic()
        rounds = simulate(config, backend="inline").rounds
        done = rounds, time.monotonic() - started
    rounds, wall_s = done
    trained = [r for r in rounds if r.round > 0]
    accuracies = [r.accuracy or 0.0 for r in trained]
    row = {
        "attack": attack,
        "defence": defence,
        "final_accuracy": accuracies[-1],
        f"last{LAST}_mean_accuracy": sum(accuracies[-LAST:]) / len(accuracies[-LAST:]),
        "final_loss": trained[-1].loss,
        "rejected": sum(r.rejected for r in trained),
        "accepted": sum(r.accepted for r in trained),
        "base_accuracy": rounds[0].accuracy,
        "wall_s": wall_s,
        "log": str(config.run_dir / LOG_FILENAME),
    }
    console.print(
        f"  {attack:>18} vs {defence:<17} final {row['final_accuracy']:.4f}, last-{LAST} "
        f"{row[f'last{LAST}_mean_accuracy']:.4f}, loss {_loss(row['final_loss'])}, rejected {row['rejected']}, "
        f"{row['wall_s']:.0f} s"
    )
    return row


def _loss(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if value < 1e4 else f"{value:.3g}"


def results_table(rows: list[dict[str, Any]], title: str) -> Table:
    clean = next(r for r in rows if r["attack"] == "none" and r["defence"] == "none")
    last = f"last{LAST}_mean_accuracy"
    table = Table(title=title)
    for column in ("attack", "defence", "final", "vs clean", f"last-{LAST} mean", "vs clean", "final loss"):
        table.add_column(column, justify="right")
    table.add_column("rejected", justify="right")
    for row in rows:
        row["final_gap"] = row["final_accuracy"] - clean["final_accuracy"]
        row[f"last{LAST}_gap"] = row[last] - clean[last]
        table.add_row(
            row["attack"],
            row["defence"],
            f"{row['final_accuracy']:.4f}",
            f"{100 * row['final_gap']:+.2f} pt",
            f"{row[last]:.4f}",
            f"{100 * row[f'last{LAST}_gap']:+.2f} pt",
            _loss(row["final_loss"]),
            f"{row['rejected']} / {row['rejected'] + row['accepted']}",
        )
    return table


def quoted_values(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The numbers the README and docs quote, formatted once, here (after :func:`results_table` set the gaps).

    Keys ATTACK_DEFENCE_MEASURE, each spec with its punctuation as dashes: scale-100-0-1_clip_final.
    """
    quoted: dict[str, str] = {}
    for row in rows:
        key = "_".join(re.sub(r"[^A-Za-z0-9]+", "-", row[spec]).strip("-") for spec in ("attack", "defence"))
        quoted |= {
            f"{key}_final": f"{row['final_accuracy']:.4f}",
            f"{key}_final_gap": f"{100 * row['final_gap']:+.2f} points",
            f"{key}_last{LAST}": f"{row[f'last{LAST}_mean_accuracy']:.4f}",
            f"{key}_last{LAST}_gap": f"{100 * row[f'last{LAST}_gap']:+.2f} points",
        }
    return quoted | defence_values(rows)


def defence_values(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per defence, how it holds against the clean run (no attack, no defence) under every attack, on final accuracy.

    Keys DEFENCE_worst_final_gap (the smallest gap over the attacks) and DEFENCE_against_clean, in words:
    ``at or above the clean run's final accuracy under every attack``, or ``below it under ATTACKS``.
    """
    quoted: dict[str, str] = {}
    for defence in dict.fromkeys(row["defence"] for row in rows):
        attacked = [row for row in rows if row["defence"] == defence and row["attack"] != "none"]
        if not attacked:
            continue
        key = re.sub(r"[^A-Za-z0-9]+", "-", defence).strip("-")
        below = [row["attack"] for row in attacked if row["final_gap"] < 0]
        quoted |= {
            f"{key}_worst_final_gap": f"{100 * min(row['final_gap'] for row in attacked):+.2f} points",
            f"{key}_against_clean": f"below the clean run's final accuracy under {', '.join(below)}"
            if below
            else "at or above the clean run's final accuracy under every attack",
        }
    return quoted


def tiny_config(seed: int, attack: str, rounds: int, out: str) -> RunConfig:
    """The tiny federation's run of ``seed`` (``attack`` empty: the clean run), with the default run config."""
    name = f"tiny-seed{seed}-{'clean' if not attack else 'attacked'}"
    return RunConfig(
        overwrite=True,
        num_clients=4,
        fraction=0.5,
        rounds=rounds,
        seed=seed,
        fast=replace(RunConfig().fast, seed=seed),
        attack=attack,
        out=f"{out}/{name}",
    )


def attacked_rounds(config: RunConfig) -> tuple[str, list[int]]:
    """The attacking client of ``config`` and the rounds that sample it."""
    (attacker,) = assign_attackers(parse_attacks(config.attack), config.num_clients, config.seed)
    clients = [partition_key(i) for i in range(config.num_clients)]
    sampler = strategy_for(config)
    return attacker, [r for r in range(1, config.rounds + 1) if attacker in sampler.sample(r, clients)]


def tiny_seeds(count: int, rounds: int, out: str) -> list[int]:
    """The first ``count`` seeds whose attacker is sampled in round 1."""
    seeds: list[int] = []
    seed = 0
    while len(seeds) < count:
        if attacked_rounds(tiny_config(seed, TINY_ATTACK, rounds, out))[1][:1] == [1]:
            seeds.append(seed)
        seed += 1
    return seeds


def finished_or_run(config: RunConfig, fresh: bool) -> list[RoundTotals]:
    """The rounds of ``config``: read back from its log if it already finished, else run now."""
    done = None if fresh else finished_run(config)
    return done[0] if done is not None else simulate(config, backend="inline").rounds


def tiny_row(seed: int, rounds: int, out: str, fresh: bool, console: Console) -> dict[str, Any]:
    """One seed of the tiny federation: final accuracy and rejected replies without and with the attacker."""
    attacked = tiny_config(seed, TINY_ATTACK, rounds, out)
    attacker, sampled = attacked_rounds(attacked)
    clean_totals = finished_or_run(tiny_config(seed, "", rounds, out), fresh)
    attacked_totals = finished_or_run(attacked, fresh)
    row = {
        "seed": seed,
        "attacker": attacker,
        "attacker_rounds": sampled,
        "base_accuracy": clean_totals[0].accuracy,
        "clean_final_accuracy": clean_totals[-1].accuracy,
        "attacked_final_accuracy": attacked_totals[-1].accuracy,
        "clean_rejected": sum(r.rejected for r in clean_totals if r.round > 0),
        "attacked_rejected": sum(r.rejected for r in attacked_totals if r.round > 0),
    }
    row["gap"] = (row["attacked_final_accuracy"] or 0.0) - (row["clean_final_accuracy"] or 0.0)
    console.print(
        f"  seed {seed}: clean {row['clean_final_accuracy']:.4f}, attacked {row['attacked_final_accuracy']:.4f} "
        f"({attacker} in rounds {sampled}), rejected {row['clean_rejected']} / {row['attacked_rejected']}"
    )
    return row


def tiny_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("seed", "attacker (rounds sampled)", "base", "clean final", "attacked final", "vs clean"):
        table.add_column(column, justify="right")
    table.add_column("rejected clean / attacked", justify="right")
    for row in rows:
        table.add_row(
            str(row["seed"]),
            f"{row['attacker']} ({', '.join(map(str, row['attacker_rounds']))})",
            f"{row['base_accuracy']:.4f}",
            f"{row['clean_final_accuracy']:.4f}",
            f"{row['attacked_final_accuracy']:.4f}",
            f"{100 * row['gap']:+.2f} pt",
            f"{row['clean_rejected']} / {row['attacked_rejected']}",
        )
    return table


def tiny_values(rows: list[dict[str, Any]]) -> dict[str, str]:
    """What the docs quote: the worst gap, and how many attacked runs end below half the clean run's accuracy."""
    collapsed = sum((r["attacked_final_accuracy"] or 0.0) < (r["clean_final_accuracy"] or 0.0) / 2 for r in rows)
    return {
        "tiny_worst_gap": f"{100 * min(r['gap'] for r in rows):+.2f} points",
        "tiny_collapsed": f"{collapsed} of {len(rows)}",
    }


def run_tiny(args: argparse.Namespace, console: Console) -> None:
    """The tiny federation with a 100x attacker from round 1: its table and robust-tiny.{json,md}."""
    seeds = tiny_seeds(args.tiny_seeds, args.tiny_rounds, args.out)
    bases = [base_used(tiny_config(seed, "", args.tiny_rounds, args.out)) for seed in seeds]
    stamp = provenance(seeds, bases)
    rows = [tiny_row(seed, args.tiny_rounds, args.out, args.fresh, console) for seed in seeds]
    title = (
        f"Tiny federation: Synthetic transfer, LoRA r=4, 4 clients, 2/round, {args.tiny_rounds} rounds, FedAvg, "
        f"size screen 10x; attacked: {TINY_ATTACK}, the attacker sampled in round 1"
    )
    table = tiny_table(rows, title)
    console.print(table)
    record = {"setup": {"rounds": args.tiny_rounds, "attack": TINY_ATTACK, "seeds": seeds}, "rows": rows}
    write_results(args.results, "robust-tiny", stamp, record, table, width=160, values=tiny_values(rows))
    console.print(f"results written to {args.results}/robust-tiny.{{json,md}}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", default=ATTACKS, help="attack specs; none: no attacker")
    parser.add_argument("--defences", nargs="+", default=DEFENCES, help="robust specs; none: plain FedAvg")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--screen-factor", type=float, default=0.0, help="the server's size screen (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-robust", help="run directories")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the table and JSON go")
    parser.add_argument("--fresh", action="store_true", help="rerun the runs whose logs already hold them")
    parser.add_argument("--tables", nargs="+", choices=("grid", "tiny"), default=["grid", "tiny"], help="tables to run")
    parser.add_argument("--tiny-seeds", type=int, default=4, help="tiny federation: seeds (attacker in round 1)")
    parser.add_argument("--tiny-rounds", type=int, default=10, help="tiny federation: rounds")
    args = parser.parse_args()
    if "none" not in args.attacks or "none" not in args.defences:
        parser.error("the clean run (attack none, defence none) is the reference: keep none in both lists")

    console = Console(width=max(Console().width, 140))
    if "tiny" in args.tables:
        run_tiny(args, console)
    if "grid" not in args.tables:
        return
    base = RunConfig(
        overwrite=True,  # a benchmark's run directories are its own: a rerun replaces them
        task="synthetic",
        codec="none",
        downstream_codec="none",
        num_clients=args.clients,
        rounds=args.rounds,
        fraction=args.fraction,
        screen_factor=args.screen_factor,
        seed=args.seed,
    )
    bases = [base_used(base)]  # attacks and defences leave the data alone: every run trains on this base
    stamp = provenance([args.seed], bases)  # before the runs: the code that ran
    rows = [run_row(a, d, base, args.out, args.fresh, console) for a in args.attacks for d in args.defences]
    title = (
        f"Synthetic(1, 1), {args.clients} clients, {args.fraction:.0%}/round, {args.rounds} rounds, FedAvg, "
        f"size screen {'off' if not args.screen_factor else f'{args.screen_factor:g}x'}; "
        "clean: no attack, no defence"
    )
    table = results_table(rows, title)
    console.print(table)

    setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = {"setup": setup, "rows": rows}
    write_results(args.results, "robust", stamp, record, table, width=160, values=quoted_values(rows))
    console.print(f"results written to {args.results}/robust.{{json,md}}")


if __name__ == "__main__":
    main()
