"""Ctrl-C in a simulation: stop at once, leave the last checkpoint as it is, say how to continue.

The inline backend runs the server loop in the main thread, where Python
raises ``KeyboardInterrupt`` itself. Flower's engine runs the ServerApp in a
thread of its own and its Ray workers in the terminal's process group (they
get the same SIGINT): :func:`stop_on_interrupt` sets a stop event before the
main thread's ``KeyboardInterrupt``, and the run's grid, a
:class:`StoppableGrid`, raises :class:`RunStopped` in the server's thread at
its next call, so that thread ends within a poll instead of waiting out the
round timeout. A round that saw the stop is never checkpointed (the replies
of clients hit by the same SIGINT are not the run's): its ``on_round`` raises
too, before the loop writes its checkpoint. What is on disk is then the last
checkpoint, and ``--resume`` continues from it. ``fedslim simulate`` prints
one line (:func:`interrupted_message`) and exits with 130
(:func:`exit_interrupted`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from flwr.app import Message
from flwr.serverapp import Grid

from fedslim.commlog import RoundTotals
from fedslim.config import ConfigError
from fedslim.server.checkpoint import load_checkpoint
from fedslim.server.nodes import ForwardingGrid

POLL_S = 0.1
"""How often a stoppable grid looks for replies (and for the stop), as Flower's own grid does."""
SERVER_STOP_WAIT_S = 30.0
"""How long the main thread waits for the server's thread to stop (it is at most a poll or a round's evaluation)."""
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped


class RunStopped(Exception):
    """Raised in the server's thread once the run was asked to stop (Ctrl-C)."""


class StoppableGrid(ForwardingGrid):
    """A grid whose every call raises :class:`RunStopped` once ``stop`` is set; waits for replies in polls."""

    def __init__(self, grid: Grid, stop: threading.Event) -> None:
        super().__init__(grid)
        self.stop = stop

    def check(self) -> None:
        if self.stop.is_set():
            raise RunStopped("the run was interrupted")

    def get_node_ids(self) -> Iterable[int]:
        self.check()
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.check()
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.check()
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's send and receive (push, then pull until every reply is in or the timeout), stopping on ``stop``."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            pulled = list(self.pull_messages(pending))
            replies += pulled
            pending -= {reply.metadata.reply_to_message_id for reply in pulled}
            if pending:
                self.stop.wait(POLL_S)
        self.check()  # replies that came in with the stop may be those of workers the same SIGINT hit
        return replies


class ServerStopper:
    """Wraps the server's grid in a :class:`StoppableGrid` and remembers the server's thread, to wait for it."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.server_thread: threading.Thread | None = None

    def wrap(self, grid: Grid) -> Grid:
        """The run's grid, made stoppable; called in the server's thread, as the ServerApp starts."""
        self.server_thread = threading.current_thread()
        return StoppableGrid(grid, self.stop)

    def on_round(self, report: Callable[[RoundTotals], None] | None) -> Callable[[RoundTotals], None]:
        """``report`` (may be None), after refusing a round that saw the stop before its checkpoint is written."""

        def on_round(totals: RoundTotals) -> None:
            if self.stop.is_set():
                raise RunStopped(f"the run was interrupted in round {totals.round}")
            if report is not None:
                report(totals)

        return on_round

    def stop_server(self) -> None:
        """Ask the server's thread to stop, and wait for it (its log closed)."""
        self.stop.set()
        thread = self.server_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(SERVER_STOP_WAIT_S)


@contextmanager
def stop_on_interrupt(stop: threading.Event, quiet: bool = True) -> Iterator[None]:
    """Within: SIGINT sets ``stop``, then raises ``KeyboardInterrupt`` as usual (in the main thread; elsewhere none).

    ``quiet``: from the stop on, Flower's logger stays silent: what its engine logs then is its workers torn down
    (a Ray actor that died with the same SIGINT), not the run's.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if quiet:
            logging.getLogger("flwr").setLevel(logging.CRITICAL + 1)
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupted_message(run_dir: Path, last_round: int | None, backend: str) -> str:
    """One line: the round the run was stopped in (after ``last_round``, the last one reported, if any) and how to
    continue it from its checkpoint, on the same ``backend`` (node states checkpointed inline go back only inline)."""
    try:
        checkpoint = load_checkpoint(run_dir)
    except ConfigError:
        checkpoint = None
    if last_round is None:
        last_round = checkpoint.completed_round if checkpoint is not None else 0
    where = f"interrupted in round {last_round + 1}"
    if checkpoint is None:
        return f"{where}; no checkpoint to continue from (start it again with --overwrite)"
    if checkpoint.finished:
        return f"interrupted as the run finished; see fedslim logs summary {run_dir}"
    resume = f"continue with: fedslim simulate --resume {run_dir}"
    if backend != "flower":  # the CLI's default
        resume += f" --backend {backend}"
    if checkpoint.completed_round != last_round:
        resume += f" (from its checkpoint after round {checkpoint.completed_round})"
    return f"{where}; {resume}"


def exit_interrupted(backend: str) -> int:
    """The exit code of an interrupted ``fedslim simulate``; on Flower's engine, the process ends here.

    Flower's engine may leave one of its worker threads waiting for a Ray task that its shutdown dropped, and the
    interpreter's exit would wait for that thread forever. The run's log, checkpoint and output are written by now
    (the server's thread has stopped), so the process exits at once.
    """
    if backend == "flower":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED_EXIT_CODE)
    return INTERRUPTED_EXIT_CODE
