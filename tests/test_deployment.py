"""A real deployment on loopback: SuperLink and SuperNodes over gRPC; the log's bytes against the SuperLink's count."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flower_processes import BIN, REPO, flwr_run, insecure_federation
from test_export import check_export_round_trip

from fedslim.commlog import LOG_FILENAME
from fedslim.config import RunConfig
from fedslim.logs.reader import RunLog
from fedslim.simulation.simulate import simulate

NODES = 3
CONNECTION = "fedslim-test"


@dataclass(frozen=True)
class Federation:
    env: dict[str, str]
    tmp: Path
    superlink_pid: int


@pytest.fixture
def deployed(tmp_path: Path, private_cache: Path) -> Iterator[Federation]:
    """An insecure SuperLink and three SuperNodes (partitions 0-2), each stopped by its process group."""
    with insecure_federation(tmp_path, NODES, CONNECTION) as (env, superlink_pid):
        yield Federation(env, tmp_path, superlink_pid)


def test_logged_bytes_agree_with_the_superlinks_traffic_count(deployed: Federation) -> None:
    out = deployed.tmp / "run"
    # With a consolidation after round 1: the merge rides in round 2's instructions, and is counted with them.
    config = f'rounds=2 num-clients={NODES} fraction=1.0 codec="topk:0.2+q8+lzma" consolidate-every=1 out="{out}"'
    completed = flwr_run(CONNECTION, config, deployed.env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    listed = subprocess.run(
        [str(BIN / "flwr"), "ls", CONNECTION, "--format", "json"],
        env=deployed.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    (run,) = json.loads(listed.stdout)["runs"]
    assert run["status"] == "finished:completed", run
    counted = run["network-traffic"]["total-bytes"]
    with RunLog(str(out)) as log:
        summary = log.summary()
        types = log.db.execute("SELECT message_type, direction, COUNT(*) FROM messages GROUP BY 1, 2").fetchall()
        down = dict(
            log.db.execute(
                "SELECT round, SUM(message_bytes) FROM messages WHERE message_type = 'train' AND direction = 'down' "
                "GROUP BY round"
            ).fetchall()
        )
    assert summary.consolidations == 1
    assert down[2] - down[1] >= NODES * summary.merge_bytes  # round 2 carries the merge of round 1 to every node
    assert sorted(types) == [("query", "down", 3), ("query", "up", 3), ("train", "down", 6), ("train", "up", 6)]
    assert summary.finished and summary.rounds_done == 2 and summary.rejected == 0
    residual = (summary.total_bytes - counted) / counted
    print(f"logged {summary.total_bytes} B, SuperLink counted {counted} B, residual {residual:+.3%}")
    assert abs(residual) < 0.05
    # The trained model out of a deployed run, consolidated after round 1, as out of a simulated one.
    check_export_round_trip(out, deployed.tmp / "exported")


def serverapp_pids(superlink: int) -> list[int]:
    """PIDs of the ServerApp processes started under the SuperLink ``superlink`` (by its SuperExec)."""
    parents: dict[int, int] = {}
    serverapps = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if any(part.endswith(b"flwr-serverapp") for part in command[:2]):
            serverapps.append(int(entry.name))

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == superlink:
                return True
        return False

    return [pid for pid in serverapps if descends(pid)]


def test_a_killed_serverapp_resumes_on_the_same_supernodes(deployed: Federation) -> None:
    """SuperLink and SuperNodes stay up; the ServerApp is killed mid-run and a new `flwr run` resumes its run."""
    # Dense both ways: a resumed deployment restarts every client without its error-feedback residual
    # (docs/operations.md), so only a run that keeps none matches the uninterrupted reference bit for bit.
    flat = {"task": "synthetic", "codec": "none", "downstream-codec": "none", "rounds": 3, "num-clients": NODES}
    # Merged into the base after rounds 1 and 2: each SuperNode replays the merges, and the resumed server too.
    flat |= {"fraction": 1.0, "seed": 3, "consolidate-every": 1}
    config = " ".join(f"{key}={json.dumps(value)}" for key, value in flat.items())
    # The same run on the inline backend reaches the deployment's final state (same seeds, same client keys).
    expected = simulate(RunConfig.from_flat({**flat, "out": str(deployed.tmp / "reference")}), backend="inline")
    started_at = time.monotonic()

    out = deployed.tmp / "killed"
    run = subprocess.Popen(
        [str(BIN / "flwr"), "run", ".", CONNECTION, "--run-config", f'{config} out="{out}"'],
        cwd=REPO,
        env=deployed.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run.wait(timeout=60)
    deadline = time.monotonic() + 120
    while not (out / LOG_FILENAME).exists() or not _rounds(out) or max(_rounds(out)) < 1:
        assert time.monotonic() < deadline, "the run never finished round 1"
        time.sleep(0.1)
    (pid,) = serverapp_pids(deployed.superlink_pid)  # the one running ServerApp
    os.kill(pid, signal.SIGKILL)
    killed_after = max(_rounds(out))
    print(f"killed at {time.monotonic() - started_at:.0f} s")
    assert killed_after < 3

    resumed = flwr_run(CONNECTION, f'{config} out="{out}" resume=true', deployed.env)
    print(f"resumed run ended at {time.monotonic() - started_at:.0f} s")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    with RunLog(str(out)) as log:
        summary = log.summary()
        rounds = [r.round for r in log.rounds()]
    assert summary.finished and summary.resumes == 1
    assert rounds == [0, 1, 2, 3]
    assert summary.final_state_digest == expected.final_state_digest
    print(f"killed after round {killed_after}; resumed digest {summary.final_state_digest} == reference")


def _rounds(run_dir: Path) -> list[int]:
    try:
        with sqlite3.connect(f"file:{run_dir / LOG_FILENAME}?mode=ro", uri=True) as db:
            return [r for (r,) in db.execute("SELECT round FROM rounds")]
    except sqlite3.Error:
        return []
