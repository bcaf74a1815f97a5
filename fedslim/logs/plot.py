"""`fedslim logs plot`: accuracy against bytes, bytes per round, and who took part, in one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedslim.logs.reader import RunLog

MAX_RASTERS = 4
DPI = 100


def plot_runs(logs: Sequence[RunLog], out: Path, width_px: int = 1200, height_px: int = 900) -> Path:
    """Write the figure for ``logs`` to ``out`` (PNG of ``width_px`` x ``height_px``).

    Top left: test accuracy against cumulative KiB moved (both directions), a
    line per run. Top right: KiB per round, up (solid) and down (dashed).
    Bottom: the participation raster of each of the first four runs (clients
    by round: accepted update, sampled without an accepted update, absent).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    if not logs:
        raise ValueError("plot needs at least one run")
    rasters = list(logs[:MAX_RASTERS])
    figure = plt.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    columns = max(2, len(rasters))
    grid = figure.add_gridspec(2, columns)
    accuracy_axes = figure.add_subplot(grid[0, : columns // 2])
    bytes_axes = figure.add_subplot(grid[0, columns // 2 :])

    for log in logs:
        rounds = log.rounds()
        moved = np.cumsum([r.bytes_up + r.bytes_down for r in rounds]) / 1024
        evaluated = [(m, r.accuracy) for m, r in zip(moved, rounds) if r.accuracy is not None]
        if evaluated:
            line = accuracy_axes.plot(*zip(*evaluated), marker=".", label=log.label)[0]
        else:
            line = accuracy_axes.plot([], [], label=log.label)[0]
        trained = [r for r in rounds if r.round > 0]
        x = [r.round for r in trained]
        bytes_axes.plot(x, [r.bytes_up / 1024 for r in trained], color=line.get_color(), label=f"{log.label} up")
        bytes_axes.plot(x, [r.bytes_down / 1024 for r in trained], color=line.get_color(), linestyle="--")
    accuracy_axes.set(xlabel="KiB moved (cumulative, up + down)", ylabel="test accuracy", title="accuracy vs bytes")
    accuracy_axes.legend(fontsize="small")
    accuracy_axes.grid(alpha=0.3)
    bytes_axes.set(xlabel="round", ylabel="KiB", title="KiB per round: up (solid), down (dashed)")
    bytes_axes.grid(alpha=0.3)

    colours = ListedColormap(["white", "#f4a582", "#2166ac"])  # absent, sampled only, accepted
    for column, log in enumerate(rasters):
        axes = figure.add_subplot(grid[1, :] if len(rasters) == 1 else grid[1, column])
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
            cmap=colours,
            vmin=0,
            vmax=2,
            origin="lower",
            extent=(0.5, last_round + 0.5, -0.5, len(clients) - 0.5),
        )
        axes.set(xlabel="round", ylabel="client (index)", title=f"participation: {log.label}")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    figure.legend(
        handles=[Patch(color=colours(2), label="update accepted"), Patch(color=colours(1), label="sampled, no update")],
        loc="lower center",
        ncols=2,
        fontsize="small",
    )
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI)
    plt.close(figure)
    return out
