"""Reading a run's communication log: summary, rounds, clients, and the raw tables for export.

A log file may hold several runs (each ``fedslim simulate`` or ``flwr run``
with the same run directory adds one). A run is named ``PATH`` (its
directory or its ``commlog.sqlite``; the most recently started run in it)
or ``PATH#RUN_ID``. Only the standard library is used, so reading is quick
however large the run was.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedslim.commlog import LOG_FILENAME, SCHEMA, RoundTotals, last_logged_at, open_log, read_round_totals

# fedslim.channel.protocol.PROVISION_TYPE, spelled out: reading a log must not import Flower.
PROVISION_TYPE = "query.provision"
EVALUATE_TYPE = "evaluate"  # client-side evaluation: its failures are not counted among the training's
# The log's tables, each with the order its rows are exported in.
TABLES = {
    "runs": "",
    "rounds": " ORDER BY round",
    "messages": " ORDER BY id",
    "memory_weights": " ORDER BY round",
    "client_evaluations": " ORDER BY round, client",
    "consolidations": " ORDER BY round",
    "bases": " ORDER BY round, holder",
    "round_metrics": " ORDER BY round, name",
    "resumes": " ORDER BY resumed_at",
}


REQUIRED_TABLES = ("runs", "messages", "rounds")  # every readable schema has them; the others came later


class RunNotFoundError(LookupError):
    """The named run is not in the log."""


class LogFormatError(ValueError):
    """A log file is not what its schema says: a table or column missing, a value of another type."""


def _schema_columns() -> dict[str, dict[str, bool]]:
    """Each table the log's schema creates (``meta`` aside): its columns, and whether each holds numbers."""
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA)
    tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'meta'")]
    columns = {
        table: {
            name: declared in ("INTEGER", "REAL") for _, name, declared, *_ in db.execute(f"PRAGMA table_info({table})")
        }
        for table in tables
    }
    db.close()
    return columns


SCHEMA_COLUMNS = _schema_columns()


def check_tables(db: sqlite3.Connection, path: Path) -> None:
    """LogFormatError naming ``path`` and what is missing, unless it has every table and column a log has.

    A table that older schemas lack may be missing, not a column of a table it has.
    """
    present = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    for table, columns in SCHEMA_COLUMNS.items():
        if table not in present:
            if table in REQUIRED_TABLES:
                raise LogFormatError(f"{path} is not a whole communication log: it has no {table} table")
            continue
        found = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        missing = [name for name in columns if name not in found]
        if missing:
            raise LogFormatError(f"{path}: the {table} table has no column {', '.join(missing)}")


def check_values(db: sqlite3.Connection, path: Path, run_id: str) -> None:
    """LogFormatError naming ``path``, the column and the value if a row of the run holds text (or bytes) where the
    schema has a number: SQLite keeps what it is given, and the reader would fail on it, or sum it as 0."""
    present = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    for table, columns in SCHEMA_COLUMNS.items():
        numeric = [name for name, holds_numbers in columns.items() if holds_numbers]
        if table not in present or not numeric:
            continue
        conditions = " OR ".join(f"typeof({name}) IN ('text', 'blob')" for name in numeric)
        query = f"SELECT {', '.join(numeric)} FROM {table} WHERE run_id = ? AND ({conditions}) LIMIT 1"
        wrong = db.execute(query, (run_id,)).fetchone()
        if wrong is not None:
            column, value = next((c, v) for c, v in zip(numeric, wrong) if isinstance(v, str | bytes))
            raise LogFormatError(
                f"{path}: {table}.{column} holds {value!r:.40} in run {run_id}, where a log has a number"
            )


@dataclass(frozen=True)
class ClientStats:
    """One client's share of a run."""

    client: str
    sampled: int
    accepted: int
    rejected: int
    """Train instructions without an accepted reply: rejected, the client's error, or no reply."""
    bytes_up: int
    bytes_down: int
    mean_weight: float | None
    last_round: int
    mean_cpu_s: float | None
    peak_rss_bytes: int | None
    errors: int = 0
    late: int = 0
    no_reply: int = 0


@dataclass(frozen=True)
class Summary:
    """What one run moved and what it reached.

    Byte totals are over every logged message (the round-0 identity exchange
    and base provisioning included); ``dense_fast_bytes`` is what the same
    messages would have cost with the fast layer sent as dense float32,
    ``full_model_bytes`` with the full model. ``training_bytes_up`` and
    ``training_bytes_down`` count rounds 1 and later only: the per-round
    traffic, without the one-off start. ``provisioning_bytes`` is what giving
    the base to nodes without one cost (chunks and their acknowledgements),
    ``provisioned_nodes`` how many nodes it went to.
    """

    run_id: str
    label: str
    strategy: str
    codec_up: str
    codec_down: str
    fast_kind: str
    clients: int
    rounds_planned: int
    rounds_done: int
    finished: bool
    messages: int
    rejected: int
    bytes_up: int
    bytes_down: int
    training_bytes_up: int
    training_bytes_down: int
    provisioning_bytes: int
    provisioned_nodes: int
    dense_fast_bytes: int
    full_model_bytes: int
    initial_accuracy: float | None
    final_accuracy: float | None
    best_accuracy: float | None
    best_round: int | None
    final_client_accuracy: float | None
    """Client-side evaluation of the last evaluated round: the mean over clients, and the worst decile."""
    final_client_accuracy_p10: float | None
    strategy_memory_bytes: int | None
    wall_time_s: float
    """The run's wall-clock time: from its start to its end (or its last row, unfinished), less the time it was
    stopped between an interruption and a resume; not the sum of its rounds' times."""
    client_cpu_s: float | None
    client_peak_rss_bytes: int | None
    final_state_digest: str | None = None
    """SHA-256 of the final fast state (hex); None until the run finishes."""
    resumes: int = 0
    """Times the run was continued from its checkpoint after it was killed."""
    errors: int = 0
    """Error replies: a client's refusal, or its ClientApp raised."""
    late: int = 0
    """Replies that came after their round's timeout (discarded)."""
    no_reply: int = 0
    """Instructions without any reply by the round timeout."""
    consolidations: int = 0
    """Merges of the fast layer into the base (``--consolidate-every``)."""
    merge_bytes: int = 0
    """Their sizes as they travel, summed (each goes to every client that lacks it, in its next instruction)."""

    @property
    def total_bytes(self) -> int:
        return self.bytes_up + self.bytes_down

    @property
    def training_rounds(self) -> int:
        return max(self.rounds_done, 1)

    @property
    def vs_full_model(self) -> float:
        return self.full_model_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def vs_dense_fast(self) -> float:
        return self.dense_fast_bytes / self.total_bytes if self.total_bytes else 0.0


def run_config(run: dict[str, Any], path: Path) -> dict[str, Any]:
    """The configuration a ``runs`` row holds; LogFormatError unless it is a JSON object."""
    try:
        config = json.loads(run["config"])
    except ValueError as exc:
        raise LogFormatError(f"{path}: the configuration of run {run['run_id']} is not JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise LogFormatError(f"{path}: the configuration of run {run['run_id']} is not a JSON object")
    return config


def parse_run_name(name: str) -> tuple[Path, str | None]:
    """``PATH`` or ``PATH#RUN_ID`` -> (the log file, the run id or None)."""
    path_text, _, run_id = name.partition("#")
    path = Path(path_text)
    if path.is_dir():
        path = path / LOG_FILENAME
    return path, run_id or None


class RunLog:
    """One run of a communication log, read only.

    Parameters
    ----------
    name : str
        ``PATH`` (a run directory or a ``commlog.sqlite``: its most recently
        started run) or ``PATH#RUN_ID``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.path, wanted = parse_run_name(name)
        self.db = open_log(self.path)
        try:
            self.run: dict[str, Any] = self._find_run(wanted)
            self.run_id: str = self.run["run_id"]
            check_values(self.db, self.path, self.run_id)
            self.config: dict[str, Any] = run_config(self.run, self.path)
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise LogFormatError(f"{self.path} cannot be read as a communication log: {exc}") from exc
        except (LookupError, ValueError):
            self.db.close()
            raise

    def _find_run(self, wanted: str | None) -> dict[str, Any]:
        """The row of the run ``wanted`` (None: the latest started), the log's tables checked first."""
        check_tables(self.db, self.path)
        if wanted is None:
            cursor = self.db.execute("SELECT * FROM runs ORDER BY started_at DESC LIMIT 1")
        else:
            cursor = self.db.execute("SELECT * FROM runs WHERE run_id = ?", (wanted,))
        row = cursor.fetchone()
        if row is None:
            known = [r[0] for r in self.db.execute("SELECT run_id FROM runs ORDER BY started_at")]
            what = f"run {wanted!r}" if wanted else "any run"
            raise RunNotFoundError(f"{self.path} holds no {what} (runs in it: {', '.join(known) or 'none'})")
        return dict(zip([c[0] for c in cursor.description], row))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def label(self) -> str:
        """A short name for tables and legends: the run directory's name."""
        return self.path.parent.name or self.run_id

    def rounds(self) -> list[RoundTotals]:
        """Every logged round, in order (round 0 is the start: the base's accuracy and the identity exchange)."""
        return read_round_totals(self.db, self.run_id)

    def summary(self, rounds: list[RoundTotals] | None = None) -> Summary:
        rounds = self.rounds() if rounds is None else rounds
        totals = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(status = 'rejected'), 0),"
            " COALESCE(SUM(CASE WHEN direction = 'up' THEN message_bytes END), 0),"
            " COALESCE(SUM(CASE WHEN direction = 'down' THEN message_bytes END), 0),"
            " COALESCE(SUM(message_bytes - payload_bytes + raw_bytes), 0), COALESCE(SUM(full_model_bytes), 0),"
            " AVG(CASE WHEN message_type = 'train' THEN client_cpu_s END), MAX(client_peak_rss_bytes),"
            " COALESCE(SUM(CASE WHEN message_type = ? THEN message_bytes END), 0),"
            " COUNT(DISTINCT CASE WHEN message_type = ? THEN node_id END),"
            " COALESCE(SUM(status = 'error' AND message_type != ?), 0), COALESCE(SUM(status = 'late'), 0),"
            " COALESCE(SUM(status = 'no-reply' AND message_type != ?), 0)"
            " FROM messages WHERE run_id = ?",
            (PROVISION_TYPE, PROVISION_TYPE, EVALUATE_TYPE, EVALUATE_TYPE, self.run_id),
        ).fetchone()
        evaluated = [r for r in rounds if r.accuracy is not None]
        on_clients = [r for r in rounds if r.client_accuracy is not None]
        trained = [r for r in evaluated if r.round > 0]
        best = max(trained, key=lambda r: r.accuracy or 0.0) if trained else None
        memory = [r.strategy_memory_bytes for r in rounds if r.strategy_memory_bytes is not None]
        fast = self.config.get("fast", {})
        _, merges = self.table("consolidations")
        return Summary(
            run_id=self.run_id,
            label=self.label,
            strategy=str(self.config.get("strategy", "fedavg")),
            codec_up=str(self.config.get("codec", "none")),
            codec_down=str(self.config.get("downstream_codec", "none")),
            fast_kind=str(fast.get("kind", "?")) if isinstance(fast, dict) else str(fast),
            clients=int(self.config.get("num_clients", 0)),
            rounds_planned=int(self.config.get("rounds", 0)),
            rounds_done=max((r.round for r in rounds), default=0),
            finished=self.run["finished_at"] is not None,
            messages=totals[0],
            rejected=totals[1],
            bytes_up=totals[2],
            bytes_down=totals[3],
            training_bytes_up=sum(r.bytes_up for r in rounds if r.round > 0),
            training_bytes_down=sum(r.bytes_down for r in rounds if r.round > 0),
            provisioning_bytes=totals[8],
            provisioned_nodes=totals[9],
            dense_fast_bytes=totals[4],
            full_model_bytes=totals[5],
            initial_accuracy=evaluated[0].accuracy if evaluated and evaluated[0].round == 0 else None,
            final_accuracy=evaluated[-1].accuracy if evaluated else None,
            best_accuracy=best.accuracy if best else None,
            best_round=best.round if best else None,
            final_client_accuracy=on_clients[-1].client_accuracy if on_clients else None,
            final_client_accuracy_p10=on_clients[-1].client_accuracy_p10 if on_clients else None,
            strategy_memory_bytes=max(memory) if memory else None,
            wall_time_s=self.wall_time_s(),
            client_cpu_s=totals[6],
            client_peak_rss_bytes=totals[7],
            final_state_digest=self.run["final_state_digest"],
            resumes=self.run["resumes"],
            errors=totals[10],
            late=totals[11],
            no_reply=totals[12],
            consolidations=len(merges),
            merge_bytes=sum(row[-1] for row in merges),
        )

    def clients(self) -> list[ClientStats]:
        """Per client: rounds sampled and accepted, rejections, bytes each way, the mean weight it was given."""
        rows = self.db.execute(
            """
            SELECT COALESCE(client, 'node ' || node_id) AS who,
                   SUM(direction = 'down' AND message_type = 'train'),
                   SUM(direction = 'up' AND message_type = 'train' AND status = 'ok'),
                   SUM(message_type = 'train' AND status IN ('rejected', 'error', 'no-reply')),
                   COALESCE(SUM(CASE WHEN direction = 'up' THEN message_bytes END), 0),
                   COALESCE(SUM(CASE WHEN direction = 'down' THEN message_bytes END), 0),
                   AVG(weight),
                   MAX(round),
                   AVG(CASE WHEN message_type = 'train' THEN client_cpu_s END),
                   MAX(client_peak_rss_bytes),
                   SUM(status = 'error' AND message_type != :evaluate),
                   SUM(status = 'late'),
                   SUM(status = 'no-reply' AND message_type != :evaluate)
            FROM messages WHERE run_id = :run GROUP BY who
            """,
            {"run": self.run_id, "evaluate": EVALUATE_TYPE},
        )
        stats = [ClientStats(*row) for row in rows]
        return sorted(stats, key=lambda s: natural_key(s.client))

    def participation(self) -> tuple[list[str], dict[str, set[int]], dict[str, set[int]]]:
        """Every client key, and per client the rounds it was sampled in and the rounds its update was accepted."""
        sampled: dict[str, set[int]] = {}
        accepted: dict[str, set[int]] = {}
        for who, server_round, direction, status, message_type in self.db.execute(
            "SELECT COALESCE(client, 'node ' || node_id), round, direction, status, message_type FROM messages"
            " WHERE run_id = ?",
            (self.run_id,),
        ):
            sampled.setdefault(who, set())
            accepted.setdefault(who, set())
            if message_type != "train":
                continue  # the identity exchange: the client exists, whether or not it is ever sampled
            if direction == "down":
                sampled[who].add(server_round)
            elif status == "ok":
                accepted[who].add(server_round)
        return sorted(sampled, key=natural_key), sampled, accepted

    def wall_time_s(self) -> float:
        """See :attr:`Summary.wall_time_s`."""
        end = self.run["finished_at"] or last_logged_at(self.db, self.run_id)
        columns, resumes = self.table("resumes")
        stopped = sum(resume[columns.index("resumed_at")] - resume[columns.index("stopped_at")] for resume in resumes)
        return float(end - self.run["started_at"] - stopped)

    def table(self, name: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Column names and rows of one of the log's tables, for this run only."""
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r}; choose one of {', '.join(TABLES)}")
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone():
            return [], []  # a table a log of an older schema does not have
        cursor = self.db.execute(f"SELECT * FROM {name} WHERE run_id = ?{TABLES[name]}", (self.run_id,))
        return [c[0] for c in cursor.description], [tuple(row) for row in cursor]


def bytes_to_reach(rounds: list[RoundTotals], target: float) -> tuple[int, int] | None:
    """(round, cumulative bytes) of the first evaluation at or above ``target`` accuracy, or None."""
    moved = 0
    for r in rounds:
        moved += r.bytes_up + r.bytes_down
        if r.round > 0 and r.accuracy is not None and r.accuracy >= target:
            return r.round, moved
    return None


def natural_key(text: str) -> list[Any]:
    """partition-2 before partition-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
