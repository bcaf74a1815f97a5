"""`fedslim logs plot`: accuracy against bytes, bytes per round, and who took part, in one PNG."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedslim.logs.labels import log_labels
from fedslim.logs.reader import RunLog

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_RASTERS = 4
DPI = 100
# Raster titles wrap to fit their axes: about this many pixels a character (small font at DPI), in a column
# less the margin its y tick labels and y label take.
TITLE_CHAR_PX = 7
RASTER_MARGIN_PX = 70
MIN_TITLE_CHARS = 16
BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def plot_runs(logs: Sequence[RunLog], out: Path, width_px: int = 1200, height_px: int = 900) -> Path:
    """Write :func:`runs_figure` of ``logs`` to ``out`` (PNG of ``width_px`` x ``height_px``)."""
    figure = runs_figure(logs, width_px, height_px)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI)
    return out


def runs_figure(logs: Sequence[RunLog], width_px: int = 1200, height_px: int = 900) -> Figure:
    """The figure of ``logs``, each run named by its short label (:func:`fedslim.logs.labels.log_labels`).

    Top left: test accuracy against cumulative bytes moved (both directions),
    a line per run. Top right: bytes per round, up (solid) and down (dashed).
    Both byte axes are logarithmic, so that runs orders of magnitude apart
    stay readable. Bottom: the participation raster of each of the first four
    runs (clients by round: accepted update, sampled without an accepted
    update, absent).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not logs:
        raise ValueError("plot needs at least one run")
    labels = log_labels(logs)
    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
    columns = max(2, min(len(logs), MAX_RASTERS))
    grid = figure.add_gridspec(2, columns)
    accuracy_axes = figure.add_subplot(grid[0, : columns // 2])
    bytes_axes = figure.add_subplot(grid[0, columns // 2 :])
    plot_traffic(accuracy_axes, bytes_axes, logs, labels)
    colours = ["white", "#f4a582", "#2166ac"]  # absent, sampled only, accepted
    title_chars = max(MIN_TITLE_CHARS, (width_px // columns - RASTER_MARGIN_PX) // TITLE_CHAR_PX)
    for column, (log, label) in enumerate(zip(logs[:MAX_RASTERS], labels)):
        axes = figure.add_subplot(grid[1, :] if len(logs) == 1 else grid[1, column])
        plot_participation(axes, log, label, colours, title_chars)
    # Legends outside the axes hide no data; the constrained layout makes room for them.
    figure.legend(handles=accuracy_axes.get_lines(), loc="outside upper center", ncols=min(len(logs), 2))
    figure.legend(
        handles=[Patch(color=colours[2], label="update accepted"), Patch(color=colours[1], label="sampled, no update")],
        loc="outside lower center",
        ncols=2,
        fontsize="small",
    )
    return figure


def plot_traffic(accuracy_axes: Axes, bytes_axes: Axes, logs: Sequence[RunLog], labels: Sequence[str]) -> None:
    """Accuracy against cumulative bytes, and bytes per round; rounds that moved no bytes are left out of both."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    moved_values: list[float] = []
    round_values: list[float] = []
    for log, label in zip(logs, labels):
        rounds = log.rounds()
        moved = np.cumsum([r.bytes_up + r.bytes_down for r in rounds])
        evaluated = [(m, r) for m, r in zip(moved, rounds) if r.accuracy is not None and m > 0]
        xs = [float(m) for m, _ in evaluated]
        line = accuracy_axes.plot(xs, [r.accuracy for _, r in evaluated], marker=".", label=label)[0]
        moved_values += xs
        for direction, style in (("bytes_up", "-"), ("bytes_down", "--")):
            sent = [(r.round, getattr(r, direction)) for r in rounds if r.round > 0 and getattr(r, direction) > 0]
            bytes_axes.plot([x for x, _ in sent], [y for _, y in sent], color=line.get_color(), linestyle=style)
            round_values += [y for _, y in sent]
    accuracy_axes.set(xlabel="bytes moved (cumulative, up + down)", ylabel="test accuracy", title="accuracy vs bytes")
    bytes_axes.set(xlabel="round", ylabel="bytes", title="bytes per round")
    directions = [
        Line2D([], [], color="grey", linestyle=style, label=name) for name, style in (("up", "-"), ("down", "--"))
    ]
    bytes_axes.legend(handles=directions, fontsize="small")
    bytes_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    log_bytes_axis(accuracy_axes, "x", moved_values)
    log_bytes_axis(bytes_axes, "y", round_values)
    for axes in (accuracy_axes, bytes_axes):
        axes.grid(alpha=0.3)


def log_bytes_axis(axes: Axes, which: str, values: Sequence[float]) -> None:
    """Make ``axes``' ``which`` ("x" or "y") axis log base 2 with ticks in byte units (1 KiB, 4 KiB, 1 MiB, ...).

    Its limits are the powers of two around ``values`` (positive), so that
    even a narrow range has labelled ticks; without values it stays linear.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if not values:
        return
    getattr(axes, f"set_{which}scale")("log", base=2)
    axis = axes.xaxis if which == "x" else axes.yaxis
    axis.set_major_locator(LogLocator(base=2))
    axis.set_major_formatter(FuncFormatter(byte_text))
    axis.set_minor_formatter(NullFormatter())
    low, high = math.log2(min(values)), math.log2(max(values))
    # A quarter of a power of two of margin keeps points off the frame.
    getattr(axes, f"set_{which}lim")(2 ** math.floor(low - 0.25), 2 ** math.ceil(high + 0.25))


def byte_text(value: float, _position: int | None = None) -> str:
    """``value`` bytes in the largest binary unit it reaches: 512 B, 4 KiB, 1.5 MiB."""
    exponent = min(int(math.log2(value) // 10), len(BYTE_UNITS) - 1) if value >= 1 else 0
    return f"{value / 1024**exponent:g} {BYTE_UNITS[exponent]}"


def plot_participation(axes: Axes, log: RunLog, label: str, colours: Sequence[str], title_chars: int) -> None:
    """Clients by round: accepted update, sampled without an accepted update, absent.

    The title, ``participation: <label>``, wraps at ``title_chars`` characters.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    clients, sampled, accepted = log.participation()
    last_round = max((r for rounds in sampled.values() for r in rounds), default=0)
    raster = np.zeros((len(clients), last_round), dtype=np.int8)
    for row, client in enumerate(clients):
        for server_round in sampled[client]:
            raster[row, server_round - 1] = 2 if server_round in accepted[client] else 1
    axes.imshow(
        raster,
        aspect="auto",
        interpolation="nearest",
        cmap=ListedColormap(colours),
        vmin=0,
        vmax=2,
        origin="lower",
        extent=(0.5, last_round + 0.5, -0.5, len(clients) - 0.5),
    )
    axes.set(xlabel="round", ylabel="client (index)")
    axes.set_title(textwrap.fill(f"participation: {label}", title_chars), fontsize="small")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
