"""Deployed round latency against the same rounds in simulation, side by side in one run.

The same run config (synthetic data, LoRA fast layer, topk:0.2+q8+lzma both
ways, every node trains every round) runs three ways:

- inline: the round loop and ClientApp in one process (no Flower transport);
- simulation: Flower's simulation engine (``fedslim simulate``);
- deployed: an insecure SuperLink and one SuperNode per node on loopback,
  over the gRPC Fleet API, started with ``flwr run``.

Per-round wall time comes from each run's communication log (rounds 1 and
later; round 0 is the identity exchange). The client's CPU seconds per update
are the ones the clients reported. The script also times a cold import of
the ClientApp, since a SuperNode starts a fresh process for every message.

    python benchmarks/deploy_latency.py                # 3 nodes, 5 rounds
    python benchmarks/deploy_latency.py --nodes 1 --name deploy_latency-1node
    python benchmarks/deploy_latency.py --nodes 5 --rounds 10

Writes benchmarks/results/deploy_latency.{json,md} (NAME.{json,md} with
--name), stamped with commit, command, seed and the base.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from flower_processes import flwr_run, insecure_federation  # noqa: E402
from provenance import base_used, provenance, write_results  # noqa: E402

from fedslim.config import FastSpec, RunConfig  # noqa: E402
from fedslim.logs.reader import RunLog  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CODEC = "topk:0.2+q8+lzma"
CONNECTION = "fedslim-latency"
INLINE, SIMULATION, DEPLOYED = "inline", "simulation (Flower engine)", "deployed (SuperLink + SuperNodes, gRPC)"
# Flower 1.39: an idle SuperNode sleeps 3 s between pulls (supernode/start_client_internal.py), and the
# ServerApp's grid sleeps 3 s between pulls of replies (superlink/grid/http_grid.py, send_and_receive).
POLL_S = 3.0
# Its SuperExec looks for new tasks every 1 s.
SUPEREXEC_POLL_S = 1.0


def round_times(out: Path) -> dict[str, Any]:
    """Per-round wall times and the clients' CPU per update, from a run's log."""
    with RunLog(str(out)) as log:
        rounds = log.rounds()
        (cpu,) = log.db.execute(
            "SELECT AVG(client_cpu_s) FROM messages WHERE run_id = ? AND message_type = 'train' AND direction = 'up'",
            (log.run_id,),
        ).fetchone()
        # Instruction created on the server -> reply created in the ClientApp: everything on the node's side.
        (node_side,) = log.db.execute(
            "SELECT AVG(up.created_at - down.created_at) FROM messages AS up JOIN messages AS down"
            " ON up.run_id = down.run_id AND up.round = down.round AND up.node_id = down.node_id"
            " WHERE up.run_id = ? AND up.message_type = 'train' AND down.message_type = 'train'"
            " AND up.direction = 'up' AND down.direction = 'down'",
            (log.run_id,),
        ).fetchone()
    trained = [r.wall_time_s for r in rounds if r.round > 0]
    return {
        "node_side_s": node_side,
        "rounds_s": trained,
        "mean_s": statistics.mean(trained),
        "client_cpu_s": cpu,
    }


def simulated(config: RunConfig, backend: str) -> dict[str, Any]:
    from fedslim.simulation.simulate import simulate

    started_at = time.monotonic()
    simulate(config, backend=backend)
    return {**round_times(Path(config.out)), "total_s": time.monotonic() - started_at}


def deployed(config: RunConfig, work: Path) -> dict[str, Any]:
    """The same run over a loopback SuperLink and ``config.num_clients`` SuperNodes; every process stopped."""
    run_config = (
        f'task="{config.task}" rounds={config.rounds} num-clients={config.num_clients} fraction=1.0 codec="{CODEC}" '
        f'downstream-codec="{CODEC}" out="{config.out}" overwrite=true'
    )
    with insecure_federation(work, config.num_clients, CONNECTION) as (env, _superlink):
        started_at = time.monotonic()
        completed = flwr_run(CONNECTION, run_config, env, timeout_s=600)
        total = time.monotonic() - started_at
    if completed.returncode != 0:
        sys.exit(f"the deployed run failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    return {**round_times(Path(config.out)), "total_s": total}


def clientapp_import_s(repeats: int = 3) -> float:
    """Median seconds a fresh Python process needs to import the ClientApp (what every deployed message pays)."""
    probe = "import time; t = time.perf_counter(); import fedslim.client.app; print(time.perf_counter() - t)"
    times = [
        float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
        for _ in range(repeats)
    ]
    return statistics.median(times)


def table(results: dict[str, dict[str, Any]], import_s: float) -> str:
    inline = results[INLINE]["mean_s"]
    lines = [
        "| setting | s / round (mean) | min | max | instruction -> reply s | client CPU s / update | vs inline |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['mean_s']:.2f} | {min(r['rounds_s']):.2f} | {max(r['rounds_s']):.2f} | "
            f"{r['node_side_s']:.2f} | {r['client_cpu_s']:.3f} | {r['mean_s'] / inline:,.0f}x |"
        )
    lines.append(f"\nClientApp cold import (median of 3 fresh processes): {import_s:.2f} s")
    return "\n".join(lines)


def known_s(deployed_run: dict[str, Any], import_s: float) -> float:
    """The parts of a deployed instruction -> reply known by themselves: the mean waits for the SuperNode's
    pull and for SuperExec, the ClientApp's import, the client's CPU."""
    return POLL_S / 2 + SUPEREXEC_POLL_S / 2 + import_s + deployed_run["client_cpu_s"]


def quoted_values(results: dict[str, dict[str, Any]], import_s: float) -> dict[str, str]:
    """The numbers docs/results.md quotes, formatted once, here."""
    deployed_run = results[DEPLOYED]
    known = known_s(deployed_run, import_s)
    return {
        "node_side_s": f"{deployed_run['node_side_s']:.1f} s",
        "pull_wait_s": f"{POLL_S / 2:.1f} s",
        "superexec_wait_s": f"{SUPEREXEC_POLL_S / 2:.1f} s",
        "clientapp_import_s": f"{import_s:.1f} s",
        "client_cpu_s": f"{deployed_run['client_cpu_s']:.1f} s",
        "simulation_client_cpu_s": f"{results[SIMULATION]['client_cpu_s']:.2f} s",
        "known_s": f"{known:.1f} s",
        "unexplained_s": f"{deployed_run['node_side_s'] - known:.1f} s",
        "deployed_s_per_round": f"{deployed_run['mean_s']:.1f} s",
        "simulation_s_per_round": f"{results[SIMULATION]['mean_s']:.2f} s",
        "inline_s_per_round": f"{results[INLINE]['mean_s']:.2f} s",
        "pull_periods": f"{deployed_run['mean_s'] / POLL_S:.1f}",
        "x_inline": f"{deployed_run['mean_s'] / results[INLINE]['mean_s']:,.0f}x",
        "x_simulation": f"{deployed_run['mean_s'] / results[SIMULATION]['mean_s']:,.0f}x",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--name", default="deploy_latency", help="results file name")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fedslim-latency-") as tmp:
        work = Path(tmp)
        config = RunConfig(
            overwrite=True,  # a benchmark's run directories are its own: a rerun replaces them
            task="synthetic",
            num_clients=args.nodes,
            rounds=args.rounds,
            fraction=1.0,
            fast=FastSpec("lora", rank=2),
            codec=CODEC,
            downstream_codec=CODEC,
        )
        bases = [base_used(config)]  # the deployed run (the app's defaults) has the same data fields: this base
        results: dict[str, dict[str, Any]] = {}
        for name, run in (
            (INLINE, lambda c: simulated(c, "inline")),
            (SIMULATION, lambda c: simulated(c, "flower")),
            (DEPLOYED, lambda c: deployed(c, work / "deployed")),
        ):
            (work / name.split()[0]).mkdir()
            print(f"running {name} ...", flush=True)
            results[name] = run(replace(config, out=str(work / name.split()[0] / "run")))
        import_s = clientapp_import_s()

    deployed_run = results[DEPLOYED]
    header = (
        f"Synthetic(1, 1), {args.nodes} nodes, {args.rounds} rounds, every node trains every round, "
        f"LoRA r=2, {CODEC} both ways, loopback, {os.cpu_count()} cores\n"
    )
    known = known_s(deployed_run, import_s)
    explanation = (
        f"\nWhere a deployed round goes: an idle SuperNode pulls the SuperLink every {POLL_S:.0f} s; its SuperExec "
        "looks for new tasks every 1 s and starts a fresh ClientApp process for each message, which imports "
        f"fedslim ({import_s:.1f} s cold), loads the base and the node's data, and trains. Instruction -> reply "
        f"took {deployed_run['node_side_s']:.1f} s on average, of which the known parts account for {known:.1f} s "
        f"(mean waits of {POLL_S / 2:.1f} s for the SuperNode's pull and 0.5 s for SuperExec, the import, and "
        f"{deployed_run['client_cpu_s']:.1f} s of client CPU); the rest is the ClientApp process starting up "
        f"(Flower's own imports, fetching the app from the SuperNode) and {args.nodes} node(s) sharing "
        f"{os.cpu_count()} cores. The ServerApp pulls replies every {POLL_S:.0f} s "
        f"after pushing, so the round ends at the first pull after the last reply: {deployed_run['mean_s']:.1f} s "
        f"per round, {deployed_run['mean_s'] / POLL_S:.1f} server pull periods. Simulation has none of this: "
        "the engine keeps its workers and the ClientApp warm, and delivers messages without polling.\n"
    )
    text = header + "\n" + table(results, import_s) + "\n" + explanation
    print(text)
    setup = {"nodes": args.nodes, "rounds": args.rounds, "codec": CODEC}
    saved = {"setup": setup, "runs": results, "clientapp_import_s": import_s}
    quoted = quoted_values(results, import_s)
    write_results(args.results, args.name, provenance([config.seed], bases), saved, text, values=quoted)


if __name__ == "__main__":
    main()
