"""The Fashion-MNIST federation every benchmark here shares, and its command-line flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedslim.config import RunConfig

RESULTS = Path(__file__).parent / "results"


def add_setup_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """Flags of the shared setup: Dir(0.3) over 50 clients, 20% per round, 30 rounds, 2 local epochs."""
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=out, help="run directories")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the table and JSON go")


def base_config(args: argparse.Namespace, seed: int | None = None) -> RunConfig:
    """The shared setup from the flags, with ``seed`` instead of --seed when given."""
    return RunConfig(
        overwrite=True,  # a benchmark's run directories are its own: a rerun replaces them
        task="fmnist",
        codec="none",  # rows name their codecs; the defaults changed after these tables were measured
        downstream_codec="none",
        num_clients=args.clients,
        rounds=args.rounds,
        fraction=args.fraction,
        dirichlet_alpha=args.alpha,
        local_epochs=args.local_epochs,
        seed=args.seed if seed is None else seed,
    )
