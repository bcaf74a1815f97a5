"""`fedslim logs`: summary, rounds, clients, compare, export, plot and tensorboard for communication logs."""

from __future__ import annotations

import argparse
from pathlib import Path

RUN_HELP = "a run directory or commlog.sqlite (its latest run), or PATH#RUN_ID"


def add_logs_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    logs = sub.add_parser(
        "logs",
        help="inspect communication logs",
        description="Read a run's communication log (RUN: " + RUN_HELP + ").",
    )
    commands = logs.add_subparsers(dest="logs_command", required=True)
    target_help = "target test accuracy for 'bytes to reach' (default: the best accuracy reached, minus 1 point)"

    summary = commands.add_parser("summary", help="one table: totals, bytes per round, compression, accuracy")
    summary.add_argument("run", help=RUN_HELP)
    summary.add_argument("--target", type=float, help=target_help)

    rounds = commands.add_parser("rounds", help="per-round accuracy, participants and bytes")
    rounds.add_argument("run", help=RUN_HELP)

    clients = commands.add_parser("clients", help="per client: participation, bytes, mean weight, rejections")
    clients.add_argument("run", help=RUN_HELP)

    compare = commands.add_parser("compare", help="runs side by side")
    compare.add_argument("runs", nargs="+", metavar="RUN", help=RUN_HELP)
    compare.add_argument("--target", type=float, help="target accuracy (default: the lowest best accuracy - 1 point)")
    compare.add_argument("--markdown", action="store_true", help="print a Markdown table (for papers and READMEs)")

    export = commands.add_parser("export", help="every table of a run as CSV files or one JSON file")
    export.add_argument("run", help=RUN_HELP)
    export.add_argument("--format", choices=("csv", "json"), default="json")
    export.add_argument("-o", "--out", type=Path, help="JSON file or CSV folder (default: next to the log)")

    plot = commands.add_parser("plot", help="accuracy vs bytes, bytes per round, participation raster (PNG)")
    plot.add_argument("runs", nargs="+", metavar="RUN", help=RUN_HELP)
    plot.add_argument("-o", "--out", type=Path, required=True, help="PNG file to write")
    plot.add_argument("--size", default="1200x900", help="image size in pixels, WIDTHxHEIGHT (default 1200x900)")

    tensorboard = commands.add_parser("tensorboard", help="write the runs' per-round scalars for TensorBoard")
    tensorboard.add_argument("runs", nargs="+", metavar="RUN", help=RUN_HELP)
    tensorboard.add_argument("--logdir", type=Path, required=True, help="TensorBoard log directory")


def default_target(best: float | None) -> float:
    return (best or 0.0) - 0.01


def run_logs(args: argparse.Namespace) -> int:
    from fedslim.logs.labels import log_labels
    from fedslim.logs.reader import RunLog, bytes_to_reach
    from fedslim.logs.views import (
        COMPARE_COLUMNS,
        clients_table,
        compare_rows,
        compare_table,
        markdown,
        summary_table,
    )
    from fedslim.report import output_console, round_table

    console = output_console()
    command = args.logs_command
    if command in ("summary", "rounds", "clients", "export"):
        with RunLog(args.run) as log:
            if command == "summary":
                rounds = log.rounds()
                summary = log.summary(rounds)
                target = args.target if args.target is not None else default_target(summary.best_accuracy)
                console.print(summary_table(summary, target, bytes_to_reach(rounds, target)))
                digest = summary.final_state_digest or "none (the run did not finish)"
                console.print(f"final state digest: {digest}", soft_wrap=True)
            elif command == "rounds":
                title = f"run {log.run_id} ({log.label})"
                console.print(round_table(log.rounds(), title, log.config.get("num_clients")))
            elif command == "clients":
                console.print(clients_table(log.clients(), f"run {log.run_id} ({log.label}): clients"))
            else:
                from fedslim.logs.export import export_run

                suffix = ".json" if args.format == "json" else "-csv"
                out = args.out or log.path.parent / f"commlog-{log.run_id}{suffix}"
                for path in export_run(log, args.format, out):
                    console.print(f"wrote {path}")
        return 0

    logs = [RunLog(name) for name in args.runs]
    try:
        if command == "compare":
            summaries = [(log.summary(rounds), rounds) for log, rounds in ((log, log.rounds()) for log in logs)]
            target = args.target
            if target is None:
                target = default_target(min((s.best_accuracy or 0.0) for s, _ in summaries))
            reached = [(s, bytes_to_reach(rounds, target)) for s, rounds in summaries]
            rows = compare_rows(log_labels(logs), reached)
            if args.markdown:
                print(markdown(COMPARE_COLUMNS, rows))
            else:
                console.print(compare_table(rows, target, console.width))
        elif command == "plot":
            from fedslim.logs.plot import plot_runs

            width, _, height = args.size.lower().partition("x")
            if not (width.isdigit() and height.isdigit()):
                raise ValueError(f"--size must be WIDTHxHEIGHT in pixels, got {args.size!r}")
            console.print(f"wrote {plot_runs(logs, args.out, int(width), int(height))}")
        else:
            from fedslim.logs.export import write_tensorboard

            for log in logs:
                console.print(f"wrote {write_tensorboard(log, args.logdir)}")
    finally:
        for log in logs:
            log.close()
    return 0
