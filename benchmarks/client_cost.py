"""What one message costs a deployed client of the text task, phase by phase.

In deployment a SuperNode starts a new ClientApp process for every message,
so each message pays for the imports, the task, the node's data, the 91 MB
MiniLM base and its fingerprint before any training. Each sample here is such
a process (a fresh interpreter), timing the phases a train message goes
through: import the ClientApp (torch and Flower with it), load the task, read
and tokenise the node's texts (JSON Lines, ``--texts`` of them), load the base
and its fingerprint, build the model with LoRA r=4 on query/value and the
head, and one local epoch of AdamW on batches of 16.

Two rows, side by side in one run: a node's first message after it got the
base (no fingerprint sidecar yet: the 91 MB are hashed) and every later one
(the sidecar, keyed by the checkpoint's size and modification time, gives the
fingerprint). The median of ``--repeats`` processes each.

    python benchmarks/client_cost.py            # about two minutes on 2 cores

Prints the table and writes benchmarks/results/client_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from provenance import RESULTS, base_used, provenance, write_results

from fedslim.base import sidecar_path
from fedslim.config import FastSpec, RunConfig
from fedslim.task import prepared_base
from fedslim.tasks.text import read_fortunes, write_node_texts

PHASES = {
    "import": "import the ClientApp (torch, Flower)",
    "task": "load the task",
    "data": "read and tokenise the node's texts",
    "base": "load the base and its fingerprint",
    "build": "build the model, attach LoRA",
    "train": "one local epoch (AdamW)",
}

MESSAGE = """
import json, resource, sys, time
from pathlib import Path
marks = [time.perf_counter()]
import fedslim.client.app
marks.append(time.perf_counter())
from fedslim.base import load_base
from fedslim.config import RunConfig
from fedslim.task import load_task
from fedslim.training import train_epochs
config = RunConfig.from_flat(json.loads(sys.argv[1]))
task = load_task(config.task)
marks.append(time.perf_counter())
data = task.node_data(config, Path(sys.argv[2]))
marks.append(time.perf_counter())
base = load_base(Path(sys.argv[3]), task)
marks.append(time.perf_counter())
model = base.build(config.fast)
marks.append(time.perf_counter())
optimizer = task.optimizer(model.fast_parameters(), config)
train_epochs(model.module, data, task, optimizer, 1, config.batch_size, [0])
marks.append(time.perf_counter())
print(json.dumps({"seconds": [b - a for a, b in zip(marks, marks[1:])],
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def one_message(config: RunConfig, texts: Path, base: Path) -> dict[str, Any]:
    """The phases of one message, in a fresh process."""
    args = [sys.executable, "-c", MESSAGE, json.dumps(config.client_task()), str(texts), str(base)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the message process failed: {done.stderr[-2000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": dict(zip(PHASES, measured["seconds"])), "peak_rss": measured["peak_rss"]}


def table(rows: dict[str, dict[str, Any]], texts: int) -> str:
    first, later = rows["first"], rows["later"]
    lines = [
        f"text task, one train message in a fresh process, {texts} texts on the node, median of "
        f"{len(first['samples'])} processes\n",
        "| phase | first message (fingerprint hashed) s | later messages (sidecar) s |",
        "|---|---|---|",
    ]
    for key, label in PHASES.items():
        lines.append(f"| {label} | {first['median'][key]:.2f} | {later['median'][key]:.2f} |")
    lines.append(f"| **total** | **{first['total']:.2f}** | **{later['total']:.2f}** |")
    lines.append(f"| peak RSS MiB | {first['peak_rss'] / 2**20:,.0f} | {later['peak_rss'] / 2**20:,.0f} |")
    return "\n".join(lines)


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    median = {key: statistics.median(s["seconds"][key] for s in samples) for key in PHASES}
    return {
        "samples": samples,
        "median": median,
        "total": statistics.median(sum(s["seconds"].values()) for s in samples),
        "peak_rss": max(s["peak_rss"] for s in samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=152, help="texts on the node (152: the mean of 30 clients)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--name", default="client_cost")
    args = parser.parse_args()

    config = RunConfig(
        task="text", fast=FastSpec("lora", rank=4), lr=5e-4, batch_size=16, codec="none", downstream_codec="none"
    )
    stamp = provenance([config.seed], [base_used(config)])
    with tempfile.TemporaryDirectory() as folder:
        node = Path(folder)
        texts, labels = read_fortunes()
        chosen = np.random.default_rng(0).choice(len(texts), args.texts, replace=False)
        write_node_texts(node / "texts.jsonl", [texts[i] for i in chosen], labels[chosen].tolist())
        base = node / "base.pt"
        shutil.copyfile(prepared_base(config).path, base)
        rows: dict[str, list[dict[str, Any]]] = {"first": [], "later": []}
        for repeat in range(args.repeats):
            for row in rows:
                if row == "first":
                    sidecar_path(base).unlink(missing_ok=True)
                rows[row].append(one_message(config, node / "texts.jsonl", base))
                print(f"  {row} message, sample {repeat + 1}/{args.repeats}", flush=True)
    summaries = {row: summarise(samples) for row, samples in rows.items()}
    text = table(summaries, args.texts)
    first, later = summaries["first"]["median"], summaries["later"]["median"]
    values = {
        "first_total_s": f"{summaries['first']['total']:.2f}",
        "later_total_s": f"{summaries['later']['total']:.2f}",
        "base_first_s": f"{first['base']:.2f}",
        "base_later_s": f"{later['base']:.2f}",
        "import_s": f"{statistics.median([first['import'], later['import']]):.2f}",
        "train_s": f"{statistics.median([first['train'], later['train']]):.2f}",
    }
    write_results(
        args.results,
        args.name,
        stamp,
        {"setup": vars(args) | {"results": str(args.results)}, "rows": summaries},
        text,
        values=values,
    )
    print(text)


if __name__ == "__main__":
    main()
