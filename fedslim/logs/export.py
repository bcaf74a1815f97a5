"""`fedslim logs export` (CSV or JSON) and `fedslim logs tensorboard` (scalars per round)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fedslim.commlog import SCHEMA_VERSION
from fedslim.logs.reader import TABLES, RunLog

EXPORT_FORMATS = ("csv", "json")


def export_run(log: RunLog, fmt: str, out: Path) -> list[Path]:
    """Write every table of ``log``'s run; returns the files written.

    ``json``: one file ``out`` with ``schema_version``, ``run`` (its ``config``
    parsed) and one list of row objects per table. ``csv``: a folder ``out``
    with one file per table (``runs.csv``, ``rounds.csv``, ``messages.csv``,
    ``memory_weights.csv``, ``client_evaluations.csv``, ``consolidations.csv``, ``bases.csv``,
    ``round_metrics.csv``, ``resumes.csv``), a header row each.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "json":
        document: dict[str, object] = {"schema_version": SCHEMA_VERSION, "run": {**log.run, "config": log.config}}
        for name in TABLES:
            if name != "runs":
                columns, rows = log.table(name)
                document[name] = [dict(zip(columns, row)) for row in rows]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(document, indent=1))
        return [out]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in TABLES:
        columns, rows = log.table(name)
        path = out / f"{name}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(rows)
        written.append(path)
    return written


def write_tensorboard(log: RunLog, logdir: Path) -> Path:
    """Scalars of ``log``'s run under ``logdir/<run directory>-<run id>`` (needs the ``tensorboard`` extra).

    By round: ``accuracy``, ``loss``, ``bytes/up``, ``bytes/down``,
    ``bytes/cumulative``, ``updates/accepted``, ``updates/rejected``,
    ``server/strategy_memory_bytes``, ``metrics/NAME`` for each metric of the
    task's own; and ``accuracy_by_kib`` with the cumulative KiB moved as its
    step (accuracy against communication).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError("TensorBoard export needs the tensorboard package: pip install -e '.[tensorboard]'") from exc

    target = logdir / f"{log.label}-{log.run_id}"
    writer = SummaryWriter(log_dir=str(target))
    moved = 0
    try:
        for r in log.rounds():
            moved += r.bytes_up + r.bytes_down
            if r.accuracy is not None:
                writer.add_scalar("accuracy", r.accuracy, r.round)
                writer.add_scalar("accuracy_by_kib", r.accuracy, int(moved / 1024))
            if r.loss is not None:
                writer.add_scalar("loss", r.loss, r.round)
            writer.add_scalar("bytes/up", r.bytes_up, r.round)
            writer.add_scalar("bytes/down", r.bytes_down, r.round)
            writer.add_scalar("bytes/cumulative", moved, r.round)
            writer.add_scalar("updates/accepted", r.accepted, r.round)
            writer.add_scalar("updates/rejected", r.rejected, r.round)
            if r.strategy_memory_bytes is not None:
                writer.add_scalar("server/strategy_memory_bytes", r.strategy_memory_bytes, r.round)
            for name, value in r.metrics.items():
                if value is not None:
                    writer.add_scalar(f"metrics/{name}", value, r.round)
    finally:
        writer.close()
    return target
