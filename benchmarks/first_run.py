"""The first run, `fedslim simulate` with every default, against full-model FedAvg on the same federation.

Rows, each one `simulate` run on the default task (Synthetic transfer: an MLP
pretrained on a public task, 30 clients with a related one, Dirichlet(0.3),
20% per round, 10 rounds):

- ``full``: full-model FedAvg, every parameter dense both ways (the baseline);
- ``lora``: the default fast layer (LoRA r=4 + the head) sent dense;
- ``default``: the run as it comes, the same fast layer with the default codec
  pipelines both ways (``topk:0.1+q8+lzma`` up, ``topk:0.05+q8+lzma`` down).

Under the table, what ``fedslim simulate`` itself prints, run as the README
tells (seed 0, Flower's engine): the accuracy at round 0 and after the last
round, and how many times fewer bytes it moved than full-model FedAvg would
have for the same messages. The README quotes these.

Columns: the accuracy of the pretrained base (round 0), after the last round
and its gain, the bytes of every message in both directions (whole Flower
messages, round 0 included) and how many times fewer than the full row's.
Over several seeds each cell is the mean, with the standard deviation.

    python benchmarks/first_run.py                 # seeds 0 1 2, and the command: about 3 minutes on 2 cores
    python benchmarks/first_run.py --seeds 0

Prints a table and writes benchmarks/results/first-run.{json,md}, stamped with
the commit, command, seeds and base.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from fmnist_setup import RESULTS
from provenance import base_used, provenance, write_results

from fedslim.config import FastSpec, RunConfig
from fedslim.simulation.simulate import simulate

ROWS = {
    "full": "full-model FedAvg, dense",
    "lora": "LoRA r=4 + head, dense",
    "default": "LoRA r=4 + head, compressed both ways (the default)",
}


def config_for(row: str, seed: int, out: Path) -> RunConfig:
    default = RunConfig(seed=seed, fast=FastSpec(seed=seed), out=str(out / f"{row}-seed{seed}"), overwrite=True)
    if row == "full":
        return replace(default, fast=FastSpec("full", seed=seed), codec="none", downstream_codec="none")
    if row == "lora":
        return replace(default, codec="none", downstream_codec="none")
    return default


def run_row(config: RunConfig) -> dict[str, Any]:
    result = simulate(config, backend="inline")
    evaluated = [r.accuracy for r in result.rounds if r.accuracy is not None]
    moved = sum(r.bytes_up + r.bytes_down for r in result.rounds)  # every message, both directions
    return {"base": evaluated[0], "final": evaluated[-1], "bytes": moved}


def command_row(out: Path) -> dict[str, Any]:
    """`fedslim simulate` as it comes, on its default backend (Flower's engine): what it prints under its table.

    Flower's engine draws random run and node ids, whose varint lengths change a message by a byte or two: the
    ratio moves by a few hundredths from run to run (94.72x and 94.78x in two runs), its last printed digit by one.
    """
    result = simulate(replace(RunConfig(), out=str(out / "command"), overwrite=True), backend="flower")
    evaluated = [r.accuracy for r in result.rounds if r.accuracy is not None]
    moved = sum(r.bytes_up + r.bytes_down for r in result.rounds)
    full = sum(r.full_model_bytes for r in result.rounds)  # what full-model FedAvg would have moved (the CLI's)
    return {"base": evaluated[0], "final": evaluated[-1], "bytes": moved, "full_model_bytes": full}


def command_values(command: dict[str, Any]) -> dict[str, str]:
    """The command's numbers formatted as `fedslim simulate` prints them (fedslim.report.saving_summary)."""
    return {
        "command_base": f"{command['base']:.4f}",
        "command_final": f"{command['final']:.4f}",
        "command_x_fewer": f"{command['full_model_bytes'] / command['bytes']:,.1f}x",
    }


def command_line(values: dict[str, str]) -> str:
    return (
        f"\n`fedslim simulate` as it comes (seed 0, Flower's engine) prints: accuracy {values['command_base']} at "
        f"round 0 -> {values['command_final']} at round 10, {values['command_x_fewer']} fewer bytes than "
        "full-model FedAvg would have moved for the same messages."
    )


MEASURES = ("base", "final", "gain", "mib", "x_fewer")


def measures(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    """Per row, per seed: accuracies, the gain over the base in points, MiB moved, x fewer bytes than full (paired)."""
    out: dict[str, dict[str, list[float]]] = {}
    for row, seeded in runs.items():
        out[row] = {
            "base": [r["base"] for r in seeded],
            "final": [r["final"] for r in seeded],
            "gain": [100 * (r["final"] - r["base"]) for r in seeded],
            "mib": [r["bytes"] / 2**20 for r in seeded],
            "x_fewer": [f["bytes"] / r["bytes"] for f, r in zip(runs["full"], seeded)] if "full" in runs else [],
        }
    return out


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    shown = f"{statistics.mean(values):,.{digits}f}"
    return shown + (f" ± {statistics.stdev(values):,.{digits}f}" if len(values) > 1 else "")


DIGITS = {"base": 4, "final": 4, "gain": 1, "mib": 2, "x_fewer": 1}


def table(rows: dict[str, dict[str, list[float]]], seeds: list[int]) -> str:
    lines = [
        f"`fedslim simulate` defaults: Synthetic transfer, 30 clients, Dir(0.3), 20% per round, 10 rounds, "
        f"seeds {', '.join(map(str, seeds))}\n",
        "| row | base (round 0) | final | gain (points) | MiB moved (up + down) | x fewer than full |",
        "|---|---|---|---|---|---|",
    ]
    for row, values in rows.items():
        lines.append(f"| {ROWS[row]} | " + " | ".join(cell(values[m], DIGITS[m]) for m in MEASURES) + " |")
    return "\n".join(lines)


def quoted_values(rows: dict[str, dict[str, list[float]]]) -> dict[str, str]:
    """The README's numbers, means over the seeds: the default row's base and final accuracy, gain, byte ratio."""
    default = rows["default"]
    quoted = {m: f"{statistics.mean(default[m]):,.{DIGITS[m]}f}" for m in MEASURES if default[m]}
    if "x_fewer" in quoted:
        quoted["x_fewer"] += "x"
    if "full" in rows:
        quoted["full_final"] = f"{statistics.mean(rows['full']['final']):.4f}"
    return quoted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-first-run"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    stamp = provenance(args.seeds, [base_used(config_for("default", seed, args.out)) for seed in args.seeds])
    runs: dict[str, list[dict[str, Any]]] = {row: [] for row in ROWS}
    for seed in args.seeds:
        for row in ROWS:
            runs[row].append(run_row(config_for(row, seed, args.out)))
            print(f"seed {seed} {row}: {runs[row][-1]}", flush=True)
    command = command_row(args.out)
    print(f"the command: {command}", flush=True)
    rows = measures(runs)
    values = {**quoted_values(rows), **command_values(command)}
    text = table(rows, args.seeds) + "\n" + command_line(values)
    record = {"setup": {"seeds": args.seeds, "defaults": RunConfig().to_dict()}, "runs": runs, "command": command}
    write_results(args.results, "first-run", stamp, record, text, values=values)
    print(text)


if __name__ == "__main__":
    main()
