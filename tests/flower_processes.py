"""Real Flower processes for integration tests: loopback ports, each process in its own group, stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """The environment of every Flower process a test starts: private home, no telemetry, no installs."""
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        **extra,
    }


@contextmanager
def started(command: list[str], env: dict[str, str], log_file: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` in a new process group for the ``with`` block; the group is stopped on exit."""
    process = subprocess.Popen(
        command, env=env, stdout=log_file.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield process
    finally:
        with suppress(ProcessLookupError):  # the whole group may have exited already (e.g. its port was taken)
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def wait_until_healthy(
    process: subprocess.Popen[bytes], http_port: int, log_file: Path, ca: Path | None = None, timeout_s: float = 30
) -> None:
    """Block until the SuperLink's HTTP API answers /health, over TLS if ``ca`` is given (or fail with its log)."""
    deadline = time.monotonic() + timeout_s
    url = f"{'https' if ca else 'http'}://127.0.0.1:{http_port}/health"
    while True:
        try:
            if httpx.get(url, timeout=0.5, verify=ssl.create_default_context(cafile=ca) if ca else True).is_success:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"SuperLink did not start: {log_file.read_text()[-2000:]}")
        time.sleep(0.3)


@contextmanager
def insecure_federation(work: Path, nodes: int, connection: str) -> Iterator[tuple[dict[str, str], int]]:
    """An insecure SuperLink and ``nodes`` SuperNodes (node k holds partition k) on loopback.

    flwr knows the SuperLink as ``connection``; yields the environment for flwr
    commands and the SuperLink's PID (also its process group and session).
    Logs go to ``work``; every process is stopped by its group on exit.
    """
    fleet_port, http_port = free_port(), free_port()
    home = work / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{connection}"\n\n'
        f'[superlink.{connection}]\naddress = "127.0.0.1:{http_port}"\ninsecure = true\n'
    )
    env = flower_env(home)
    with ExitStack() as stack:
        log_file = work / "superlink.log"
        command = [str(BIN / "flower-superlink"), "--insecure", "--fleet-api-address", f"127.0.0.1:{fleet_port}"]
        command += ["--host", "127.0.0.1", "--port", str(http_port), "--database", str(work / "state.db")]
        command += ["--disable-runtime-dependency-installation"]
        superlink = stack.enter_context(started(command, env, log_file))
        wait_until_healthy(superlink, http_port, log_file)
        for node in range(nodes):
            command = [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{fleet_port}"]
            command += ["--port", str(free_port()), "--node-config", f"partition-id={node} num-partitions={nodes}"]
            stack.enter_context(started(command, env, work / f"supernode-{node}.log"))
        yield env, superlink.pid


def flwr_run(
    connection: str, run_config: str, env: dict[str, str], timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    """``flwr run`` of this repository's app on ``connection``, streamed until the run ends."""
    return subprocess.run(
        [str(BIN / "flwr"), "run", ".", connection, "--stream", "--run-config", run_config],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
