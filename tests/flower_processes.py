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
from dataclasses import dataclass
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


def fedslim(*args: str) -> list[str]:
    """The ``fedslim`` command line of this interpreter."""
    return [sys.executable, "-m", "fedslim.cli", *args]


@dataclass
class TlsFederation:
    """A running TLS SuperLink with node authentication (see :func:`tls_federation`)."""

    work: Path
    env: dict[str, str]
    fleet_port: int
    stack: ExitStack

    @property
    def certs(self) -> Path:
        return self.work / "certs"

    @property
    def keys(self) -> Path:
        return self.work / "keys"

    def supernode(self, name: str, data: Path, base: Path, *extra: str) -> subprocess.Popen[bytes]:
        """Start `fedslim deploy supernode` ``name`` with its key, ``data`` and ``base`` (logged to NAME.log)."""
        command = fedslim("deploy", "supernode", "--superlink", f"127.0.0.1:{self.fleet_port}", "--name", name)
        command += ["--data", str(data), "--base", str(base), "--port", str(free_port()), *extra]
        command += ["--ca", str(self.certs / "ca.crt"), "--key", str(self.keys / name)]
        return self.stack.enter_context(started(command, self.env, self.work / f"{name}.log"))


@contextmanager
def tls_federation(
    work: Path, registered: list[str], unregistered: list[str], connection: str
) -> Iterator[TlsFederation]:
    """`fedslim deploy` from zero on loopback: certificates, a node key per name, the flwr connection, the
    SuperLink (TLS, node authentication; logged to superlink.log) and the ``registered`` keys registered.

    SuperNodes are started with :meth:`TlsFederation.supernode`; every process stops on exit.
    """
    env = flower_env(work / "flwr-home")
    certs, keys = work / "certs", work / "keys"
    fleet_port, http_port = free_port(), free_port()
    setup = [fedslim("deploy", "certs", "--out", str(certs), "--host", "127.0.0.1", "--host", "localhost")]
    setup += [fedslim("deploy", "node-key", name, "--out", str(keys)) for name in (*registered, *unregistered)]
    address = f"127.0.0.1:{http_port}"
    setup.append(fedslim("deploy", "connection", connection, "--address", address, "--ca", str(certs / "ca.crt")))
    for command in setup:
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=60)
    with ExitStack() as stack:
        log_file = work / "superlink.log"
        command = fedslim("deploy", "superlink", "--certs", str(certs), "--fleet-address", f"127.0.0.1:{fleet_port}")
        command += ["--control-address", address, "--database", str(work / "state.db")]
        superlink = stack.enter_context(started(command, env, log_file))
        wait_until_healthy(superlink, http_port, log_file, ca=certs / "ca.crt")
        for name in registered:
            done = subprocess.run(
                fedslim("deploy", "register", str(keys / f"{name}.pub"), "--connection", connection),
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stdout + done.stderr
        yield TlsFederation(work, env, fleet_port, stack)
