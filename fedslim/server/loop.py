"""The server's round loop: send the fast state, check and log replies, aggregate, evaluate."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedslim.base import ensure_pretrained_base, load_base
from fedslim.codec import DenseCodec
from fedslim.commlog import LOG_FILENAME, CommLog, RoundTotals, message_bytes
from fedslim.config import RunConfig
from fedslim.messages import DELTA_KEY, FAST_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, client_key, identity_requests
from fedslim.server.nodes import NodesMissingError, OrderedGrid, wait_for_nodes
from fedslim.simulation.datasets import load_federation
from fedslim.strategies.fedavg import FastFedAvg
from fedslim.training import evaluate


@dataclass(frozen=True)
class RunResult:
    """What a finished run leaves behind."""

    run_id: str
    log_path: str
    rounds: list[RoundTotals]


def check_update(reply: Message, shapes: dict[str, tuple[int, ...]], codec: DenseCodec) -> str | None:
    """Why ``reply`` cannot be aggregated, or None if it is a valid fast update."""
    if reply.has_error():
        return _error_text(reply)
    try:
        codec.decode(reply.content.array_records[DELTA_KEY], shapes)
        examples = reply.content.metric_records[METRICS_KEY][NUM_EXAMPLES_KEY]
    except (KeyError, ValueError) as exc:
        return f"malformed update: {exc}"
    if not isinstance(examples, int) or examples <= 0:
        return f"malformed update: num-examples must be a positive integer, got {examples!r}"
    return None


@dataclass
class WireAccounting:
    """Logs one round's messages with their byte counts, and screens the replies."""

    commlog: CommLog
    run_id: str
    server_round: int
    codec: DenseCodec
    full_payload_bytes: int

    def record_down(self, message: Message) -> None:
        records = message.content.array_records
        self._record(message, "down", self.codec.payload_bytes(records[FAST_KEY]) if FAST_KEY in records else 0)

    def record_identity(self, reply: Message, key: str | None) -> None:
        self._record(reply, "up", 0, None if key else f"no client key in the identity reply: {_error_text(reply)}")

    def screen_up(self, reply: Message, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Log ``reply``; True if it is a valid update to aggregate, False if rejected."""
        reason = check_update(reply, shapes, self.codec)
        payload = 0 if reason else self.codec.payload_bytes(reply.content.array_records[DELTA_KEY])
        self._record(reply, "up", payload, reason)
        if reason:
            log(
                WARNING,
                "round %d: rejected update from node %d: %s",
                self.server_round,
                reply.metadata.src_node_id,
                reason,
            )
        return reason is None

    def _record(self, message: Message, direction: str, payload: int, reason: str | None = None) -> None:
        """One log row; the full-model figure swaps the fast payload for the full model's."""
        size = message_bytes(message)
        node = message.metadata.dst_node_id if direction == "down" else message.metadata.src_node_id
        full = size - payload + (self.full_payload_bytes if payload else 0)
        self.commlog.record_message(
            self.run_id, self.server_round, node, direction, message.metadata.message_type, payload, size, full, reason
        )


def identify_nodes(grid: Grid, config: RunConfig, wire: WireAccounting) -> OrderedGrid:
    """Wait for the federation, ask each node for its client key, and order the grid by it."""
    requests = identity_requests(wait_for_nodes(grid, config.num_clients))
    replies = list(grid.send_and_receive(requests, timeout=config.round_timeout))
    for request in requests:
        wire.record_down(request)
    keys: dict[int, str] = {}
    for reply in replies:
        key = client_key(reply)
        wire.record_identity(reply, key)
        if key:
            keys[reply.metadata.src_node_id] = key
    if len(keys) < config.num_clients:
        raise NodesMissingError(f"only {len(keys)} of {config.num_clients} nodes identified themselves")
    return OrderedGrid(grid, keys)


def _error_text(reply: Message) -> str:
    return f"client error {reply.error.code}: {reply.error.reason}" if reply.has_error() else "malformed reply"


def run_federation(
    grid: Grid,
    config: RunConfig,
    strategy: Strategy | None = None,
    on_round: Callable[[RoundTotals], None] | None = None,
) -> RunResult:
    """Run ``config.rounds`` rounds of fast-layer training and log every message.

    Parameters
    ----------
    grid : Grid
        Flower's grid (simulation or deployment).
    config : RunConfig
        The run.
    strategy : Strategy, optional
        Aggregation over fast deltas; FedAvg over participants by default.
    on_round : callable, optional
        Called with each round's totals as soon as the round is logged
        (progress displays).
    """
    strategy = strategy or FastFedAvg(fraction_train=config.fraction, server_lr=config.server_lr, seed=config.seed)
    codec = DenseCodec()
    base = load_base(ensure_pretrained_base(config), config.dataset)
    model = base.build(config.fast)
    test_set = load_federation(config).test
    shapes = model.fast_shapes()
    fast_state = model.fast_state()
    full_payload_bytes = ArrayRecord(base.state).count_bytes()

    commlog = CommLog(config.run_dir / LOG_FILENAME)
    run_id = uuid.uuid4().hex[:12]
    commlog.start_run(
        run_id,
        config.to_dict(),
        base.fingerprint,
        base.num_parameters(),
        model.num_fast_parameters(),
        codec.payload_bytes(codec.encode(fast_state)),
        full_payload_bytes,
    )
    log(
        INFO,
        "fedslim run %s: %d fast of %d base parameters (%s), log %s",
        run_id,
        model.num_fast_parameters(),
        base.num_parameters(),
        config.fast.kind,
        commlog.path,
    )

    def finish_round(server_round: int, sampled: int, accepted: int, started: float) -> None:
        result = evaluate(model.module, test_set)
        commlog.record_round(
            run_id, server_round, sampled, accepted, result.accuracy, result.loss, time.monotonic() - started
        )
        (totals,) = commlog.round_totals(run_id, only_round=server_round)
        log(
            INFO,
            "round %d: accuracy %.4f loss %.4f, %d/%d updates accepted",
            server_round,
            result.accuracy,
            result.loss,
            accepted,
            sampled,
        )
        if on_round:
            on_round(totals)

    try:
        grid = identify_nodes(grid, config, WireAccounting(commlog, run_id, 0, codec, full_payload_bytes))
        finish_round(0, 0, 0, time.monotonic())
        for server_round in range(1, config.rounds + 1):
            started = time.monotonic()
            task = ConfigRecord({**config.client_task(), "base-fingerprint": base.fingerprint})
            instructions = list(strategy.configure_train(server_round, codec.encode(fast_state), task, grid))
            replies = list(grid.send_and_receive(instructions, timeout=config.round_timeout))
            wire = WireAccounting(commlog, run_id, server_round, codec, full_payload_bytes)
            for message in instructions:
                wire.record_down(message)
            accepted = [reply for reply in replies if wire.screen_up(reply, shapes)]
            new_arrays, _ = strategy.aggregate_train(server_round, accepted)
            if new_arrays is not None:
                fast_state = codec.decode(new_arrays, shapes)
                model.load_fast_state(fast_state)
            finish_round(server_round, len(instructions), len(accepted), started)
        return RunResult(run_id, str(commlog.path), commlog.round_totals(run_id))
    finally:
        commlog.close()
