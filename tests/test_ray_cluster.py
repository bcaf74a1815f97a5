"""`fedslim simulate` on a Ray cluster already running: a head and a worker node started here, on loopback.

The worker node has a fedslim cache of its own, empty, as another machine
would: its clients must find the server's base there, written once by each of
its worker processes from the cluster's store, neither pretrained nor sent over
the run's messages. A real-process test (Ray's daemons, about half a minute).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from flower_processes import BIN, REPO, free_port

from fedslim.channel.protocol import PROVISION_TYPE
from fedslim.cli import main as cli_main
from fedslim.config import RunConfig
from fedslim.simulation.simulate import simulate

RAY_START_TIMEOUT_S = 180  # a head starts in seconds, but in minutes on a machine loaded many times over


def processes_naming(marker: str) -> list[int]:
    """The processes whose command line holds ``marker`` (this test's Ray session folder)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with suppress(OSError):
            if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
    return found


def stop_processes(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL what is left after 10 s."""
    for signal_number, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal_number)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.2)


@contextmanager
def ray_cluster(work: Path) -> Iterator[tuple[str, Path]]:
    """A Ray head (no CPUs: it runs no client) and one worker node (1 CPU, a fedslim cache of its own), both on
    127.0.0.1, in a session folder of their own. Yields the head's address and the worker's cache folder; on exit
    every process of the session is stopped by its PID (``ray stop`` would stop other users' Ray too)."""
    session = Path(tempfile.mkdtemp(prefix="fsray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    worker_cache = work / "worker-cache"
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "FEDSLIM_CACHE": str(work / "head-cache"),
    }
    ray = [str(BIN / "ray"), "start", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    head = [*ray, "--head", "--port", address.rpartition(":")[2], "--num-cpus", "0", "--temp-dir", str(session)]
    head += ["--include-dashboard", "false", "--ray-client-server-port", str(free_port())]
    head += ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port())]
    worker = [*ray, "--address", address, "--num-cpus", "1"]
    worker += ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port())]
    try:
        for name, command, node_env in (
            ("head", head, env),
            ("worker", worker, {**env, "FEDSLIM_CACHE": str(worker_cache)}),
        ):
            log = work / f"ray-{name}.log"
            with log.open("wb") as output:  # a file, not a pipe: Ray's daemons keep it open after `ray start` exits
                started = subprocess.run(
                    command, env=node_env, stdout=output, stderr=subprocess.STDOUT, timeout=RAY_START_TIMEOUT_S
                )
            assert started.returncode == 0, f"ray start ({name}) failed: {log.read_text()[-2000:]}"
        yield address, worker_cache
    finally:
        stop_processes(processes_naming(str(session)))


@pytest.mark.real_process
def test_simulate_runs_on_a_running_ray_cluster_with_the_base_written_once_per_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSLIM_CACHE", str(tmp_path / "server-cache"))
    with ray_cluster(tmp_path) as (address, worker_cache):
        config = RunConfig(
            task="synthetic", num_clients=3, rounds=2, fraction=1.0, ray_address=address, out=str(tmp_path / "run")
        )
        result = simulate(config, backend="flower")
    assert [r.accepted for r in result.rounds[1:]] == [3, 3]
    with sqlite3.connect(result.log_path) as db:
        origins = db.execute("SELECT holder, origin FROM bases ORDER BY holder").fetchall()
        provisioned = db.execute("SELECT COUNT(*) FROM messages WHERE message_type = ?", (PROVISION_TYPE,)).fetchone()
    # The server pretrained the base once; each client found it on its machine, none was sent it.
    assert sorted(origin for _, origin in origins) == ["node-file"] * 3 + ["pretrained"]
    assert provisioned == (0,)
    (server_base,) = (tmp_path / "server-cache" / "bases").glob("*.pt")
    assert [p.name for p in (worker_cache / "bases").glob("*.pt")] == [server_base.name]
    assert (worker_cache / "bases" / server_base.name).read_bytes() == server_base.read_bytes()


def test_ray_address_is_a_run_setting_of_the_flower_backend_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["simulate", "--backend", "inline", "--ray-address", "10.0.0.5:6379", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exited:
        cli_main(command)
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "fedslim simulate: error: ray-address 10.0.0.5:6379 needs --backend flower (the inline backend runs no Ray)\n"
    )
