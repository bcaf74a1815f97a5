"""The run around the rounds: set up, identify the nodes (round 0), iterate the rounds, sync the final state."""

from __future__ import annotations

import pickle
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedslim.adapters import FastSlowModel, numpy_bits
from fedslim.base import ResidentBase, ensure_base, load_base
from fedslim.channel.accounting import RunWire, WireAccounting
from fedslim.channel.bounds import client_text
from fedslim.channel.downlink import Downlink, ServerReplica, state_digest
from fedslim.channel.matching import Exchange
from fedslim.channel.protocol import (
    BASE_FINGERPRINT_KEY,
    FINAL_SYNC_TYPE,
    error_text,
    instruction_content,
    partition_key,
    reported_digest,
)
from fedslim.channel.uplink import SizeScreen, UplinkReceiver
from fedslim.codecs.pipeline import decode_budget
from fedslim.commlog import LOG_FILENAME, CommLog, RoundTotals
from fedslim.config import ConfigError, RunConfig
from fedslim.consolidation import BaseChain
from fedslim.data.checks import attached_model, checked_test_data
from fedslim.data.participation import TRACE_FILENAME, Schedule, label_count_matrix, participation_schedule, write_trace
from fedslim.export import MODEL_DIRNAME, run_manifest, write_model
from fedslim.server.checkpoint import (
    CHECKPOINT_FORMAT,
    Arithmetic,
    Checkpoint,
    NodeStates,
    NodeStateStore,
    adopt_arithmetic,
    claim_run_dir,
    read_checkpoint,
    resumable_config,
    write_checkpoint,
)
from fedslim.server.identity import IdentityQuery, record_server_base
from fedslim.server.nodes import NODE_WAIT_TIMEOUT_S, NodesMissingError, OrderedGrid, wait_for_nodes
from fedslim.server.round import ServerRun
from fedslim.strategies.base import FastStrategy, Federation
from fedslim.strategies.registry import strategy_for
from fedslim.task import Task, task_for


@dataclass(frozen=True)
class RunResult:
    """What a finished run leaves behind: its log, the per-round totals and the final fast state."""

    run_id: str
    log_path: str
    rounds: list[RoundTotals]
    fast_state: dict[str, np.ndarray]
    final_state_digest: str
    """SHA-256 of the final fast state (hex), as logged."""


def identify_nodes(
    grid: Grid, config: RunConfig, base: ResidentBase, wire: WireAccounting
) -> tuple[OrderedGrid, IdentityQuery]:
    """Round 0: wait for the federation, learn each node's client key and base, and order the grid by key.

    A node holding another base is refused (logged as a rejection) and never
    sampled; a node without the base is given it (:func:`provision_bases`), or
    left out if that fails. A node that does not answer, or is not connected
    after the wait, is left out with a warning; the returned query asks it
    again in later rounds (:class:`~fedslim.server.identity.IdentityQuery`).
    Only a federation where no node can take part is refused.
    """
    task = {**config.client_task(), BASE_FINGERPRINT_KEY: base.fingerprint}
    # A node's first message starts its ClientApp (imports, the base from disk): round 0 waits at least as long as
    # for the nodes to connect, however short the round timeout.
    timeout = max(config.round_timeout, NODE_WAIT_TIMEOUT_S)
    query = IdentityQuery(task, base.path, base.fingerprint, timeout, config.provision_chunk_bytes)
    requests = query.requests(wait_for_nodes(grid, config.num_clients))
    replies = list(grid.send_and_receive(requests, timeout=timeout))
    found = query.settle(grid, requests, replies, wire)
    query = replace(query, timeout=config.round_timeout)  # later queries travel with a round's instructions
    if not set(found.keys) - found.refused:
        raise NodesMissingError(
            "no node identified itself"
            if not found.keys
            else "no node holds the server's base (or could be given it) and training examples"
        )
    return OrderedGrid(grid, wire.run.client_keys, excluded=frozenset(found.refused), declared=found.declared), query


def final_sync(run: ServerRun) -> int:
    """After the last round, give every admitted node the exact final fast state; returns how many confirmed it.

    The replica becomes the exact state (a full-state version), each node
    syncs to it and replies with the digest of what it now holds; a reply
    with another digest, an error, or none at all is logged as unconfirmed.
    """
    replica = run.downlink.replica
    replica.settle(run.fast_state)
    task = run.downlink.round_config(run.config.rounds)
    held = {node: run.client_versions.get(key) for node, key in run.grid.admitted.items()}
    messages = [
        Message(
            instruction_content(task, replica.sync_for(version), merges=run.downlink.merges_for(version)),
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
    exchange = Exchange.of(messages)
    for reply in replies:
        node, digest, problem = reply.metadata.src_node_id, reported_digest(reply), exchange.problem(reply)
        if problem is not None:
            wire.record_reply(reply, f"unexpected reply: {problem} in the final sync")
            log(WARNING, "final sync: reply from node %d rejected: %s", node, problem)
        elif digest == replica.digest:
            confirmed.add(node)
            wire.record_reply(reply, None)
        elif digest is None:
            wire.record_reply(reply, f"no final-sync confirmation: {error_text(reply)}")
        else:
            shown = client_text(digest, 64)
            wire.record_reply(reply, f"final fast state differs: node digest {shown}, server {replica.digest}")
    if len(confirmed) < len(messages):
        log(WARNING, "final sync: %d of %d nodes confirmed the final fast state", len(confirmed), len(messages))
    return len(confirmed)


def run_federation(
    grid: Grid,
    config: RunConfig,
    strategy: FastStrategy | None = None,
    on_round: Callable[[RoundTotals], None] | None = None,
    node_states: NodeStates | None = None,
) -> RunResult:
    """Run ``config.rounds`` rounds of fast-layer training and log every message; continue a killed run on resume.

    Parameters
    ----------
    grid : Grid
        Flower's grid (simulation or deployment).
    config : RunConfig
        The run. With ``resume``, the run directory's checkpoint says where
        to continue (and the run config must be the checkpoint's).
    strategy : FastStrategy, optional
        Aggregation over fast deltas; by default the one ``config.strategy``
        names. It is bound to the federation once the nodes are identified.
        On resume, the checkpoint's strategy (with its memory) is used.
    on_round : callable, optional
        Called with each round's totals as soon as the round is logged
        (progress displays).
    node_states : NodeStates, optional
        The nodes' context states, where the nodes run in this process: they
        go into each checkpoint and come back on resume, so that a resumed
        run is bit for bit the run that was killed. Without them, a resumed
        run gives every client the full fast state, and error-feedback
        residuals start from zero.
    """
    claim_run_dir(config)
    resumed = read_checkpoint(config.run_dir) if config.resume else None
    if resumed is not None:
        config = resumable_config(resumed, config)
        strategy = resumed.strategy
    strategy = strategy or strategy_for(config)
    if config.consolidate_every and not strategy.consolidates:
        raise ConfigError(
            f"--consolidate-every with strategy {type(strategy).__name__}: it cannot forget its state at a "
            "consolidation; use a fedslim strategy"
        )
    task = task_for(config)
    base = load_base(ensure_base(task, config), task)
    chain = BaseChain.replayed(base, config.fast, list(resumed.merges) if resumed is not None else [])
    model = attached_model(chain.base, config.fast, config.task)
    model.module.to(config.torch_device())
    test = checked_test_data(task, task.test_data(config), model.module, config.task)
    schedule = simulated_participation(config, task)
    first_round = resumed.completed_round + 1 if resumed is not None else 1
    wire = open_log(config, base, model, type(strategy).__name__, resumed)
    record_server_base(wire, first_round if resumed is not None else 0, base)
    store = None
    threads = torch.get_num_threads()
    try:
        if resumed is not None:
            adopt_arithmetic(resumed.arithmetic, config.torch_device())
        if node_states is not None and config.checkpoint_every:
            store = NodeStateStore(config.run_dir, resumed.node_states if resumed is not None else None)
        grid, joining = identify_nodes(
            grid, config, base, WireAccounting(wire, first_round if resumed is not None else 0)
        )
        federation = federation_of(grid, model.fast_shapes(), schedule, config)
        if resumed is None:
            strategy.bind(federation)
            replica = ServerReplica(model.fast_state(), config.downlink, base.fingerprint, seed=config.seed)
            screen = SizeScreen(config.screen_factor)
            fast_state = model.fast_state()
        else:
            strategy.rebind(federation)
            replica, screen, fast_state = resumed.replica, resumed.screen, resumed.fast_state
            model.load_fast_state(fast_state)
        run = ServerRun(
            config=config,
            grid=grid,
            strategy=strategy,
            model=model,
            task=task,
            test=test,
            fast_state=fast_state,
            downlink=Downlink(replica, {**config.client_task(), BASE_FINGERPRINT_KEY: base.fingerprint}, chain),
            uplink=UplinkReceiver(
                model.fast_shapes(),
                chain.base.fingerprint,
                screen,
                config.local_step_count,
                grid.declared_by_client(),
                decode_budget(config.uplink, model.fast_shapes()),
            ),
            wire=wire,
            schedule=schedule,
            on_round=on_round,
            joining=joining,
        )
        if resumed is None:
            run.finish_round(0, 0, 0, len(grid.admitted), time.monotonic())
            save_checkpoint(run, 0, node_states, store)
        else:
            restore_clients(run, resumed, node_states, store)
        for server_round in range(first_round, config.rounds + 1):
            run.run_round(server_round)
            if config.checkpoint_every and (
                server_round % config.checkpoint_every == 0 or server_round == config.rounds
            ):
                save_checkpoint(run, server_round, node_states, store)
            wire.commlog.checkpoint()
        if config.final_sync:
            final_sync(run)
        digest = state_digest(run.fast_state, length=64)
        wire.commlog.finish_run(wire.run_id, digest)
        save_checkpoint(run, config.rounds, node_states, store, finished=True)
        if not config.checkpoint_every:
            save_model(run, config.rounds, finished=True)
        log(INFO, "fedslim run %s finished: final state digest %s", wire.run_id, digest)
        return RunResult(
            wire.run_id, str(wire.commlog.path), wire.commlog.round_totals(wire.run_id), run.fast_state, digest
        )
    finally:
        torch.set_num_threads(threads)  # a resume computes on the run's threads; the caller gets its own back
        wire.commlog.close()
        if store is not None:
            store.close()


def save_checkpoint(
    run: ServerRun,
    completed_round: int,
    node_states: NodeStates | None,
    store: NodeStateStore | None,
    finished: bool = False,
) -> None:
    """Write the run's checkpoint after ``completed_round`` (see :mod:`fedslim.server.checkpoint`)."""
    if not run.config.checkpoint_every:
        return
    index = None
    if node_states is not None and store is not None:
        keys = run.grid.admitted
        changed = {keys[node]: state for node, state in node_states.changed_states().items() if node in keys}
        index = store.stage(changed, completed_round)
    checkpoint = Checkpoint(
        format=CHECKPOINT_FORMAT,
        run_id=run.wire.run_id,
        config=run.config,
        completed_round=completed_round,
        fast_state=run.fast_state,
        replica=run.downlink.replica,
        client_versions=run.client_versions,
        rejected=run.rejected,
        strategy=run.strategy,
        screen=run.uplink.screen,
        node_states=index,
        arithmetic=Arithmetic.here(run.config.torch_device()),
        finished=finished,
        merges=tuple(run.downlink.chain.blobs) if run.downlink.chain is not None else (),
    )
    # The model first: a run stopped between the two resumes from the older checkpoint and writes the model again,
    # where the other order could leave a checkpoint that counts as finished beside an older model.
    save_model(run, completed_round, finished)
    try:
        write_checkpoint(checkpoint, run.config.run_dir)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"cannot checkpoint the run: {exc} (a custom strategy must be picklable; or set checkpoint-every 0)"
        ) from exc
    if store is not None and index is not None:
        store.settle(index)


def save_model(run: ServerRun, completed_round: int, finished: bool) -> None:
    """Write ``RUN_DIR/model/``: the run's exact fast state after ``completed_round`` (the one its central
    evaluation measured), its consolidations and a manifest (see :mod:`fedslim.export`)."""
    chain = run.downlink.chain
    assert chain is not None  # run_federation always gives its downlink the chain
    manifest = run_manifest(
        run.config,
        run.wire.run_id,
        chain.root,
        chain.base.fingerprint,
        completed_round,
        finished,
        run.fast_state,
        len(chain.blobs),
    )
    write_model(run.config.run_dir / MODEL_DIRNAME, manifest, run.fast_state, chain.blobs)


def restore_clients(
    run: ServerRun, resumed: Checkpoint, node_states: NodeStates | None, store: NodeStateStore | None
) -> None:
    """What the server knows of its clients after a resume: their node states where it holds them, else nothing.

    Nodes whose state cannot be put back hold no replica the server knows
    (they get the full state) and no error-feedback residual.
    """
    run.rejected = set(resumed.rejected)
    if node_states is not None and store is not None and resumed.node_states is not None:
        nodes, saved = run.grid.nodes_of(), store.load()
        node_states.restore_states({nodes[client]: state for client, state in saved.items() if client in nodes})
        node_states.changed_states()  # what was just put back is what the store holds
        run.client_versions = {
            client: resumed.client_versions.get(client) if client in saved else None for client in run.client_versions
        }
    else:
        run.client_versions = dict.fromkeys(run.client_versions)
        run.rejected = set()
    log(
        INFO,
        "fedslim run %s resumed after round %d (%s)",
        run.wire.run_id,
        resumed.completed_round,
        "node states restored" if store is not None and resumed.node_states is not None else "clients resync",
    )


def open_log(
    config: RunConfig, base: ResidentBase, model: FastSlowModel, strategy: str, resumed: Checkpoint | None
) -> RunWire:
    """Open the run directory's communication log: a new run in it, or the resumed one with its killed round gone."""
    commlog = CommLog(config.run_dir / LOG_FILENAME)
    fast_parameters = model.num_fast_parameters()
    full_payload_bytes = ArrayRecord({n: Array(numpy_bits(t)) for n, t in base.state.items()}).count_bytes()
    if resumed is not None:
        run_id = resumed.run_id
        # A final sync logged after the checkpoint is done again (its rows go): the checkpoint does not count it.
        commlog.continue_run(run_id, resumed.completed_round, forget_types=(FINAL_SYNC_TYPE,))
    else:
        run_id = uuid.uuid4().hex[:12]
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
        "fedslim run %s%s: %d fast of %d base parameters (%s), strategy %s, participation %s, "
        "codec up %s / down %s, log %s",
        run_id,
        f" (resumed after round {resumed.completed_round})" if resumed is not None else "",
        fast_parameters,
        base.num_parameters(),
        config.fast.kind
        + (f", personal {config.fast.personal} kept on each client" if config.fast.personal != "none" else ""),
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


def simulated_participation(config: RunConfig, task: Task) -> Schedule | None:
    """The availability schedule of a simulated participation model (None for ``all``), saved as a trace."""
    if config.participation == "all":
        return None
    label_counts = label_count_matrix([np.asarray(task.label_counts(config, i)) for i in range(config.num_clients)])
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
