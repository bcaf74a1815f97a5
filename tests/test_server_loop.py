"""The round loop with an in-process grid: every kind of bad update is rejected and logged, the round goes on.

Also the size screen: a finite update from a diverged local run is rejected before any strategy stores it.
"""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fakes import ListGrid
from flwr.app import Context, Error, Message, RecordDict

import fedslim.client.app
from fedslim.channel.downlink import state_digest
from fedslim.channel.protocol import (
    DELTA_KEY,
    FINAL_SYNC_TYPE,
    REPLICA_META_KEY,
    REPLICA_RECORD,
    REPLICA_STATE_KEY,
    UPDATE_KEY,
    update_blob,
)
from fedslim.client.app import app as client_app
from fedslim.codecs.layouts import encode_varints
from fedslim.commlog import LOG_FILENAME
from fedslim.config import RunConfig
from fedslim.protos.fedslim.v1 import update_pb2 as pb
from fedslim.server.loop import run_federation
from fedslim.server.nodes import OrderedGrid
from fedslim.simulation.inline import FIRST_NODE_ID, InlineGrid
from fedslim.strategies.fedavg import FastFedAvg


def _reencode(blob: bytes, edit: Callable[[pb.Envelope, pb.FastUpdate], None]) -> bytes:
    """Open a (zlib-compressed) update blob, let ``edit`` change it, and close it again."""
    envelope = pb.Envelope.FromString(blob)
    update = pb.FastUpdate.FromString(zlib.decompress(envelope.payload))
    edit(envelope, update)
    raw = update.SerializeToString()
    envelope.raw_size, envelope.payload, envelope.crc32 = len(raw), zlib.compress(raw), zlib.crc32(raw)
    return envelope.SerializeToString()


def _set(path: str, value: object) -> Callable[[pb.Envelope, pb.FastUpdate], None]:
    def edit(envelope: pb.Envelope, update: pb.FastUpdate) -> None:
        *parents, leaf = path.split(".")
        target: object = update.tensors[0]
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, value)

    return edit


def _bomb(blob: bytes) -> bytes:
    raw = bytes(50_000_000)
    return pb.Envelope(lossless=pb.LOSSLESS_ZLIB, raw_size=len(raw), payload=zlib.compress(raw)).SerializeToString()


def _lying_bomb(blob: bytes) -> bytes:
    # Small enough for the codec's decode budget (a 4.9 KB blob): only inflating it shows the lie.
    return pb.Envelope(
        lossless=pb.LOSSLESS_ZLIB, raw_size=100, payload=zlib.compress(bytes(5_000_000))
    ).SerializeToString()


def _unknown_encoding(envelope: pb.Envelope, update: pb.FastUpdate) -> None:
    update.tensors[0].ClearField("sparse")


def _index_out_of_range(envelope: pb.Envelope, update: pb.FastUpdate) -> None:
    sparse = update.tensors[0].sparse
    gaps = [0] * int(sparse.nnz)
    gaps[-1] = 10**9
    sparse.gaps_varint = encode_varints(np.array(gaps))


# How each misbehaving node spoils its reply; the healthy ones are those not listed.
SPOILERS: dict[int, tuple[Callable[[bytes], bytes], str]] = {
    101: (lambda b: b[: len(b) // 2], "corrupt"),
    102: (lambda b: b[: len(b) // 2] + bytes(8) + b[len(b) // 2 + 8 :], "corrupt"),
    103: (lambda b: b"\xff" * 40, "corrupt"),
    104: (lambda b: _reencode(b, _unknown_encoding), "no known encoding"),
    105: (lambda b: _reencode(b, lambda e, u: setattr(e, "lossless", 9)), "unknown lossless stage 9"),
    106: (lambda b: _reencode(b, lambda e, u: u.tensors[0].shape.append(1)), "shape"),
    107: (lambda b: _reencode(b, _index_out_of_range), "out of range"),
    108: (lambda b: _reencode(b, _set("sparse.values.quantized.scale", float("nan"))), "non-finite"),
    109: (_bomb, "above the"),
    110: (_lying_bomb, "inflates past"),
    111: (lambda b: _reencode(b, lambda e, u: setattr(u, "base_fingerprint", "f" * 64)), "wrong base fingerprint"),
    112: (lambda b: _reencode(b, lambda e, u: setattr(u, "state_version", u.state_version + 7)), "stale update"),
}
ERROR_NODE = 113


class InProcessGrid:
    """Delivers each message straight to the ClientApp, keeping one Flower context per node as a SuperNode does."""

    def __init__(self, num_nodes: int, spoilers: dict[int, tuple[Callable[[bytes], bytes], str]] | None = None) -> None:
        self.node_ids = [100 + i for i in range(num_nodes)]
        self.spoilers = spoilers or {}
        self.contexts = {
            node: Context(
                run_id=1, node_id=node, node_config={"partition-id": node - 100}, state=RecordDict(), run_config={}
            )
            for node in self.node_ids
        }
        self.downlinks: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return self.node_ids

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            is_train = message.metadata.message_type == "train"
            if is_train:
                self.downlinks.append(message)
            if node == ERROR_NODE and is_train:
                replies.append(Message(Error(code=7, reason="device ran out of memory"), reply_to=message))
                continue
            reply = client_app(message, self.contexts[node])
            if node in self.spoilers and is_train and not reply.has_error():
                spoil, _ = self.spoilers[node]
                reply.content.config_records[DELTA_KEY][UPDATE_KEY] = spoil(update_blob(reply.content))
            replies.append(reply)
        return replies


def test_each_kind_of_bad_update_is_rejected_logged_and_the_round_goes_on(
    small_config: RunConfig, caplog: pytest.LogCaptureFixture
) -> None:
    config = replace(small_config, num_clients=16, fraction=1.0, rounds=2, codec="topk:0.3+q8+zlib")
    result = run_federation(InProcessGrid(config.num_clients, SPOILERS), config)  # type: ignore[arg-type]

    bad = set(SPOILERS) | {ERROR_NODE}
    assert [(r.sampled, r.accepted) for r in result.rounds[1:]] == [(16, 16 - len(bad))] * 2
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    for server_round in (1, 2):
        rejected = dict(
            db.execute(
                "SELECT node_id, reason FROM messages WHERE status IN ('rejected', 'error') AND round = ?",
                (server_round,),
            ).fetchall()
        )
        assert set(rejected) == {str(node) for node in bad}
        errors = db.execute("SELECT node_id FROM messages WHERE status = 'error' AND round = ?", (server_round,))
        assert errors.fetchall() == [(str(ERROR_NODE),)]  # the client's own error, not the server's rejection
        for node, (_, reason) in SPOILERS.items():
            assert reason in rejected[str(node)], (node, rejected[str(node)])
            assert any(
                f"rejected update from node {node}: " in r.getMessage() and reason in r.getMessage()
                for r in caplog.records
            )
        assert "device ran out of memory" in rejected[str(ERROR_NODE)]
    assert np.isfinite(result.rounds[-1].loss) and result.rounds[-1].accuracy > result.rounds[0].accuracy


def test_replicas_stay_bit_identical_with_compressed_downstream(small_config: RunConfig) -> None:
    config = replace(
        small_config, num_clients=6, fraction=0.5, rounds=6, codec="topk:0.2+q4", downstream_codec="topk:0.1+q8"
    )
    grid = InProcessGrid(config.num_clients)
    result = run_federation(grid, config)  # type: ignore[arg-type]

    # Every client accepted every round: each one's replica matched the server's digest after syncing.
    assert all(r.accepted == r.sampled == 3 for r in result.rounds[1:])
    last = grid.downlinks[-1].content.config_records["config"]
    current = []
    for context in grid.contexts.values():
        meta = context.state.config_records[REPLICA_META_KEY]
        if meta["version"] == last["replica-version"]:
            current.append({n: a.numpy() for n, a in context.state.array_records[REPLICA_STATE_KEY].items()})
    assert len(current) == 3 and last["replica-version"] >= 5
    assert all(state_digest(state) == last["replica-digest"] for state in current)
    for state in current[1:]:
        assert all(np.array_equal(state[n].view(np.uint32), current[0][n].view(np.uint32)) for n in state)
    # Clients that missed rounds got several steps in one message, or the full state.
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    downlink_payloads = [
        p for (p,) in db.execute("SELECT payload_bytes FROM messages WHERE direction='down' AND round > 0")
    ]
    assert len(set(downlink_payloads)) > 2


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
        strategy = FastFedAvg(fraction_train=0.25, seed=3)
        return [[int(c.split("-")[1]) for c in strategy.sample(r, grid.clients())] for r in range(1, 6)]

    rng = np.random.default_rng(0)
    first = dict(enumerate(rng.integers(1, 2**63, 12).tolist()))
    second = dict(enumerate(rng.integers(1, 2**63, 12).tolist()))
    assert sampled_partitions(first) == sampled_partitions(second)


def test_ordered_grid_sorts_keys_naturally_and_lists_unknown_nodes_last() -> None:
    keys = {5: "partition-10", 6: "partition-9", 7: "partition-0"}
    grid = OrderedGrid(ListGrid([9, 5, 6, 7, 3]), keys)  # type: ignore[arg-type]
    assert grid.get_node_ids() == [7, 6, 5, 3, 9]


class TamperingGrid(InlineGrid):
    """Node ``liar`` answers the final sync with a digest that is not the server's."""

    def __init__(self, num_nodes: int, liar: int) -> None:
        super().__init__(client_app, num_nodes)
        self.liar = liar

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.message_type == FINAL_SYNC_TYPE and reply.metadata.src_node_id == self.liar:
                reply.content.config_records[REPLICA_RECORD]["digest"] = "0" * 32
        return replies


def test_final_sync_leaves_every_node_holding_the_exact_final_state(small_config: RunConfig) -> None:
    config = replace(
        small_config,
        num_clients=5,
        fraction=0.4,
        rounds=3,
        codec="topk:0.3+q8",
        downstream_codec="topk:0.1+q4",  # lossy: the replica alone would trail the exact state
        final_sync=True,
    )
    liar = FIRST_NODE_ID + 4
    grid = TamperingGrid(config.num_clients, liar)
    result = run_federation(grid, config)  # type: ignore[arg-type]
    for context in grid.contexts.values():
        held = {name: array.numpy() for name, array in context.state.array_records[REPLICA_STATE_KEY].items()}
        assert set(held) == set(result.fast_state)
        assert all(np.array_equal(held[name], result.fast_state[name]) for name in held)
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    rows = db.execute(
        "SELECT direction, node_id, status, reason, codec FROM messages WHERE message_type = ? AND round = 3",
        (FINAL_SYNC_TYPE,),
    ).fetchall()
    assert sorted(direction for direction, *_ in rows) == ["down"] * 5 + ["up"] * 5
    assert {codec for direction, _, _, _, codec in rows if direction == "down"} == {"none"}  # exact float32
    rejected = [(node, reason) for _, node, status, reason, _ in rows if status == "rejected"]
    server = state_digest(result.fast_state)
    assert rejected == [(str(liar), f"final fast state differs: node digest {'0' * 32}, server {server}")]


def _diverging(train: Callable[..., float], node: int, server_round: int) -> Callable[..., float]:
    """Client training that blows up the fast parameters on one node in one round, as a diverged local run does."""

    def diverged_train(*args: Any) -> float:
        loss = train(*args)
        optimizer, seed = args[3], args[-1]
        if list(seed)[1:] == [server_round, node]:  # seed = [run seed, round, partition id]
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.mul_(1e3).add_(1.0)
        return loss

    return diverged_train


@pytest.mark.parametrize("factor", [10.0, 0.0])
def test_a_diverged_local_run_is_screened_out_and_the_client_drops_its_residual(
    small_config: RunConfig, monkeypatch: pytest.MonkeyPatch, factor: float
) -> None:
    config = replace(
        small_config,
        num_clients=6,
        fraction=1.0,
        rounds=4,
        codec="topk:0.2+q8",
        strategy="fedvarp",
        screen_factor=factor,
    )
    monkeypatch.setattr(fedslim.client.app, "train_epochs", _diverging(fedslim.client.app.train_epochs, 2, 2))
    result = run_federation(InProcessGrid(config.num_clients), config)  # type: ignore[arg-type]

    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    rejected = db.execute("SELECT round, client, reason FROM messages WHERE status = 'rejected'").fetchall()
    state_norm = np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in result.fast_state.values()))
    if factor == 0.0:
        # Without the screen, FedVARP takes the diverged update in, keeps replaying it from its memory,
        # and the model is lost: a huge state (a step that would make it non-finite is refused), a huge or NaN
        # loss (logged as NULL); clients then fail to encode non-finite updates.
        assert result.rounds[2].accepted == 6 and not any(r.startswith("update too large") for *_, r in rejected)
        loss = result.rounds[-1].loss
        assert not state_norm < 100 and (loss is None or loss > 1e6)
        return
    assert len(rejected) == 1
    server_round, client, reason = rejected[0]
    assert (server_round, client) == (2, "partition-2") and reason.startswith("update too large")
    # Next round the client was told to drop its residual (most of the diverged update, under top-k with
    # error feedback): its update is of the usual size again and accepted.
    accepted = db.execute(
        "SELECT round FROM messages WHERE direction = 'up' AND client = 'partition-2' AND status = 'ok' AND round > 0"
    ).fetchall()
    assert [r for (r,) in accepted] == [1, 3, 4]
    assert all(r.accepted == 6 for r in result.rounds[1:] if r.round != 2) and result.rounds[2].accepted == 5
    assert state_norm < 100 and np.isfinite(result.rounds[-1].loss)
