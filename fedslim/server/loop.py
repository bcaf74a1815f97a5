"""The server's round loop: sync the clients' replica, decode, check and log replies, aggregate, evaluate."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedslim.base import ResidentBase, ensure_pretrained_base, load_base
from fedslim.commlog import LOG_FILENAME, CommLog, RoundRow, RoundTotals
from fedslim.config import RunConfig
from fedslim.messages import (
    BASE_DIFFERENT,
    BASE_MISSING_STATUS,
    CLIENT_RECORD,
    CONFIG_KEY,
    DELTA_KEY,
    DROP_RESIDUAL_KEY,
    FAST_KEY,
    FINAL_SYNC_TYPE,
    REPLICA_MISMATCH,
    WIRE_KEY,
    base_report,
    client_key,
    error_text,
    identity_requests,
    partition_key,
    record_update,
    reported_digest,
    sync_record,
    update_record,
)
from fedslim.replica import ServerReplica
from fedslim.server.nodes import NodesMissingError, OrderedGrid, wait_for_nodes
from fedslim.server.provisioning import provision_bases
from fedslim.server.wire import RunWire, SizeScreen, UpdateCheck, WireAccounting
from fedslim.data.datasets import FederatedData, load_federation
from fedslim.data.participation import TRACE_FILENAME, Schedule, participation_schedule, write_trace
from fedslim.strategies.base import FastStrategy, Federation
from fedslim.strategies.registry import strategy_for
from fedslim.training import evaluate


@dataclass(frozen=True)
class RunResult:
    """What a finished run leaves behind: its log, the per-round totals and the final fast state."""

    run_id: str
    log_path: str
    rounds: list[RoundTotals]
    fast_state: dict[str, np.ndarray]


def identify_nodes(grid: Grid, config: RunConfig, base: ResidentBase, wire: WireAccounting) -> OrderedGrid:
    """Round 0: wait for the federation, learn each node's client key and base, and order the grid by key.

    A node holding another base is refused (logged as a rejection) and never
    sampled; a node without the base is given it (:func:`provision_bases`), or
    left out if that fails.
    """
    task = {**config.client_task(), "base-fingerprint": base.fingerprint}
    query = ConfigRecord({**task, "base-bytes": base.path.stat().st_size})
    requests = identity_requests(wait_for_nodes(grid, config.num_clients), query)
    replies = list(grid.send_and_receive(requests, timeout=config.round_timeout))
    keys = wire.run.client_keys
    for reply in replies:
        key = client_key(reply)
        if key:
            keys[reply.metadata.src_node_id] = key
    for request in requests:
        wire.record_down(request)
    refused: set[int] = set()
    missing: dict[int, int] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        report = base_report(reply)
        reason = None if node in keys else f"no client key in the identity reply: {error_text(reply)}"
        if report is not None and report.status == BASE_DIFFERENT:
            reason = (
                f"base fingerprint mismatch: node {keys[node]} holds {_short(report.fingerprint)}, "
                f"the server's base is {_short(base.fingerprint)}; it takes no part in the run"
            )
            refused.add(node)
        elif report is not None and report.status == BASE_MISSING_STATUS:
            missing[node] = report.partial_bytes
        wire.record_reply(reply, reason)
    if len(keys) < config.num_clients:
        raise NodesMissingError(f"only {len(keys)} of {config.num_clients} nodes identified themselves")
    if missing:
        chunk = config.provision_chunk_bytes
        provisioned = provision_bases(grid, missing, base.path, task, chunk, config.round_timeout, wire)
        refused |= set(missing) - provisioned
    for node in sorted(refused):
        log(WARNING, "node %d (%s) is left out of the run: it lacks the server's base", node, keys[node])
    if len(refused) == len(keys):
        raise NodesMissingError("no node holds the server's base, or could be given it")
    return OrderedGrid(grid, keys, excluded=frozenset(refused))


def _short(fingerprint: str) -> str:
    """A hex fingerprint cut for a log line; anything else (a reason it could not be read) in full."""
    return f"{fingerprint[:16]}..." if len(fingerprint) == 64 else fingerprint


def final_sync(
    grid: OrderedGrid,
    config: RunConfig,
    replica: ServerReplica,
    exact: dict[str, np.ndarray],
    client_versions: dict[str, int | None],
    base_fingerprint: str,
    wire: WireAccounting,
) -> int:
    """After the last round, give every admitted node the exact final fast state; returns how many confirmed it.

    The replica becomes ``exact`` (a full-state version), each node syncs to it
    and replies with the digest of what it now holds; a reply with another
    digest, an error, or none at all is logged as unconfirmed.
    """
    replica.settle(exact)
    task = ConfigRecord(
        {
            **config.client_task(),
            "base-fingerprint": base_fingerprint,
            "server-round": config.rounds,
            "replica-version": replica.version,
            "replica-digest": replica.digest,
        }
    )
    held = {node: client_versions.get(key) for node, key in grid.admitted.items()}
    messages = [
        Message(
            RecordDict({FAST_KEY: sync_record(replica.sync_for(version)), CONFIG_KEY: task}),
            dst_node_id=node,
            message_type=FINAL_SYNC_TYPE,
        )
        for node, version in held.items()
    ]
    replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
    for message in messages:
        node = message.metadata.dst_node_id
        wire.record_down(message, held[node], replica.version, codec=replica.full_state_pipeline.spec)
    confirmed = 0
    for reply in replies:
        digest = reported_digest(reply)
        if digest == replica.digest:
            confirmed += 1
            wire.record_reply(reply, None)
        elif digest is None:
            wire.record_reply(reply, f"no final-sync confirmation: {error_text(reply)}")
        else:
            wire.record_reply(reply, f"final fast state differs: node digest {digest}, server {replica.digest}")
    if confirmed < len(messages):
        log(WARNING, "final sync: %d of %d nodes confirmed the final fast state", confirmed, len(messages))
    return confirmed


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
        Aggregation over fast deltas; by default the one ``config.strategy``
        names. It sees the exact fast state and float32 deltas; the loop does
        the wire work (replica sync down, decoding and screening up). A
        :class:`~fedslim.strategies.base.FastStrategy` is bound to the
        federation first, and the weights of its steps are logged.
    on_round : callable, optional
        Called with each round's totals as soon as the round is logged
        (progress displays).
    """
    strategy = strategy or strategy_for(config)
    base = load_base(ensure_pretrained_base(config), config.dataset)
    model = base.build(config.fast)
    data = load_federation(config)
    shapes = model.fast_shapes()
    fast_state = model.fast_state()
    replica = ServerReplica(fast_state, config.downlink, base.fingerprint, seed=config.seed)
    full_payload_bytes = ArrayRecord(base.state).count_bytes()
    schedule = simulated_participation(config, data)

    commlog = CommLog(config.run_dir / LOG_FILENAME)
    run_id = uuid.uuid4().hex[:12]
    commlog.start_run(
        run_id,
        config.to_dict(),
        base.fingerprint,
        base.num_parameters(),
        model.num_fast_parameters(),
        ArrayRecord({n: Array(v) for n, v in fast_state.items()}).count_bytes(),
        full_payload_bytes,
    )
    log(
        INFO,
        "fedslim run %s: %d fast of %d base parameters (%s), strategy %s, participation %s, "
        "codec up %s / down %s, log %s",
        run_id,
        model.num_fast_parameters(),
        base.num_parameters(),
        config.fast.kind,
        type(strategy).__name__,
        config.participation,
        config.uplink.spec,
        config.downlink.spec,
        commlog.path,
    )
    client_keys: dict[int, str] = {}

    def finish_round(server_round: int, sampled: int, accepted: int, available: int, started: float) -> None:
        result = None
        if server_round % config.eval_every == 0 or server_round in (0, config.rounds):
            result = evaluate(model.module, data.test)
        memory = strategy.memory_bytes() if isinstance(strategy, FastStrategy) else None
        commlog.record_round(
            run_id,
            RoundRow(
                round=server_round,
                sampled=sampled,
                accepted=accepted,
                available=available,
                accuracy=result.accuracy if result else None,
                loss=result.loss if result else None,
                wall_time_s=time.monotonic() - started,
                strategy_memory_bytes=memory,
            ),
        )
        (totals,) = commlog.round_totals(run_id, only_round=server_round)
        if result:
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

    run_wire = RunWire(
        commlog,
        run_id,
        fast_raw_bytes=4 * model.num_fast_parameters(),
        full_payload_bytes=full_payload_bytes,
        uplink=config.uplink.spec,
        downlink=config.downlink.spec,
        client_keys=client_keys,
    )
    try:
        grid = identify_nodes(grid, config, base, WireAccounting(run_wire, 0))
        if isinstance(strategy, FastStrategy):
            strategy.bind(federation_of(grid, shapes, schedule, config))
        # The replica version each client holds, by client key (0: the initial state every client can build).
        client_versions: dict[str, int | None] = {key: 0 for key in grid.keys.values()}
        screen = SizeScreen(config.screen_factor)
        rejected: set[str] = set()  # clients whose last update the server rejected: they drop their EF residual
        finish_round(0, 0, 0, len(client_versions), time.monotonic())
        for server_round in range(1, config.rounds + 1):
            started = time.monotonic()
            available = {partition_key(i) for i in schedule.clients_in(server_round)} if schedule is not None else None
            replica.publish(fast_state)
            task = ConfigRecord(
                {
                    **config.client_task(),
                    "base-fingerprint": base.fingerprint,
                    "replica-version": replica.version,
                    "replica-digest": replica.digest,
                }
            )
            exact = ArrayRecord({n: Array(v) for n, v in fast_state.items()})
            sampled = list(strategy.configure_train(server_round, exact, task, grid.only(available)))
            # The replica version each sampled node holds before this round's sync (None: unknown).
            nodes = [m.metadata.dst_node_id for m in sampled]
            held = {node: client_versions.get(client_keys.get(node, "")) for node in nodes}
            instructions = [
                node_instruction(m, replica.sync_for(held[node]), client_keys.get(node) in rejected)
                for m, node in zip(sampled, nodes)
            ]
            replies = list(grid.send_and_receive(instructions, timeout=config.round_timeout)) if instructions else []
            wire = WireAccounting(run_wire, server_round)
            for message in instructions:
                wire.record_down(message, held[message.metadata.dst_node_id], replica.version)
            expected = UpdateCheck(shapes, base.fingerprint, replica.version)
            accepted = []
            for reply, delta in wire.screen_up(replies, expected, screen, config.local_step_count):
                key = client_keys.get(reply.metadata.src_node_id, "")
                if delta is not None:
                    rejected.discard(key)
                    client_versions[key] = replica.version
                    blob = record_update(reply.content.array_records[DELTA_KEY])
                    reply.content[DELTA_KEY] = ArrayRecord({n: Array(v) for n, v in delta.items()})
                    reply.content[WIRE_KEY] = update_record(blob)
                    reply.content[CLIENT_RECORD] = ConfigRecord({"key": key})
                    accepted.append(reply)
                elif not reply.has_error():
                    rejected.add(key)
                elif reply.error.code == REPLICA_MISMATCH:
                    client_versions[key] = None
            new_arrays, _ = strategy.aggregate_train(server_round, accepted)
            if isinstance(strategy, FastStrategy) and strategy.last_step is not None:
                step = strategy.last_step
                commlog.record_weights(run_id, server_round, step.weights, step.memory_weights)
            if new_arrays is not None:
                fast_state = {name: new_arrays[name].numpy() for name in shapes}
                model.load_fast_state(fast_state)
            count = len(available) if available is not None else len(client_versions)
            finish_round(server_round, len(instructions), len(accepted), count, started)
        if config.final_sync:
            wire = WireAccounting(run_wire, config.rounds)
            final_sync(grid, config, replica, fast_state, client_versions, base.fingerprint, wire)
        commlog.finish_run(run_id)
        return RunResult(run_id, str(commlog.path), commlog.round_totals(run_id), fast_state)
    finally:
        commlog.close()


def simulated_participation(config: RunConfig, data: FederatedData) -> Schedule | None:
    """The availability schedule of a simulated participation model (None for ``all``), saved as a trace."""
    if config.participation == "all":
        return None
    num_classes = int(max(int(c.y.max()) for c in data.clients if len(c)) + 1)
    label_counts = np.stack([np.bincount(c.y, minlength=num_classes) for c in data.clients])
    schedule = participation_schedule(
        config.participation, label_counts, config.rounds, config.participation_mean, config.seed
    )
    config.run_dir.mkdir(parents=True, exist_ok=True)
    write_trace(config.run_dir / TRACE_FILENAME, schedule.available)
    return schedule


def federation_of(
    grid: OrderedGrid, shapes: dict[str, tuple[int, ...]], schedule: Schedule | None, config: RunConfig
) -> Federation:
    """What a strategy is told about the federation; the true p_i only when the user declares them known."""
    probabilities = None
    if config.p_known:
        p = schedule.probabilities if schedule is not None else np.ones(config.num_clients)
        # Sampling a fraction of the available clients scales everyone's chance by it.
        probabilities = {partition_key(i): float(min(1.0, p[i] * config.fraction)) for i in range(len(p))}
    return Federation(grid.admitted, shapes, probabilities)


def node_instruction(message: Message, blobs: list[bytes], drop_residual: bool = False) -> Message:
    """A copy of a strategy's train instruction whose fast record is this node's replica sync.

    ``drop_residual`` tells a node whose last update was rejected to discard
    its error-feedback residual (what is left of the rejected update).
    """
    content = RecordDict({**message.content, FAST_KEY: sync_record(blobs)})
    if drop_residual:
        content[CONFIG_KEY] = ConfigRecord({**message.content.config_records[CONFIG_KEY], DROP_RESIDUAL_KEY: True})
    return Message(
        content=content, dst_node_id=message.metadata.dst_node_id, message_type=message.metadata.message_type
    )
