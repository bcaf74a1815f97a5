"""A reply is taken only as the answer to the message its node was sent, named by the id the grid gave that message:
a reply replayed from an earlier round, or one naming a forged id, is rejected and logged, on both backends."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from uuid import uuid4

import pytest
from flwr.app import Message, RecordDict

from fedslim.channel.matching import Exchange
from fedslim.channel.protocol import CONFIG_KEY, IDENTIFY_TYPE, SERVER_ROUND_KEY, TRAIN_TYPE, evaluation_content
from fedslim.client.app import app as client_app
from fedslim.commlog import LOG_FILENAME
from fedslim.config import RunConfig, parse_faults
from fedslim.server.evaluation import check_evaluations
from fedslim.server.loop import run_federation
from fedslim.server.nodes import ForwardingGrid
from fedslim.simulation.faults import FaultyGrid
from fedslim.simulation.inline import FIRST_NODE_ID, InlineGrid
from fedslim.simulation.simulate import simulate

REPLAY = "unexpected reply: a replay or forgery (it names message '"


def forge(reply: Message) -> Message:
    """``reply`` naming a message id of its own making."""
    reply.metadata.__dict__["_reply_to_message_id"] = str(uuid4())
    return reply


def train_round(messages: list[Message]) -> int | None:
    """The round of an exchange of train instructions (None for any other exchange)."""
    if not messages or messages[0].metadata.message_type != TRAIN_TYPE:
        return None
    return int(messages[0].content.config_records[CONFIG_KEY][SERVER_ROUND_KEY])  # type: ignore[arg-type]


class ReplayingGrid(ForwardingGrid):
    """Every train reply of round 1 is lost (so the fast state does not move) and replayed verbatim, ahead of the
    honest replies, in round 2; with ``forge_round``, the first reply of that round names a forged id."""

    def __init__(self, grid: ForwardingGrid | InlineGrid, forge_round: int | None = None) -> None:
        super().__init__(grid)  # type: ignore[arg-type]
        self.forge_round = forge_round
        self.captured: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        server_round = train_round(messages)
        if server_round == 1:
            self.captured = replies
            return []
        if server_round == 2:
            return [*self.captured, *replies]
        if server_round is not None and server_round == self.forge_round:
            return [forge(replies[0]), *replies[1:]]
        return replies


def rows(config: RunConfig, where: str, *args: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    query = f"SELECT round, message_type, status, reason FROM messages WHERE {where} ORDER BY id"
    found = db.execute(query, args).fetchall()
    db.close()
    return found


def replay_config(small_config: RunConfig) -> RunConfig:
    return replace(small_config, num_clients=4, fraction=1.0, rounds=3)


def test_a_round_one_reply_replayed_when_the_state_did_not_move_is_rejected(small_config: RunConfig) -> None:
    config = replay_config(small_config)
    lost = run_federation(
        LosingGrid(InlineGrid(client_app, 4)),  # type: ignore[arg-type]
        replace(config, out=f"{config.out}-lost"),
    )
    replayed = run_federation(ReplayingGrid(InlineGrid(client_app, 4)), config)  # type: ignore[arg-type]

    assert [(r.accepted, r.rejected) for r in replayed.rounds[1:]] == [(0, 4), (4, 4), (4, 0)]
    rejected = rows(config, "status = 'rejected'")
    assert [(r, kind) for r, kind, _, _ in rejected] == [(2, TRAIN_TYPE)] * 4
    for *_, reason in rejected:
        assert str(reason).startswith(REPLAY) and str(reason).endswith("in this round"), reason
    # The replays changed nothing: the run is the one whose round-1 replies were lost, bit for bit.
    assert replayed.final_state_digest == lost.final_state_digest
    assert [r.accuracy for r in replayed.rounds] == [r.accuracy for r in lost.rounds]


class LosingGrid(ForwardingGrid):
    """Every train reply of round 1 is lost."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        return [] if train_round(messages) == 1 else replies


def test_a_reply_naming_a_forged_message_id_is_rejected_and_its_instruction_is_unanswered(
    small_config: RunConfig,
) -> None:
    config = replay_config(small_config)
    result = run_federation(ReplayingGrid(InlineGrid(client_app, 4), forge_round=3), config)  # type: ignore[arg-type]

    assert [(r.accepted, r.rejected) for r in result.rounds[1:]] == [(0, 4), (4, 4), (3, 2)]
    ((server_round, kind, status, reason),) = rows(config, "round = 3 AND status = 'rejected'")
    assert (server_round, kind, status) == (3, TRAIN_TYPE, "rejected")
    assert str(reason).startswith(REPLAY) and "...', not the one node 1000 was sent) in this round" in str(reason)
    # The forged reply answers nothing: its node's instruction is logged as unanswered.
    assert [row[:3] for row in rows(config, "round = 3 AND status = 'no-reply'")] == [(3, TRAIN_TYPE, "no-reply")]


class ForgingGrid(ForwardingGrid):
    """The first reply of every exchange but the train rounds names a forged message id."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if train_round(messages) is not None or not replies:
            return replies
        return [forge(replies[0]), *replies[1:]]


def test_identity_evaluation_and_final_sync_replies_naming_a_forged_id_are_rejected(small_config: RunConfig) -> None:
    config = replace(small_config, num_clients=4, fraction=1.0, rounds=2, client_holdout=0.2, final_sync=True)
    result = run_federation(ForgingGrid(InlineGrid(client_app, 4)), config)  # type: ignore[arg-type]

    forged = rows(config, "reason LIKE ?", f"{REPLAY}%")
    where = {"query": "the identity exchange", "evaluate": "this round's evaluation", "query.sync": "the final sync"}
    # Round 0's identity reply, each round's evaluation, the final sync. The node whose identity reply was forged
    # is left out of round 1, asked again with its train instructions, and takes part from round 2.
    assert [(r, kind) for r, kind, _, _ in forged] == [
        (0, IDENTIFY_TYPE), (0, "evaluate"), (1, "evaluate"), (2, "evaluate"), (2, "query.sync")
    ]  # fmt: skip
    for _, kind, status, reason in forged:
        assert status == "rejected" and str(reason).endswith(f"was sent) in {where[str(kind)]}"), reason
    assert [r.sampled for r in result.rounds[1:]] == [3, 4]


def test_an_exchange_takes_one_answer_per_node_naming_its_message() -> None:
    sent = [Message(RecordDict(), dst_node_id=node, message_type="evaluate") for node in (1, 2)]
    for message in sent:
        message.metadata.__dict__["_message_id"] = str(uuid4())
    exchange = Exchange.of(sent)
    answer = Message(evaluation_content({"examples": 10, "correct": 5, "loss": 0.5}), reply_to=sent[0])
    assert exchange.problem(forge(Message(RecordDict(), reply_to=sent[1]))).startswith("a replay or forgery")
    assert exchange.problem(
        Message(RecordDict(), reply_to=Message(RecordDict(), dst_node_id=1, message_type="evaluate"))
    ) == ("a replay or forgery (it names no message, not the one node 1 was sent)")
    assert exchange.problem(answer) is None
    assert exchange.problem(answer) == "a second reply"
    assert (
        exchange.problem(Message(RecordDict(), reply_to=Message(RecordDict(), dst_node_id=3, message_type="evaluate")))
        == "not asked for"
    )
    assert exchange.problem(Message(RecordDict(), reply_to=sent[1])) is None

    ids = {message.metadata.dst_node_id: message.metadata.message_id for message in sent}
    forged = forge(Message(evaluation_content({"examples": 10, "correct": 5, "loss": 0.5}), reply_to=sent[0]))
    checked = check_evaluations([forged, answer], {1: "partition-1"}, {}, 0.2, ids)
    assert checked[0][:2] == (None, None) and str(checked[0][2]).startswith(REPLAY)
    assert checked[1][0] == "partition-1" and checked[1][1] is not None and checked[1][1].accuracy == 0.5


def test_on_flowers_engine_a_replayed_and_a_forged_reply_are_rejected(
    small_config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedslim.simulation.faults as faults

    monkeypatch.setattr(faults, "fault_wrapper", lambda config: lambda grid: ReplayingGrid(grid, forge_round=3))
    config = replay_config(small_config)
    result = simulate(config, backend="flower")

    assert [(r.accepted, r.rejected) for r in result.rounds[1:]] == [(0, 4), (4, 4), (3, 2)]
    rejected = rows(config, "status = 'rejected'")
    assert [r for r, *_ in rejected] == [2] * 4 + [3]
    assert all(str(reason).startswith(REPLAY) for *_, reason in rejected), rejected


class MisdirectedLateGrid(ForwardingGrid):
    """Late replies pulled after their round come from another node than the one their instruction went to."""

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            reply.metadata.__dict__["_src_node_id"] = FIRST_NODE_ID + (reply.metadata.src_node_id + 1) % 4
        return replies


def test_a_late_reply_is_taken_only_from_the_node_its_instruction_went_to(small_config: RunConfig) -> None:
    config = replace(small_config, num_clients=4, fraction=1.0, rounds=3, faults="late=0.5")
    grid = MisdirectedLateGrid(FaultyGrid(InlineGrid(client_app, 4), parse_faults(config.faults), config.seed))  # type: ignore[arg-type]
    run_federation(grid, config)

    pulled = rows(config, "message_type = 'train' AND direction = 'up' AND round > 1 AND reason LIKE '%names%'")
    assert pulled and not rows(config, "status = 'late'")
    for _, _, status, reason in pulled:
        assert status == "rejected", reason
        assert re.fullmatch(
            r"unexpected reply: it names message '[0-9a-f-]{16}\.\.\.', no unanswered instruction "
            r"to node 100[0-3]",
            str(reason),
        ), reason
