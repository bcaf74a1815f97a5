"""A thousand clients on two cores: round time, memory and checkpoint cost at 100 and 1,000 simulated clients,
and ten thousand at 1% per round.

Setup: Synthetic(1, 1), the default LoRA fast layer, FedVARP (one stored
update per client) with top-k 10% + 8-bit values both ways and error
feedback, 10% of the clients sampled per round, 20 rounds, seed 0, a
checkpoint after every round (the default); N = 100 and N = 1,000 clients, on
the inline backend and on Flower's simulation engine (Ray workers, one CPU
each). Every row runs in a fresh Python process, so peaks do not mix.

Ten thousand clients: ``--fraction 0.01 --clients 1000 10000`` samples 1%
per round (10 and 100 clients), so that the 10,000 rows compare with 1,000
clients at the same fraction (results ``scale-1pct``). The server holds the
test set and each client's label counts, not the clients' data; each Ray
worker makes only the partitions it serves (Synthetic: one device from where
its draws start in the generator's stream, indexed once per process).

Columns:

- round s: mean of the log's ``rounds.wall_time_s`` over rounds 1+ (sample,
  sync, train, check, aggregate, evaluate; no checkpoint);
- wall s: mean wall clock between two logged rounds over rounds 1+ (all of a
  round, the previous round's checkpoint included), and the same per
  sampled client (ms per sampled);
- client CPU ms: mean CPU time of one sampled client's training (the log's
  ``client_cpu_s``), to tell the clients' work from the server's:
  Synthetic's sample counts are log-normal, so it depends on who is sampled;
- server peak MB: peak RSS of the process running the server
  (``getrusage``; inline: the clients too), also per client;
- all MB (n): peak of the RSS summed over that process and all its
  descendants (Ray's workers, raylet, GCS), read from /proc every 0.2 s, with
  the number of processes at that peak (shared pages count once per process);
- strategy B/client: the largest ``rounds.strategy_memory_bytes`` over N;
- checkpoint: the final checkpoint file's size and, in parentheses, the
  store of the nodes' context states beside it (``node-states.sqlite``,
  inline only: each checkpoint adds the states of the nodes messaged since
  the previous one), and the mean time of one checkpoint (``save_checkpoint``:
  changed node states serialised and committed, the rest pickled, fsynced).

The ratios compare the largest N with the smallest on the same backend and
fraction: wall time per sampled client, server peak memory per client,
strategy memory per client (the acceptance: each at most 2x).

    python benchmarks/scale.py                  # the full table (N = 100 and 1,000; about 15 minutes on 2 cores)
    python benchmarks/scale.py --quick          # 3 rounds, N = 100 and 300, to try things out
    python benchmarks/scale.py --backends inline --clients 100 1000
    python benchmarks/scale.py --fraction 0.01 --clients 1000 10000   # 10,000 clients against 1,000, 1% each

Prints a table and writes benchmarks/results/scale.{json,md} (scale-quick with --quick, scale-1pct with
--fraction 0.01, scale-1pct-inline with --backends inline too), stamped with commit, command, seed and the base.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from provenance import base_used, provenance, write_results
from rich.console import Console
from rich.table import Table

from fedslim.config import RunConfig

RESULTS = Path(__file__).parent / "results"
BACKENDS = ("inline", "flower")
CODEC = "topk:0.1+q8"
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Row:
    backend: str
    clients: int
    rounds: int
    sampled_per_round: float
    round_s: float
    wall_s: float
    ms_per_sampled: float
    client_cpu_ms: float
    server_peak_mb: float
    server_kb_per_client: float
    all_processes_peak_mb: float
    processes: int
    strategy_bytes_per_client: float
    checkpoint_mb: float
    node_states_mb: float
    checkpoint_s: float
    final_accuracy: float
    run_s: float
    round_wall_s: list[float] = field(default_factory=list)
    """Wall clock of each round 1..R (the previous checkpoint included)."""


def children_of() -> dict[int, list[int]]:
    """Every process's children, by parent pid, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])  # the command name may hold spaces and parentheses
        children.setdefault(parent, []).append(int(entry))
    return children


def tree_rss(root: int) -> tuple[int, int]:
    """RSS summed over ``root`` and its descendants (bytes), and how many processes that is."""
    children = children_of()
    total, count, pending = 0, 0, [root]
    while pending:
        pid = pending.pop()
        pending += children.get(pid, [])
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
            count += 1
        except OSError:
            continue
    return total, count


class TreeMemory:
    """The peak of :func:`tree_rss` over this process's tree, sampled in a thread."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            total, count = tree_rss(os.getpid())
            if total > self.peak_bytes:
                self.peak_bytes, self.peak_processes = total, count


def timed(function: Callable[..., None], spent: list[float]) -> Callable[..., None]:
    """``function``, appending the seconds of each call to ``spent``."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        function(*args, **kwargs)
        spent.append(time.perf_counter() - started)

    return wrapper


def client_cpu_ms(log_path: str) -> float:
    """Mean CPU milliseconds of an accepted train reply in rounds 1+, as the clients reported them."""
    with sqlite3.connect(log_path) as db:
        (mean,) = db.execute(
            "SELECT AVG(client_cpu_s) FROM messages WHERE direction = 'up' AND message_type = 'train'"
            " AND status = 'ok' AND round >= 1"
        ).fetchone()
    return 1000 * (mean or 0.0)


def row_config(backend: str, clients: int, rounds: int, out: str, seed: int, fraction: float) -> RunConfig:
    """The run of one configuration."""
    return RunConfig(
        overwrite=True,  # a benchmark's run directories are its own: a rerun replaces them
        task="synthetic",
        num_clients=clients,
        rounds=rounds,
        fraction=fraction,
        strategy="fedvarp",
        codec=CODEC,
        downstream_codec=CODEC,
        seed=seed,
        out=f"{out}/{backend}-{clients}",
    )


def run_row(backend: str, clients: int, rounds: int, out: str, seed: int, fraction: float) -> Row:
    """One configuration, in this process."""
    from fedslim.commlog import RoundTotals
    from fedslim.server import loop
    from fedslim.server.checkpoint import NODE_STATES_FILENAME, checkpoint_path
    from fedslim.simulation.simulate import simulate

    config = row_config(backend, clients, rounds, out, seed, fraction)
    checkpoint_s: list[float] = []
    loop.save_checkpoint = timed(loop.save_checkpoint, checkpoint_s)  # type: ignore[assignment]
    logged_at: dict[int, float] = {}

    def on_round(totals: RoundTotals) -> None:
        logged_at[totals.round] = time.monotonic()
        print(f"  {backend} N={clients}: round {totals.round}/{rounds}", file=sys.stderr, flush=True)

    started = time.monotonic()
    with TreeMemory() as memory:
        result = simulate(config, on_round=on_round, backend=backend)
    run_s = time.monotonic() - started
    trained = result.rounds[1:]
    spans = [logged_at[r] - logged_at[r - 1] for r in range(1, rounds + 1)]
    wall_s = sum(spans) / len(spans)
    sampled = sum(r.sampled for r in trained) / len(trained)
    server_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    node_states = config.run_dir / NODE_STATES_FILENAME
    return Row(
        backend=backend,
        clients=clients,
        rounds=rounds,
        sampled_per_round=sampled,
        round_s=sum(r.wall_time_s for r in trained) / len(trained),
        wall_s=wall_s,
        ms_per_sampled=1000 * wall_s / sampled,
        client_cpu_ms=client_cpu_ms(result.log_path),
        server_peak_mb=server_peak / 2**20,
        server_kb_per_client=server_peak / 1024 / clients,
        all_processes_peak_mb=memory.peak_bytes / 2**20,
        processes=memory.peak_processes,
        strategy_bytes_per_client=max(r.strategy_memory_bytes or 0 for r in result.rounds) / clients,
        checkpoint_mb=checkpoint_path(config.run_dir).stat().st_size / 2**20,
        node_states_mb=node_states.stat().st_size / 2**20 if node_states.exists() else 0.0,
        checkpoint_s=sum(checkpoint_s) / len(checkpoint_s),
        final_accuracy=result.rounds[-1].accuracy or 0.0,
        run_s=run_s,
        round_wall_s=spans,
    )


def run_in_subprocess(backend: str, clients: int, rounds: int, out: str, seed: int, fraction: float) -> Row:
    """One configuration in a fresh Python process (its progress on stderr, its row as JSON on stdout)."""
    command = [sys.executable, __file__, "--row", f"{backend}:{clients}", "--rounds", str(rounds)]
    command += ["--out", out, "--seed", str(seed), "--fraction", str(fraction)]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{backend} N={clients} failed (exit {completed.returncode})")
    return Row(**json.loads(completed.stdout.strip().splitlines()[-1]))


RATIOS = {
    "ms_per_sampled": "wall time per sampled client",
    "server_kb_per_client": "server peak memory per client",
    "strategy_bytes_per_client": "strategy memory per client",
}


def ratios(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Per backend: the largest N's row over the smallest's, for each quantity of :data:`RATIOS`."""
    found: dict[str, dict[str, float]] = {}
    for backend in BACKENDS:
        by_n = {r.clients: r for r in rows if r.backend == backend}
        if len(by_n) < 2:
            continue
        small, large = by_n[min(by_n)], by_n[max(by_n)]
        found[backend] = {name: getattr(large, name) / getattr(small, name) for name in RATIOS}
    return found


def table(rows: list[Row], found: dict[str, dict[str, float]], title: str) -> Table:
    result = Table(title=title)
    columns = (
        "backend", "clients", "sampled/round", "round s", "wall s", "ms per sampled", "client CPU ms",
        "server peak MB", "server KB/client", "all MB (n)", "strategy B/client", "checkpoint MB (node states)",
        "checkpoint s", "final acc",
    )  # fmt: skip
    for column in columns:
        result.add_column(column, justify="left" if column == "backend" else "right")
    for r in rows:
        result.add_row(
            r.backend,
            f"{r.clients:,}",
            f"{r.sampled_per_round:.0f}",
            f"{r.round_s:.2f}",
            f"{r.wall_s:.2f}",
            f"{r.ms_per_sampled:.0f}",
            f"{r.client_cpu_ms:.0f}",
            f"{r.server_peak_mb:,.0f}",
            f"{r.server_kb_per_client:,.0f}",
            f"{r.all_processes_peak_mb:,.0f} ({r.processes})",
            f"{r.strategy_bytes_per_client:,.0f}",
            f"{r.checkpoint_mb:.2f} ({r.node_states_mb:.2f})",
            f"{r.checkpoint_s:.3f}",
            f"{r.final_accuracy:.4f}",
        )
    result.caption = "  ".join(
        f"{backend}, largest N over smallest: "
        + ", ".join(f"{label} {ratio[name]:.2f}x" for name, label in RATIOS.items())
        + "."
        for backend, ratio in found.items()
    )
    return result


def quoted_values(rows: list[Row], found: dict[str, dict[str, float]]) -> dict[str, str]:
    """The numbers docs/results.md quotes, formatted once, here: BACKEND_QUANTITY_ratio (largest N over
    smallest, :data:`RATIOS`) and BACKEND_N_checkpoint_s (the mean time of one checkpoint).

    ``reached``: the share of the clients expected to take part at least once in the run, 1 - (1 - f)^R;
    ``run_time``: the rows' runs together; ``backends_accuracy``: how the backends' final accuracies at the
    same N compare, in words.
    """
    quoted = {f"{backend}_{name}_ratio": f"{ratio[name]:.2f}x" for backend, ratio in found.items() for name in RATIOS}
    quoted |= {f"{r.backend}_{r.clients}_checkpoint_s": f"{r.checkpoint_s:.3f} s" for r in rows}
    first = rows[0]
    quoted["reached"] = f"{1 - (1 - first.sampled_per_round / first.clients) ** first.rounds:.0%}"
    run_s = sum(r.run_s for r in rows)
    quoted["run_time"] = f"{run_s / 60:.0f} minutes" if run_s >= 90 else f"{run_s:.0f} s"
    finals: dict[int, set[str]] = {}
    for r in rows:
        finals.setdefault(r.clients, set()).add(f"{r.final_accuracy:.4f}")
    if all(len(distinct) == 1 for distinct in finals.values()):
        quoted["backends_accuracy"] = "equal to four digits"
    else:
        by_n = [[r.final_accuracy for r in rows if r.clients == n] for n in finals]
        quoted["backends_accuracy"] = f"apart by up to {max(max(a) - min(a) for a in by_n):.4f}"
    return quoted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--quick", action="store_true", help="3 rounds, N = 100 and 300")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fraction", type=float, default=0.1, help="the share of the clients sampled per round")
    parser.add_argument("--out", default="runs/bench-scale", help="run directories")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the table and JSON go")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # BACKEND:N, run in this process, JSON on stdout
    args = parser.parse_args()
    if args.row:
        backend, clients = args.row.split(":")
        print(json.dumps(asdict(run_row(backend, int(clients), args.rounds, args.out, args.seed, args.fraction))))
        return
    if args.quick:
        args.rounds, args.clients = 3, [100, 300]

    configs = [(backend, clients) for backend in args.backends for clients in args.clients]
    bases = [base_used(row_config(b, n, args.rounds, args.out, args.seed, args.fraction)) for b, n in configs]
    rows = [run_in_subprocess(b, n, args.rounds, args.out, args.seed, args.fraction) for b, n in configs]
    found = ratios(rows)
    title = (
        f"Synthetic(1, 1), FedVARP, {CODEC} both ways, {args.fraction:.0%}/round, {args.rounds} rounds, "
        f"seed {args.seed}, checkpoint every round, {os.cpu_count()} cores"
    )
    result = table(rows, found, title)
    console = Console(width=max(Console().width, 200))
    console.print(result)
    name = "scale-quick" if args.quick else "scale" + ("" if args.fraction == 0.1 else f"-{100 * args.fraction:g}pct")
    name += "" if args.backends == list(BACKENDS) else "-" + "-".join(args.backends)
    record = {
        "setup": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "row"},
        "rows": [asdict(r) for r in rows],
        "ratios": found,
    }
    write_results(
        args.results, name, provenance([args.seed], bases), record, result, width=220, values=quoted_values(rows, found)
    )
    console.print(f"results written to {args.results}/{name}.{{json,md}}")


if __name__ == "__main__":
    main()
