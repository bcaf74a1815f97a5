"""Where a benchmark's numbers come from, stamped into every results file, and the check that they still hold.

Every ``benchmarks/results/NAME.json`` starts with a ``provenance`` object:
the commit and whether tracked files were modified, the exact command, the
seeds, the machine, and each base the runs trained on (the identity that
pretrains it and its fingerprint). Pretraining is deterministic, so the check
below pretrains each named base again with the current code: a different
fingerprint means the published numbers were measured on a base this code no
longer builds, and the file must be re-measured or marked superseded.

Deterministic means on one kind of machine: CPUs differ in the kernels torch
runs, and so in the last bits of every product. The stamp names the
measuring machine's float arithmetic (:func:`fedslim.base.float_arithmetic`);
a pretrained base measured on a machine that computes otherwise cannot be
rebuilt bit for bit here, and the check lists it as a note instead.

    python benchmarks/provenance.py --check                      # exit 1 naming every stale results file
    python benchmarks/provenance.py --supersede NAME --reason R  # keep a file, marked as no longer holding
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console, ConsoleRenderable

from fedslim.base import UNLIKE_UNNAMED, float_arithmetic
from fedslim.config import RunConfig
from fedslim.task import prepared_base, task_for
from fedslim.tasks.benchmarks import PRETRAIN_RECIPES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def git(*args: str) -> str:
    """``git ARGS`` in the checkout, or "unknown" where it fails."""
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def base_used(config: RunConfig) -> dict[str, Any]:
    """The pretrained base a run of ``config`` trains on: its identity and fingerprint (pretrained if not cached)."""
    return {"identity": task_for(config).base_identity(config), "fingerprint": prepared_base(config).fingerprint}


def provenance(seeds: Iterable[int], bases: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The stamp of a results file written now, by this process's command line."""
    distinct: dict[str, Mapping[str, Any]] = {}
    for base in bases:
        distinct.setdefault(json.dumps(base, sort_keys=True), base)
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    modified = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    machine = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "float_arithmetic": float_arithmetic(),
    }
    if torch.cuda.is_available():
        machine["accelerator"] = torch.cuda.get_device_name()
    # A copy of a clean checkout on another machine (a lent GPU) is told its commit in FEDSLIM_COMMIT:
    # whatever git state travelled with the copy does not describe it.
    copied_from = os.environ.get("FEDSLIM_COMMIT")
    return {
        "commit": copied_from or git("rev-parse", "HEAD"),
        "modified": not copied_from and bool(modified) and modified != "unknown",
        "command": shlex.join(["python", str(shown), *sys.argv[1:]]),
        "seeds": sorted(set(seeds)),
        "bases": list(distinct.values()),
        "measured_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
    }


def write_results(
    results: Path,
    name: str,
    stamp: Mapping[str, Any],
    record: Mapping[str, Any],
    table: ConsoleRenderable | str,
    width: int = 180,
    values: Mapping[str, str] | None = None,
) -> None:
    """Write NAME.json (stamp, record, and the formatted ``values`` the docs quote) and NAME.md (the table).

    ``table`` is drawn at ``width`` without colour (a rich Table, or a Group of them), or, when a script
    formats Markdown itself, is that text, written as it is.
    """
    results.mkdir(parents=True, exist_ok=True)
    payload = {"provenance": dict(stamp), **record, "values": dict(values or {})}
    (results / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    with (results / f"{name}.md").open("w") as handle:
        if isinstance(table, str):
            handle.write(table.rstrip("\n") + "\n")
        else:
            Console(file=handle, width=width, color_system=None).print(table)


def run_config_of(identity: Mapping[str, Any]) -> RunConfig:
    """A configuration whose base has ``identity`` (its data fields; the recipe is the code's)."""
    fields = {key: identity[key] for key in ("seed", "synthetic_alpha", "synthetic_beta") if key in identity}
    return RunConfig(task=identity.get("dataset") or identity["task"], **fields)


def same_arithmetic(stamp: Mapping[str, Any]) -> bool:
    """Whether the machine that measured a results file computes floats as this one does (so pretrains alike)."""
    named = stamp.get("machine", {}).get("float_arithmetic")
    return named == float_arithmetic() if named else float_arithmetic() not in UNLIKE_UNNAMED


def stale_results(results: Path) -> list[str]:
    """One line per results file that does not hold on the current code: no stamp, or a base it no longer pretrains.

    Files marked superseded are skipped (they say so where they are published), and so are pretrained bases
    measured on a machine whose float arithmetic differs from this one's (:func:`unverifiable_results`).
    """
    problems: list[str] = []
    pretrained: dict[str, str] = {}
    for path in sorted(results.glob("*.json")):
        stamp = json.loads(path.read_text(encoding="utf-8")).get("provenance")
        if not isinstance(stamp, dict):
            problems.append(f"{path.name}: no provenance; rerun the benchmark that wrote it")
            continue
        if stamp.get("superseded"):
            continue
        for base in stamp.get("bases", []):
            identity = base["identity"]
            recipe = PRETRAIN_RECIPES.get(identity.get("dataset", ""))
            if "recipe" in identity and (recipe is None or identity["recipe"] != asdict(recipe)):
                problems.append(
                    f"{path.name}: ran on a base pretrained by recipe {identity.get('recipe')}, the code's is "
                    f"{asdict(recipe) if recipe else 'none'}; re-measure with `{stamp.get('command')}` "
                    "or mark it superseded"
                )
                continue
            if "recipe" in identity and not same_arithmetic(stamp):
                continue  # the recipe holds; the bits it pretrains to here cannot be compared
            key = json.dumps(identity, sort_keys=True)
            if key not in pretrained:
                pretrained[key] = base_used(run_config_of(identity))["fingerprint"]
            if pretrained[key] != base["fingerprint"]:
                problems.append(
                    f"{path.name}: ran on base {base['fingerprint'][:16]} but the code now pretrains "
                    f"{pretrained[key][:16]} for {run_config_of(identity).task} seed {identity['seed']}; "
                    f"re-measure with `{stamp.get('command')}` or mark it superseded"
                )
    return problems


def unverifiable_results(results: Path) -> list[str]:
    """One line per results file that ran on pretrained bases this machine cannot rebuild bit for bit: it was
    measured on a machine whose float arithmetic differs (its numbers hold here within run-to-run noise only)."""
    lines = []
    for path in sorted(results.glob("*.json")):
        stamp = json.loads(path.read_text(encoding="utf-8")).get("provenance")
        if not isinstance(stamp, dict) or stamp.get("superseded") or same_arithmetic(stamp):
            continue
        if any("recipe" in base["identity"] for base in stamp.get("bases", [])):
            named = stamp.get("machine", {}).get("float_arithmetic") or "unnamed"
            lines.append(
                f"{path.name}: measured on a machine of float arithmetic {named}, this one's is "
                f"{float_arithmetic()}: its pretrained bases cannot be rebuilt bit for bit here"
            )
    return lines


def supersede(results: Path, name: str, reason: str) -> None:
    """Mark NAME.json as no longer holding on the current code, with why (its numbers stay, flagged)."""
    path = results / f"{name}.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    stamp = record.pop("provenance", None) or {}
    record = {"provenance": {**stamp, "superseded": reason}, **record}
    path.write_text(json.dumps(record, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="list results files that no longer hold")
    parser.add_argument("--supersede", metavar="NAME", help="mark benchmarks/results/NAME.json superseded")
    parser.add_argument("--reason", help="why NAME no longer holds (with --supersede)")
    args = parser.parse_args(argv)
    if args.supersede:
        if not args.reason:
            parser.error("--supersede needs --reason")
        supersede(args.results, args.supersede, args.reason)
        return 0
    for line in unverifiable_results(args.results):
        print(f"note: {line}")
    problems = stale_results(args.results)
    for line in problems:
        print(line)
    print(f"{len(problems)} stale results file(s)" if problems else "every results file holds on the current code")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
