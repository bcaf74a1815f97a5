"""The communication log: every message in both directions, in SQLite in the run directory.

Rows are committed as they are written, so a crash leaves every finished
round readable. Byte columns:

- ``payload_bytes``: the fast-layer record as serialised (0 for errors).
- ``message_bytes``: the whole Flower message as serialised for transport
  (the sum of its deflated objects: metadata, records, arrays).
- ``full_model_bytes``: what the same message would have been if it carried
  the full model, as full-model FedAvg does.

Aggregation: ``messages.weight`` is the coefficient the strategy gave an
accepted update in its round's step, and ``memory_weights`` the coefficient
it gave each client's stored update (FedVARP, MIFA, FedStale):
``x_{t+1} = x_t + server_lr * (sum_i weight_i * update_i + sum_j memory_weight_j * stored_j)``,
where stored_j is client j's last accepted update before round t.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

SCHEMA_VERSION = 2
LOG_FILENAME = "commlog.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    config TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    base_parameters INTEGER NOT NULL,
    fast_parameters INTEGER NOT NULL,
    fast_payload_bytes INTEGER NOT NULL,
    full_model_payload_bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,  -- Flower node ids are unsigned 64-bit: kept as decimal text
    client TEXT,            -- the node's stable client key
    direction TEXT NOT NULL CHECK (direction IN ('down', 'up')),
    message_type TEXT NOT NULL,
    payload_bytes INTEGER NOT NULL,
    message_bytes INTEGER NOT NULL,
    full_model_bytes INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'rejected')),
    reason TEXT,
    weight REAL,            -- coefficient of this update in the round's step (accepted train replies)
    timestamp REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_round ON messages (run_id, round, direction);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    sampled INTEGER NOT NULL,
    accepted INTEGER NOT NULL,
    accuracy REAL,
    loss REAL,
    wall_time_s REAL NOT NULL,
    available INTEGER,              -- clients available this round (participation model)
    strategy_memory_bytes INTEGER,  -- per-client state the strategy holds on the server
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS memory_weights (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    client TEXT NOT NULL,
    weight REAL NOT NULL,
    PRIMARY KEY (run_id, round, client)
);
"""


def message_bytes(message: Message) -> int:
    """Serialised size of a Flower message: every object Flower transfers for it."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


@dataclass(frozen=True)
class RoundTotals:
    """One row of the per-round table."""

    round: int
    accuracy: float | None
    loss: float | None
    sampled: int
    accepted: int
    bytes_up: int
    bytes_down: int
    full_model_bytes: int
    strategy_memory_bytes: int | None = None


class CommLog:
    """Writer and reader of one run directory's communication log.

    Parameters
    ----------
    path : Path
        The SQLite file (created with its schema if absent).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        version = int(self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        if version != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has log schema {version}; this fedslim reads {SCHEMA_VERSION}")

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
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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

    def record_message(
        self,
        run_id: str,
        server_round: int,
        node_id: int,
        direction: str,
        message_type: str,
        payload_bytes: int,
        serialized_bytes: int,
        full_model_bytes: int,
        reason: str | None = None,
        client: str | None = None,
    ) -> None:
        """Record one message; a ``reason`` marks it rejected."""
        self._db.execute(
            "INSERT INTO messages (run_id, round, node_id, client, direction, message_type, payload_bytes,"
            " message_bytes, full_model_bytes, status, reason, timestamp)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                server_round,
                str(node_id),
                client,
                direction,
                message_type,
                payload_bytes,
                serialized_bytes,
                full_model_bytes,
                "rejected" if reason else "ok",
                reason,
                time.time(),
            ),
        )

    def record_round(
        self,
        run_id: str,
        server_round: int,
        sampled: int,
        accepted: int,
        accuracy: float | None,
        loss: float | None,
        wall_time_s: float,
        available: int | None = None,
        strategy_memory_bytes: int | None = None,
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, server_round, sampled, accepted, accuracy, loss, wall_time_s, available, strategy_memory_bytes),
        )

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

    def round_totals(self, run_id: str, only_round: int | None = None) -> list[RoundTotals]:
        """Per-round accuracy and bytes, read back from the log (one round if ``only_round`` is given)."""
        rows = self._db.execute(
            """
            SELECT r.round, r.accuracy, r.loss, r.sampled, r.accepted,
                   COALESCE(SUM(CASE WHEN m.direction = 'up' THEN m.message_bytes END), 0),
                   COALESCE(SUM(CASE WHEN m.direction = 'down' THEN m.message_bytes END), 0),
                   COALESCE(SUM(m.full_model_bytes), 0),
                   r.strategy_memory_bytes
            FROM rounds r LEFT JOIN messages m ON m.run_id = r.run_id AND m.round = r.round
            WHERE r.run_id = ? AND (? IS NULL OR r.round = ?)
            GROUP BY r.round ORDER BY r.round
            """,
            (run_id, only_round, only_round),
        )
        return [RoundTotals(*row) for row in rows]
