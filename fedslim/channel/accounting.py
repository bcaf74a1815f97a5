"""The channel's byte statistics: what every message of a run costs on the wire, one log row each.

Each row records the message's Fleet API cost (:func:`message_bytes`), the
fedslim payload it carries, the same payload as dense float32, and what
full-model FedAvg would have moved instead (see docs/commlog.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import Message

from fedslim.channel.bounds import plausible_time
from fedslim.channel.protocol import (
    CONFIG_KEY,
    DIRECTION_KEY,
    SYNC_KEY,
    instruction_direction,
    instruction_merges,
    instruction_sync,
)
from fedslim.channel.uplink import Received, footprint, payload_bytes
from fedslim.commlog import CommLog, MessageRow, Status

if TYPE_CHECKING:
    from flwr.proto.message_pb2 import ObjectTree
    from flwr.supercore.inflatable.inflatable_object import InflatableObject

# Flower 1.39's Fleet API fields whose values the server never sees, at their fixed lengths.
_SESSION_ID = "00000000-0000-0000-0000-000000000000"  # a uuid4 per pushed message
_RECONNECT_S = 5


def message_bytes(message: Message, direction: str) -> int:
    """What ``message`` costs on the Fleet API (SuperLink <-> SuperNode), in both directions of the exchange.

    Its objects (each deflated object is pushed or pulled once) plus the
    protobuf envelope of the exchange that carries it: a node pulls an
    instruction with PullMessages (request, then the message's metadata and
    object tree); it pushes a reply with PushMessages (the same, then the list
    of objects to push and a session). This is what the SuperLink counts as a
    run's network traffic; gRPC and TCP framing are not included.
    """
    from flwr.app.message.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import (
        PullMessagesRequest,
        PullMessagesResponse,
        PushMessagesRequest,
        PushMessagesResponse,
        Reconnect,
    )
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import no_object_id_recompute

    with no_object_id_recompute():  # each object is deflated and hashed once (Flower's own ids, reused)
        objects, tree, content = _content(message)
    proto = message_to_proto(remove_content_from_message(message))
    if direction == "down":
        node = Node(node_id=message.metadata.dst_node_id)
        envelope = PullMessagesRequest(node=node).ByteSize()
        envelope += PullMessagesResponse(messages_list=[proto], message_object_trees=[tree]).ByteSize()
    else:
        node = Node(node_id=message.metadata.src_node_id)
        envelope = PushMessagesRequest(
            node=node, messages_list=[proto], message_object_trees=[tree], clientapp_runtime_list=[0.0]
        ).ByteSize()
        envelope += PushMessagesResponse(
            reconnect=Reconnect(reconnect=_RECONNECT_S),
            results={message.metadata.message_id: 0},
            objects_to_push=list(objects),
            session_id=_SESSION_ID,
        ).ByteSize()
    return content + envelope


def _content(message: Message) -> tuple[list[str], ObjectTree, int]:
    """The ids of the message's distinct objects (post-order), its object tree, and their deflated bytes."""
    from flwr.proto.message_pb2 import ObjectTree

    sizes: dict[str, int] = {}

    def visit(obj: InflatableObject) -> ObjectTree:
        children = [visit(child) for child in (obj.children or {}).values()]
        sizes.setdefault(obj.object_id, len(obj.deflate()))
        return ObjectTree(object_id=obj.object_id, children=children)

    tree = visit(message)
    return list(sizes), tree, sum(sizes.values())


@dataclass(frozen=True)
class RunWire:
    """What every log row of one run shares."""

    commlog: CommLog
    run_id: str
    fast_raw_bytes: int
    full_payload_bytes: int
    uplink: str
    downlink: str
    client_keys: dict[int, str]


@dataclass(frozen=True)
class WireAccounting:
    """Logs one round's messages with their byte counts."""

    run: RunWire
    server_round: int

    def record_down(
        self, message: Message, held_version: int | None = None, current_version: int = 0, codec: str | None = None
    ) -> None:
        """Log an instruction; ``held_version`` is the replica version the node held before it (None: unknown).

        ``codec`` names the payload's encoding when it is not the run's downstream codec.
        """
        config = message.content.config_records.get(CONFIG_KEY, {})
        syncs = SYNC_KEY in config  # the identity query carries the task but no fast state
        sync = sum(len(b) for b in instruction_sync(message.content)) if syncs else 0
        steer = len(instruction_direction(message.content)) if DIRECTION_KEY in config else 0
        merges = instruction_merges(message.content)  # each a fast state, like FedAMD's direction v
        raw = self.run.fast_raw_bytes * ((sync > 0) + (steer > 0) + len(merges))
        lag = current_version - held_version if held_version is not None and syncs else None
        payload = sync + steer + sum(map(len, merges))
        self._record(message, "down", payload, raw, codec or self.run.downlink, lag)

    def record_chunk(self, message: Message, chunk_bytes: int) -> None:
        """Log one chunk of base provisioning (a one-off cost: full-model FedAvg would need the base too)."""
        self._record(message, "down", chunk_bytes, 0, None, None)

    def record_reply(
        self, reply: Message, reason: str | None, device: tuple[float | None, int | None] = (None, None)
    ) -> None:
        """Log a reply without fast-layer data (identity, evaluation, final-sync confirmation); a ``reason``
        rejects it. ``device``: the client's reported CPU seconds and peak memory.

        An error reply (a refusal, a ClientApp that raised) is logged as an error.
        """
        status = Status.ERROR if reply.has_error() else None
        self._record(reply, "up", 0, 0, None, None, reason, device, status)

    def record_received(self, received: Received) -> None:
        """Log a train reply as the uplink received it: accepted, rejected (its reason), or the client's error."""
        payload = received.payload_bytes
        raw = self.run.fast_raw_bytes if payload else 0
        reply = received.reply
        error = reply.has_error() and received.instruction is not None
        self._record(
            reply,
            "up",
            payload,
            raw,
            self.run.uplink,
            received.version_lag,
            received.reason,
            footprint(reply),
            Status.ERROR if error else None,
        )

    def record_late(self, reply: Message, reason: str) -> None:
        """Log a train reply that came after its round's timeout (it travelled, so it counts; it is discarded)."""
        payload = payload_bytes(reply)
        raw = self.run.fast_raw_bytes if payload else 0
        self._record(reply, "up", payload, raw, self.run.uplink, None, reason, footprint(reply), Status.LATE)

    def record_no_reply(self, instruction: Message, reason: str) -> None:
        """Log an instruction that got no reply by the round timeout: an up row without a message (0 bytes)."""
        node = instruction.metadata.dst_node_id
        self._write(node, "up", instruction.metadata.message_type, time.time(), reason, Status.NO_REPLY)

    def _record(
        self,
        message: Message,
        direction: str,
        payload: int,
        raw: int,
        codec: str | None,
        version_lag: int | None,
        reason: str | None = None,
        device: tuple[float | None, int | None] = (None, None),
        status: Status | None = None,
    ) -> None:
        """One log row; the full-model figure swaps a fast-layer payload (``raw`` > 0) for the full model."""
        try:
            size = message_bytes(message, direction)
        except (ValueError, TypeError, OverflowError):  # not serialisable: it never crossed Flower's wire (in-process)
            size = 0
        node = message.metadata.dst_node_id if direction == "down" else message.metadata.src_node_id
        created = message.metadata.created_at
        self._write(
            node,
            direction,
            message.metadata.message_type,
            created if plausible_time(created) else time.time(),  # the sender's clock: NaN or 1e300 are not times
            reason,
            status,
            codec=codec if payload else None,
            raw=raw,
            payload=payload,
            size=size,
            full=size - payload + self.run.full_payload_bytes if raw else size,
            version_lag=version_lag,
            device=device,
        )

    def _write(
        self,
        node: int,
        direction: str,
        message_type: str,
        created_at: float,
        reason: str | None,
        status: Status | None,
        *,
        codec: str | None = None,
        raw: int = 0,
        payload: int = 0,
        size: int = 0,
        full: int = 0,
        version_lag: int | None = None,
        device: tuple[float | None, int | None] = (None, None),
    ) -> None:
        """One row of this round's messages for ``node`` (the byte columns default to a message that never came)."""
        self.run.commlog.record_message(
            self.run.run_id,
            MessageRow(
                round=self.server_round,
                node_id=node,
                client=self.run.client_keys.get(node),
                direction=direction,
                message_type=message_type,
                codec=codec,
                raw_bytes=raw,
                payload_bytes=payload,
                message_bytes=size,
                full_model_bytes=full,
                version_lag=version_lag,
                reason=reason,
                created_at=created_at,
                client_cpu_s=device[0],
                client_peak_rss_bytes=device[1],
                status=status,
            ),
        )
