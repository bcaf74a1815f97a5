"""Tables of `fedslim logs`: rich for the terminal, Markdown for papers."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from fedslim.logs.reader import ClientStats, Summary
from fedslim.report import UNBOUNDED


def kib(n: float) -> str:
    return f"{n / 1024:,.1f}"


def accuracy(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def reached_text(reached: tuple[int, int] | None) -> str:
    return f"{kib(reached[1])} KiB (round {reached[0]})" if reached else "not reached"


def summary_table(summary: Summary, target: float, reached: tuple[int, int] | None) -> Table:
    """One run in one table: what it was, what it moved, what it reached."""
    table = Table(title=f"run {summary.run_id} ({summary.label})", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right", overflow="fold")
    status = "finished" if summary.finished else "interrupted (or still running)"
    rows = [
        ("strategy / fast layer", f"{summary.strategy} / {summary.fast_kind}"),
        ("codec up / down", f"{summary.codec_up} / {summary.codec_down}"),
        ("clients", f"{summary.clients}"),
        ("rounds", f"{summary.rounds_done} of {summary.rounds_planned}, {status}"),
        ("messages (rejected)", f"{summary.messages:,} ({summary.rejected:,})"),
        (
            "replies: errors / late / none",
            f"{summary.errors:,} / {summary.late:,} / {summary.no_reply:,}",
        ),
        ("KiB up / down", f"{kib(summary.bytes_up)} / {kib(summary.bytes_down)}"),
        ("KiB total", kib(summary.total_bytes)),
        (
            "KiB per round up / down (rounds 1+)",
            f"{kib(summary.training_bytes_up / summary.training_rounds)} / "
            f"{kib(summary.training_bytes_down / summary.training_rounds)}",
        ),
        ("vs full model (same messages)", f"{summary.vs_full_model:,.1f}x fewer bytes"),
        ("vs dense fast layer", f"{summary.vs_dense_fast:,.1f}x fewer bytes"),
        ("accuracy: start / final", f"{accuracy(summary.initial_accuracy)} / {accuracy(summary.final_accuracy)}"),
        ("best accuracy", f"{accuracy(summary.best_accuracy)} (round {summary.best_round})"),
        (f"bytes to reach {target:.4f}", reached_text(reached)),
    ]
    if summary.provisioning_bytes:
        provisioned = f"{kib(summary.provisioning_bytes)} KiB to {summary.provisioned_nodes} node(s)"
        rows.insert(9, ("base provisioning (one-off)", provisioned))
    if summary.consolidations:
        each = summary.merge_bytes / summary.consolidations
        rows.append(("base consolidations", f"{summary.consolidations} ({kib(each)} KiB each)"))
    if summary.final_client_accuracy is not None:
        on_clients = f"{accuracy(summary.final_client_accuracy)} / {accuracy(summary.final_client_accuracy_p10)}"
        rows.append(("client-side accuracy, final: mean / worst decile", on_clients))
    if summary.strategy_memory_bytes:
        per_client = summary.strategy_memory_bytes / summary.clients if summary.clients else 0
        held = f"{kib(summary.strategy_memory_bytes)} KiB ({per_client:,.0f} B/client)"
        rows.append(("server memory (strategy)", held))
    if summary.client_cpu_s is not None:
        rows.append(("client CPU per update (mean)", f"{summary.client_cpu_s:,.2f} s"))
    if summary.client_peak_rss_bytes is not None:
        rows.append(("client peak memory (largest)", f"{summary.client_peak_rss_bytes / 2**20:,.0f} MiB"))
    rows.append(("wall time", f"{summary.wall_time_s:,.1f} s"))
    if summary.resumes:
        rows.append(("resumed from its checkpoint", f"{summary.resumes} time(s)"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def clients_table(clients: Sequence[ClientStats], title: str) -> Table:
    table = Table(title=title)
    columns = ("client", "sampled", "accepted", "not accepted", "errors", "late", "no reply", "KiB up", "KiB down")
    for column in (*columns, "mean weight", "last round", "CPU s/update", "peak MiB"):
        table.add_column(column, justify="left" if column == "client" else "right", overflow="fold")
    for c in clients:
        table.add_row(
            c.client,
            str(c.sampled),
            str(c.accepted),
            str(c.rejected),
            str(c.errors),
            str(c.late),
            str(c.no_reply),
            kib(c.bytes_up),
            kib(c.bytes_down),
            f"{c.mean_weight:.4f}" if c.mean_weight is not None else "-",
            str(c.last_round),
            f"{c.mean_cpu_s:.2f}" if c.mean_cpu_s is not None else "-",
            f"{c.peak_rss_bytes / 2**20:,.0f}" if c.peak_rss_bytes is not None else "-",
        )
    return table


COMPARE_COLUMNS = (
    "run",
    "strategy",
    "codec up / down",
    "rounds",
    "final acc",
    "best acc",
    "KiB total",
    "KiB / round (1+)",
    "vs full model",
    "vs dense fast",
    "KiB to target",
)


def compare_rows(labels: Sequence[str], runs: Sequence[tuple[Summary, tuple[int, int] | None]]) -> list[list[str]]:
    """One row per run (``labels``: the runs' short labels): the cells of :data:`COMPARE_COLUMNS`."""
    return [
        [
            label,
            s.strategy,
            f"{s.codec_up} / {s.codec_down}",
            f"{s.rounds_done}" + ("" if s.finished else " (interrupted)"),
            accuracy(s.final_accuracy),
            accuracy(s.best_accuracy),
            kib(s.total_bytes),
            kib((s.training_bytes_up + s.training_bytes_down) / s.training_rounds),
            f"{s.vs_full_model:,.1f}x",
            f"{s.vs_dense_fast:,.1f}x",
            f"{kib(reached[1])} (r{reached[0]})" if reached else "-",
        ]
        for label, (s, reached) in zip(labels, runs, strict=True)
    ]


def compare_table(rows: list[list[str]], target: float, width: int) -> Table:
    """A row per run if that fits in ``width`` characters with no cell wrapped, else a column per run.

    In a column per run, cells too long for their column wrap (folded inside
    a word if they must); none is cut short.
    """
    title = f"runs side by side (target accuracy {target:.4f})"
    wide = Table(title=title)
    for column in COMPARE_COLUMNS:
        wide.add_column(column, justify="left" if column in ("run", "strategy", "codec up / down") else "right")
    for row in rows:
        wide.add_row(*row)
    if Console(width=UNBOUNDED).measure(wide).maximum <= width:
        return wide
    tall = Table(title=title)
    tall.add_column("", style="bold", no_wrap=True, overflow="fold")
    for row in rows:
        tall.add_column(row[0], justify="right", overflow="fold")
    for metric, *cells in list(zip(COMPARE_COLUMNS, *rows))[1:]:
        tall.add_row(metric, *cells)
    return tall


def markdown(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub/pandoc pipe table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)
