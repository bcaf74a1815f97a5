"""Checkpoint and resume: what a killed run needs to continue, written atomically at the end of a round.

A checkpoint holds the server side of a run after round ``completed_round``:
the exact fast state, the replica (its versions and the steps clients may
still need), the consolidations merged into the base, the replica version each client holds, the clients told to drop
their error-feedback residual, the strategy with its per-client memory and
1/p estimates, the size screen's history, and, where the nodes run in the
server's process (the inline backend), which saved Flower context state of
each node goes with it (the states themselves are in :class:`NodeStateStore`),
and how the server computed (:class:`Arithmetic`: a resume takes the run's
thread count, and warns of what else differs).
Everything random in a run is seeded by (seed, round, client), so no random
generator state is needed: a resumed run repeats exactly what the killed one
would have done from the next round on.

The log is part of the same transaction in spirit: on resume the rows of
rounds after ``completed_round`` (the round that was killed) are deleted
before it is run again, and so are those of a final sync that came after the
last checkpoint, so every message is logged exactly once. A write killed
before its rename leaves a temporary file, deleted when the next run claims
the directory.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
import tempfile
from contextlib import closing
from dataclasses import dataclass, fields, replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Protocol

import numpy as np
from flwr.app import RecordDict
from flwr.common.logger import log

from fedslim.channel.downlink import ServerReplica
from fedslim.channel.uplink import SizeScreen
from fedslim.commlog import LOG_FILENAME
from fedslim.config import ConfigError, RunConfig
from fedslim.data.participation import TRACE_FILENAME
from fedslim.export import MODEL_DIRNAME
from fedslim.strategies.base import FastStrategy

CHECKPOINT_FILENAME = "checkpoint.pkl"
NODE_STATES_FILENAME = "node-states.sqlite"
# 2: the run config names its task (``task``), not its dataset; 3: it holds task settings; 4: the run's arithmetic
CHECKPOINT_FORMAT = 4
CHECKPOINT_TEMPORARY_PREFIX = ".checkpoint-"


class NodeStates(Protocol):
    """Nodes whose Flower context state the server can save and restore (nodes in the server's process)."""

    def changed_states(self) -> dict[int, bytes]:
        """The serialised context state of each node that received a message since the last call (first call: all)."""
        ...

    def restore_states(self, states: dict[int, bytes]) -> None:
        """Put back what :meth:`save_states` returned."""
        ...


@dataclass(frozen=True)
class Arithmetic:
    """What a run's bits depend on besides its configuration: how this process computes them.

    torch's thread count changes how a product or a sum is split, and so its
    last bits (the nodes of the inline backend train in the server's
    process); the float arithmetic of the CPU (:func:`~fedslim.base.float_arithmetic`),
    the torch and numpy versions and the device change the kernels.
    """

    torch_threads: int
    float_arithmetic: str
    torch_version: str
    numpy_version: str
    device: str

    @classmethod
    def here(cls, device: str) -> Arithmetic:
        """This process's arithmetic, computing on ``device`` (``cpu``, ``cuda``)."""
        import torch

        from fedslim.base import float_arithmetic

        with torch.random.fork_rng(devices=[]):  # its network's initialisation must not move the run's generator
            digest = float_arithmetic()
        if device.startswith("cuda"):
            device = f"{device} ({torch.cuda.get_device_name()})"
        return cls(torch.get_num_threads(), digest, torch.__version__, np.__version__, device)


def adopt_arithmetic(saved: Arithmetic, device: str) -> None:
    """Continue a run as it computed: take the thread count it ran with, and warn (one line) of what differs
    that cannot be taken (a resumed run then ends in other bits than the uninterrupted one would have)."""
    import torch

    if torch.get_num_threads() != saved.torch_threads:
        log(
            INFO,
            "resume: torch computes on %d threads, as the run did before (this process had %d)",
            saved.torch_threads,
            torch.get_num_threads(),
        )
        torch.set_num_threads(saved.torch_threads)
    here = Arithmetic.here(device)
    differing = [
        f"{name.replace('_', ' ')} {getattr(saved, name)} -> {getattr(here, name)}"
        for name in ("float_arithmetic", "torch_version", "numpy_version", "device")
        if getattr(saved, name) != getattr(here, name)
    ]
    if differing:
        log(
            WARNING,
            "resume: this process computes otherwise than the run did before (%s): the run will not end in the "
            "bits an uninterrupted run would have",
            ", ".join(differing),
        )


@dataclass(frozen=True)
class Checkpoint:
    """A run's server side after ``completed_round`` (0: the nodes are identified, no round has run)."""

    format: int
    run_id: str
    config: RunConfig
    completed_round: int
    fast_state: dict[str, np.ndarray]
    replica: ServerReplica
    client_versions: dict[str, int | None]
    rejected: set[str]
    strategy: FastStrategy
    screen: SizeScreen
    node_states: dict[str, int] | None
    """Where the server could read the nodes' context states: the round of each client's saved state in the
    run's :class:`NodeStateStore`; None otherwise."""
    arithmetic: Arithmetic
    """How the server computed the rounds so far (a resume takes its thread count, and warns of the rest)."""
    finished: bool = False
    merges: tuple[bytes, ...] = ()
    """The run's consolidations, oldest first (:class:`~fedslim.consolidation.Merge` blobs): the base is the
    resident checkpoint with each merged into it."""


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_FILENAME


def write_checkpoint(checkpoint: Checkpoint, run_dir: Path) -> None:
    """Write atomically: a temporary file in the run directory, fsync, rename over the old one, fsync the folder."""
    target = checkpoint_path(run_dir)
    handle, temporary = tempfile.mkstemp(prefix=CHECKPOINT_TEMPORARY_PREFIX, dir=run_dir)
    try:
        with os.fdopen(handle, "wb") as file:
            pickle.dump(checkpoint, file, protocol=pickle.HIGHEST_PROTOCOL)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The checkpoint of ``run_dir``, finished or not; a ConfigError saying why there is none that can be read."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise ConfigError(
            f"nothing to resume in {run_dir}: no {CHECKPOINT_FILENAME} (the run had checkpoint-every 0, was "
            "killed before its nodes were identified, or this is not a run directory)"
        )
    try:
        with path.open("rb") as file:
            checkpoint = pickle.load(file)
    except Exception as exc:  # noqa: BLE001 - unpickling raises anything; the user needs one line
        raise ConfigError(f"cannot read the checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(checkpoint, Checkpoint) or checkpoint.format != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} was written by another version of fedslim; it cannot be resumed")
    return checkpoint


def read_checkpoint(run_dir: Path) -> Checkpoint:
    """The checkpoint of an interrupted run in ``run_dir``; a ConfigError saying why it cannot be resumed."""
    checkpoint = load_checkpoint(run_dir)
    if checkpoint.finished:
        raise ConfigError(
            f"the run in {run_dir} finished (round {checkpoint.completed_round}); nothing to resume "
            "(--overwrite starts it again)"
        )
    return checkpoint


def resumable_config(checkpoint: Checkpoint, config: RunConfig) -> RunConfig:
    """The checkpoint's run config, refused when ``config`` asks for a different run (only resume may differ)."""
    saved = replace(checkpoint.config, resume=True, overwrite=False, out=config.out)
    asked = replace(config, resume=True, overwrite=False)
    differing = [f.name for f in fields(RunConfig) if getattr(saved, f.name) != getattr(asked, f.name)]
    if differing:
        raise ConfigError(
            f"cannot resume run {checkpoint.run_id} with another configuration: {', '.join(differing)} differ "
            "from the checkpoint's"
        )
    return saved


def claim_run_dir(config: RunConfig) -> None:
    """Refuse a run directory that holds another run, unless ``overwrite``; then clear it. Nothing for a resume.

    A log from an earlier run is never appended to silently: ``resume``
    continues an interrupted run, ``overwrite`` deletes what was there.
    """
    run_dir = config.run_dir
    if config.resume:
        remove_killed_writes(run_dir)
        return
    log_path = run_dir / LOG_FILENAME
    existing = [path for path in (log_path, checkpoint_path(run_dir)) if path.exists()]
    if not existing:
        remove_killed_writes(run_dir)
        return
    if not config.overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(p.name for p in existing)}); continue it with "
            f"--resume {run_dir} (run config resume = true), replace it with --overwrite (overwrite = true), "
            "or choose another --out"
        )
    for name in (LOG_FILENAME, NODE_STATES_FILENAME, CHECKPOINT_FILENAME, TRACE_FILENAME):
        for path in (run_dir / name, run_dir / f"{name}-wal", run_dir / f"{name}-shm"):
            path.unlink(missing_ok=True)
    shutil.rmtree(run_dir / MODEL_DIRNAME, ignore_errors=True)
    remove_killed_writes(run_dir)


def remove_killed_writes(run_dir: Path) -> None:
    """Delete the temporary files of checkpoint writes that were killed (a finished write renames its file).

    Only at the start of a run that has claimed ``run_dir``: a run refused
    there may be refused because another is running, and writing."""
    for path in Path(run_dir).glob(f"{CHECKPOINT_TEMPORARY_PREFIX}*"):
        path.unlink(missing_ok=True)


class NodeStateStore:
    """The nodes' context states of a run's checkpoints: SQLite beside the checkpoint, one row per client and round.

    A checkpoint writes only the states that changed since the previous one
    (the nodes sampled in between), so its cost follows the sampled clients,
    not the federation. Two steps keep it consistent with the checkpoint
    file: :meth:`stage` commits the new rows durably and returns the index
    (client -> round of its state) the checkpoint records; once that
    checkpoint is in place, :meth:`settle` deletes every row it does not
    name. A kill between the two leaves extra rows, never missing ones.

    Parameters
    ----------
    run_dir : Path
        The run directory.
    index : dict[str, int], optional
        The index of the checkpoint a resumed run starts from.
    """

    def __init__(self, run_dir: Path, index: dict[str, int] | None = None) -> None:
        self.index = dict(index or {})
        self._db = sqlite3.connect(Path(run_dir) / NODE_STATES_FILENAME, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed stage survives a power cut: the checkpoint needs it
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS node_states"
            " (client TEXT NOT NULL, round INTEGER NOT NULL, state BLOB NOT NULL, PRIMARY KEY (client, round))"
        )
        stale = [
            (client, saved)
            for client, saved in self._db.execute("SELECT client, round FROM node_states")
            if self.index.get(client) != saved
        ]
        self._db.executemany("DELETE FROM node_states WHERE client = ? AND round = ?", stale)  # a killed stage

    def stage(self, states: dict[str, bytes], completed_round: int) -> dict[str, int]:
        """Store ``states`` (by client key) as of ``completed_round``; the index the next checkpoint records."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO node_states VALUES (?, ?, ?)",
                [(client, completed_round, state) for client, state in states.items()],
            )
        return {**self.index, **dict.fromkeys(states, completed_round)}

    def settle(self, index: dict[str, int]) -> None:
        """The checkpoint naming ``index`` is in place: forget every state it does not name."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "DELETE FROM node_states WHERE client = ? AND round != ?",
                [(client, saved) for client, saved in index.items() if self.index.get(client) != saved],
            )
        self.index = index

    def load(self) -> dict[str, bytes]:
        """The state the index names for each client."""
        rows = self._db.execute("SELECT client, round, state FROM node_states")
        return {client: state for client, saved, state in rows if self.index.get(client) == saved}

    def close(self) -> None:
        self._db.close()


def serialise_state(state: RecordDict) -> bytes:
    """A node's context state as Flower's own protobuf bytes."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(state).SerializeToString()


def deserialise_state(blob: bytes) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

    proto = RecordDictProto()
    proto.ParseFromString(blob)
    return recorddict_from_proto(proto)


def node_personal_state(run_dir: Path, client: str) -> dict[str, np.ndarray]:
    """The personal tensors (its own head) of simulated node ``client`` as the run's checkpoint saved its context
    state, read-only (ConfigError naming why there are none: the run kept no node states, or no such node)."""
    from fedslim.channel.protocol import PERSONAL_STATE_KEY

    checkpoint = load_checkpoint(run_dir)
    if checkpoint.node_states is None:
        raise ConfigError(
            f"{run_dir} keeps no node states: only a simulation with --backend inline and checkpoints does (a "
            "deployed node keeps its own head in its context)"
        )
    saved = checkpoint.node_states.get(client)
    if saved is None:
        known = sorted(checkpoint.node_states)
        raise ConfigError(
            f"no node {client!r} in {run_dir}; its nodes are {', '.join(known[:4])}{', ...' * (len(known) > 4)}"
        )
    with closing(sqlite3.connect(f"file:{Path(run_dir) / NODE_STATES_FILENAME}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT state FROM node_states WHERE client = ? AND round = ?", (client, saved)).fetchone()
    if row is None:
        raise ConfigError(f"the state of node {client!r} is missing from {run_dir / NODE_STATES_FILENAME}")
    personal = deserialise_state(row[0]).array_records.get(PERSONAL_STATE_KEY)
    if personal is None:
        raise ConfigError(f"node {client!r} holds no personal tensors (the run had no --personal, or it never trained)")
    return {name: array.numpy() for name, array in personal.items()}
