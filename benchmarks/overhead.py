"""What fedslim's bookkeeping costs per round, against a plain Flower 1.39 FedAvg app, from one run.

    python benchmarks/overhead.py                          # 20 clients, 20%/round, 10 rounds, 1 epoch, lr 0.05
    python benchmarks/overhead.py --backends inline --no-profile

Rows, each run on two backends:

- ``plain``: Flower's own ``FedAvg`` (``start()`` loop) and a bare ClientApp
  (benchmarks/plain_flower.py): full model down, full model up, no fedslim
  code on the wire path. It trains the same model (the run's pretrained base,
  every parameter), on the same partitions, with the same local SGD and seeds
  (``fedslim.training.train_epochs``, seed ``[seed, round, partition_id]``),
  on the same clients each round (FedAvg's ``configure_train`` node choice is
  replaced by fedslim's seeded rule over nodes ordered by partition id, the
  partition ids learned by one query per node before round 1), and evaluates
  centrally on the test set after every round (``evaluate_fn``), as fedslim.
- ``full``: fedslim, ``--fast full`` FedAvg, no codec (classic FedAvg through
  fedslim's replica sync, codecs, screen and communication log).
- ``lora``: fedslim, the default LoRA fast layer (rank 4, alpha 8), no codec.

Backends: ``flower`` is Flower's simulation engine (``run_simulation``, Ray,
``client_resources`` 1 CPU / 0 GPU per node, as ``fedslim simulate``);
``inline`` is fedslim's :class:`~fedslim.simulation.inline.InlineGrid` (the
ClientApp called in this process, one Flower context per node with its
``partition-id``), used for both apps.

What a "round" is, the same for every row: the time from the end of round
r-1's central evaluation to the end of round r's, taken by this script's own
clock (``time.monotonic``) in the callback each server calls right after
evaluating (``evaluate_fn`` for the plain app, ``on_round`` for fedslim).
For the plain app that spans FedAvg's ``configure_train``, the train messages
and the clients' work (load the arrays, train, wrap the reply),
``aggregate_train``, an empty federated-evaluation step, and the central
evaluation (load the aggregate, evaluate). For fedslim it spans the replica
publish and its digest, the task config, the strategy's sampling, each node's
replica sync, the clients' work (sync, train, encode the delta), the wire
accounting of every message (sizes, SQLite rows), decoding and screening the
replies, the aggregation, the central evaluation, and the round's row and
totals in the log; fedslim's own ``wall_time_s`` (from the round's start to
the end of its evaluation) is kept in the JSON beside it. Round 1 pays the
warm-up (data loading in each worker, first calls) and is left out: the
medians are over rounds 2..R. The sampled clients, hence the local work, are
the same for every row in a round (checked: the partitions fedslim's log shows
a train message sent to, against those the plain strategy sampled), so rows
are also compared round for round ("round-paired": the median over rounds
2..R of the row's round time over the plain row's). Torch in this process
(the server, and the inline clients) runs ``--threads`` threads (1: the
clients of the simulation engine run one per 1-CPU worker; and one thread
keeps the timings steady when other work shares the machine; the load
average before and after each row is in the JSON).

``--profile`` (on by default) then runs the plain app and fedslim ``full``
once more each, inline, under cProfile from the end of round 1 to the end of
the run. Per round, it splits the time into the shared work (the cumulative
time of ``fedslim.training.train_epochs`` and ``evaluate``) and the rest, and
lists the top functions of fedslim/ and flwr/ by cumulative time: all of
them (fedslim), and those outside the shared work (fedslim, then plain).
Times under cProfile are inflated for Python-heavy code; read them as shares.

Prints the tables and writes benchmarks/results/overhead.{json,md}, stamped
with commit, command, seed and the base. A benchmark only: wall-clock times
are never asserted by a test.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import platform
import pstats
import sqlite3
import statistics
import time
import warnings
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from fmnist_setup import add_setup_arguments, base_config
from provenance import base_used, provenance, write_results
from rich.console import Console, Group
from rich.table import Table

from fedslim.config import FastSpec, RunConfig
from fedslim.data.datasets import load_federation
from fedslim.simulation.inline import InlineGrid
from fedslim.simulation.simulate import simulate

ROWS = {
    "plain": "plain Flower FedAvg (full)",
    "full": "fedslim --fast full",
    "lora": "fedslim lora (default)",
}
BACKENDS = ("flower", "inline")
# What fedslim's simulate gives Flower's simulation engine (quiet form).
BACKEND_CONFIG: dict[str, Any] = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"logging_level": "ERROR", "log_to_driver": False},
}
PROFILE_ROOTS = ("fedslim", "flwr")


@dataclass
class RoundClock:
    """End-of-round timestamps, and the accuracy and loss each round ended with."""

    stamps: dict[int, float] = field(default_factory=dict)
    accuracy: dict[int, float] = field(default_factory=dict)
    loss: dict[int, float] = field(default_factory=dict)

    def stamp(self, server_round: int, accuracy: float | None, loss: float | None) -> None:
        self.stamps[server_round] = time.monotonic()
        if accuracy is not None:
            self.accuracy[server_round] = accuracy
        if loss is not None:
            self.loss[server_round] = loss

    def durations(self) -> dict[int, float]:
        """Seconds of each round r >= 1: from the end of round r-1 to the end of round r."""
        return {r: self.stamps[r] - self.stamps[r - 1] for r in sorted(self.stamps) if r - 1 in self.stamps}


def quiet_flower() -> None:
    """Flower's INFO lines off, and its run_simulation deprecation notice (fedslim calls it on purpose)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.WARNING)
    flwr_logger.addFilter(lambda record: "run_simulation` function is deprecated" not in record.getMessage())


def row_config(base: RunConfig, row: str, backend: str, args: argparse.Namespace) -> RunConfig:
    kind = "lora" if row == "lora" else "full"
    fast = FastSpec(kind=kind, rank=args.rank, lora_alpha=2.0 * args.rank, seed=base.seed)
    return replace(base, fast=fast, lr=args.lr, out=f"{args.out}/{backend}-{row}")


def run_plain_row(config: RunConfig, backend: str, clock: RoundClock) -> dict[int, list[int]]:
    """Run the plain app; returns the partition ids it sampled in each round."""
    import plain_flower

    def on_round(server_round: int, accuracy: float, loss: float) -> None:
        clock.stamp(server_round, accuracy, loss)

    if backend == "inline":
        return plain_flower.run_plain(InlineGrid(plain_flower.app, config.num_clients), config, on_round).sampled
    from flwr.simulation import run_simulation

    finished: list[plain_flower.PlainResult] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=plain_flower.make_server_app(config, on_round, finished.append),
            client_app=plain_flower.app,
            num_supernodes=config.num_clients,
            backend_config=BACKEND_CONFIG,
            verbose_logging=False,
        )
    if not finished:
        raise RuntimeError("the plain Flower simulation ended before its server finished (see the log above)")
    return finished[0].sampled


def run_fedslim_row(config: RunConfig, backend: str, clock: RoundClock) -> tuple[dict[int, list[int]], list[float]]:
    """Run fedslim; returns the partition ids sent a train message in each round, and its logged ``wall_time_s``."""
    result = simulate(config, on_round=lambda t: clock.stamp(t.round, t.accuracy, t.loss), backend=backend)
    return logged_samples(result.log_path, result.run_id), [r.wall_time_s for r in result.rounds]


def logged_samples(log_path: str, run_id: str) -> dict[int, list[int]]:
    """The clients of every train message the server sent, by round, from fedslim's communication log."""
    sampled: dict[int, list[int]] = {}
    with closing(sqlite3.connect(log_path)) as db:
        query = (
            "SELECT round, client FROM messages"
            " WHERE run_id = ? AND direction = 'down' AND message_type = 'train' ORDER BY round"
        )
        for server_round, client in db.execute(query, (run_id,)):
            sampled.setdefault(server_round, []).append(int(str(client).rpartition("-")[2]))
    return {r: sorted(ids) for r, ids in sampled.items()}


def run_row(row: str, backend: str, config: RunConfig, console: Console) -> dict[str, Any]:
    clock = RoundClock()
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    logged: list[float] = []
    if row == "plain":
        sampled = run_plain_row(config, backend, clock)
    else:
        sampled, logged = run_fedslim_row(config, backend, clock)
    total = time.monotonic() - started
    durations = clock.durations()
    timed = [durations[r] for r in sorted(durations) if r >= 2]
    final_round = max(clock.accuracy)
    console.print(
        f"  {backend:6} {row:5}: median {statistics.median(timed):.3f} s/round (rounds 2..{config.rounds}), "
        f"final accuracy {clock.accuracy[final_round]:.4f}, {total:.0f} s in all"
    )
    return {
        "backend": backend,
        "row": row,
        "label": ROWS[row],
        "fast": config.fast.kind,
        "round_s": {str(r): d for r, d in durations.items()},
        "median_s_per_round": statistics.median(timed),
        "mean_s_per_round": statistics.fmean(timed),
        "sum_s_rounds_2_on": sum(timed),
        "fedslim_logged_wall_time_s": {str(r): w for r, w in enumerate(logged)} if logged else None,
        "fedslim_logged_median_s": statistics.median(logged[2:]) if len(logged) > 2 else None,
        "accuracy": {str(r): a for r, a in sorted(clock.accuracy.items())},
        "final_accuracy": clock.accuracy[final_round],
        "sampled_partitions": {str(r): ids for r, ids in sorted(sampled.items())},
        "run_s": total,
        "load_average_1min": [load_before, os.getloadavg()[0]],  # before and after: other work on the machine
    }


def compare(rows: list[dict[str, Any]]) -> None:
    """Ratios to the plain row of the same backend, round-for-round too, and accuracy gaps."""
    for row in rows:
        plain = next((p for p in rows if p["backend"] == row["backend"] and p["row"] == "plain"), None)
        if plain is None:
            continue
        row["ratio_to_plain"] = row["median_s_per_round"] / plain["median_s_per_round"]
        paired = [row["round_s"][r] / plain["round_s"][r] for r in row["round_s"] if int(r) >= 2]
        row["median_paired_ratio_to_plain"] = statistics.median(paired)
        row["extra_s_per_round"] = row["median_s_per_round"] - plain["median_s_per_round"]
        row["final_accuracy_gap_to_plain"] = row["final_accuracy"] - plain["final_accuracy"]
        common = [r for r in row["accuracy"] if r in plain["accuracy"]]
        row["max_accuracy_gap_to_plain"] = max(abs(row["accuracy"][r] - plain["accuracy"][r]) for r in common)
        row["same_clients_as_plain"] = row["sampled_partitions"] == plain["sampled_partitions"]


def results_table(rows: list[dict[str, Any]], title: str) -> Table:
    caption = (
        "round = end of one central evaluation to the end of the next (same clock for every row); "
        "x plain: ratio of medians; paired: median over rounds of row / plain; "
        "max |Δacc|: largest gap to plain in any round's test accuracy; "
        "same clients: the same partitions trained in every round as the plain row"
    )
    table = Table(title=title, caption=caption)
    for column in (
        "backend",
        "row",
        "median s/round",
        "x plain",
        "paired x plain",
        "+s/round",
        "final acc",
        "vs plain",
        "max |Δacc|",
        "same clients",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        has_ref = "ratio_to_plain" in row
        table.add_row(
            row["backend"],
            row["label"],
            f"{row['median_s_per_round']:.3f}",
            f"{row['ratio_to_plain']:.3f}x" if has_ref else "-",
            f"{row['median_paired_ratio_to_plain']:.3f}x" if has_ref else "-",
            f"{row['extra_s_per_round']:+.3f}" if has_ref else "-",
            f"{row['final_accuracy']:.4f}",
            f"{100 * row['final_accuracy_gap_to_plain']:+.2f} pt" if has_ref else "-",
            f"{100 * row['max_accuracy_gap_to_plain']:.2f} pt" if has_ref else "-",
            ("yes" if row["same_clients_as_plain"] else "NO") if has_ref else "-",
        )
    return table


# ------------------------------------------------------------------ profile


def code_root(filename: str) -> str | None:
    """``fedslim/commlog.py`` or ``flwr/app/...`` for a file of fedslim or Flower; None for anything else."""
    parts = Path(filename).parts
    for index in range(len(parts) - 1, -1, -1):
        if parts[index] in PROFILE_ROOTS:
            return "/".join(parts[index:])
    return None


TRAINING_WORK = ("train_epochs", "evaluate")  # fedslim/training.py: the local SGD and the central evaluation


def descendants(graph: dict[Any, set[Any]], roots: set[Any]) -> set[Any]:
    """Every node reachable from ``roots`` in ``graph`` (the roots included)."""
    seen, stack = set(roots), list(roots)
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def profiled_run(row: str, config: RunConfig) -> pstats.Stats:
    """Run ``row`` inline with cProfile on from the end of round 1 to the end of the run."""
    profiler = cProfile.Profile()

    def enable_after_round_1(server_round: int) -> None:
        if server_round == 1:
            profiler.enable()

    if row == "plain":
        import plain_flower

        grid = InlineGrid(plain_flower.app, config.num_clients)
        plain_flower.run_plain(grid, config, lambda r, _a, _l: enable_after_round_1(r))
    else:
        simulate(config, on_round=lambda totals: enable_after_round_1(totals.round), backend="inline")
    profiler.disable()
    return pstats.Stats(profiler)


def profile_summary(row: str, config: RunConfig, top: int) -> dict[str, Any]:
    """Where a row's time goes in rounds 2..R (inline, cProfile), in seconds per round.

    ``work``: the local SGD and the central evaluation (the cumulative time of
    ``train_epochs`` and ``evaluate``), the same computation in every row;
    ``bookkeeping``: everything else the round spent (all profiled time
    minus ``work``). ``top``: fedslim/ and flwr/ functions by cumulative time;
    ``top_bookkeeping``: the same without the functions that contain or sit
    inside ``work`` (the call chain down to ``train_epochs``, the model's
    forward), so what is left is the wire path.
    """
    rounds = config.rounds - 1
    stats = profiled_run(row, config).stats  # type: ignore[attr-defined]
    callees: dict[Any, set[Any]] = {}
    callers: dict[Any, set[Any]] = {}
    for func, (*_, called_by) in stats.items():
        callers[func] = set(called_by)
        for caller in called_by:
            callees.setdefault(caller, set()).add(func)
    work = {f for f in stats if f[0].endswith("training.py") and f[2] in TRAINING_WORK}
    inside_work = (descendants(callees, work) | descendants(callers, work)) - work
    total = sum(value[2] for value in stats.values())
    work_s = sum(stats[f][3] for f in work)

    def entry(func: Any) -> dict[str, Any]:
        _, calls, own, cumulative, _ = stats[func]
        return {
            "function": f"{code_root(func[0])}:{func[1]}({func[2]})",
            "calls_per_round": calls / rounds,
            "cum_s_per_round": cumulative / rounds,
            "own_s_per_round": own / rounds,
        }

    ours = sorted((f for f in stats if code_root(f[0])), key=lambda f: stats[f][3], reverse=True)
    return {
        "run": f"{ROWS[row]}, inline, rounds 2..{config.rounds} under cProfile",
        "rounds": rounds,
        "profiled_s_per_round": total / rounds,
        "work_s_per_round": work_s / rounds,
        "bookkeeping_s_per_round": (total - work_s) / rounds,
        "top": [entry(f) for f in ours[:top]],
        "top_bookkeeping": [entry(f) for f in ours if f not in inside_work and f not in work][:top],
    }


def profile_table(profile: dict[str, Any], key: str, what: str) -> Table:
    table = Table(
        title=f"{profile['run']}: {what}; per round: {profile['profiled_s_per_round']:.3f} s profiled, "
        f"{profile['work_s_per_round']:.3f} s local SGD + evaluation, {profile['bookkeeping_s_per_round']:.3f} s other"
    )
    for column in ("function", "calls/round", "cum s/round", "own s/round"):
        table.add_column(column, justify="right")
    for item in profile[key]:
        table.add_row(
            item["function"],
            f"{item['calls_per_round']:,.1f}",
            f"{item['cum_s_per_round']:.4f}",
            f"{item['own_s_per_round']:.4f}",
        )
    return table


BOUND = 1.2  # the acceptance: fedslim's full-model round at most this many times plain Flower's


def quoted_values(rows: list[dict[str, Any]], profiles: dict[str, Any]) -> dict[str, str]:
    """The numbers docs/results.md quotes, formatted once, here: keys BACKEND_ROW_..., and the profile's split.

    ``full_against_bound``: whether fedslim's full-model rows stay within :data:`BOUND` of plain Flower, by
    both ratios (of medians, and round-paired), in words.
    """
    quoted: dict[str, str] = {}
    for row in rows:
        key = f"{row['backend']}_{row['row']}"
        quoted[f"{key}_s_per_round"] = f"{row['median_s_per_round']:.1f} s"
        if row["row"] != "plain" and "ratio_to_plain" in row:
            quoted[f"{key}_x_plain"] = f"{row['ratio_to_plain']:.3f}x"
            quoted[f"{key}_paired_x_plain"] = f"{row['median_paired_ratio_to_plain']:.3f}x"
            quoted[f"{key}_extra_s"] = f"{row['extra_s_per_round']:+.2f} s"
    full_rows = [r for r in rows if r["row"] == "full" and "ratio_to_plain" in r]
    if full_rows:
        over = [r["backend"] for r in full_rows if max(r["ratio_to_plain"], r["median_paired_ratio_to_plain"]) > BOUND]
        quoted["full_against_bound"] = (
            f"above the {BOUND:g}x bound on {' and '.join(over)}" if over else f"within the {BOUND:g}x bound"
        )
    if profiles:
        full, plain = profiles["full"], profiles["plain"]
        quoted |= {
            "profile_work_s": f"{full['work_s_per_round']:.1f} s",
            "profile_plain_work_s": f"{plain['work_s_per_round']:.1f} s",
            "profile_full_bookkeeping_s": f"{full['bookkeeping_s_per_round']:.2f} s",
            "profile_plain_bookkeeping_s": f"{plain['bookkeeping_s_per_round']:.2f} s",
            "profile_extra_bookkeeping_s": (
                f"{full['bookkeeping_s_per_round'] - plain['bookkeeping_s_per_round']:.2f} s"
            ),
        }
    return quoted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_arguments(parser, out="runs/bench-overhead")
    parser.set_defaults(rounds=10, clients=20, local_epochs=1)
    parser.add_argument("--lr", type=float, default=0.05, help="client SGD learning rate (every row)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (server, inline clients)")
    parser.add_argument("--name", default="overhead", help="results file name")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be >= 3 (round 1 is warm-up; the medians are over rounds 2..R)")

    quiet_flower()
    torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 160))
    base = base_config(args)
    load_federation(base)
    bases = [base_used(base)]  # every row, plain Flower's included, trains on the run's base
    rows = [
        run_row(row, backend, row_config(base, row, backend, args), console)
        for backend in args.backends
        for row in args.rows
    ]
    compare(rows)
    title = (
        f"Fashion-MNIST, Dir({args.alpha}), {args.clients} clients, {args.fraction:.0%}/round, {args.rounds} rounds, "
        f"{args.local_epochs} local epoch(s), lr {args.lr:g}; seconds per round, median of rounds 2..{args.rounds}"
    )
    table = results_table(rows, title)
    console.print(table)

    profiles: dict[str, Any] = {}
    tables = [table]
    if args.profile:
        for row in ("plain", "full"):
            profiles[row] = profile_summary(row, row_config(base, row, "profile", args), args.profile_top)
        top = args.profile_top
        tables += [
            profile_table(profiles["full"], "top", f"top {top} of fedslim/ and flwr/ by cumulative time"),
            profile_table(profiles["full"], "top_bookkeeping", f"top {top} outside local SGD and evaluation"),
            profile_table(profiles["plain"], "top_bookkeeping", f"top {top} outside local SGD and evaluation"),
        ]
        for extra in tables[1:]:
            console.print(extra)

    setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    record = {"setup": setup, "machine": machine, "backend_config": BACKEND_CONFIG, "rows": rows, "profile": profiles}
    stamp = provenance([args.seed], bases)
    quoted = quoted_values(rows, profiles)
    write_results(args.results, args.name, stamp, record, Group(*tables), width=200, values=quoted)
    console.print(f"results written to {args.results}/{args.name}.{{json,md}}")


if __name__ == "__main__":
    main()
