"""The `fedslim` command line."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedslim.config import RunConfig

SIMULATE_HELP = "run a federation in Flower's simulation engine"


def _simulate_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from fedslim.config import DATASETS, FAST_KINDS, RunConfig

    defaults = RunConfig()
    p = sub.add_parser(
        "simulate",
        help=SIMULATE_HELP,
        description="Simulate a federation in which only the fast layer travels, and print a per-round table.",
    )
    p.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    p.add_argument(
        "--data-dir",
        default="",
        help="folder with the four Fashion-MNIST IDX .gz files "
        "(default: $FEDSLIM_DATA_DIR or /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--clients", type=int, default=defaults.num_clients, help="number of clients (virtual SuperNodes)")
    p.add_argument("--rounds", type=int, default=defaults.rounds)
    p.add_argument(
        "--fraction",
        type=float,
        default=None,
        help=f"fraction of the available clients sampled per round "
        f"(default: {defaults.fraction} with --participation all, else 1.0)",
    )
    p.add_argument("--fast", choices=FAST_KINDS, default=defaults.fast.kind, help="which tensors train and travel")
    p.add_argument("--rank", type=int, default=defaults.fast.rank, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=defaults.fast.lora_alpha, help="LoRA scaling numerator")
    p.add_argument("--density", type=float, default=defaults.fast.density, help="fast fraction of entries (sparse)")
    p.add_argument("--fast-biases", action="store_true", help="also train and send every bias vector (BitFit)")
    p.add_argument(
        "--lora-min-params",
        type=int,
        default=defaults.fast.lora_min_params,
        help="layers with fewer weight entries than this are fast as a whole instead of getting LoRA",
    )
    p.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    p.add_argument(
        "--local-steps",
        type=int,
        default=defaults.local_steps,
        help="minibatch steps per round instead of epochs (0: use --local-epochs)",
    )
    p.add_argument("--lr", type=float, default=defaults.lr, help="client SGD learning rate")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--server-lr", type=float, default=defaults.server_lr)
    p.add_argument("--alpha", type=float, default=defaults.dirichlet_alpha, help="Dirichlet concentration (fmnist)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--codec",
        default=defaults.codec,
        help="uplink codec pipeline, e.g. topk:0.05+q8+lzma, randk:0.05+q4, ternary:0.1, powersgd:2, fp16, none",
    )
    p.add_argument(
        "--downstream-codec",
        default=defaults.downstream_codec,
        help="codec of the server's broadcast steps (same syntax as --codec)",
    )
    p.add_argument(
        "--no-error-feedback",
        dest="error_feedback",
        action="store_false",
        help="send biased codecs' output without carrying what they drop into the next update",
    )
    p.add_argument(
        "--ef-decay",
        type=float,
        default=defaults.error_feedback_decay,
        help="error-feedback residual kept per round a client missed (1: all of it)",
    )
    p.add_argument(
        "--screen-factor",
        type=float,
        default=defaults.screen_factor,
        help="reject an update more than this many times the median size of recent ones (a diverged local run); 0: off",
    )
    p.add_argument(
        "--strategy",
        default=defaults.strategy,
        help="aggregation rule: fedavg, fedau, fedvarp, mifa, fedstale, fedamd, or module:Class",
    )
    p.add_argument(
        "--strategy-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="strategy argument (repeatable), e.g. beta=0.5, p-estimate=fedau, cutoff=50, memory=fp16",
    )
    p.add_argument(
        "--participation",
        default=defaults.participation,
        help="who is available each round: all, bernoulli, label, markov, cyclic, or trace:FILE",
    )
    p.add_argument(
        "--participation-mean",
        type=float,
        default=defaults.participation_mean,
        help="mean participation probability of the participation model",
    )
    p.add_argument(
        "--p-known",
        action="store_true",
        help="let the strategy read the true participation probabilities (p-estimate=known)",
    )
    p.add_argument("--eval-every", type=int, default=defaults.eval_every, help="evaluate every N rounds")
    p.add_argument(
        "--final-sync",
        action="store_true",
        help="after the last round, send every node the exact final fast state and have it confirm the digest",
    )
    p.add_argument("--out", default=defaults.out, help="run directory (communication log goes here)")
    p.add_argument(
        "--backend",
        choices=("flower", "inline"),
        default="flower",
        help="flower: Flower's simulation engine (Ray); inline: the same apps called in this process, sequentially",
    )
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    from fedslim.config import FastSpec, RunConfig

    return RunConfig(
        dataset=args.dataset,
        num_clients=args.clients,
        rounds=args.rounds,
        fraction=args.fraction or (RunConfig.fraction if args.participation == "all" else 1.0),
        fast=FastSpec(
            args.fast, args.rank, args.lora_alpha, args.density, args.seed, args.fast_biases, args.lora_min_params
        ),
        seed=args.seed,
        local_epochs=args.local_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        server_lr=args.server_lr,
        dirichlet_alpha=args.alpha,
        data_dir=args.data_dir,
        out=args.out,
        codec=args.codec,
        downstream_codec=args.downstream_codec,
        error_feedback=args.error_feedback,
        error_feedback_decay=args.ef_decay,
        screen_factor=args.screen_factor,
        local_steps=args.local_steps,
        strategy=args.strategy,
        strategy_args=",".join(args.strategy_arg),
        participation=args.participation,
        participation_mean=args.participation_mean,
        p_known=args.p_known,
        eval_every=args.eval_every,
        final_sync=args.final_sync,
    )


def run_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedslim.base import ensure_pretrained_base
    from fedslim.commlog import RoundTotals
    from fedslim.report import round_table
    from fedslim.data.datasets import DatasetMissingError, load_federation
    from fedslim.simulation.simulate import simulate
    from fedslim.strategies.registry import strategy_for

    config = config_from_args(args)
    strategy_for(config)  # a bad strategy or argument fails here, before any node starts
    console = Console()
    progress = Progress(
        TextColumn("[bold]rounds"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )
    task = progress.add_task("rounds", total=config.rounds, status="starting nodes")

    def on_round(totals: RoundTotals) -> None:
        status = f"round {totals.round}: {totals.accepted}/{totals.sampled} updates"
        if totals.accuracy is not None:
            status += f", accuracy {totals.accuracy:.4f}"
        progress.update(task, completed=totals.round, status=status)

    console.print(
        f"fedslim: {config.dataset}, {config.num_clients} clients, {config.rounds} rounds, "
        f"fast layer {config.fast.kind}, strategy {config.strategy}, participation {config.participation}, "
        f"codec up {config.uplink.spec} / down {config.downlink.spec}, "
        f"run dir {config.run_dir}"
    )
    try:
        with console.status(f"loading {config.dataset} and the resident base (pretrained once, then cached)"):
            load_federation(config)
            ensure_pretrained_base(config)
        with progress:
            result = simulate(config, on_round=on_round, verbose=args.verbose, backend=args.backend)
    except DatasetMissingError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    console.print(round_table(result.rounds, f"run {result.run_id} ({config.fast.kind})", config.num_clients))
    console.print(f"communication log: {result.log_path} (fedslim logs summary {config.run_dir})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from fedslim.commlog import SchemaVersionError
    from fedslim.deploy.cli import add_deploy_parser, run_deploy
    from fedslim.logs.cli import add_logs_parser, run_logs
    from fedslim.logs.reader import RunNotFoundError

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fedslim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    if argv[:1] in (["logs"], ["deploy"]):
        sub.add_parser("simulate", help=SIMULATE_HELP)  # listed only: these commands need none of its defaults
    else:
        _simulate_parser(sub)
    add_logs_parser(sub)
    add_deploy_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "simulate":
        from fedslim.config import ConfigError

        try:
            return run_simulate(args)
        except ConfigError as exc:
            parser.error(str(exc))
    try:
        return run_logs(args) if args.command == "logs" else run_deploy(args)
    except (FileNotFoundError, RunNotFoundError, SchemaVersionError, ValueError, ImportError) as exc:
        print(f"fedslim {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
