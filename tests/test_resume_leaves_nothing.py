"""A resume repeats nothing and leaves nothing: a final sync cut short is logged once, a killed checkpoint write
leaves no file behind, and the resumed run computes on the thread count the run started with."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import fedslim.server.loop as loop
from fedslim.commlog import LOG_FILENAME
from fedslim.config import ConfigError, RunConfig
from fedslim.logs.reader import RunLog
from fedslim.server.checkpoint import CHECKPOINT_TEMPORARY_PREFIX, load_checkpoint, write_checkpoint
from fedslim.simulation.simulate import simulate

MESSAGES = (
    "SELECT round, client, direction, message_type, payload_bytes, message_bytes, status, reason FROM messages"
    " ORDER BY round, client, direction, message_type, status"
)


class KilledBeforeTheLastCheckpoint(RuntimeError):
    """Stands for a kill between the final sync and the run's last checkpoint."""


def messages(run_dir: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{run_dir / LOG_FILENAME}?mode=ro", uri=True) as db:
        return db.execute(MESSAGES).fetchall()


def crashing(config: RunConfig, marker: Path, crash_round: int) -> RunConfig:
    return replace(
        config, strategy="pausing:CrashingFedAvg", strategy_args=f"pause-round={crash_round},marker={marker}"
    )


def test_a_kill_after_the_final_sync_and_a_resume_log_every_message_once(
    small_config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = replace(small_config, final_sync=True)
    reference = simulate(replace(config, out=f"{config.out}-reference"), backend="inline")

    last_checkpoint = loop.save_checkpoint

    def killed_at_the_last(*args: object, finished: bool = False, **kwargs: object) -> None:
        if finished:
            raise KilledBeforeTheLastCheckpoint
        last_checkpoint(*args, finished=finished, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", killed_at_the_last)
        with pytest.raises(KilledBeforeTheLastCheckpoint):
            simulate(config, backend="inline")
    run_dir = Path(config.out)
    synced = [row for row in messages(run_dir) if row[3] == "query.sync"]
    assert len(synced) == 2 * config.num_clients and all(row[6] == "ok" for row in synced)

    resumed = simulate(replace(config, resume=True), backend="inline")
    assert resumed.final_state_digest == reference.final_state_digest
    # Message for message (the final sync's included) the uninterrupted run's log, nothing twice; and the resume's
    # own identity exchange, logged under the round it would have run next.
    logged = messages(run_dir)
    identified = [row for row in logged if row[0] == config.rounds + 1]
    assert [row[2:4] for row in identified] == [("down", "query"), ("up", "query")] * config.num_clients
    assert [row for row in logged if row not in identified] == messages(Path(reference.log_path).parent)
    with RunLog(str(run_dir)) as log:
        summary = log.summary()
    assert summary.finished and summary.resumes == 1


def test_no_temporary_file_of_a_killed_checkpoint_write_survives_the_next_start(
    small_config: RunConfig, tmp_path: Path
) -> None:
    from pausing import ServerCrash

    config = crashing(replace(small_config, rounds=3), tmp_path / "crashed", crash_round=2)
    with pytest.raises(ServerCrash):
        simulate(config, backend="inline")
    run_dir = Path(config.out)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WRITE, str(run_dir)], env={**os.environ, "PYTHONPATH": os.getcwd()}, check=False
    )
    assert killed.returncode == -signal.SIGKILL
    (left,) = run_dir.glob(f"{CHECKPOINT_TEMPORARY_PREFIX}*")
    assert left.stat().st_size > 0  # what the write had got through when it was killed

    result = simulate(replace(config, resume=True), backend="inline")
    assert [r.round for r in result.rounds] == [0, 1, 2, 3]
    assert not list(run_dir.glob(f"{CHECKPOINT_TEMPORARY_PREFIX}*"))
    # An overwrite, too, starts without them.
    left.write_bytes(b"killed")
    simulate(replace(config, overwrite=True), backend="inline")
    assert not list(run_dir.glob(f"{CHECKPOINT_TEMPORARY_PREFIX}*"))


# A checkpoint write killed with SIGKILL in the middle of its pickle (nothing is left to clean up after it).
KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
from fedslim.server.checkpoint import write_checkpoint

class KilledHere:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)

write_checkpoint([b"x" * 200_000, KilledHere()], Path(sys.argv[1]))
"""


def test_a_resume_computes_on_the_runs_thread_count_and_warns_of_other_arithmetic(
    small_config: RunConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pausing import ServerCrash

    own_threads = torch.get_num_threads()
    config = replace(small_config, rounds=3)
    try:
        torch.set_num_threads(1)
        reference = simulate(replace(config, out=f"{config.out}-reference"), backend="inline")
        with pytest.raises(ServerCrash):
            simulate(crashing(config, tmp_path / "crashed", crash_round=2), backend="inline")
        run_dir = Path(config.out)
        saved = load_checkpoint(run_dir)
        assert saved.arithmetic.torch_threads == 1 and saved.arithmetic.torch_version == torch.__version__
        write_checkpoint(replace(saved, arithmetic=replace(saved.arithmetic, numpy_version="0.0")), run_dir)

        torch.set_num_threads(2)
        threads: list[int] = []
        with caplog.at_level(logging.INFO, logger="flwr"):
            resumed = simulate(
                replace(crashing(config, tmp_path / "crashed", crash_round=2), resume=True),
                on_round=lambda _: threads.append(torch.get_num_threads()),
                backend="inline",
            )
        assert threads == [1, 1] and torch.get_num_threads() == 2  # the run's threads, and the caller's back
        assert resumed.final_state_digest == reference.final_state_digest
        notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume: ")]
        assert notes[0] == "resume: torch computes on 1 threads, as the run did before (this process had 2)"
        assert notes[1:] == [
            f"resume: this process computes otherwise than the run did before (numpy version 0.0 -> {np.__version__}"
            "): the run will not end in the bits an uninterrupted run would have"
        ]
    finally:
        torch.set_num_threads(own_threads)

    older = replace(load_checkpoint(run_dir), format=3)
    write_checkpoint(older, run_dir)
    with pytest.raises(ConfigError, match=r"^\S+ was written by another version of fedslim; it cannot be resumed$"):
        load_checkpoint(run_dir)
