"""Screening and logging the messages of a run: what each costs on the wire, and whether a reply is accepted."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.app import Message
from flwr.common.logger import log

from fedslim.codecs.pipeline import DELTA, DecodedUpdate, decode_update
from fedslim.commlog import CommLog, MessageRow, message_bytes
from fedslim.messages import (
    ANCHOR_METRIC,
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


class SizeScreen:
    """Rejects updates whose size marks a diverged local run, before a strategy (or its memory) sees them.

    A client whose local SGD diverged can still send a finite update,
    thousands of times the usual size. Averaged in, it wrecks the global model
    in one round; a strategy that stores updates (FedVARP, MIFA, FedStale)
    would also replay it every round it keeps the entry. An update's size is
    its L2 norm per local step (under local epochs, a client with more data
    takes more steps). The reference is the median size of the last
    ``window`` screened updates, rejected ones included, together with this
    round's candidates: the first round is screened against itself, one
    diverged client barely moves the median, and a lasting change in every
    client's step size moves it within a window instead of locking everyone out.

    Parameters
    ----------
    factor : float
        An update larger than ``factor`` times the reference is rejected;
        0 turns the screen off.
    window : int (default: 200)
        Number of recent sizes the reference remembers.
    min_reference : int (default: 5)
        With fewer sizes than this (or a zero median) there is no reference
        and nothing is rejected.
    """

    def __init__(self, factor: float, window: int = 200, min_reference: int = 5) -> None:
        self.factor = factor
        self.min_reference = min_reference
        self.recent: deque[float] = deque(maxlen=window)

    def reasons(self, sizes: Sequence[float | None]) -> list[str | None]:
        """Why each candidate is rejected (None: it passes; a None size is not screened)."""
        reference = [*self.recent, *(size for size in sizes if size is not None)]
        median = float(np.median(reference)) if len(reference) >= self.min_reference else 0.0
        if not self.factor or median == 0.0:
            return [None] * len(sizes)
        return [
            None
            if size is None or size <= self.factor * median
            else (
                f"update too large: {size:.4g} per local step, {size / median:,.0f}x the median of recent "
                f"updates ({median:.4g}; the screen rejects above {self.factor:g}x): local training diverged?"
            )
            for size in sizes
        ]

    def remember(self, size: float) -> None:
        """Add the size of a screened update to the reference."""
        self.recent.append(size)


def update_size(update: DecodedUpdate, reply: Message, local_steps: Callable[[int], int]) -> float | None:
    """L2 norm per local step of a decoded delta; None for a FedAMD anchor (a gradient, not a local run)."""
    metrics = reply.content.metric_records[METRICS_KEY]
    if metrics.get(ANCHOR_METRIC):
        return None
    norm = float(np.sqrt(sum(np.sum(np.square(value, dtype=np.float64)) for value in update.tensors.values())))
    return norm / local_steps(int(metrics[NUM_EXAMPLES_KEY]))  # type: ignore[arg-type]


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

    def screen_up(
        self, replies: Sequence[Message], expected: UpdateCheck, screen: SizeScreen, local_steps: Callable[[int], int]
    ) -> list[tuple[Message, dict[str, np.ndarray] | None]]:
        """Log a round's train replies; each with its decoded delta if it can be aggregated, None if rejected.

        A reply is rejected when :func:`check_update` finds it malformed or
        out of place, or when ``screen`` finds it too large for the round
        (``local_steps`` gives the steps a client with so many examples took).
        """
        checked = [check_update(reply, expected) for reply in replies]
        sizes = [
            update_size(update, reply, local_steps) if update is not None and reason is None else None
            for reply, (update, reason) in zip(replies, checked)
        ]
        screened = screen.reasons(sizes)
        results: list[tuple[Message, dict[str, np.ndarray] | None]] = []
        for reply, (update, reason), size, too_large in zip(replies, checked, sizes, screened):
            reason = reason or too_large
            self._record_update(reply, update, expected, reason)
            if size is not None:
                screen.remember(size)
            results.append((reply, update.tensors if update is not None and reason is None else None))
        return results

    def _record_update(
        self, reply: Message, update: DecodedUpdate | None, expected: UpdateCheck, reason: str | None
    ) -> None:
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
