"""The round loop with an in-process grid: bad replies are rejected and logged, the round goes on."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
from fakes import ListGrid
from flwr.app import Array, Context, Error, Message, RecordDict

from fedslim.client.app import app as client_app
from fedslim.commlog import LOG_FILENAME
from fedslim.config import RunConfig
from fedslim.server.loop import run_federation
from fedslim.server.nodes import OrderedGrid
from fedslim.strategies.fedavg import FastFedAvg

NAN_NODE, ERROR_NODE = 102, 103


class InProcessGrid:
    """Delivers each message straight to the ClientApp; two nodes misbehave."""

    def __init__(self, num_nodes: int) -> None:
        self.node_ids = [100 + i for i in range(num_nodes)]

    def get_node_ids(self) -> list[int]:
        return self.node_ids

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node == ERROR_NODE and message.metadata.message_type == "train":
                replies.append(Message(Error(code=7, reason="device ran out of memory"), reply_to=message))
                continue
            context = Context(
                run_id=1, node_id=node, node_config={"partition-id": node - 100}, state=RecordDict(), run_config={}
            )
            reply = client_app(message, context)
            if node == NAN_NODE and message.metadata.message_type == "train":
                delta = reply.content.array_records["delta"]
                name = next(iter(delta.keys()))
                delta[name] = Array(np.full(delta[name].shape, np.nan, np.float32))
            replies.append(reply)
        return replies


def test_bad_replies_are_rejected_logged_and_the_round_goes_on(small_config: RunConfig) -> None:
    config = replace(small_config, fraction=1.0, rounds=2)
    result = run_federation(InProcessGrid(config.num_clients), config)  # type: ignore[arg-type]

    assert [(r.sampled, r.accepted) for r in result.rounds[1:]] == [(4, 2), (4, 2)]
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    rejected = dict(
        db.execute("SELECT node_id, reason FROM messages WHERE status = 'rejected' AND round = 1").fetchall()
    )
    assert set(rejected) == {str(NAN_NODE), str(ERROR_NODE)}
    assert "NaN" in rejected[str(NAN_NODE)]
    assert "device ran out of memory" in rejected[str(ERROR_NODE)]
    assert result.rounds[-1].accuracy is not None and np.isfinite(result.rounds[-1].loss)


def test_identity_exchange_is_logged_as_round_zero(small_config: RunConfig) -> None:
    config = replace(small_config, fraction=1.0, rounds=1)
    run_federation(InProcessGrid(config.num_clients), config)  # type: ignore[arg-type]
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    rows = db.execute(
        "SELECT direction, message_type, COUNT(*), SUM(payload_bytes), SUM(status = 'ok') FROM messages "
        "WHERE round = 0 GROUP BY direction"
    ).fetchall()
    assert sorted(rows) == [("down", "query", 4, 0, 4), ("up", "query", 4, 0, 4)]


def test_sampling_follows_client_keys_not_random_node_ids() -> None:
    def sampled_partitions(node_of_partition: dict[int, int]) -> list[list[int]]:
        keys = {node: f"partition-{p}" for p, node in node_of_partition.items()}
        grid = OrderedGrid(ListGrid(sorted(keys)), keys)  # type: ignore[arg-type]
        partition_of = {node: p for p, node in node_of_partition.items()}
        strategy = FastFedAvg(fraction_train=0.25, seed=3)
        return [sorted(partition_of[n] for n in strategy.sample_nodes(r, grid.get_node_ids())) for r in range(1, 6)]

    rng = np.random.default_rng(0)
    first = dict(enumerate(rng.integers(1, 2**63, 12).tolist()))
    second = dict(enumerate(rng.integers(1, 2**63, 12).tolist()))
    assert sampled_partitions(first) == sampled_partitions(second)


def test_ordered_grid_sorts_keys_naturally_and_lists_unknown_nodes_last() -> None:
    keys = {5: "partition-10", 6: "partition-9", 7: "partition-0"}
    grid = OrderedGrid(ListGrid([9, 5, 6, 7, 3]), keys)  # type: ignore[arg-type]
    assert grid.get_node_ids() == [7, 6, 5, 3, 9]
