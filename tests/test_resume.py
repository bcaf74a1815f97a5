"""Checkpoint and resume: a server killed with SIGKILL in the middle of a round continues to the same final state."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fedslim.cli import main
from fedslim.commlog import LOG_FILENAME
from fedslim.config import ConfigError, FastSpec, RunConfig
from fedslim.logs.reader import RunLog
from fedslim.server.checkpoint import NODE_STATES_FILENAME, NodeStateStore, load_checkpoint, write_checkpoint
from fedslim.simulation.simulate import simulate

TESTS = Path(__file__).resolve().parent
PAUSE_ROUND = 3
MODES = {  # strategy, codecs up and down, client-side evaluation's held-out share
    "fedavg": ("pausing:PausingFedAvg", "none", "none", 0.0),
    "fedvarp-codec-ef-client-eval": ("pausing:PausingFedVARP", "topk:0.2+q8", "topk:0.3+q8", 0.2),
}


def killable_config(mode: str, out: Path, marker: Path) -> RunConfig:
    strategy, codec, downstream, holdout = MODES[mode]
    return RunConfig(
        task="synthetic",
        num_clients=8,
        rounds=6,
        fraction=0.5,
        fast=FastSpec("lora", rank=2),
        strategy=strategy,
        strategy_args=f"pause-round={PAUSE_ROUND},marker={marker}",
        codec=codec,
        downstream_codec=downstream,
        client_holdout=holdout,
        out=str(out),
    )


def cli_args(config: RunConfig) -> list[str]:
    return [
        "--task", config.task,
        "--clients", str(config.num_clients),
        "--rounds", str(config.rounds),
        "--fraction", str(config.fraction),
        "--fast", config.fast.kind,
        "--rank", str(config.fast.rank),
        "--strategy", config.strategy,
        *[a for arg in config.strategy_args.split(",") for a in ("--strategy-arg", arg)],
        "--codec", config.codec,
        "--downstream-codec", config.downstream_codec,
        "--client-holdout", str(config.client_holdout),
        "--out", config.out,
    ]  # fmt: skip


def fedslim(args: list[str], cache: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "FEDSLIM_CACHE": str(cache), "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedslim.cli", "simulate", "--backend", "inline", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def logged(run_dir: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{run_dir / LOG_FILENAME}?mode=ro", uri=True) as db:
        return db.execute(query).fetchall()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_server_killed_mid_round_resumes_to_the_same_final_state(
    mode: str, tmp_path: Path, private_cache: Path
) -> None:
    marker = tmp_path / "paused"
    reference = simulate(
        replace(killable_config(mode, tmp_path / "reference", marker), strategy_args=""), backend="inline"
    )

    config = killable_config(mode, tmp_path / "killed", marker)
    server = fedslim(cli_args(config), private_cache)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert server.poll() is None, server.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, "the server never reached the pause"
            time.sleep(0.05)
        os.kill(int(marker.read_text() or server.pid), signal.SIGKILL)
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
    assert server.returncode == -signal.SIGKILL
    run_dir = Path(config.out)
    # Killed in the middle of round 3: its replies are in the log, the round itself is not.
    assert logged(run_dir, f"SELECT COUNT(*) FROM messages WHERE round = {PAUSE_ROUND} AND direction = 'up'")[0][0] > 0
    assert [r for (r,) in logged(run_dir, "SELECT round FROM rounds ORDER BY round")] == list(range(PAUSE_ROUND))
    # The database file alone holds every finished round (the write-ahead log is checkpointed at each round end).
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run_dir / LOG_FILENAME, alone / LOG_FILENAME)
    assert [r for (r,) in logged(alone, "SELECT round FROM rounds ORDER BY round")] == list(range(PAUSE_ROUND))

    resumed = fedslim(["--resume", str(run_dir)], private_cache)
    output = resumed.communicate(timeout=180)[0].decode()
    assert resumed.returncode == 0, output[-3000:]
    assert f"final state digest: {reference.final_state_digest}" in " ".join(output.split())

    with RunLog(str(run_dir)) as log:
        summary = log.summary()
        assert summary.finished and summary.resumes == 1
        assert summary.final_state_digest == reference.final_state_digest
    rounds = [r for (r,) in logged(run_dir, "SELECT round FROM rounds ORDER BY round")]
    assert rounds == list(range(config.rounds + 1))
    # No reply of the killed round is counted twice; train traffic is the uninterrupted run's, message for message.
    train = "SELECT round, client, direction, payload_bytes, message_bytes, status FROM messages"
    train += " WHERE message_type = 'train' ORDER BY round, client, direction"
    assert logged(run_dir, train) == logged(Path(reference.log_path).parent, train)
    evaluations = "SELECT round, client, examples, correct, loss FROM client_evaluations ORDER BY round, client"
    assert logged(run_dir, evaluations) == logged(Path(reference.log_path).parent, evaluations)
    assert bool(logged(run_dir, evaluations)) == bool(config.client_holdout)
    counts = logged(run_dir, "SELECT r.round, r.sampled, COUNT(m.id) FROM rounds r JOIN messages m ON m.round = r.round"
                    " AND m.message_type = 'train' AND m.direction = 'up' GROUP BY r.round")  # fmt: skip
    assert all(sampled == replies for _, sampled, replies in counts)


def test_a_run_directory_holding_a_run_is_refused_unless_overwritten_or_resumed(
    small_config: RunConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    first = simulate(small_config, backend="inline")
    assert main(["logs", "summary", small_config.out]) == 0
    assert f"final state digest: {first.final_state_digest}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        simulate(small_config, backend="inline")
    with pytest.raises(ConfigError, match="finished .*nothing to resume"):
        simulate(replace(small_config, resume=True), backend="inline")
    again = simulate(replace(small_config, overwrite=True), backend="inline")
    assert again.run_id != first.run_id and again.final_state_digest == first.final_state_digest
    with RunLog(small_config.out) as log:
        assert log.run_id == again.run_id
    assert len(logged(Path(small_config.out), "SELECT run_id FROM runs")) == 1


def test_resume_refuses_another_configuration_and_a_directory_without_checkpoint(
    small_config: RunConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="nothing to resume"):
        simulate(replace(small_config, resume=True, out=str(tmp_path / "empty")), backend="inline")
    simulate(small_config, backend="inline")
    path = Path(small_config.out)
    unfinished = replace(load_checkpoint(path), finished=False)
    write_checkpoint(unfinished, path)
    with pytest.raises(ConfigError, match="cannot resume run .* with another configuration: lr differ"):
        simulate(replace(small_config, resume=True, lr=0.5), backend="inline")
    with pytest.raises(SystemExit):
        main(["simulate", "--resume", small_config.out, "--rounds", "5"])
    assert "--resume continues the run with the configuration it was started with; drop --rounds" in (
        capsys.readouterr().err
    )


def test_a_resume_without_the_node_states_sends_every_client_the_full_state(
    small_config: RunConfig, tmp_path: Path
) -> None:
    """Where the server cannot put the nodes' states back (Flower's engine, deployment): clients resync, and
    without error feedback the run still ends in the uninterrupted run's state, bit for bit."""
    from pausing import ServerCrash

    from fedslim.client.app import app as client_app
    from fedslim.server.loop import run_federation
    from fedslim.simulation.inline import InlineGrid

    marker = tmp_path / "crashed"
    config = replace(
        small_config,
        rounds=5,
        strategy="pausing:CrashingFedAvg",
        strategy_args=f"pause-round={PAUSE_ROUND},marker={marker}",
    )
    reference = simulate(replace(config, strategy_args="", out=str(tmp_path / "reference")), backend="inline")
    with pytest.raises(ServerCrash):
        run_federation(InlineGrid(client_app, config.num_clients), config)  # type: ignore[arg-type]
    result = run_federation(InlineGrid(client_app, config.num_clients), replace(config, resume=True))  # type: ignore[arg-type]
    assert result.final_state_digest == reference.final_state_digest
    query = f"SELECT version_lag FROM messages WHERE round = {PAUSE_ROUND} AND message_type = 'train'"
    query += " AND direction = 'down'"
    # The resumed run knows no client's replica and sends the full state; the uninterrupted one sent steps.
    assert {lag for (lag,) in logged(Path(config.out), query)} == {None}
    assert None not in {lag for (lag,) in logged(Path(reference.log_path).parent, query)}


def test_the_node_state_store_keeps_exactly_what_the_checkpoint_names(tmp_path: Path) -> None:
    store = NodeStateStore(tmp_path)
    store.settle(store.stage({"partition-0": b"a0", "partition-1": b"b0"}, 0))
    assert store.load() == {"partition-0": b"a0", "partition-1": b"b0"}
    store.stage({"partition-0": b"a1"}, 1)  # killed before the checkpoint of round 1 was in place
    store.close()

    resumed = NodeStateStore(tmp_path, {"partition-0": 0, "partition-1": 0})  # the checkpoint of round 0
    assert resumed.load() == {"partition-0": b"a0", "partition-1": b"b0"}
    resumed.settle(resumed.stage({"partition-1": b"b1"}, 1))
    assert resumed.load() == {"partition-0": b"a0", "partition-1": b"b1"}
    resumed.close()
    rows = sqlite3.connect(tmp_path / NODE_STATES_FILENAME).execute("SELECT client, round FROM node_states").fetchall()
    assert sorted(rows) == [("partition-0", 0), ("partition-1", 1)]  # only what the last checkpoint names
