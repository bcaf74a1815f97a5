"""Record (or check) what seeded runs produce: per-round accuracy, every message's bytes, the final fast state.

A refactor must leave these numbers bit for bit as they were. The scenarios:

- ``synthetic-lora``: what ``fedslim simulate`` ran by default until the first-run default changed
  (Synthetic(1,1), 30 clients, 10 rounds, LoRA, no codec);
- ``first-run``: ``fedslim simulate`` as it comes (Synthetic transfer, 30 clients, 10 rounds, LoRA,
  ``topk:0.1+q8+lzma`` up, ``topk:0.05+q8+lzma`` down), recorded when it became the default;
- ``wire-compressed``: the first 3 rounds of ``benchmarks/wire.py --preset fast``'s compressed row
  (Fashion-MNIST, LoRA r=4 + biases, ``topk:0.1+q8+lzma`` up, ``topk:0.05+q8+lzma`` down);
- ``fedvarp-label`` and ``fedamd-label``: FedVARP and FedAMD under label-correlated participation
  with ``topk:0.1+q8+lzma`` both ways (the participation benchmark's setup, 40 clients, 4 rounds).

Runs use the inline backend: Flower's engine draws random node ids, whose varint lengths change the
byte count of a message by a byte from run to run.

Bit for bit holds between machines of one float arithmetic (``fedslim.base.float_arithmetic``: CPUs
differ in the kernels torch runs) and one thread count (sums run in another order with more threads), so
each kind of machine has its record, ``tests/data/behaviour-ARITHMETIC-Nthreads.json``;
``tests/data/behaviour.json`` was recorded before records named theirs, and is used by machines not
known to compute otherwise (``fedslim.base.UNLIKE_UNNAMED``).

    python scripts/record_behaviour.py --write    # record this machine's (--only: just those scenarios)
    python scripts/record_behaviour.py            # compare the current code against this machine's record
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedslim.base import UNLIKE_UNNAMED, float_arithmetic
from fedslim.config import FastSpec, RunConfig

RECORDS = Path(__file__).resolve().parent.parent / "tests" / "data"
UNNAMED = RECORDS / "behaviour.json"  # recorded before records named their machine's float arithmetic


def own_record() -> Path:
    """The record of machines like this one: its float arithmetic, and torch's thread count (training sums in
    another order with more threads)."""
    return RECORDS / f"behaviour-{float_arithmetic()}-{torch.get_num_threads()}threads.json"


def record_path() -> Path | None:
    """This machine's record: its own, else the unnamed one unless this machine is known to compute otherwise
    (None: there is no record for this machine yet)."""
    if own_record().exists():
        return own_record()
    return None if float_arithmetic() in UNLIKE_UNNAMED else UNNAMED


COMPRESSED = "topk:0.1+q8+lzma"


def scenarios() -> dict[str, RunConfig]:
    participation = RunConfig(
        task="fmnist",
        num_clients=40,
        rounds=4,
        fraction=1.0,
        dirichlet_alpha=0.1,
        local_steps=5,
        batch_size=16,
        lr=0.1,
        participation="label",
        participation_mean=0.2,
        codec=COMPRESSED,
        downstream_codec=COMPRESSED,
    )
    return {
        "synthetic-lora": RunConfig(task="synthetic", codec="none", downstream_codec="none"),
        "first-run": RunConfig(),
        "wire-compressed": RunConfig(
            task="fmnist",
            num_clients=50,
            rounds=3,
            fraction=0.2,
            dirichlet_alpha=0.3,
            local_epochs=2,
            lr=0.2,
            fast=FastSpec("lora", rank=4, lora_alpha=8.0, biases=True, lora_min_params=20000),
            codec="topk:0.1+q8+lzma",
            downstream_codec="topk:0.05+q8+lzma",
        ),
        "fedvarp-label": replace(participation, strategy="fedvarp"),
        "fedamd-label": replace(participation, strategy="fedamd", strategy_args="anchor-probability=0.5"),
    }


def observe(config: RunConfig) -> dict[str, Any]:
    """Run ``config`` inline and read back what the behaviour record keeps."""
    from fedslim.channel.downlink import state_digest
    from fedslim.simulation.simulate import simulate

    result = simulate(config, backend="inline")
    db = sqlite3.connect(result.log_path)
    messages = db.execute(
        "SELECT round, client, direction, message_type, payload_bytes, message_bytes, status, weight"
        " FROM messages WHERE run_id = ? ORDER BY id",
        (result.run_id,),
    ).fetchall()
    db.close()
    return {
        "accuracy": [r.accuracy for r in result.rounds],
        "loss": [r.loss for r in result.rounds],
        "messages": [list(row) for row in messages],
        "final_digest": state_digest(result.fast_state),
    }


def record(names: list[str]) -> dict[str, Any]:
    observed = {}
    for name in names:
        with tempfile.TemporaryDirectory() as out:
            observed[name] = observe(replace(scenarios()[name], out=out))
        print(f"{name}: final digest {observed[name]['final_digest']}", file=sys.stderr)
    return observed


def differences(expected: dict[str, Any], observed: dict[str, Any]) -> list[str]:
    """What differs between a recorded scenario and an observed one, one line per field."""
    lines = []
    for key in ("accuracy", "loss", "final_digest"):
        if expected[key] != observed[key]:
            lines.append(f"{key}: recorded {expected[key]}, now {observed[key]}")
    if len(expected["messages"]) != len(observed["messages"]):
        lines.append(f"messages: recorded {len(expected['messages'])}, now {len(observed['messages'])}")
    for index, (before, after) in enumerate(zip(expected["messages"], observed["messages"])):
        if before != after:
            lines.append(f"message {index}: recorded {before}, now {after}")
            break
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="record the current behaviour")
    parser.add_argument("--only", nargs="*", default=list(scenarios()), help="scenarios to run")
    args = parser.parse_args()
    path = own_record() if args.write else record_path()
    if path is None:
        parser.error(f"no record for this machine's float arithmetic {float_arithmetic()}; record one with --write")
    observed = record(args.only)
    if args.write:
        kept = json.loads(path.read_text()) if path.exists() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(kept | observed, indent=1) + "\n")
        print(f"recorded {', '.join(observed)} in {path}")
        return 0
    recorded = json.loads(path.read_text())
    failed = False
    for name, seen in observed.items():
        lines = differences(recorded[name], seen)
        print(f"{name}: {'identical' if not lines else 'DIFFERS'}")
        for line in lines:
            print(f"  {line}")
        failed |= bool(lines)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
