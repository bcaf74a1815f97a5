"""Screening and logging the messages of a run: what each costs on the wire, and whether a reply is accepted."""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.app import Message
from flwr.common.logger import log

from fedslim.codecs.pipeline import DELTA, DecodedUpdate, decode_update
from fedslim.commlog import CommLog, MessageRow, message_bytes
from fedslim.messages import (
    CPU_KEY,
    DELTA_KEY,
    DIRECTION_KEY,
    FAST_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PEAK_RSS_KEY,
    error_text,
    record_sync,
    record_update,
)


@dataclass(frozen=True)
class UpdateCheck:
    """The server's expectations of a train reply in one round."""

    shapes: dict[str, tuple[int, ...]]
    base_fingerprint: str
    state_version: int


def check_update(reply: Message, expected: UpdateCheck) -> tuple[DecodedUpdate | None, str | None]:
    """The decoded update of ``reply`` (None if it cannot be decoded) and the reason it cannot be aggregated.

    The reason is None exactly when the update can be aggregated.
    """
    if reply.has_error():
        return None, error_text(reply)
    try:
        blob = record_update(reply.content.array_records[DELTA_KEY])
        examples = reply.content.metric_records[METRICS_KEY][NUM_EXAMPLES_KEY]
        update = decode_update(blob, expected.shapes)
    except (KeyError, ValueError) as exc:
        return None, f"malformed update: {exc}"
    if not isinstance(examples, int) or examples <= 0:
        return update, f"malformed update: num-examples must be a positive integer, got {examples!r}"
    if update.kind != DELTA:
        return update, "malformed update: a client sent a full state, not a delta"
    if update.base_fingerprint != expected.base_fingerprint:
        return update, f"wrong base fingerprint {update.base_fingerprint[:16]}... in the update"
    if update.state_version != expected.state_version:
        return update, (
            f"stale update: computed against fast-state version {update.state_version}, "
            f"the round trains version {expected.state_version}"
        )
    return update, None


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
    """Logs one round's messages with their byte counts, and screens the replies."""

    run: RunWire
    server_round: int

    def record_down(
        self, message: Message, held_version: int | None = None, current_version: int = 0, codec: str | None = None
    ) -> None:
        """Log an instruction; ``held_version`` is the replica version the node held before it (None: unknown).

        ``codec`` names the payload's encoding when it is not the run's downstream codec.
        """
        records = message.content.array_records
        sync = sum(len(b) for b in record_sync(records[FAST_KEY])) if FAST_KEY in records else 0
        steer = len(record_update(records[DIRECTION_KEY])) if DIRECTION_KEY in records else 0
        raw = self.run.fast_raw_bytes * ((sync > 0) + (steer > 0))  # FedAMD's direction v is a second fast state
        lag = current_version - held_version if held_version is not None and FAST_KEY in records else None
        self._record(message, "down", sync + steer, raw, codec or self.run.downlink, lag)

    def record_chunk(self, message: Message, chunk_bytes: int) -> None:
        """Log one chunk of base provisioning (a one-off cost: full-model FedAvg would need the base too)."""
        self._record(message, "down", chunk_bytes, 0, None, None)

    def record_reply(self, reply: Message, reason: str | None) -> None:
        """Log a reply without fast-layer data (identity, final-sync confirmation); a ``reason`` rejects it."""
        self._record(reply, "up", 0, 0, None, None, reason)

    def screen_up(self, reply: Message, expected: UpdateCheck) -> dict[str, np.ndarray] | None:
        """Log ``reply``; its decoded delta if it can be aggregated, None if rejected."""
        update, reason = check_update(reply, expected)
        try:
            payload = len(record_update(reply.content.array_records[DELTA_KEY]))
        except (KeyError, ValueError):
            payload = 0
        lag = expected.state_version - update.state_version if update is not None else None
        raw = self.run.fast_raw_bytes if payload else 0
        self._record(reply, "up", payload, raw, self.run.uplink, lag, reason, footprint(reply))
        if reason:
            log(
                WARNING,
                "round %d: rejected update from node %d: %s",
                self.server_round,
                reply.metadata.src_node_id,
                reason,
            )
            return None
        return update.tensors if update is not None else None

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
    ) -> None:
        """One log row; the full-model figure swaps a fast-layer payload (``raw`` > 0) for the full model."""
        size = message_bytes(message, direction)
        node = message.metadata.dst_node_id if direction == "down" else message.metadata.src_node_id
        self.run.commlog.record_message(
            self.run.run_id,
            MessageRow(
                round=self.server_round,
                node_id=node,
                client=self.run.client_keys.get(node),
                direction=direction,
                message_type=message.metadata.message_type,
                codec=codec if payload else None,
                raw_bytes=raw,
                payload_bytes=payload,
                message_bytes=size,
                full_model_bytes=size - payload + self.run.full_payload_bytes if raw else size,
                version_lag=version_lag,
                reason=reason,
                created_at=message.metadata.created_at,
                client_cpu_s=device[0],
                client_peak_rss_bytes=device[1],
            ),
        )


def footprint(reply: Message) -> tuple[float | None, int | None]:
    """The CPU seconds and peak memory a client reported with its reply (None where it did not)."""
    if reply.has_error() or METRICS_KEY not in reply.content.metric_records:
        return None, None
    metrics = reply.content.metric_records[METRICS_KEY]
    cpu, rss = metrics.get(CPU_KEY), metrics.get(PEAK_RSS_KEY)
    return (
        float(cpu) if isinstance(cpu, int | float) else None,
        int(rss) if isinstance(rss, int | float) else None,
    )
