"""A real deployment on loopback: SuperLink and SuperNodes over gRPC; the log's bytes against the SuperLink's count."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from flower_processes import BIN, REPO, flower_env, free_port, started, wait_until_healthy

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
    fleet_port, http_port = free_port(), free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{http_port}"\ninsecure = true\n'
    )
    env = flower_env(home)
    with ExitStack() as stack:
        log_file = tmp_path / "superlink.log"
        command = [str(BIN / "flower-superlink"), "--insecure", "--fleet-api-address", f"127.0.0.1:{fleet_port}"]
        command += ["--host", "127.0.0.1", "--port", str(http_port), "--database", str(tmp_path / "state.db")]
        command += ["--disable-runtime-dependency-installation"]
        superlink = stack.enter_context(started(command, env, log_file))
        wait_until_healthy(superlink, http_port, log_file)
        for node in range(NODES):
            command = [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{fleet_port}"]
            command += ["--port", str(free_port()), "--node-config", f"partition-id={node} num-partitions={NODES}"]
            stack.enter_context(started(command, env, tmp_path / f"supernode-{node}.log"))
        yield Federation(env, tmp_path)


def test_logged_bytes_agree_with_the_superlinks_traffic_count(deployed: Federation) -> None:
    out = deployed.tmp / "run"
    config = f'rounds=2 num-clients={NODES} fraction=1.0 codec="topk:0.2+q8+lzma" out="{out}"'
    completed = subprocess.run(
        [str(BIN / "flwr"), "run", ".", CONNECTION, "--stream", "--run-config", config],
        cwd=REPO,
        env=deployed.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
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
