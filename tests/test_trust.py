"""A client's reply is a claim: the server takes it only as the answer to what it asked, and checks what it says."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np
from flwr.app import Message, RecordDict

from fedslim.channel.protocol import DELTA_KEY, NUM_EXAMPLES_KEY, TRAIN_TYPE, UPDATE_KEY, update_blob
from fedslim.client.app import app as client_app
from fedslim.codecs import decode_update, encode_update, parse_codec
from fedslim.commlog import LOG_FILENAME
from fedslim.config import RunConfig
from fedslim.server.loop import run_federation
from fedslim.simulation.inline import FIRST_NODE_ID, InlineGrid
from fedslim.strategies import FedVARP
from fedslim.task import prepared_base

Tamper = Callable[[Message, list[Message]], list[Message]]


class TamperingGrid(InlineGrid):
    """The in-process grid, with a hook that may alter, add or drop each round's train replies."""

    def __init__(self, num_nodes: int, tamper: Tamper) -> None:
        super().__init__(client_app, num_nodes)
        self.tamper = tamper

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if messages and messages[0].metadata.message_type == TRAIN_TYPE:
            return self.tamper(messages[0], replies)
        return replies


def rejected_rows(config: RunConfig) -> list[tuple[int, str | None, str]]:
    db = sqlite3.connect(f"{config.out}/{LOG_FILENAME}")
    rows = db.execute("SELECT round, client, reason FROM messages WHERE status = 'rejected' ORDER BY id").fetchall()
    db.close()
    return rows


def as_reply_from(node: int, reply: Message) -> Message:
    """A copy of ``reply``'s content sent by ``node`` (which may not have been asked)."""
    return Message(
        RecordDict(dict(reply.content)), reply_to=Message(RecordDict(), dst_node_id=node, message_type=TRAIN_TYPE)
    )


def test_replies_nobody_asked_for_are_rejected_and_fedvarp_goes_on(small_config: RunConfig) -> None:
    config = replace(small_config, num_clients=4, rounds=3, fraction=0.5, local_steps=5, lr=0.01)

    def tamper(_: Message, replies: list[Message]) -> list[Message]:
        asked = {r.metadata.src_node_id for r in replies}
        stranger = next(n for n in range(FIRST_NODE_ID, FIRST_NODE_ID + 4) if n not in asked)
        # A second reply from a sampled node, one from a node not sampled this round, one from an unknown node id.
        return [*replies, replies[0], as_reply_from(stranger, replies[0]), as_reply_from(424242, replies[0])]

    result = run_federation(TamperingGrid(4, tamper), config, FedVARP(fraction_train=0.5))  # type: ignore[arg-type]
    assert [(r.sampled, r.accepted, r.rejected) for r in result.rounds[1:]] == [(2, 2, 3)] * 3
    reasons = [reason for _, _, reason in rejected_rows(config)]
    assert reasons.count("unexpected reply: a second reply in this round") == 3
    assert reasons.count("unexpected reply: not asked for in this round") == 6
    assert np.isfinite(result.rounds[-1].loss) and result.rounds[-1].loss < result.rounds[0].loss


def test_a_client_claiming_more_examples_than_it_declared_is_rejected(small_config: RunConfig) -> None:
    config = replace(small_config, num_clients=4, rounds=2, fraction=1.0)
    liar = FIRST_NODE_ID + 1

    def tamper(_: Message, replies: list[Message]) -> list[Message]:
        for reply in replies:
            if reply.metadata.src_node_id == liar:
                reply.content.config_records[DELTA_KEY][NUM_EXAMPLES_KEY] = 10**12
        return replies

    honest = run_federation(TamperingGrid(4, lambda _, replies: replies), replace(config, out=f"{config.out}-honest"))
    lied = run_federation(TamperingGrid(4, tamper), config)  # type: ignore[arg-type]
    ((_, client, reason), (_, _, second)) = rejected_rows(config)
    assert client == "partition-1" and reason.startswith("num-examples 1,000,000,000,000 is more than the")
    assert reason.endswith("training examples partition-1 declared when it joined") and second == reason
    assert [(r.accepted, r.rejected) for r in lied.rounds[1:]] == [(3, 1)] * 2
    assert lied.rounds[-1].accuracy > 0.5 * honest.rounds[-1].accuracy


def test_an_outlier_in_round_one_of_a_small_federation_is_screened(small_config: RunConfig) -> None:
    config = replace(small_config, num_clients=4, rounds=2, fraction=0.5)
    shapes = prepared_base(config).build(config.fast).fast_shapes()

    def blow_up(_: Message, replies: list[Message]) -> list[Message]:
        reply = replies[0]
        update = decode_update(update_blob(reply.content), shapes)
        huge = {name: value * 1e4 for name, value in update.tensors.items()}
        blob = encode_update(
            huge,
            config.uplink,
            kind=update.kind,
            base_fingerprint=update.base_fingerprint,
            state_version=update.state_version,
        ).blob
        reply.content.config_records[DELTA_KEY][UPDATE_KEY] = blob
        return replies

    result = run_federation(TamperingGrid(4, blow_up), config)  # type: ignore[arg-type]
    rows = rejected_rows(config)
    assert [r for r, _, _ in rows] == [1, 2]  # two updates per round: the smaller one is the reference
    for *_, reason in rows:
        assert reason.startswith("update too large: ") and "per root local step" in reason
    assert np.isfinite(result.rounds[-1].loss) and result.rounds[-1].loss < 2 * result.rounds[0].loss


def test_an_update_the_runs_codec_never_sends_is_rejected_before_it_is_decoded(small_config: RunConfig) -> None:
    config = replace(small_config, num_clients=4, rounds=1, fraction=0.5)  # codec none: dense float32
    shapes = prepared_base(config).build(config.fast).fast_shapes()

    def as_factors(_: Message, replies: list[Message]) -> list[Message]:
        reply = replies[0]
        update = decode_update(update_blob(reply.content), shapes)
        blob = encode_update(
            update.tensors,
            parse_codec("powersgd:1"),
            kind=update.kind,
            base_fingerprint=update.base_fingerprint,
            state_version=update.state_version,
        ).blob
        reply.content.config_records[DELTA_KEY][UPDATE_KEY] = blob
        return replies

    result = run_federation(TamperingGrid(4, as_factors), config)  # type: ignore[arg-type]
    ((server_round, _, reason),) = rejected_rows(config)
    assert server_round == 1 and reason.startswith("malformed update: tensor ")
    assert reason.endswith(" comes as rank-1 factors; codec none sends no low-rank factors")
    assert [(r.accepted, r.rejected) for r in result.rounds[1:]] == [(1, 1)]
