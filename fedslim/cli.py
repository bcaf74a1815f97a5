"""The `fedslim` command line."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedslim.config import RunConfig

SIMULATE_HELP = "run a federation in Flower's simulation engine"
SIMULATION_PACKAGES = frozenset({"ray", "datasets", "flwr_datasets", "matplotlib"})
"""What the simulation extra adds to a device install (pyproject.toml): none of it is needed by a node."""
SIMULATION_INSTALL = 'pip install "fedslim[simulation]"'


def missing_extra(exc: ImportError) -> str | None:
    """One line for a package of the simulation extra that this install lacks (None for any other import error)."""
    if exc.name is None or exc.name.partition(".")[0] not in SIMULATION_PACKAGES:
        return None
    return f"{exc.name} is not installed: it comes with the simulation extra ({SIMULATION_INSTALL})"


def _simulate_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from fedslim.config import HelpGroup, add_run_config_arguments

    p = sub.add_parser(
        "simulate",
        help=SIMULATE_HELP,
        description="Simulate a federation in which only the fast layer travels, and print a per-round table.",
        usage="%(prog)s [options]",
    )
    run = add_run_config_arguments(p)[HelpGroup.RUN]
    run.add_argument(
        "--backend",
        choices=("flower", "inline"),
        default="flower",
        help="flower: Flower's simulation engine (Ray); inline: the same apps called in this process, sequentially "
        "(default: flower)",
    )
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the interrupted (Ctrl-C) or killed run of RUN_DIR from its last checkpoint, with the run's own "
        "configuration",
    )


def run_simulate(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedslim.base import provenance_of
    from fedslim.commlog import RoundTotals
    from fedslim.config import ConfigError, RunConfig
    from fedslim.data.participation import check_trace
    from fedslim.export import MODEL_DIRNAME
    from fedslim.report import output_console, round_table, saving_summary
    from fedslim.server.checkpoint import claim_run_dir
    from fedslim.simulation.simulate import check_backend, simulate
    from fedslim.strategies.registry import strategy_for
    from fedslim.task import prepared_base, task_for

    config = resumed_config(args) if args.resume else RunConfig.from_args(args)
    if args.backend == "flower" and importlib.util.find_spec("ray") is None:
        raise ConfigError(
            f"--backend flower runs on Ray, which is not installed: {SIMULATION_INSTALL}, or --backend inline"
        )
    check_backend(config, args.backend)
    # A bad strategy, trace or run directory fails here, before any node starts.
    strategy_for(config)
    config.torch_device()
    task = task_for(config)
    check_trace(config.participation, config.num_clients, config.rounds)
    config.check_run_dir()
    claim_run_dir(config)
    console = output_console()
    progress = Progress(
        TextColumn("[bold]rounds"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )
    bar = progress.add_task("rounds", total=config.rounds, status="starting nodes")
    reported: list[int] = []  # the rounds logged so far, for the line Ctrl-C prints

    def on_round(totals: RoundTotals) -> None:
        reported.append(totals.round)
        status = f"round {totals.round}: {totals.accepted}/{totals.sampled} updates"
        if totals.accuracy is not None:
            status += f", accuracy {totals.accuracy:.4f}"
        if totals.client_accuracy is not None:
            status += f", on clients {totals.client_accuracy:.4f} (p10 {totals.client_accuracy_p10:.4f})"
        progress.update(bar, completed=totals.round, status=status)

    console.print(
        f"fedslim: task {config.task}, {config.num_clients} clients, {config.rounds} rounds, "
        f"fast layer {config.fast.kind}, strategy {config.strategy}, participation {config.participation}, "
        f"codec up {config.uplink.spec} / down {config.downlink.spec}, "
        f"run dir {config.run_dir}"
    )
    try:
        with console.status(f"loading {task.name}'s data and its resident base (made once, then cached)"):
            task.test_data(config)
            base = prepared_base(config)
        console.print(f"base: {provenance_of(base).describe()}", soft_wrap=True)
        with progress:
            result = simulate(config, on_round=on_round, verbose=args.verbose, backend=args.backend)
    except FileNotFoundError as exc:  # a dataset's files (DatasetMissingError) or a task's own
        console.print(f"[red]error:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        from fedslim.simulation.interrupt import exit_interrupted, interrupted_message

        print(interrupted_message(config.run_dir, reported[-1] if reported else None, args.backend), file=sys.stderr)
        return exit_interrupted(args.backend)
    console.print(round_table(result.rounds, f"run {result.run_id} ({config.fast.kind})", config.num_clients))
    console.print(saving_summary(result.rounds))
    console.print(f"final state digest: {result.final_state_digest}", soft_wrap=True)
    console.print(f"communication log: {result.log_path} (fedslim logs summary {config.run_dir})")
    console.print(f"trained model: {config.run_dir / MODEL_DIRNAME} (fedslim export {config.run_dir} --out DIR)")
    return 0


def resumed_config(args: argparse.Namespace) -> RunConfig:
    """The configuration of the run ``--resume`` continues; run flags given with it are refused, not ignored."""
    from dataclasses import replace

    from fedslim.config import FLAT_KEYS, ConfigError, RunConfig
    from fedslim.server.checkpoint import read_checkpoint

    given = RunConfig.from_args(args).to_dict()
    defaults = RunConfig().to_dict()
    flags = [
        entry.flag
        for entry in FLAT_KEYS.values()
        if entry.flag is not None
        and (given["fast"] if entry.in_fast else given)[entry.name]
        != (defaults["fast"] if entry.in_fast else defaults)[entry.name]
    ]
    flags += ["--task-setting"] if given["task_settings"] else []
    if flags:
        raise ConfigError(
            f"--resume continues the run with the configuration it was started with; drop {', '.join(flags)}"
        )
    checkpoint = read_checkpoint(Path(args.resume))
    return replace(checkpoint.config, resume=True, overwrite=False, out=args.resume)


EXPORT_HELP = "write a run's trained model to a folder; --merged: also as files that need no fedslim"


def _export_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export",
        help=EXPORT_HELP,
        description="Write the model a run trained (RUN_DIR/model/: the fast layer, the consolidations, the "
        "manifest) to a folder; load it with fedslim.load_model(DIR).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or a model folder export wrote)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write: new or empty")
    p.add_argument(
        "--merged",
        action="store_true",
        help="also model.safetensors (the base with the fast layer folded in, for the task's own build_base() "
        "module), and for LoRA a peft adapter folder (peft/)",
    )
    p.add_argument(
        "--node",
        metavar="KEY",
        help="with --personal head: the model of node KEY (partition-N), its own head in place of the base's "
        "(simulations with --backend inline keep the node states)",
    )
    p.add_argument("--base", metavar="PATH", help="the run's base checkpoint, where this machine's cache lacks it")


def run_export(args: argparse.Namespace) -> int:
    from fedslim.export import export_model
    from fedslim.server.checkpoint import node_personal_state

    run_dir = Path(args.run_dir)
    personal = node_personal_state(run_dir, args.node) if args.node else None
    base = Path(args.base) if args.base else None
    exported = export_model(run_dir, Path(args.out), args.merged, base, personal, args.node or "")
    print(f"wrote {', '.join(exported.files)} to {exported.folder}")
    for note in exported.notes:
        print(note)
    return 0


def main(argv: list[str] | None = None) -> int:
    from fedslim.bases_cli import add_bases_parser, run_bases
    from fedslim.commlog import SchemaVersionError
    from fedslim.deploy.cli import add_deploy_parser, run_deploy
    from fedslim.logs.cli import add_logs_parser, run_logs
    from fedslim.logs.reader import RunNotFoundError

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fedslim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    if argv[:1] in (["logs"], ["deploy"], ["export"], ["bases"]):
        sub.add_parser("simulate", help=SIMULATE_HELP)  # listed only: these commands need none of its defaults
    else:
        _simulate_parser(sub)
    add_logs_parser(sub)
    add_deploy_parser(sub)
    _export_parser(sub)
    add_bases_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "simulate":
        from fedslim.config import ConfigError

        try:
            return run_simulate(args)
        except ConfigError as exc:
            problem = str(exc)
        except ImportError as exc:
            if (problem := missing_extra(exc)) is None:
                raise
        # One line, without the usage: the message names the flag and what it accepts.
        simulate = sub.choices["simulate"]
        simulate.exit(2, f"{simulate.prog}: error: {' '.join(problem.split())}\n")
    try:
        if args.command == "export":
            return run_export(args)
        if args.command == "bases":
            return run_bases(args)
        return run_logs(args) if args.command == "logs" else run_deploy(args)
    except (FileNotFoundError, RunNotFoundError, SchemaVersionError, ValueError, ImportError) as exc:
        message = missing_extra(exc) if isinstance(exc, ImportError) else None
        print(f"fedslim {args.command}: error: {message or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
