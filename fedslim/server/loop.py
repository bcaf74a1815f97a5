"""The run around the rounds: set up, identify the nodes (round 0), iterate the rounds, sync the final state."""

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

from fedslim.adapters import FastSlowModel
from fedslim.base import ResidentBase, ensure_pretrained_base, load_base
from fedslim.channel.accounting import RunWire, WireAccounting
from fedslim.channel.downlink import Downlink, ServerReplica
from fedslim.channel.protocol import (
    BASE_BYTES_KEY,
    BASE_FINGERPRINT_KEY,
    CONFIG_KEY,
    FAST_KEY,
    FINAL_SYNC_TYPE,
    BaseStatus,
    base_report,
    client_key,
    declared_examples,
    error_text,
    identity_requests,
    partition_key,
    reported_digest,
    sync_record,
)
from fedslim.channel.uplink import SizeScreen, UplinkReceiver
from fedslim.commlog import LOG_FILENAME, CommLog, RoundTotals
from fedslim.config import RunConfig
from fedslim.data.datasets import FederatedData, load_federation
from fedslim.data.participation import TRACE_FILENAME, Schedule, participation_schedule, write_trace
from fedslim.server.nodes import NodesMissingError, OrderedGrid, wait_for_nodes
from fedslim.server.provisioning import provision_bases
from fedslim.server.round import ServerRun
from fedslim.strategies.base import FastStrategy, Federation
from fedslim.strategies.registry import strategy_for


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
    task = {**config.client_task(), BASE_FINGERPRINT_KEY: base.fingerprint}
    query = ConfigRecord({**task, BASE_BYTES_KEY: base.path.stat().st_size})
    requests = identity_requests(wait_for_nodes(grid, config.num_clients), query)
    replies = list(grid.send_and_receive(requests, timeout=config.round_timeout))
    keys = wire.run.client_keys
    declared: dict[int, int] = {}
    for reply in replies:
        key, examples = client_key(reply), declared_examples(reply)
        if key:
            keys[reply.metadata.src_node_id] = key
        if key and examples is not None:
            declared[reply.metadata.src_node_id] = examples
    for request in requests:
        wire.record_down(request)
    refused: set[int] = set()
    missing: dict[int, int] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        report = base_report(reply)
        reason = None if node in keys else f"no client key in the identity reply: {error_text(reply)}"
        if report is not None and report.status == BaseStatus.MISMATCH:
            reason = (
                f"base fingerprint mismatch: node {keys[node]} holds {_short(report.fingerprint)}, "
                f"the server's base is {_short(base.fingerprint)}; it takes no part in the run"
            )
            refused.add(node)
        elif report is not None and report.status == BaseStatus.MISSING:
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
    return OrderedGrid(grid, keys, excluded=frozenset(refused), declared=declared)


def _short(fingerprint: str) -> str:
    """A hex fingerprint cut for a log line; anything else (a reason it could not be read) in full."""
    return f"{fingerprint[:16]}..." if len(fingerprint) == 64 else fingerprint


def final_sync(run: ServerRun) -> int:
    """After the last round, give every admitted node the exact final fast state; returns how many confirmed it.

    The replica becomes the exact state (a full-state version), each node
    syncs to it and replies with the digest of what it now holds; a reply
    with another digest, an error, or none at all is logged as unconfirmed.
    """
    replica = run.downlink.replica
    replica.settle(run.fast_state)
    task = ConfigRecord(run.downlink.round_config(run.config.rounds))
    held = {node: run.client_versions.get(key) for node, key in run.grid.admitted.items()}
    messages = [
        Message(
            RecordDict({FAST_KEY: sync_record(replica.sync_for(version)), CONFIG_KEY: task}),
            dst_node_id=node,
            message_type=FINAL_SYNC_TYPE,
        )
        for node, version in held.items()
    ]
    replies = list(run.grid.send_and_receive(messages, timeout=run.config.round_timeout))
    wire = WireAccounting(run.wire, run.config.rounds)
    for message in messages:
        node = message.metadata.dst_node_id
        wire.record_down(message, held[node], replica.version, codec=replica.full_state_pipeline.spec)
    confirmed: set[int] = set()
    for reply in replies:
        node, digest = reply.metadata.src_node_id, reported_digest(reply)
        if node not in held or node in confirmed:
            wire.record_reply(reply, "unexpected reply: not asked for, or a second reply, in the final sync")
        elif digest == replica.digest:
            confirmed.add(node)
            wire.record_reply(reply, None)
        elif digest is None:
            wire.record_reply(reply, f"no final-sync confirmation: {error_text(reply)}")
        else:
            wire.record_reply(reply, f"final fast state differs: node digest {digest}, server {replica.digest}")
    if len(confirmed) < len(messages):
        log(WARNING, "final sync: %d of %d nodes confirmed the final fast state", len(confirmed), len(messages))
    return len(confirmed)


def run_federation(
    grid: Grid,
    config: RunConfig,
    strategy: FastStrategy | None = None,
    on_round: Callable[[RoundTotals], None] | None = None,
) -> RunResult:
    """Run ``config.rounds`` rounds of fast-layer training and log every message.

    Parameters
    ----------
    grid : Grid
        Flower's grid (simulation or deployment).
    config : RunConfig
        The run.
    strategy : FastStrategy, optional
        Aggregation over fast deltas; by default the one ``config.strategy``
        names. It is bound to the federation once the nodes are identified.
    on_round : callable, optional
        Called with each round's totals as soon as the round is logged
        (progress displays).
    """
    strategy = strategy or strategy_for(config)
    base = load_base(ensure_pretrained_base(config), config.dataset)
    model = base.build(config.fast)
    data = load_federation(config)
    schedule = simulated_participation(config, data)
    wire = start_log(config, base, model, type(strategy).__name__)
    try:
        grid = identify_nodes(grid, config, base, WireAccounting(wire, 0))
        strategy.bind(federation_of(grid, model.fast_shapes(), schedule, config))
        replica = ServerReplica(model.fast_state(), config.downlink, base.fingerprint, seed=config.seed)
        screen = SizeScreen(config.screen_factor)
        run = ServerRun(
            config=config,
            grid=grid,
            strategy=strategy,
            model=model,
            test=data.test,
            fast_state=model.fast_state(),
            downlink=Downlink(replica, {**config.client_task(), BASE_FINGERPRINT_KEY: base.fingerprint}),
            uplink=UplinkReceiver(
                model.fast_shapes(), base.fingerprint, screen, config.local_step_count, grid.declared_by_client()
            ),
            wire=wire,
            schedule=schedule,
            on_round=on_round,
        )
        run.finish_round(0, 0, 0, len(grid.admitted), time.monotonic())
        for server_round in range(1, config.rounds + 1):
            run.run_round(server_round)
        if config.final_sync:
            final_sync(run)
        wire.commlog.finish_run(wire.run_id)
        return RunResult(wire.run_id, str(wire.commlog.path), wire.commlog.round_totals(wire.run_id), run.fast_state)
    finally:
        wire.commlog.close()


def start_log(config: RunConfig, base: ResidentBase, model: FastSlowModel, strategy: str) -> RunWire:
    """Open the run directory's communication log and record the run in it."""
    commlog = CommLog(config.run_dir / LOG_FILENAME)
    run_id = uuid.uuid4().hex[:12]
    fast_parameters = model.num_fast_parameters()
    full_payload_bytes = ArrayRecord(base.state).count_bytes()
    fast_payload_bytes = ArrayRecord({n: Array(v) for n, v in model.fast_state().items()}).count_bytes()
    commlog.start_run(
        run_id,
        config.to_dict(),
        base.fingerprint,
        base.num_parameters(),
        fast_parameters,
        fast_payload_bytes,
        full_payload_bytes,
    )
    log(
        INFO,
        "fedslim run %s: %d fast of %d base parameters (%s), strategy %s, participation %s, "
        "codec up %s / down %s, log %s",
        run_id,
        fast_parameters,
        base.num_parameters(),
        config.fast.kind,
        strategy,
        config.participation,
        config.uplink.spec,
        config.downlink.spec,
        commlog.path,
    )
    return RunWire(
        commlog,
        run_id,
        fast_raw_bytes=4 * fast_parameters,
        full_payload_bytes=full_payload_bytes,
        uplink=config.uplink.spec,
        downlink=config.downlink.spec,
        client_keys={},
    )


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
