"""Fuzzing the server's intake at scale: the generators of tests/test_fuzz.py, from plain seeds.

Of every twenty cases, eleven are valid blobs of a codec pipeline with one mutation (flip, truncate,
insert, splice; at the envelope, lossless payload or FastUpdate depth) and five are FastUpdates of random
field values ("fields"), decoded with ``decode_update``; two are a round of random train replies through
``UplinkReceiver.receive`` ("replies"); two are one to three whole rounds of a ``ServerRun`` whose nodes
answer with generated replies (hostile claims, huge updates, hostile metadata, missing, repeated, unasked and
late replies), through the checks, the size screen, the log rows, a strategy's memory, the check after
aggregation and a checkpoint, on the inline backend's grid ("server-inline") or as Flower's engine delivers
replies ("server-flower"). Per category: cases; rejected (blobs refused with UpdateError; for replies and
server rounds, train replies rejected with a reason, errors, no replies and late ones); accepted (blobs that
still decode; replies taken); other exceptions (anything else that got out: must be 0); the slowest case;
and the largest tracemalloc peak of one case (what Python, numpy, zlib and lzma allocated while decoding
it; libzstd's own buffers are not traced, its window is capped by the update limit). Generating a case is
neither timed nor traced, except that a server case draws its replies while its rounds run.

    python benchmarks/fuzz.py                    # 100,000 cases
    python benchmarks/fuzz.py --cases 2000 --seed 1

Case i of seed s is ``random.Random(f"{s}:{i}")``: a failure printed here reruns alone from its seed.
Prints a table and writes benchmarks/results/fuzz.{json,md}, stamped with commit, command and seed (no
pretrained base: the cases are built from codec pipelines alone).
"""

from __future__ import annotations

import argparse
import logging
import platform
import random
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from provenance import provenance, write_results  # noqa: E402
from test_fuzz import (  # noqa: E402
    PIPELINES,
    corpus,
    decode_case,
    huge_corpus,
    mutated_blob,
    random_round,
    random_server_case,
    random_update,
    receive_round,
    run_server_case,
)

RESULTS = Path(__file__).parent / "results"
CATEGORIES = ("flip", "truncate", "insert", "splice", "fields", "replies", "server-inline", "server-flower")
SERVER_BACKENDS = {18: "inline", 19: "flower"}  # the cases (index mod 20) that run whole server rounds


@dataclass
class Tally:
    """What one category's cases came to."""

    cases: int = 0
    rejected: int = 0
    accepted: int = 0
    other: int = 0
    max_s: float = 0.0
    max_peak_bytes: int = 0
    total_s: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    def add(self, rejected: int, accepted: int, seconds: float, peak: int) -> None:
        self.cases += 1
        self.rejected += rejected
        self.accepted += accepted
        self.max_s = max(self.max_s, seconds)
        self.max_peak_bytes = max(self.max_peak_bytes, peak)
        self.total_s += seconds


def outcome(kind: int, rng: random.Random) -> tuple[str, str, Callable[[], tuple[int, int]]]:
    """Case ``kind`` (its index mod 20) drawn from ``rng``: its category, description, and how to run it."""
    if kind in SERVER_BACKENDS:
        server_case = random_server_case(rng, SERVER_BACKENDS[kind])
        return f"server-{server_case.backend}", server_case.detail, lambda: run_server_case(server_case)
    if kind in (16, 17):
        round_ = random_round(rng)

        def run_round() -> tuple[int, int]:
            received = receive_round(round_)
            accepted = sum(item.update is not None for item in received)
            return len(received) - accepted, accepted

        return "replies", round_.detail, run_round
    case = mutated_blob(rng) if kind < 11 else random_update(rng)

    def run_blob() -> tuple[int, int]:
        decoded = decode_case(case)
        return int(not decoded), int(decoded)

    return case.category, case.detail, run_blob


def run(cases: int, seed: int, console: Console) -> dict[str, Tally]:
    tallies = {category: Tally() for category in CATEGORIES}
    started = time.monotonic()
    for index in range(cases):
        category, detail, run_case = outcome(index % 20, random.Random(f"{seed}:{index}"))
        tally = tallies[category]
        tracemalloc.start()
        begun = time.perf_counter()
        try:
            rejected, accepted = run_case()
        except Exception as exc:  # counting what escapes is the point
            rejected, accepted = 0, 0
            tally.other += 1
            failure = {"case": f"{seed}:{index}", "detail": detail, "error": f"{type(exc).__name__}: {exc}"[:500]}
            tally.failures.append(failure)
            console.print(f"[red]other exception[/red] {failure}")
        finally:
            seconds = time.perf_counter() - begun
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        tally.add(rejected, accepted, seconds, peak)
        if (index + 1) % 10_000 == 0:
            console.print(f"  {index + 1:,} cases, {time.monotonic() - started:.0f} s")
    return tallies


def results_table(tallies: dict[str, Tally], title: str) -> Table:
    table = Table(title=title)
    for column in ("category", "cases", "rejected", "accepted", "other", "mean ms", "max ms", "max peak KiB"):
        table.add_column(column, justify="right")
    total = Tally()
    for category, tally in tallies.items():
        table.add_row(*_cells(category, tally))
        total.cases += tally.cases
        total.rejected += tally.rejected
        total.accepted += tally.accepted
        total.other += tally.other
        total.total_s += tally.total_s
        total.max_s = max(total.max_s, tally.max_s)
        total.max_peak_bytes = max(total.max_peak_bytes, tally.max_peak_bytes)
    table.add_section()
    table.add_row(*_cells("all", total))
    return table


def _cells(name: str, tally: Tally) -> list[str]:
    mean_ms = 1000 * tally.total_s / tally.cases if tally.cases else 0.0
    return [
        name,
        f"{tally.cases:,}",
        f"{tally.rejected:,}",
        f"{tally.accepted:,}",
        f"{tally.other:,}",
        f"{mean_ms:.2f}",
        f"{1000 * tally.max_s:.1f}",
        f"{tally.max_peak_bytes / 1024:,.0f}",
    ]


def quoted_values(setup: dict[str, Any], failures: list[dict[str, str]]) -> dict[str, str]:
    """The numbers docs/results.md quotes, formatted once, here."""
    return {
        "cases": f"{setup['cases']:,}",
        "pipelines": f"{len(setup['pipelines'])}",
        "other": f"{len(failures):,}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--name", default="fuzz", help="results file name")
    args = parser.parse_args()

    # Flower stamps every Message with the run and task it is created in; stand in for one, as the tests do.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    console = Console(width=max(Console().width, 120))
    corpus()
    huge_corpus()
    logging.getLogger("flwr").setLevel(logging.ERROR)  # the server cases' warnings (rejections) are counted, not shown
    warnings.simplefilter("ignore", RuntimeWarning)  # overflow in a cast: the refused steps and fp16 memories
    started = time.monotonic()
    tallies = run(args.cases, args.seed, console)
    wall_s = time.monotonic() - started
    title = (
        f"{args.cases:,} fuzz cases (seed {args.seed}) against decode_update, UplinkReceiver.receive and the "
        f"server's rounds on both backends: {len(PIPELINES)} pipelines; replies counted one by one; {wall_s:.0f} s"
    )
    table = results_table(tallies, title)
    console.print(table)

    setup: dict[str, Any] = {
        "cases": args.cases,
        "seed": args.seed,
        "pipelines": PIPELINES,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
    }
    rows = [
        {"category": category, **{k: v for k, v in vars(tally).items() if k != "failures"}}
        for category, tally in tallies.items()
    ]
    failures = [failure for tally in tallies.values() for failure in tally.failures]
    report = {"setup": setup, "rows": rows, "failures": failures, "wall_s": wall_s}
    quoted = quoted_values(setup, failures)
    write_results(args.results, args.name, provenance([args.seed], []), report, table, width=160, values=quoted)
    console.print(f"results written to {args.results}/{args.name}.{{json,md}}")
    if failures:
        raise SystemExit(f"{len(failures)} cases raised something other than UpdateError")


if __name__ == "__main__":
    main()
