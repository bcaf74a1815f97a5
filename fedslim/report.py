"""The per-round table, read from the communication log."""

from __future__ import annotations

import io
from logging import INFO

from flwr.common.logger import log
from rich.console import Console
from rich.table import Table

from fedslim.commlog import RoundTotals


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def round_table(rounds: list[RoundTotals], title: str = "") -> Table:
    """Accuracy, loss and bytes per round, with what full-model FedAvg would have moved."""
    table = Table(title=title or None)
    # "full FedAvg": what full-model FedAvg would have moved for the same messages.
    for column in ("round", "acc", "loss", "updates", "KiB up", "KiB down", "full FedAvg KiB", "saving"):
        table.add_column(column, justify="right")
    for r in rounds:
        moved = r.bytes_up + r.bytes_down
        table.add_row(
            str(r.round),
            f"{r.accuracy:.4f}" if r.accuracy is not None else "-",
            f"{r.loss:.4f}" if r.loss is not None else "-",
            f"{r.accepted}/{r.sampled}",
            _kib(r.bytes_up),
            _kib(r.bytes_down),
            _kib(r.full_model_bytes),
            f"{r.full_model_bytes / moved:,.1f}x" if moved else "-",
        )
    up = sum(r.bytes_up for r in rounds)
    down = sum(r.bytes_down for r in rounds)
    full = sum(r.full_model_bytes for r in rounds)
    table.add_section()
    table.add_row(
        "total", "", "", "", _kib(up), _kib(down), _kib(full), f"{full / (up + down):,.1f}x" if up + down else "-"
    )
    return table


def log_round_table(run_id: str, rounds: list[RoundTotals]) -> None:
    """Write the table through Flower's logger (for `flwr run`, where stdout is the log)."""
    buffer = io.StringIO()
    Console(file=buffer, width=120, color_system=None).print(round_table(rounds, f"run {run_id}"))
    for line in buffer.getvalue().splitlines():
        log(INFO, "%s", line)
