"""`flwr run .` runs the same app through a real local SuperLink in Flower's simulation engine."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import write_docs_example
from flower_processes import BIN, REPO, flower_env, free_port, started, wait_until_healthy

from fedslim.commlog import LOG_FILENAME


@pytest.fixture
def local_superlink(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A simulation SuperLink on loopback, started here and stopped by its process group; the processes it
    starts import tasks from ``tmp_path/tasks``."""
    http_port, control_port = free_port(), free_port()
    env = flower_env(
        tmp_path / "flwr-home",
        PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "tasks"), os.environ.get("PYTHONPATH")])),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
    )
    log_file = tmp_path / "superlink.log"
    command = [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess"]
    command += ["--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", str(http_port)]
    command += ["--database", str(tmp_path / "state.db")]
    with started(command, env, log_file) as process:
        wait_until_healthy(process, http_port, log_file)
        yield env


def test_flwr_run_from_the_repo_root_with_the_docs_example_task(
    local_superlink: dict[str, str], tmp_path: Path
) -> None:
    _, data = write_docs_example(tmp_path, train=800, test=200)
    out = tmp_path / "run"
    completed = subprocess.run(
        [
            str(BIN / "flwr"),
            "run",
            ".",
            "--stream",
            "--run-config",
            f'rounds=1 num-clients=4 fraction=0.5 codec="topk:0.2+q8+lzma" out="{out}" '
            f'task="my_task:MyTask" data-dir="{data}" '
            'strategy="fedstale" strategy-args="beta=0.5,p-estimate=fedau"',
            "--federation-config",
            "num-supernodes=4",
        ],
        cwd=REPO,
        env=local_superlink,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    db = sqlite3.connect(out / LOG_FILENAME)
    assert db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 2
    counts = db.execute("SELECT message_type, direction, COUNT(*) FROM messages GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
    assert counts == [("query", "down", 4), ("query", "up", 4), ("train", "down", 2), ("train", "up", 2)]
    # The codec from the run config reached the clients: the accepted updates are compressed blobs.
    (fast_payload,) = db.execute("SELECT fast_payload_bytes FROM runs").fetchone()
    uploads = db.execute("SELECT payload_bytes, status FROM messages WHERE message_type = 'train' AND direction = 'up'")
    assert [status for _, status in uploads.fetchall()] == ["ok", "ok"]
    (largest,) = db.execute("SELECT MAX(payload_bytes) FROM messages WHERE direction = 'up'").fetchone()
    assert 0 < largest < 0.4 * fast_payload
    # So did the strategy: FedStale weighted both updates with FedAU's 1/N (no intervals yet) and logged it.
    logged = json.loads(db.execute("SELECT config FROM runs").fetchone()[0])
    assert (logged["strategy"], logged["task"]) == ("fedstale", "my_task:MyTask")
    weights = db.execute("SELECT weight FROM messages WHERE message_type = 'train' AND direction = 'up'").fetchall()
    assert weights == [(0.25,), (0.25,)]
