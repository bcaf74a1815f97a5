"""Ctrl-C: a run stops at once with one line (exit code 130), and `--resume` finishes it as if never stopped."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from test_resume import PAUSE_ROUND, cli_args, fedslim, killable_config

from fedslim.commlog import LOG_FILENAME, RoundTotals
from fedslim.config import RunConfig
from fedslim.logs.reader import RunLog
from fedslim.server.checkpoint import load_checkpoint, write_checkpoint
from fedslim.simulation.interrupt import (
    INTERRUPTED_EXIT_CODE,
    RunStopped,
    ServerStopper,
    StoppableGrid,
    interrupted_message,
)
from fedslim.simulation.simulate import simulate


def interrupted(process: subprocess.Popen[bytes], until: float) -> str:
    """SIGINT to the process group (what a terminal's Ctrl-C does); the output once the process exits."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        output = process.communicate(timeout=until)[0].decode()
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"still running {until} s after Ctrl-C: {process.communicate()[0].decode()[-3000:]}")
    return output


def resumed_digest(run_dir: Path, cache: Path) -> str:
    resumed = fedslim(["--resume", str(run_dir)], cache)
    output = resumed.communicate(timeout=180)[0].decode()
    assert resumed.returncode == 0, output[-3000:]
    with RunLog(str(run_dir)) as log:
        summary = log.summary()
    assert summary.finished and summary.resumes == 1
    assert summary.final_state_digest
    return summary.final_state_digest


def test_ctrl_c_inline_stops_with_one_line_and_resume_gives_the_uninterrupted_digest(
    tmp_path: Path, private_cache: Path
) -> None:
    marker = tmp_path / "paused"  # the strategy sleeps in round PAUSE_ROUND, after writing it
    mode = "fedvarp-codec-ef-client-eval"  # error feedback, codecs both ways, client-side evaluation
    reference = simulate(
        replace(killable_config(mode, tmp_path / "reference", marker), strategy_args=""), backend="inline"
    )
    config = killable_config(mode, tmp_path / "stopped", marker)
    process = fedslim(cli_args(config), private_cache)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.communicate()[0].decode()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the pause"
        time.sleep(0.05)
    output = interrupted(process, until=30)

    assert process.returncode == INTERRUPTED_EXIT_CODE, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    line = f"interrupted in round {PAUSE_ROUND}; continue with: fedslim simulate --resume {config.out} --backend inline"
    assert [text for text in output.splitlines() if "interrupted" in text] == [line]
    assert resumed_digest(Path(config.out), private_cache) == reference.final_state_digest


def rounds_logged(run_dir: Path) -> int:
    try:
        with sqlite3.connect(f"file:{run_dir / LOG_FILENAME}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COALESCE(MAX(round), 0) FROM rounds").fetchone()[0])
    except sqlite3.Error:  # not created yet
        return 0


def test_ctrl_c_on_flowers_engine_stops_its_server_thread_and_the_checkpoint_resumes(
    tmp_path: Path, private_cache: Path
) -> None:
    """Flower's engine runs the ServerApp in a thread and Ray workers in the terminal's process group: one Ctrl-C
    ends the run within seconds, and its checkpoint finishes (inline here) to the uninterrupted run's state.
    Without error feedback: a run on Flower's engine cannot checkpoint the nodes' residuals."""
    config = RunConfig(task="synthetic", num_clients=4, rounds=30, fraction=0.5, codec="none",
                       downstream_codec="none", out=str(tmp_path / "stopped"))  # fmt: skip
    reference = simulate(replace(config, out=str(tmp_path / "reference")), backend="inline")
    args = ["--backend", "flower", "--task", "synthetic", "--clients", "4", "--rounds", "30", "--fraction", "0.5",
            "--codec", "none", "--downstream-codec", "none", "--out", config.out]  # fmt: skip
    process = fedslim(args, private_cache)  # the later --backend wins
    deadline = time.monotonic() + 120
    while rounds_logged(Path(config.out)) < 1:
        assert process.poll() is None, process.communicate()[0].decode()[-3000:]
        assert time.monotonic() < deadline, "the run never finished round 1"
        time.sleep(0.1)
    output = interrupted(process, until=20)

    assert process.returncode == INTERRUPTED_EXIT_CODE, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    (line,) = [text for text in output.splitlines() if "interrupted" in text]
    assert line.endswith(f"; continue with: fedslim simulate --resume {config.out}"), line
    assert resumed_digest(Path(config.out), private_cache) == reference.final_state_digest


ROUND_2 = RoundTotals(round=2, accuracy=0.5, loss=1.0, sampled=2, accepted=2, bytes_up=1, bytes_down=1,
                      full_model_bytes=4)  # fmt: skip


def test_ctrl_c_while_flowers_engine_starts_its_nodes_ends_the_process(tmp_path: Path, private_cache: Path) -> None:
    """Stopped as the run starts (Ray and its workers starting, the nodes' first query): no checkpoint yet, the
    process ends at once and quietly."""
    out = tmp_path / "stopped"
    process = fedslim(
        ["--backend", "flower", "--task", "synthetic", "--clients", "4", "--out", str(out)], private_cache
    )
    deadline = time.monotonic() + 120
    while not (out / LOG_FILENAME).exists():  # the run has started: its nodes are being identified
        assert process.poll() is None, process.communicate()[0].decode()[-3000:]
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    output = interrupted(process, until=20)
    assert process.returncode == INTERRUPTED_EXIT_CODE, output[-3000:]
    assert "Traceback" not in output and "ERROR" not in output
    assert [text for text in output.splitlines() if "interrupted" in text][0].startswith("interrupted in round 1; ")


class SilentGrid:
    """Takes messages, never answers."""

    def push_messages(self, messages: object) -> list[str]:
        return ["m1", "m2"]

    def pull_messages(self, message_ids: object) -> list[object]:
        return []


def test_a_stop_ends_a_wait_for_replies_at_the_next_poll_and_no_stopped_round_is_reported() -> None:
    stopper = ServerStopper()
    grid = stopper.wrap(SilentGrid())  # type: ignore[arg-type]
    assert isinstance(grid, StoppableGrid) and stopper.server_thread is threading.current_thread()
    threading.Timer(0.3, stopper.stop.set).start()
    started = time.monotonic()
    with pytest.raises(RunStopped):
        grid.send_and_receive([], timeout=600)
    assert time.monotonic() - started < 2
    with pytest.raises(RunStopped):
        grid.get_node_ids()

    reported: list[int] = []
    on_round = ServerStopper().on_round(lambda totals: reported.append(totals.round))
    on_round(ROUND_2)
    assert reported == [2]
    with pytest.raises(RunStopped, match="interrupted in round 2"):
        stopper.on_round(lambda totals: reported.append(totals.round))(ROUND_2)
    assert reported == [2]


def test_the_line_says_where_the_resume_starts_and_when_there_is_nothing_to_resume(
    small_config: RunConfig, tmp_path: Path
) -> None:
    assert interrupted_message(tmp_path, None, "flower") == (
        "interrupted in round 1; no checkpoint to continue from (start it again with --overwrite)"
    )
    simulate(replace(small_config, rounds=3), backend="inline")
    run_dir = Path(small_config.out)
    write_checkpoint(replace(load_checkpoint(run_dir), finished=False, completed_round=1), run_dir)
    assert interrupted_message(run_dir, None, "flower") == (
        f"interrupted in round 2; continue with: fedslim simulate --resume {run_dir}"
    )
    assert interrupted_message(run_dir, 2, "inline") == (
        f"interrupted in round 3; continue with: fedslim simulate --resume {run_dir} --backend inline "
        "(from its checkpoint after round 1)"
    )
