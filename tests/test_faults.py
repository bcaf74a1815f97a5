"""No fault aborts a run: lost instructions, clients that raise, late replies, nodes silent at identification.

Each train instruction gets exactly one outcome row (ok, rejected, error, no-reply); a reply pulled after its
round's timeout is one more row, late, under the round it arrived in.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedslim.channel.protocol import CONFIG_KEY, SERVER_ROUND_KEY, TRAIN_TYPE
from fedslim.cli import main
from fedslim.client.app import app as client_app
from fedslim.commlog import LOG_FILENAME
from fedslim.config import ConfigError, FaultShares, RunConfig, parse_faults
from fedslim.server.loop import run_federation
from fedslim.simulation.faults import FaultyGrid
from fedslim.simulation.inline import FIRST_NODE_ID, InlineGrid
from fedslim.simulation.simulate import simulate


def _outcomes(db: sqlite3.Connection) -> dict[tuple[int, str], list[str]]:
    """The statuses of each train instruction's rows (late rows apart), by (round, node)."""
    outcomes: dict[tuple[int, str], list[str]] = {}
    for server_round, node in db.execute(
        "SELECT round, node_id FROM messages WHERE message_type = 'train' AND direction = 'down'"
    ):
        outcomes[(server_round, node)] = []
    for server_round, node, status in db.execute(
        "SELECT round, node_id, status FROM messages WHERE message_type = 'train' AND direction = 'up'"
        " AND status != 'late'"
    ):
        outcomes.setdefault((server_round, node), []).append(status)
    return outcomes


def test_a_third_of_the_sampled_clients_failing_every_round_ends_no_round(small_config: RunConfig) -> None:
    config = replace(small_config, num_clients=10, fraction=1.0, rounds=8, faults="drop=0.1,error=0.1,late=0.1")
    result = simulate(config, backend="inline")

    assert [r.round for r in result.rounds] == list(range(9))
    assert result.rounds[-1].accuracy > result.rounds[0].accuracy + 0.05
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    outcomes = _outcomes(db)
    assert len(outcomes) == 8 * 10 and all(len(statuses) == 1 for statuses in outcomes.values()), outcomes
    counts = dict(db.execute("SELECT status, COUNT(*) FROM messages WHERE direction = 'up' GROUP BY 1").fetchall())
    assert counts.get("error", 0) > 0 and counts.get("no-reply", 0) > 0 and counts.get("late", 0) > 0, counts
    assert counts["ok"] > 0.5 * 80
    # Every late reply answers an instruction left without a reply in an earlier round, and is discarded.
    late = db.execute("SELECT round, node_id, reason FROM messages WHERE status = 'late'").fetchall()
    for server_round, node, reason in late:
        answered = int(reason.split("round ")[1].split("'")[0])
        assert answered < server_round and outcomes[(answered, node)] == ["no-reply"], (server_round, node, reason)
        assert "discarded" in reason
    assert all(r.accepted + r.rejected == r.sampled for r in result.rounds[1:])
    assert sum(r.late for r in result.rounds) == len(late)
    # A late client's update is never aggregated: only accepted replies have weights.
    assert db.execute("SELECT COUNT(*) FROM messages WHERE weight IS NOT NULL AND status != 'ok'").fetchone() == (0,)


def _train(node: int, server_round: int) -> Message:
    task = ConfigRecord({SERVER_ROUND_KEY: server_round})
    return Message(RecordDict({CONFIG_KEY: task}), dst_node_id=node, message_type=TRAIN_TYPE)


def test_faults_are_seeded_and_spare_every_message_but_train_instructions() -> None:
    shares = FaultShares(drop=0.3, error=0.3, late=0.3)
    grids = [FaultyGrid(InlineGrid(client_app, 1), shares, seed) for seed in (3, 3, 4)]
    draws = [[grid.fault(_train(node, r)) for node in range(20) for r in (1, 2)] for grid in grids]
    assert draws[0] == draws[1] != draws[2]
    assert {"drop", "error", "late", None} == set(draws[0])
    query = Message(RecordDict(), dst_node_id=7, message_type="query")
    assert grids[0].fault(query) is None


def test_an_inline_clientapp_that_raises_does_not_end_the_run(
    small_config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = replace(small_config, num_clients=4, fraction=1.0, rounds=2)
    broken = FIRST_NODE_ID + 2

    def flaky(message: Message, context: Context) -> Message:
        if message.metadata.dst_node_id == broken and message.metadata.message_type == "train":
            raise ZeroDivisionError("division by zero")
        return client_app(message, context)

    result = run_federation(InlineGrid(flaky, config.num_clients), config)  # type: ignore[arg-type]

    assert [(r.sampled, r.accepted, r.rejected) for r in result.rounds[1:]] == [(4, 3, 1)] * 2
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    rows = db.execute(
        "SELECT round, status, reason FROM messages WHERE node_id = ? AND direction = 'up' AND round > 0",
        (str(broken),),
    ).fetchall()
    code = int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
    reason = f"client error {code}: <class 'ZeroDivisionError'>:<'division by zero'>"
    assert rows == [(1, "error", reason), (2, "error", reason)]


class SilentAtFirst(InlineGrid):
    """Node ``silent`` answers no identity query before round ``until``, and nothing it is sent before then."""

    def __init__(self, num_nodes: int, silent: int, until: int) -> None:
        super().__init__(client_app, num_nodes)
        self.silent = silent
        self.until = until
        self.round = 0
        self.queried: list[int] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for message in messages:
            if message.metadata.message_type == "train":
                self.round = int(message.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        to_silent = [m for m in messages if m.metadata.dst_node_id == self.silent]
        self.queried += [self.round] * len(to_silent)
        if self.round < self.until:
            messages = [m for m in messages if m.metadata.dst_node_id != self.silent]
        return super().send_and_receive(messages, timeout=timeout)


def test_a_node_silent_at_identification_is_left_out_and_joins_later(small_config: RunConfig) -> None:
    config = replace(small_config, num_clients=4, fraction=1.0, rounds=6, strategy="fedvarp")
    silent = FIRST_NODE_ID + 1
    grid = SilentAtFirst(config.num_clients, silent, until=3)
    result = run_federation(grid, config)  # type: ignore[arg-type]

    assert [r.sampled for r in result.rounds[1:]] == [3, 3, 3, 4, 4, 4]  # asked in rounds 1 and 3: joins in 4
    assert grid.queried == [0, 1, 3, 4, 5, 6]  # backoff: 1 round after the silent round 0, then 2 after round 1
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    rows = db.execute(
        "SELECT round, direction, message_type, status, client FROM messages WHERE node_id = ? AND round <= 3"
        " ORDER BY id",
        (str(silent),),
    ).fetchall()
    assert rows == [
        (0, "down", "query", "ok", None),
        (0, "up", "query", "no-reply", None),
        (1, "down", "query", "ok", None),
        (1, "up", "query", "no-reply", None),
        (3, "down", "query", "ok", "partition-1"),
        (3, "up", "query", "ok", "partition-1"),
    ]
    assert result.rounds[-1].accuracy > result.rounds[0].accuracy


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("drop=0.2,error=1.5", "--faults 'drop=0.2,error=1.5': error must be a share in [0, 1], got '1.5'"),
        ("crash=0.1", "--faults 'crash=0.1': unknown fault 'crash'"),
        ("drop=0.6,late=0.6", "--faults 'drop=0.6,late=0.6': the shares add up to 1.2, more than 1"),
        ("drop=x", "drop must be a share in [0, 1], got 'x'"),
        ("late=0.1,late=0.2", "late is given twice"),
    ],
)
def test_a_bad_fault_spec_is_a_one_line_error(
    spec: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_faults(spec)
    with pytest.raises(SystemExit):
        main(["simulate", "--faults", spec, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_the_fault_spec_and_round_timeout_come_from_the_cli_and_the_run_config() -> None:
    assert parse_faults("drop=0.2, error=0.1,late=0.1") == FaultShares(0.2, 0.1, 0.1)
    assert not parse_faults("")
    config = RunConfig.from_flat({"faults": "late=0.5", "round-timeout": 3.0})
    assert (config.faults, config.round_timeout) == ("late=0.5", 3.0)


STRAGGLER_SLEEP_S = 14.0


def test_a_real_straggler_on_flowers_engine_is_logged_and_the_run_goes_on(
    small_config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower's engine, a ClientApp that sleeps past the round timeout in round 1.

    Flower's Ray backend delivers no other reply while one ClientApp runs past
    the timeout (seen: the next round gets none in time, and Flower logs
    "duplicate reply"); whatever the timing, every instruction has its outcome
    row, the late replies are logged, and every round ends.
    """
    from flwr.clientapp import ClientApp

    import fedslim.client.app as client_module

    real_app = client_module.app
    straggling = ClientApp()

    @straggling.train()
    def train(msg: Message, context: Context) -> Message:
        if msg.content.config_records[CONFIG_KEY][SERVER_ROUND_KEY] == 1 and context.node_config["partition-id"] == 0:
            time.sleep(STRAGGLER_SLEEP_S)
        return real_app(msg, context)

    @straggling.query()
    def query(msg: Message, context: Context) -> Message:
        return real_app(msg, context)

    monkeypatch.setattr(client_module, "app", straggling)
    config = replace(small_config, num_clients=4, fraction=1.0, rounds=4, round_timeout=STRAGGLER_SLEEP_S / 2)
    result = simulate(config, backend="flower")

    assert [r.round for r in result.rounds] == list(range(5))
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    outcomes = _outcomes(db)
    assert len(outcomes) == 4 * 4 and all(len(statuses) == 1 for statuses in outcomes.values()), outcomes
    straggler = db.execute(
        "SELECT status FROM messages WHERE round = 1 AND client = 'partition-0' AND direction = 'up'"
    ).fetchall()
    assert straggler == [("no-reply",)]
    late = db.execute("SELECT COUNT(*) FROM messages WHERE status = 'late' AND reason LIKE '%round 1%'").fetchone()
    assert late[0] >= 1  # the straggler's reply, pulled in a later round and discarded
