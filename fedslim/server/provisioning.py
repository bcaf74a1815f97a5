"""Giving the resident base, once, to nodes that do not have it: chunks over the run's own Flower connection.

Every chunk is a ``query.provision`` message logged in round 0, so the log
shows provisioning as a one-off cost apart from the rounds' traffic. A node
that stops answering keeps what it received and resumes from there in the
next run; a node whose finished download does not have the announced
fingerprint discards it and is left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedslim.channel.accounting import WireAccounting
from fedslim.channel.matching import Exchange
from fedslim.channel.protocol import (
    CHUNK_KEY,
    CONFIG_KEY,
    OFFSET_KEY,
    PROVISION_TYPE,
    TOTAL_BYTES_KEY,
    chunk_record,
    error_text,
    provision_progress,
)


def provision_bases(
    grid: Grid,
    held: Mapping[int, int],
    base_path: Path,
    task: Mapping[str, Any],
    chunk_bytes: int,
    timeout: float,
    wire: WireAccounting,
) -> set[int]:
    """Send the checkpoint at ``base_path`` to the nodes of ``held`` (node id -> bytes each already holds).

    ``task`` is the client task plus the base's fingerprint. Returns the nodes
    that received the whole checkpoint and verified its fingerprint; every
    chunk and every reply is logged, refusals as rejected.
    """
    data = base_path.read_bytes()
    total = len(data)
    pending = dict(held)
    verified: set[int] = set()
    steps_left = 2 * (total // chunk_bytes + 1)
    log(INFO, "provisioning the base (%d bytes) to %d node(s)", total, len(pending))
    while pending:
        chunks = {node: data[offset : offset + chunk_bytes] for node, offset in pending.items()}
        messages = [
            Message(
                RecordDict(
                    {
                        CONFIG_KEY: ConfigRecord({**task, OFFSET_KEY: pending[node], TOTAL_BYTES_KEY: total}),
                        CHUNK_KEY: chunk_record(chunk),
                    }
                ),
                dst_node_id=node,
                message_type=PROVISION_TYPE,
            )
            for node, chunk in chunks.items()
        ]
        received = list(grid.send_and_receive(messages, timeout=timeout))
        for message in messages:
            wire.record_chunk(message, len(chunks[message.metadata.dst_node_id]))
        exchange, replies = Exchange.of(messages), dict[int, Message]()
        for reply in received:
            problem = exchange.problem(reply)
            if problem is None:
                replies[reply.metadata.src_node_id] = reply
            else:
                wire.record_reply(reply, f"unexpected reply: {problem} in base provisioning")
        progress: dict[int, int] = {}
        for node, offset in pending.items():
            reply = replies.get(node)
            if reply is None:
                warning = "provisioning: node %d did not answer at byte %d of %d (it resumes there next time)"
                log(WARNING, warning, node, offset, total)
                continue
            status = provision_progress(reply)
            if status is None:
                wire.record_reply(reply, f"base provisioning failed: {error_text(reply)}")
            elif status[1]:
                wire.record_reply(reply, None)
                verified.add(node)
            elif status[0] == offset or not 0 <= status[0] < total or steps_left == 0:
                # A node that took nothing, claims more than there is, or never finishes is not waited for.
                wire.record_reply(reply, f"base provisioning stalled at byte {status[0]} of {total}")
            else:
                wire.record_reply(reply, None)  # a node that held another amount resumes from what it holds
                progress[node] = status[0]
        pending = progress
        steps_left -= 1
    return verified
