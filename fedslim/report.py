"""The per-round table, read from the communication log."""

from __future__ import annotations

import io
import os
from logging import INFO

from rich.console import Console
from rich.table import Table

from fedslim.commlog import RoundTotals

UNBOUNDED = 10_000
"""A console width no table or line reaches: printed at it, nothing is wrapped or cut to fit."""


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def _metric(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def round_table(rounds: list[RoundTotals], title: str = "", num_clients: int | None = None) -> Table:
    """Accuracy, loss and bytes per round, with what full-model FedAvg would have moved.

    With client-side evaluation, two columns show the accuracy of the replica
    the clients train from on their held-out examples: the mean over the
    evaluated clients and the worst decile (the 10th percentile).

    When the strategy keeps per-client state on the server, a column shows
    what it holds (and, given ``num_clients``, how much that is per client).
    A task's own metrics (``Task.evaluate``) follow the loss, one column each.
    """
    table = Table(title=title or None)
    with_memory = any(r.strategy_memory_bytes for r in rounds)
    on_clients = any(r.clients_evaluated for r in rounds)
    # "clients": the replica clients train from, on their held-out examples: the mean, and the 10th percentile.
    # "full FedAvg": what full-model FedAvg would have moved for the same messages.
    task_metrics = sorted({name for r in rounds for name in r.metrics})
    columns = ["round", "acc", "loss", *task_metrics, *(["clients mean", "clients p10"] if on_clients else [])]
    columns += ["updates", "KiB up", "KiB down", "full FedAvg KiB", "saving"]
    for column in columns + (["server KiB"] if with_memory else []):
        table.add_column(column, justify="right", overflow="fold")  # never cut
    for r in rounds:
        moved = r.bytes_up + r.bytes_down
        cells = [
            str(r.round),
            _metric(r.accuracy),
            _metric(r.loss),
            *(_metric(r.metrics.get(name)) for name in task_metrics),
            *([_metric(r.client_accuracy), _metric(r.client_accuracy_p10)] if on_clients else []),
            f"{r.accepted}/{r.sampled}",
            _kib(r.bytes_up),
            _kib(r.bytes_down),
            _kib(r.full_model_bytes),
            f"{r.full_model_bytes / moved:,.1f}x" if moved else "-",
        ]
        table.add_row(*cells, *([_kib(r.strategy_memory_bytes or 0)] if with_memory else []))
    up = sum(r.bytes_up for r in rounds)
    down = sum(r.bytes_down for r in rounds)
    full = sum(r.full_model_bytes for r in rounds)
    total = [
        "total",
        "",
        "",
        *([""] * len(task_metrics)),
        *(["", ""] if on_clients else []),
        "",
        _kib(up),
        _kib(down),
        _kib(full),
        f"{full / (up + down):,.1f}x" if up + down else "-",
    ]
    if with_memory:
        held = max(r.strategy_memory_bytes or 0 for r in rounds)
        total.append(f"{_kib(held)} ({held / num_clients:,.0f} B/client)" if num_clients else _kib(held))
    table.add_section()
    table.add_row(*total)
    return table


def saving_summary(rounds: list[RoundTotals]) -> str:
    """One sentence under the table: where accuracy started and ended, and the bytes against full-model FedAvg."""
    moved = sum(r.bytes_up + r.bytes_down for r in rounds)
    full = sum(r.full_model_bytes for r in rounds)
    evaluated = [r for r in rounds if r.accuracy is not None]
    parts = []
    if len(evaluated) > 1:
        first, last = evaluated[0], evaluated[-1]
        gain = 100 * (last.accuracy - first.accuracy)  # type: ignore[operator]
        parts.append(
            f"accuracy {first.accuracy:.4f} at round {first.round} -> {last.accuracy:.4f} at round {last.round} "
            f"({gain:+.1f} points)"
        )
    if moved:
        parts.append(
            f"moved {moved / 2**20:,.2f} MiB where full-model FedAvg would have moved {full / 2**20:,.2f} MiB: "
            f"{full / moved:,.1f}x fewer bytes"
        )
    return "; ".join(parts)


def log_round_table(run_id: str, rounds: list[RoundTotals], num_clients: int | None = None) -> None:
    """Write the table through Flower's logger (for `flwr run`, where stdout is the log)."""
    from flwr.common.logger import log

    buffer = io.StringIO()
    Console(file=buffer, width=UNBOUNDED, color_system=None).print(round_table(rounds, f"run {run_id}", num_clients))
    for line in buffer.getvalue().splitlines():
        log(INFO, "%s", line)
    log(INFO, "%s", saving_summary(rounds))


def output_console() -> Console:
    """A console on stdout: a terminal's width (or ``$COLUMNS``); on a file or a pipe, as wide as each table and
    line is, instead of 80 columns that would wrap lines and squeeze cells."""
    console = Console()
    return console if console.is_terminal or "COLUMNS" in os.environ else Console(width=UNBOUNDED)
