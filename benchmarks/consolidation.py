"""Two timescales: rank-r LoRA consolidated into the base every K rounds, against plain LoRA, by the bytes moved.

Rows, one run each, same federation and seed:

- ``LoRA r``: plain rank-r LoRA (+ the head), never merged;
- ``LoRA r, consolidated every K``: the same layer merged into the base every
  K rounds and started again (``--consolidate-every K``), so the base takes
  a rank-r step each time: rank r x (merges + 1) in all, at the per-round
  cost of rank r (each client also receives each merge once);
- ``LoRA r x rounds/K``: plain LoRA of the rank consolidation reaches by the
  end, which pays that rank's bytes every round.

Every few rounds (``--eval-every``) the model is evaluated centrally; every round's bytes (train instructions and
replies, whole Flower messages) are summed, so each row is a curve of
accuracy against cumulative bytes. The "at equal bytes" columns take each
row within the bytes plain rank-r LoRA moves in the whole run: the last round
it reaches, and its mean accuracy over its last three evaluations there (one
evaluation swings by a point from round to round). The target is that
consolidation beats plain LoRA there.

    python benchmarks/consolidation.py                # Fashion-MNIST, about 3 minutes a row on 2 cores
    python benchmarks/consolidation.py --task text    # fortunes + MiniLM, about 35 minutes a row on 2 cores
    python benchmarks/consolidation.py --task text --device cuda --rows lora-r12   # one row (one process each)

On a GPU the text rows run side by side, one process per row (all five in
about 90 seconds on an H200).

Rows can be measured by separate processes, at once or one after another:
each adds its rows to the results file, which keeps the rows measured
before by the same commit, setup and kind of machine.

Prints a table and writes benchmarks/results/consolidation[-TASK][-rRANK][-codecs].{json,md},
stamped with the commit, command, seed and base.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shlex
import sqlite3
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
    rank: int
    every: int  # consolidate every this many rounds (0: never)


def rows_for(args: argparse.Namespace) -> list[Row]:
    rows = [Row(f"lora-r{args.rank}", f"LoRA r={args.rank}", args.rank, 0)]
    for every in args.every:
        rows.append(Row(f"consolidate-{every}", f"LoRA r={args.rank}, consolidated every {every}", args.rank, every))
    for rank in sorted({args.rank * -(-args.rounds // every) for every in args.every}):
        rows.append(Row(f"lora-r{rank}", f"LoRA r={rank} (= r x rounds/K)", rank, 0))
    return rows


def config_for(row: Row, args: argparse.Namespace) -> RunConfig:
    text = args.task == "text"
    return RunConfig(
        task=args.task,
        num_clients=args.clients,
        rounds=args.rounds,
        fraction=args.fraction,
        dirichlet_alpha=args.alpha,
        local_epochs=args.local_epochs,
        fast=FastSpec("lora", rank=row.rank, seed=args.seed),
        consolidate_every=row.every,
        seed=args.seed,
        lr=2e-3 if text else RunConfig.lr,
        batch_size=16 if text else RunConfig.batch_size,
        codec=args.codec,
        downstream_codec=args.downstream_codec,
        eval_every=args.eval_every,
        device=args.device,
        overwrite=True,
        out=str(Path(args.out) / row.key),
    )


def cumulative_bytes(log: Path) -> dict[int, int]:
    """Train instructions and replies up to and including each round, whole Flower messages both ways."""
    with sqlite3.connect(f"file:{log}?mode=ro", uri=True) as db:
        per_round = dict(
            db.execute(
                "SELECT round, SUM(message_bytes) FROM messages WHERE message_type = 'train' GROUP BY round"
            ).fetchall()
        )
    total, running = 0, {}
    for server_round in range(max(per_round, default=0) + 1):
        total += per_round.get(server_round, 0)
        running[server_round] = total
    return running


def run_row(config: RunConfig) -> dict[str, Any]:
    result = simulate(config, backend="inline")
    spent = cumulative_bytes(Path(result.log_path))
    curve = [(r.round, r.accuracy, spent.get(r.round, 0)) for r in result.rounds if r.accuracy is not None]
    merges = (config.rounds - 1) // config.consolidate_every if config.consolidate_every else 0
    return {
        "final": curve[-1][1],
        "best": max(accuracy for _, accuracy, _ in curve),
        "curve": curve,
        "total_bytes": curve[-1][2],
        "merges": merges,
        "effective_rank": config.fast.rank * (merges + 1),
    }


LATE_EVALUATIONS = 3


def at_budget(curve: list[tuple[int, float, int]], budget: int) -> tuple[int, float]:
    """The last round evaluated within ``budget`` bytes, and the mean accuracy of the last evaluations there."""
    within = [(server_round, accuracy) for server_round, accuracy, spent in curve if spent <= budget]
    late = [accuracy for _, accuracy in within[-LATE_EVALUATIONS:]]
    return within[-1][0], sum(late) / len(late)


def table(rows: list[Row], results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    baseline = results.get(rows[0].key)
    budget = baseline["total_bytes"] if baseline else None
    reference = at_budget(baseline["curve"], budget)[1] if baseline else None
    lines = [
        f"{args.task}, {args.clients} clients, Dir({args.alpha}), {args.fraction:.0%} per round, {args.rounds} rounds, "
        f"{args.local_epochs} local epoch(s), codecs up {args.codec} / down {args.downstream_codec}, seed {args.seed}; "
        f"equal bytes: what plain LoRA r={args.rank} moves in {args.rounds} rounds\n",
        f"| row | rank in the end | final | best | MiB moved | at equal bytes: round | mean of last {LATE_EVALUATIONS} "
        "evaluations | vs plain r |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.key not in results:
            continue
        run = results[row.key]
        if budget is not None and reference is not None:
            budget_round, accuracy = at_budget(run["curve"], budget)
            equal = f"{budget_round} | {accuracy:.4f} | {100 * (accuracy - reference):+.2f} pts"
        else:
            equal = "- | - | -"
        lines.append(
            f"| {row.label} | {run['effective_rank']} | {run['final']:.4f} | {run['best']:.4f} | "
            f"{run['total_bytes'] / 2**20:,.2f} | {equal} |"
        )
    return "\n".join(lines)


NOT_SETUP = ("rows", "out", "results")


def earlier_rows(path: Path, stamp: dict[str, Any], setup: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows in results file ``path`` measured by the same commit, setup and kind of machine (else none)."""
    if not path.is_file() or stamp["modified"]:
        return {}
    try:
        earlier = json.loads(path.read_text())
    except json.JSONDecodeError:  # just created to be locked, or cut short
        return {}
    before = earlier.get("provenance", {})
    same = (
        before.get("commit") == stamp["commit"]
        and not before.get("modified")
        and before.get("machine", {}).get("float_arithmetic") == stamp["machine"]["float_arithmetic"]
        and before.get("machine", {}).get("accelerator") == stamp["machine"].get("accelerator")
        and {k: v for k, v in earlier.get("setup", {}).items() if k not in NOT_SETUP} == setup
    )
    return earlier["runs"] if same else {}


def command_of_every_row(command: str) -> str:
    """``command`` without ``--rows``: the command that measures every row of the file."""
    kept: list[str] = []
    skipping = False
    for token in shlex.split(command):
        skipping = token == "--rows" or (skipping and not token.startswith("--"))
        if not skipping:
            kept.append(token)
    return shlex.join(kept)


def record_rows(measured: dict[str, dict[str, Any]], stamp: dict[str, Any], args: argparse.Namespace, name: str) -> str:
    """Add ``measured`` to the results file (under a lock: processes may share it) and return its table."""
    setup = {k: v for k, v in vars(args).items() if k not in NOT_SETUP}
    path = args.results / f"{name}.json"
    args.results.mkdir(parents=True, exist_ok=True)
    every_row = rows_for(args)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = earlier_rows(path, stamp, setup) | measured
        runs = {row.key: runs[row.key] for row in every_row if row.key in runs}
        text_table = table(every_row, runs, args)
        record = {"setup": setup | {"results": str(args.results)}, "runs": runs}
        write_results(args.results, name, stamp, record, text_table)
    return text_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="fmnist", choices=("fmnist", "text"))
    parser.add_argument("--every", type=int, nargs="+", default=[5, 10], help="values of K")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=None, help="default: 50 (fmnist), 30 (text)")
    parser.add_argument("--fraction", type=float, default=None, help="default: 0.2 (fmnist), 0.3 (text)")
    parser.add_argument("--alpha", type=float, default=None, help="default: 0.3 (fmnist), 0.5 (text)")
    parser.add_argument("--local-epochs", type=int, default=None, help="default: 2 (fmnist), 1 (text)")
    parser.add_argument("--codec", default="none")
    parser.add_argument("--downstream-codec", default="none")
    parser.add_argument("--eval-every", type=int, default=None, help="default: 3 (fmnist), 5 (text)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--rows", nargs="+", metavar="KEY", help="measure only these rows (default: all)")
    parser.add_argument("--out", default="runs/bench-consolidation")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    text = args.task == "text"
    for name, fmnist, fortunes in (
        ("clients", 50, 30),
        ("fraction", 0.2, 0.3),
        ("alpha", 0.3, 0.5),
        ("local_epochs", 2, 1),
        ("eval_every", 3, 5),
    ):
        if getattr(args, name) is None:
            setattr(args, name, fortunes if text else fmnist)

    rows = rows_for(args)
    if args.rows:
        unknown = sorted(set(args.rows) - {row.key for row in rows})
        if unknown:
            parser.error(f"unknown rows {', '.join(unknown)}; the rows are {', '.join(row.key for row in rows)}")
        rows = [row for row in rows if row.key in args.rows]
    name = "consolidation" + ("" if args.task == "fmnist" else f"-{args.task}")
    name += "" if args.rank == parser.get_default("rank") else f"-r{args.rank}"
    name += "" if args.codec == args.downstream_codec == "none" else "-codecs"
    stamp = provenance([args.seed], [base_used(config_for(rows[0], args))])
    stamp["command"] = command_of_every_row(stamp["command"])
    measured: dict[str, dict[str, Any]] = {}
    for row in rows:
        print(f"{row.key}: {row.label}", flush=True)
        measured[row.key] = run_row(config_for(row, args))
        text_table = record_rows(measured, stamp, args, name)
    print(text_table)


if __name__ == "__main__":
    main()
