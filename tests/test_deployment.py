"""A real deployment on loopback: SuperLink and SuperNodes over gRPC; the log's bytes against the SuperLink's count."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flower_processes import BIN, flwr_run, insecure_federation

from fedslim.logs.reader import RunLog

NODES = 3
CONNECTION = "fedslim-test"


@dataclass(frozen=True)
class Federation:
    env: dict[str, str]
    tmp: Path


@pytest.fixture
def deployed(tmp_path: Path, private_cache: Path) -> Iterator[Federation]:
    """An insecure SuperLink and three SuperNodes (partitions 0-2), each stopped by its process group."""
    with insecure_federation(tmp_path, NODES, CONNECTION) as env:
        yield Federation(env, tmp_path)


def test_logged_bytes_agree_with_the_superlinks_traffic_count(deployed: Federation) -> None:
    out = deployed.tmp / "run"
    config = f'rounds=2 num-clients={NODES} fraction=1.0 codec="topk:0.2+q8+lzma" out="{out}"'
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
    assert sorted(types) == [("query", "down", 3), ("query", "up", 3), ("train", "down", 6), ("train", "up", 6)]
    assert summary.finished and summary.rounds_done == 2 and summary.rejected == 0
    residual = (summary.total_bytes - counted) / counted
    print(f"logged {summary.total_bytes} B, SuperLink counted {counted} B, residual {residual:+.3%}")
    assert abs(residual) < 0.05
