"""The communication log: every message in both directions, in SQLite in the run directory.

Rows are committed as they are written, so a crash leaves every finished
round readable. The schema is documented column by column in
docs/commlog.md; its version is in ``meta.schema_version``. Byte columns
of ``messages``:

- ``raw_bytes``: the fast-layer tensors the message carries, as dense float32.
- ``payload_bytes``: the fedslim blob that carries them (the compressed update
  up, the replica sync down; 0 for messages without fast-layer data).
- ``message_bytes``: what the message costs between SuperLink and SuperNode:
  every object Flower transfers for it plus its transport envelope (the
  message proto and object tree in the Fleet API's push/pull).
- ``full_model_bytes``: what the same message would have cost carrying the
  full model, as full-model FedAvg does.

Aggregation: ``messages.weight`` is the coefficient the strategy gave an
accepted update in its round's step, and ``memory_weights`` the coefficient
it gave each client's stored update (FedVARP, MIFA, FedStale):
``x_{t+1} = x_t + server_lr * (sum_i weight_i * update_i + sum_j memory_weight_j * stored_j)``,
where stored_j is client j's last accepted update before round t.

Importing this module loads only the standard library, so reading a log is
quick; what a message costs is measured in :mod:`fedslim.channel.accounting`.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import astuple, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 7
# 5 added client_evaluations, 6 consolidations, 7 bases, round_metrics and resumes: an older log reads as one
# without client-side evaluation, merges, a record of where its base came from, task-defined metrics or time
# stopped between an interruption and its resume.
READABLE_SCHEMAS = (4, 5, 6, 7)
LOG_FILENAME = "commlog.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    finished_at REAL,               -- NULL while running, or if the run was interrupted
    config TEXT NOT NULL,           -- the run configuration, JSON
    base_fingerprint TEXT NOT NULL,
    base_parameters INTEGER NOT NULL,
    fast_parameters INTEGER NOT NULL,
    fast_payload_bytes INTEGER NOT NULL,
    full_model_payload_bytes INTEGER NOT NULL,
    final_state_digest TEXT,        -- SHA-256 of the final fast state (NULL until the run finishes)
    resumes INTEGER NOT NULL DEFAULT 0  -- times the run was continued from its checkpoint
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,          -- Flower node ids are unsigned 64-bit: kept as decimal text
    client TEXT,                    -- the node's stable client key
    direction TEXT NOT NULL CHECK (direction IN ('down', 'up')),
    message_type TEXT NOT NULL,
    codec TEXT,                     -- codec spec of the payload (NULL without fast-layer data)
    raw_bytes INTEGER NOT NULL,
    payload_bytes INTEGER NOT NULL,
    message_bytes INTEGER NOT NULL,
    full_model_bytes INTEGER NOT NULL,
    version_lag INTEGER,            -- fast-state versions between the client's and the server's
    status TEXT NOT NULL CHECK (status IN ('ok', 'rejected', 'error', 'late', 'no-reply')),
    reason TEXT,
    weight REAL,                    -- coefficient of this update in the round's step (accepted train replies)
    client_cpu_s REAL,              -- train replies: CPU seconds the client spent on the round
    client_peak_rss_bytes INTEGER,  -- train replies: peak resident memory of the client's process
    created_at REAL NOT NULL,       -- when the sender created the message (Unix seconds)
    logged_at REAL NOT NULL         -- when the server logged it
);
CREATE INDEX IF NOT EXISTS messages_by_round ON messages (run_id, round, direction);
CREATE INDEX IF NOT EXISTS messages_by_client ON messages (run_id, client);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    sampled INTEGER NOT NULL,
    accepted INTEGER NOT NULL,
    available INTEGER,              -- clients available this round (participation model)
    accuracy REAL,
    loss REAL,
    wall_time_s REAL NOT NULL,
    strategy_memory_bytes INTEGER,  -- per-client state the strategy holds on the server
    finished_at REAL NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS client_evaluations (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    client TEXT NOT NULL,
    examples INTEGER NOT NULL,      -- the client's held-out examples
    correct INTEGER NOT NULL,       -- how many of them the round's replica classified correctly
    loss REAL,                      -- the mean loss over them (NULL: not finite, a diverged model)
    PRIMARY KEY (run_id, round, client)
);
CREATE TABLE IF NOT EXISTS consolidations (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,         -- the round after which the fast layer was merged into the base
    generation INTEGER NOT NULL,    -- merges in the base's chain, this one included
    parent TEXT NOT NULL,           -- fingerprint of the base merged into
    fingerprint TEXT NOT NULL,      -- fingerprint of the merged base
    replica_version INTEGER NOT NULL,  -- the version the fresh fast layer starts as
    merge_bytes INTEGER NOT NULL,   -- the merge as it travels, in the next instruction of each client lacking it
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS bases (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,         -- 0, or the first round after a resume
    holder TEXT NOT NULL,           -- 'server', or a node's client key
    origin TEXT NOT NULL CHECK (origin IN ('pretrained', 'cache', 'provisioned', 'node-file')),
    path TEXT,                      -- the checkpoint on the holder's machine (NULL: a node's, which it does not say)
    fingerprint TEXT NOT NULL,
    PRIMARY KEY (run_id, round, holder)
);
CREATE TABLE IF NOT EXISTS round_metrics (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    name TEXT NOT NULL,             -- a metric the task's evaluate returned besides loss and accuracy
    value REAL,                     -- NULL if it was not finite
    PRIMARY KEY (run_id, round, name)
);
CREATE TABLE IF NOT EXISTS resumes (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    after_round INTEGER NOT NULL,   -- the checkpoint's round: the rows of later rounds were deleted, to run again
    stopped_at REAL NOT NULL,       -- the last row logged before the interruption (Unix seconds)
    resumed_at REAL NOT NULL,
    PRIMARY KEY (run_id, resumed_at)
);
CREATE TABLE IF NOT EXISTS memory_weights (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    client TEXT NOT NULL,
    weight REAL NOT NULL,
    PRIMARY KEY (run_id, round, client)
);
"""


class Status(StrEnum):
    """What became of a message (``messages.status``)."""

    OK = "ok"
    REJECTED = "rejected"  # the server refused the reply: a check, the size screen, an unexpected reply
    ERROR = "error"  # the client answered with an error: a refusal, or its ClientApp raised
    LATE = "late"  # the reply arrived after its round's timeout and was discarded
    NO_REPLY = "no-reply"  # no reply to the instruction arrived within the round timeout (a row without a message)


@dataclass(frozen=True)
class MessageRow:
    """One row of ``messages`` (see the module docstring and docs/commlog.md)."""

    round: int
    node_id: int
    client: str | None
    direction: str
    message_type: str
    codec: str | None
    raw_bytes: int
    payload_bytes: int
    message_bytes: int
    full_model_bytes: int
    version_lag: int | None
    reason: str | None
    created_at: float
    client_cpu_s: float | None = None
    client_peak_rss_bytes: int | None = None
    status: Status | None = None
    """None: ``ok``, or ``rejected`` when there is a ``reason``."""


@dataclass(frozen=True)
class RoundRow:
    """One row of ``rounds``."""

    round: int
    sampled: int
    accepted: int
    available: int | None
    accuracy: float | None
    loss: float | None
    wall_time_s: float
    strategy_memory_bytes: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    """The task's own metrics of the evaluation (``round_metrics``), besides accuracy and loss."""


@dataclass(frozen=True)
class ConsolidationRow:
    """One row of ``consolidations``."""

    round: int
    generation: int
    parent: str
    fingerprint: str
    replica_version: int
    merge_bytes: int


SERVER_HOLDER = "server"  # the holder of the server's own row in ``bases``


@dataclass(frozen=True)
class BaseRow:
    """Where a holder's base came from (``bases``: see :class:`fedslim.base.BaseOrigin` for the origins)."""

    origin: str
    path: str | None
    fingerprint: str


@dataclass(frozen=True)
class RoundTotals:
    """One round as logged: its evaluation, participants and traffic (round 0 is the start)."""

    round: int
    accuracy: float | None
    loss: float | None
    sampled: int
    accepted: int
    bytes_up: int
    bytes_down: int
    full_model_bytes: int
    strategy_memory_bytes: int | None = None
    rejected: int = 0
    """Train instructions of the round without an accepted reply: rejected, the client's error, or no reply."""
    available: int | None = None
    wall_time_s: float = 0.0
    late: int = 0
    """Replies to earlier rounds' train instructions that arrived in this round, after their timeout (discarded)."""
    clients_evaluated: int = 0
    """Clients whose client-side evaluation of the round's model was accepted (they evaluate the replica they
    train from: with a lossy downstream codec it trails the exact state the server evaluates)."""
    client_accuracy: float | None = None
    """Mean over those clients of each one's accuracy on its held-out examples."""
    client_accuracy_p10: float | None = None
    """The worst decile: the 10th percentile of those accuracies (linear interpolation, as numpy's default)."""
    metrics: dict[str, float | None] = field(default_factory=dict)
    """The task's own metrics of the round's central evaluation, by name (None: not finite)."""


@dataclass(frozen=True)
class ClientEvaluation:
    """One client's accepted evaluation of the round's replica on its held-out examples (a row of
    ``client_evaluations``)."""

    client: str
    examples: int
    correct: int
    loss: float | None

    @property
    def accuracy(self) -> float:
        return self.correct / self.examples


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _client_accuracies(db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> dict[int, list[float]]:
    """Each round's accepted client-side accuracies (none in a log of schema 4, which has no such table)."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'client_evaluations'").fetchone():
        return {}
    accuracies: dict[int, list[float]] = {}
    for server_round, examples, correct in db.execute(
        f"SELECT round, examples, correct FROM client_evaluations WHERE {where} ORDER BY round, client", args
    ):
        accuracies.setdefault(server_round, []).append(correct / examples)
    return accuracies


def _round_metrics(db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> dict[int, dict[str, float | None]]:
    """Each round's task-defined metrics (none in a log of schema 6 or older, which has no such table)."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'round_metrics'").fetchone():
        return {}
    metrics: dict[int, dict[str, float | None]] = {}
    for server_round, name, value in db.execute(
        f"SELECT round, name, value FROM round_metrics WHERE {where} ORDER BY round, name", args
    ):
        metrics.setdefault(server_round, {})[name] = value
    return metrics


def read_round_totals(db: sqlite3.Connection, run_id: str, only_round: int | None = None) -> list[RoundTotals]:
    """Every round of ``run_id`` (or only ``only_round``) with its traffic, from the log's tables."""
    where = "run_id = ?" + (" AND round = ?" if only_round is not None else "")
    args = (run_id,) if only_round is None else (run_id, only_round)
    traffic: dict[int, dict[str, int]] = {}
    for server_round, direction, size, full, rejected, late in db.execute(
        "SELECT round, direction, SUM(message_bytes), SUM(full_model_bytes),"
        " SUM(status IN ('rejected', 'error', 'no-reply') AND message_type = 'train'),"
        f" SUM(status = 'late' AND message_type = 'train') FROM messages WHERE {where} GROUP BY round, direction",
        args,
    ):
        sums = traffic.setdefault(server_round, {"up": 0, "down": 0, "full": 0, "rejected": 0, "late": 0})
        sums[direction] = size
        sums["full"] += full
        sums["rejected"] += rejected
        sums["late"] += late
    empty = {"up": 0, "down": 0, "full": 0, "rejected": 0, "late": 0}
    rows = db.execute(
        "SELECT round, accuracy, loss, sampled, accepted, available, wall_time_s, strategy_memory_bytes"
        f" FROM rounds WHERE {where} ORDER BY round",
        args,
    )
    evaluated = _client_accuracies(db, where, args)
    metrics = _round_metrics(db, where, args)
    return [
        RoundTotals(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            sampled=sampled,
            accepted=accepted,
            bytes_up=traffic.get(server_round, empty)["up"],
            bytes_down=traffic.get(server_round, empty)["down"],
            full_model_bytes=traffic.get(server_round, empty)["full"],
            strategy_memory_bytes=memory,
            rejected=traffic.get(server_round, empty)["rejected"],
            available=available,
            wall_time_s=wall_time_s,
            late=traffic.get(server_round, empty)["late"],
            clients_evaluated=len(evaluated.get(server_round, [])),
            client_accuracy=sum(evaluated[server_round]) / len(evaluated[server_round])
            if server_round in evaluated
            else None,
            client_accuracy_p10=percentile(evaluated[server_round], 10) if server_round in evaluated else None,
            metrics=metrics.get(server_round, {}),
        )
        for server_round, accuracy, loss, sampled, accepted, available, wall_time_s, memory in rows
    ]


class SchemaVersionError(RuntimeError):
    """A log written with another schema version than this fedslim reads."""


def open_log(path: Path, create: bool = False) -> sqlite3.Connection:
    """A connection to the log at ``path``, checked for its schema version (created if ``create``)."""
    path = Path(path)
    if not create and not path.is_file():
        raise FileNotFoundError(f"no communication log at {path}")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # Every row is its own transaction; in WAL mode NORMAL syncs at checkpoints, not at each commit. A killed
        # process loses nothing committed; a power cut may lose the last rows but never corrupts the file.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    else:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as exc:
        db.close()
        raise SchemaVersionError(f"{path} is not a fedslim communication log ({exc})") from exc
    version = int(row[0]) if row else None
    if version not in READABLE_SCHEMAS:
        db.close()
        raise SchemaVersionError(f"{path} has log schema {version}; this fedslim reads schema {SCHEMA_VERSION}")
    if create and version != SCHEMA_VERSION:  # the schema script has just added what the newer schema has
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    return db


def last_logged_at(db: sqlite3.Connection, run_id: str) -> float:
    """When the run last logged a row: its start, a message, or a round's end (Unix seconds)."""
    (last,) = db.execute(
        "SELECT MAX(started_at, COALESCE((SELECT MAX(logged_at) FROM messages WHERE run_id = ?), 0),"
        " COALESCE((SELECT MAX(finished_at) FROM rounds WHERE run_id = ?), 0)) FROM runs WHERE run_id = ?",
        (run_id, run_id, run_id),
    ).fetchone()
    return float(last)


def storable(*values: Any) -> tuple[Any, ...]:
    """A row's values as SQLite stores them: an integer outside its signed 64 bits, or a NaN or infinite float,
    becomes NULL, and text that is not valid Unicode is escaped. The server rejects a reply whose claims are out
    of bounds before it logs it (``fedslim/channel/bounds.py``); this keeps a value that still gets here from
    stopping the run with an OverflowError or UnicodeEncodeError."""
    return tuple(_storable(value) for value in values)


def _storable(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, possible in-process only
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


class CommLog:
    """Writer of one run directory's communication log (every row committed as written).

    Parameters
    ----------
    path : Path
        The SQLite file (created with its schema if absent).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db = open_log(self.path, create=True)

    def close(self) -> None:
        self._db.close()

    def start_run(
        self,
        run_id: str,
        config: dict[str, Any],
        base_fingerprint: str,
        base_parameters: int,
        fast_parameters: int,
        fast_payload_bytes: int,
        full_model_payload_bytes: int,
    ) -> None:
        self._db.execute(
            "INSERT INTO runs VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?, NULL, 0)",
            (
                run_id,
                time.time(),
                json.dumps(config, default=str),
                base_fingerprint,
                base_parameters,
                fast_parameters,
                fast_payload_bytes,
                full_model_payload_bytes,
            ),
        )

    def finish_run(self, run_id: str, final_state_digest: str) -> None:
        self._db.execute(
            "UPDATE runs SET finished_at = ?, final_state_digest = ? WHERE run_id = ?",
            (time.time(), final_state_digest, run_id),
        )
        self.checkpoint()

    def checkpoint(self) -> None:
        """Move the write-ahead log into the database file, so that the ``.sqlite`` file alone holds every row."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def continue_run(self, run_id: str, after_round: int, forget_types: tuple[str, ...] = ()) -> None:
        """Reopen ``run_id`` to continue after ``after_round``: forget every row of a later round (a killed round),
        and every message of the types ``forget_types``, whatever its round (a killed final sync)."""
        if self._db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
            raise KeyError(f"run {run_id} is not in {self.path}")
        stopped_at = last_logged_at(self._db, run_id)
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO resumes VALUES (?, ?, ?, ?)", (run_id, after_round, stopped_at, time.time()))
            tables = ("messages", "rounds", "memory_weights", "client_evaluations", "consolidations", "bases")
            for table in (*tables, "round_metrics"):
                self._db.execute(f"DELETE FROM {table} WHERE run_id = ? AND round > ?", (run_id, after_round))
            self._db.executemany(
                "DELETE FROM messages WHERE run_id = ? AND message_type = ?", [(run_id, kind) for kind in forget_types]
            )
            self._db.execute(
                "UPDATE runs SET finished_at = NULL, final_state_digest = NULL, resumes = resumes + 1 WHERE run_id = ?",
                (run_id,),
            )

    def record_message(self, run_id: str, row: MessageRow) -> None:
        """Record one message; a ``reason`` marks it rejected."""
        self._db.execute(
            "INSERT INTO messages (run_id, round, node_id, client, direction, message_type, codec, raw_bytes,"
            " payload_bytes, message_bytes, full_model_bytes, version_lag, reason, created_at, client_cpu_s,"
            " client_peak_rss_bytes, status, logged_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            storable(
                run_id,
                row.round,
                str(row.node_id),
                row.client,
                row.direction,
                row.message_type,
                row.codec,
                row.raw_bytes,
                row.payload_bytes,
                row.message_bytes,
                row.full_model_bytes,
                row.version_lag,
                row.reason,
                row.created_at,
                row.client_cpu_s,
                row.client_peak_rss_bytes,
                row.status or (Status.REJECTED if row.reason else Status.OK),
                time.time(),
            ),
        )

    def record_round(self, run_id: str, row: RoundRow) -> None:
        """The round's row, and one ``round_metrics`` row per metric of the task's own."""
        *columns, metrics = astuple(row)
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR REPLACE INTO rounds (run_id, round, sampled, accepted, available, accuracy, loss,"
                " wall_time_s, strategy_memory_bytes, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, *columns, time.time()),
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO round_metrics VALUES (?, ?, ?, ?)",
                [(run_id, row.round, name, value if math.isfinite(value) else None) for name, value in metrics.items()],
            )

    def record_client_evaluation(self, run_id: str, server_round: int, evaluation: ClientEvaluation) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO client_evaluations VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, server_round, evaluation.client, evaluation.examples, evaluation.correct, evaluation.loss),
        )

    def record_base(self, run_id: str, server_round: int, holder: str, row: BaseRow) -> None:
        """Where ``holder`` (``server``, or a node's client key) got the run's base (a row of ``bases``)."""
        self._db.execute(
            "INSERT OR REPLACE INTO bases VALUES (?, ?, ?, ?, ?, ?)", (run_id, server_round, holder, *astuple(row))
        )

    def record_consolidation(self, run_id: str, row: ConsolidationRow) -> None:
        self._db.execute("INSERT OR REPLACE INTO consolidations VALUES (?, ?, ?, ?, ?, ?, ?)", (run_id, *astuple(row)))

    def record_weights(
        self, run_id: str, server_round: int, weights: dict[str, float], memory_weights: dict[str, float]
    ) -> None:
        """The strategy's coefficients of the round: fresh updates by client, and stored ones."""
        self._db.executemany(
            "UPDATE messages SET weight = ? WHERE run_id = ? AND round = ? AND client = ?"
            " AND direction = 'up' AND status = 'ok' AND message_type = 'train'",
            [(w, run_id, server_round, client) for client, w in weights.items()],
        )
        self._db.executemany(
            "INSERT OR REPLACE INTO memory_weights VALUES (?, ?, ?, ?)",
            [(run_id, server_round, client, w) for client, w in memory_weights.items()],
        )

    def reject_updates(self, run_id: str, server_round: int, clients: list[str], reason: str) -> None:
        """Mark the round's accepted train replies of ``clients`` rejected with ``reason`` (a refused step)."""
        self._db.executemany(
            "UPDATE messages SET status = 'rejected', reason = ?, weight = NULL WHERE run_id = ? AND round = ?"
            " AND client = ? AND direction = 'up' AND status = 'ok' AND message_type = 'train'",
            [(reason, run_id, server_round, client) for client in clients],
        )

    def round_totals(self, run_id: str, only_round: int | None = None) -> list[RoundTotals]:
        """Per-round accuracy and bytes, read back from the log (one round if ``only_round`` is given)."""
        return read_round_totals(self._db, run_id, only_round)
