"""Base provisioning: a node without the base is given it once, in chunks, resumably; a node with another is refused."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fakes import other_base
from flwr.app import Message

from fedslim.base import checkpoint_fingerprint
from fedslim.channel.protocol import PROVISION_TYPE
from fedslim.client.app import app as client_app
from fedslim.client.provisioning import PartialBase, ProvisioningError
from fedslim.commlog import LOG_FILENAME
from fedslim.config import RunConfig
from fedslim.logs.reader import PROVISION_TYPE as LOGGED_PROVISION_TYPE
from fedslim.logs.reader import RunLog
from fedslim.server.loop import run_federation
from fedslim.simulation.inline import FIRST_NODE_ID, InlineGrid
from fedslim.task import prepared_base

CHUNK = 48 * 1024  # the synthetic base (~330 KiB) spans 7 chunks; a dense fast layer (~17 KiB) fits in one


class ProvisioningGrid(InlineGrid):
    """Node k keeps its base at ``base_paths[k]`` when given; ``drop_after`` chunks reach node ``flaky``, then none.

    A dropped chunk is never delivered: the node is offline, the server hears nothing back.
    """

    def __init__(self, num_nodes: int, base_paths: dict[int, Path], flaky: int | None = None, drop_after: int = 0):
        super().__init__(client_app, num_nodes)
        for k, path in base_paths.items():
            self.contexts[FIRST_NODE_ID + k].node_config["base-path"] = str(path)
        self.flaky = FIRST_NODE_ID + flaky if flaky is not None else None
        self.drop_after = drop_after
        self.chunks_delivered = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        delivered = []
        for message in messages:
            if message.metadata.message_type == PROVISION_TYPE and message.metadata.dst_node_id == self.flaky:
                if self.chunks_delivered >= self.drop_after:
                    continue
                self.chunks_delivered += 1
            delivered.append(message)
        return super().send_and_receive(delivered, timeout=timeout)


def rows(config: RunConfig, where: str, *args: object) -> list[dict[str, Any]]:
    """The run's message rows matching ``where``, as dicts."""
    db = sqlite3.connect(Path(config.out) / LOG_FILENAME)
    db.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in db.execute(f"SELECT * FROM messages WHERE {where}", args)]
    finally:
        db.close()


def test_the_log_reader_spells_the_provisioning_message_type_as_the_wire_does() -> None:
    assert LOGGED_PROVISION_TYPE == PROVISION_TYPE


def test_partial_download_resumes_ignores_misplaced_chunks_and_verifies_the_result(tmp_path: Path) -> None:
    partial = PartialBase(tmp_path / "node" / "base.pt")
    data = bytes(range(256)) * 10
    assert partial.write("f" * 64, len(data), 0, data[:1000]) == 1000
    assert partial.write("f" * 64, len(data), 500, data[500:900]) == 1000  # not where the download stands
    assert PartialBase(partial.path).held("f" * 64, len(data)) == 1000  # a new process sees the same
    with pytest.raises(ProvisioningError, match="runs past"):
        partial.write("f" * 64, len(data), 1000, data[1000:] + b"extra")
    assert partial.write("f" * 64, len(data), 1000, data[1000:]) == len(data)
    with pytest.raises(ProvisioningError, match="not the announced"):
        partial.finish("f" * 64, "0" * 64)
    assert not partial.part.exists() and not partial.meta.exists() and not partial.path.exists()


def test_a_partial_download_of_another_base_is_discarded(tmp_path: Path) -> None:
    partial = PartialBase(tmp_path / "base.pt")
    partial.write("a" * 64, 100, 0, bytes(40))
    assert partial.held("b" * 64, 100) == 0
    assert not partial.part.exists()
    assert partial.write("b" * 64, 100, 0, bytes(100)) == 100
    assert partial.finish("b" * 64, "b" * 64).read_bytes() == bytes(100)


def test_a_node_without_the_base_gets_it_resumably_and_then_moves_only_the_fast_layer(
    small_config: RunConfig, tmp_path: Path
) -> None:
    config = replace(small_config, num_clients=3, fraction=1.0, rounds=2, provision_chunk_bytes=CHUNK)
    server_base = prepared_base(config)
    size = server_base.path.stat().st_size
    chunks = -(-size // CHUNK)
    assert chunks >= 4, "the base must span several chunks for the test to mean anything"
    node_base = tmp_path / "edge" / "base.pt"

    # First run: the node goes offline after two chunks. It is left out; the others train.
    interrupted = replace(config, out=str(tmp_path / "first"))
    grid = ProvisioningGrid(3, {2: node_base}, flaky=2, drop_after=2)
    result = run_federation(grid, interrupted)  # type: ignore[arg-type]
    assert [r.accepted for r in result.rounds[1:]] == [2, 2]
    assert not node_base.exists() and PartialBase(node_base).part.stat().st_size == 2 * CHUNK

    # Second run: the node resumes at byte 2 * CHUNK, verifies the base and trains from round 1.
    resumed = replace(config, out=str(tmp_path / "second"))
    result = run_federation(ProvisioningGrid(3, {2: node_base}), resumed)  # type: ignore[arg-type]
    assert [r.accepted for r in result.rounds[1:]] == [3, 3]
    assert checkpoint_fingerprint(node_base, server_base.task) == server_base.fingerprint
    assert not PartialBase(node_base).part.exists()

    chunk_rows = rows(resumed, "message_type = ? AND direction = 'down'", PROVISION_TYPE)
    assert len(chunk_rows) == chunks - 2 and {row["round"] for row in chunk_rows} == {0}
    assert sum(row["payload_bytes"] for row in chunk_rows) == size - 2 * CHUNK
    with RunLog(resumed.out) as log:
        summary = log.summary()
    assert summary.provisioned_nodes == 1 and summary.provisioning_bytes > size - 2 * CHUNK
    # The log names where each holder's base came from; the node that got it is the provisioned one.
    with RunLog(interrupted.out) as log:
        first = {row[2]: row[3] for row in log.table("bases")[1]}
    # Pretrained by this test, or by an earlier one of the session; the second run finds it cached either way.
    assert first.pop("server") in ("pretrained", "cache")
    assert first == {"partition-0": "node-file", "partition-1": "node-file"}
    with RunLog(resumed.out) as log:
        columns, logged = log.table("bases")
    assert columns == ["run_id", "round", "holder", "origin", "path", "fingerprint"]
    assert {row[2]: (row[3], row[4]) for row in logged} == {
        "server": ("cache", str(server_base.path)),
        "partition-0": ("node-file", None),
        "partition-1": ("node-file", None),
        "partition-2": ("provisioned", None),
    }
    assert {row[5] for row in logged} == {server_base.fingerprint}
    assert summary.training_bytes_up + summary.training_bytes_down + summary.provisioning_bytes < summary.total_bytes
    # Rounds 1 and later carry the fast layer only.
    later = rows(resumed, "round > 0")
    assert {row["message_type"] for row in later} == {"train"}
    assert 0 < max(row["message_bytes"] for row in later) < CHUNK


def test_a_node_with_another_base_is_refused_and_never_sampled(small_config: RunConfig, tmp_path: Path) -> None:
    config = replace(small_config, num_clients=3, fraction=1.0, rounds=2, final_sync=True)
    mismatched = other_base(config, tmp_path / "edge" / "base.pt")
    before = mismatched.read_bytes()
    result = run_federation(ProvisioningGrid(3, {1: mismatched}), config)  # type: ignore[arg-type]

    assert [(r.sampled, r.accepted) for r in result.rounds[1:]] == [(2, 2), (2, 2)]
    refused = rows(config, "status = 'rejected'")
    assert len(refused) == 1
    assert refused[0]["round"] == 0 and refused[0]["client"] == "partition-1"
    assert refused[0]["reason"].startswith("base fingerprint mismatch: node partition-1 holds ")
    assert rows(config, "round > 0 AND client = 'partition-1'") == []
    assert mismatched.read_bytes() == before  # the node's own file is never overwritten


def test_a_download_complete_but_not_yet_verified_is_verified_at_the_next_start(
    small_config: RunConfig, tmp_path: Path
) -> None:
    config = replace(small_config, num_clients=2, fraction=1.0, rounds=1)
    server_base = prepared_base(config)
    node_base = tmp_path / "edge" / "base.pt"
    data = server_base.path.read_bytes()
    PartialBase(node_base).write(server_base.fingerprint, len(data), 0, data)  # the node stopped right after this

    result = run_federation(ProvisioningGrid(2, {1: node_base}), config)  # type: ignore[arg-type]
    assert result.rounds[1].accepted == 2
    assert rows(config, "message_type = ?", PROVISION_TYPE) == []
    assert checkpoint_fingerprint(node_base, server_base.task) == server_base.fingerprint
