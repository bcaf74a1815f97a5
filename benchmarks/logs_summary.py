"""How fast `fedslim logs summary` answers on a large log, with the log's indexes and without them.

Writes a communication log shaped like a 100-round run of 100 clients that
all take part every round (the identity exchange, then 100 instructions and
100 replies per round: 20,200 messages) with fedslim's own writer, into a
file that also holds 9 other runs of the same size (a run directory reused
for a sweep), so the queries must pick one run out of 202,000 rows. Then
times, best of 5:

- the summary computed in this process (``RunLog.rounds`` + ``RunLog.summary``);
- the whole command, ``fedslim logs summary RUN`` in a fresh process (Python
  start-up and imports included), which is what a user waits for;

once with the schema's indexes and once on a copy without them.

    python benchmarks/logs_summary.py

Writes benchmarks/results/logs_summary.{json,md}, stamped with commit and
command (no seed and no pretrained base: the log is written, not trained).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from fmnist_setup import RESULTS  # noqa: E402
from provenance import provenance, write_results  # noqa: E402

from fedslim.commlog import LOG_FILENAME, CommLog, MessageRow, RoundRow  # noqa: E402
from fedslim.logs.reader import RunLog  # noqa: E402

INDEXES = ("messages_by_round", "messages_by_client")


def write_log(path: Path, runs: int, rounds: int, clients: int) -> str:
    """A log with ``runs`` runs of ``rounds`` x ``clients``; returns the id of the last run written."""
    log = CommLog(path)
    run_id = ""
    for run in range(runs):
        run_id = f"run{run:04d}"
        log.start_run(run_id, {"num_clients": clients, "rounds": rounds, "strategy": "fedavg"}, "f" * 64, 1, 1, 1, 1)
        for server_round in range(rounds + 1):
            kinds = ("query",) if server_round == 0 else ("train",)
            for kind in kinds:
                for client in range(clients):
                    for direction, payload in (("down", 4000), ("up", 2500)):
                        row = MessageRow(
                            round=server_round,
                            node_id=10_000 + client,
                            client=f"partition-{client}",
                            direction=direction,
                            message_type=kind,
                            codec="topk:0.1+q8+lzma" if kind == "train" else None,
                            raw_bytes=47_032 if kind == "train" else 0,
                            payload_bytes=payload if kind == "train" else 0,
                            message_bytes=payload + 1_500,
                            full_model_bytes=1_670_000,
                            version_lag=0,
                            reason=None,
                            created_at=time.time(),
                        )
                        log.record_message(run_id, row)
            log.record_round(
                run_id,
                RoundRow(server_round, clients, clients, clients, 0.8 + server_round / 1000, 0.5, 1.0, 1_000_000),
            )
        log.record_weights(run_id, rounds, {f"partition-{c}": 1 / clients for c in range(clients)}, {})
    log.finish_run(run_id, "0" * 64)
    log.close()
    return run_id


def time_in_process(name: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        with RunLog(name) as log:
            log.summary(log.rounds())
        best = min(best, time.perf_counter() - started)
    return best


def time_command(name: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fedslim.cli", "logs", "summary", name], check=True, capture_output=True)
        best = min(best, time.perf_counter() - started)
    return best


def quoted_values(settings: dict[str, int], rows: int, results: list[dict[str, Any]]) -> dict[str, str]:
    """The numbers docs/results.md quotes, formatted once, here (``results``: with indexes, then without).

    ``in_process_x_faster`` and ``command_x_faster``: the time without the indexes over the time with them.
    """
    indexed, bare = results
    return {
        "runs": f"{settings['runs']:,}",
        "rounds": f"{settings['rounds']:,}",
        "clients": f"{settings['clients']:,}",
        "repeats": f"{settings['repeats']}",
        "message_rows": f"{rows:,}",
        "in_process_ms_indexed": f"{indexed['in_process_s'] * 1000:,.0f} ms",
        "in_process_ms_bare": f"{bare['in_process_s'] * 1000:,.0f} ms",
        "command_ms_indexed": f"{indexed['command_s'] * 1000:,.0f} ms",
        "command_ms_bare": f"{bare['command_s'] * 1000:,.0f} ms",
        "in_process_x_faster": f"{bare['in_process_s'] / indexed['in_process_s']:.1f}x",
        "command_x_faster": f"{bare['command_s'] / indexed['command_s']:.1f}x",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="runs in the log file")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        indexed = Path(tmp) / "indexed" / LOG_FILENAME
        run_id = write_log(indexed, args.runs, args.rounds, args.clients)
        bare = Path(tmp) / "bare" / LOG_FILENAME
        bare.parent.mkdir()
        shutil.copy(indexed, bare)
        with sqlite3.connect(bare) as db:
            for index in INDEXES:
                db.execute(f"DROP INDEX {index}")
        rows = sqlite3.connect(indexed).execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        results = []
        for label, path in (("with indexes", indexed), ("without indexes", bare)):
            name = f"{path.parent}#{run_id}"
            results.append(
                {
                    "log": label,
                    "in_process_s": time_in_process(name, args.repeats),
                    "command_s": time_command(name, args.repeats),
                }
            )
    table = [
        f"`fedslim logs summary` on run {args.runs} of {args.runs} in one log: {args.rounds} rounds x "
        f"{args.clients} clients, {rows:,} message rows in the file; best of {args.repeats}\n",
        "| log | summary in process | whole command (fresh process) |",
        "|---|---|---|",
    ]
    table += [f"| {r['log']} | {r['in_process_s'] * 1000:,.0f} ms | {r['command_s'] * 1000:,.0f} ms |" for r in results]
    text = "\n".join(table)
    print(text)
    settings = {k: v for k, v in vars(args).items() if k != "results"}
    record = {"settings": settings, "rows": rows, "results": results}
    quoted = quoted_values(settings, rows, results)
    write_results(args.results, "logs_summary", provenance([], []), record, text, values=quoted)


if __name__ == "__main__":
    main()
