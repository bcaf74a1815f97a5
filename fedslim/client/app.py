"""The fedslim ClientApp: check the resident base, sync the fast replica, train it, reply with the compressed delta."""

from __future__ import annotations

import pickle
import resource
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedslim.adapters import FastSlowModel
from fedslim.base import ResidentBase, checkpoint_fingerprint, default_base_path, load_base
from fedslim.client.provisioning import PartialBase, ProvisioningError
from fedslim.codecs.feedback import Residual, compensate, new_residual
from fedslim.codecs.pipeline import DELTA, decode_update, encode_update
from fedslim.config import ConfigError, FastSpec, RunConfig
from fedslim.messages import (
    ANCHOR_METRIC,
    BAD_REQUEST,
    BASE_DIFFERENT,
    BASE_MISMATCH,
    BASE_MISSING,
    BASE_MISSING_STATUS,
    BASE_OK,
    CHUNK_KEY,
    CONFIG_KEY,
    CPU_KEY,
    DELTA_KEY,
    DIRECTION_KEY,
    DROP_RESIDUAL_KEY,
    FAST_KEY,
    METRICS_KEY,
    NON_FINITE_UPDATE,
    NUM_EXAMPLES_KEY,
    PEAK_RSS_KEY,
    REPLICA_MISMATCH,
    ROLE_KEY,
    BaseReport,
    identity_reply,
    partition_key,
    provision_reply,
    record_chunk,
    record_sync,
    record_update,
    replica_report,
    update_record,
)
from fedslim.replica import ClientReplica, ReplicaMismatch
from fedslim.data.datasets import ArrayDataset, DatasetMissingError, load_array_file, load_federation
from fedslim.training import full_gradient, train_epochs, train_steps, train_variance_reduced

# Keys in the node's Flower context state (kept by the SuperNode across rounds and ClientApp restarts).
REPLICA_KEY = "fedslim-replica"
REPLICA_META_KEY = "fedslim-replica-meta"
RESIDUAL_KEY = "fedslim-ef-residual"
RESIDUAL_META_KEY = "fedslim-ef-residual-meta"

# What a train instruction asks for: plain local training, or FedAMD's anchor / miner work.
TRAIN_ROLE, ANCHOR_ROLE, MINER_ROLE = "train", "anchor", "miner"

app = ClientApp()


class Refusal(Exception):
    """The client refuses the request; the reply carries ``code`` and the reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.process_time()
    try:
        content = handle_train(msg, context)
    except Refusal as refusal:
        return Message(Error(code=refusal.code, reason=str(refusal)), reply_to=msg)
    metrics = content.metric_records[METRICS_KEY]
    metrics[CPU_KEY] = time.process_time() - started
    metrics[PEAK_RSS_KEY] = peak_rss_bytes()
    return Message(content, reply_to=msg)


def peak_rss_bytes() -> int:
    """The largest resident memory this process has had (in simulation every virtual node shares the process)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Report this node's stable client key (the server orders and samples by it) and what it holds of the base."""
    try:
        report = base_report(msg, context) if CONFIG_KEY in msg.content.config_records else None
    except Refusal as refusal:
        return Message(Error(code=refusal.code, reason=str(refusal)), reply_to=msg)
    return identity_reply(msg, node_key(context), report)


def base_report(msg: Message, context: Context) -> BaseReport:
    """ok, mismatch (with the fingerprint held instead), or missing (with the bytes of a partial download)."""
    config, extras = task_config(msg, "base-fingerprint", "base-bytes")
    expected, total = str(extras["base-fingerprint"]), extras["base-bytes"]
    path = node_base_path(context, config)
    if not path.is_file() and isinstance(total, int):
        partial = PartialBase(path)
        held = partial.held(expected, total)
        if held < total:
            return BaseReport(BASE_MISSING_STATUS, partial_bytes=held)
        try:  # the last chunk arrived but the node stopped before verifying it
            finish_download(partial, expected)
        except ValueError:
            return BaseReport(BASE_MISSING_STATUS)
    if not path.is_file():
        return BaseReport(BASE_MISSING_STATUS)
    try:
        held_fingerprint = load_base(path, config.dataset).fingerprint
    except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        # Another file sits where the base belongs: refused, never overwritten.
        return BaseReport(BASE_DIFFERENT, f"unreadable ({exc})")
    return BaseReport(BASE_OK if held_fingerprint == expected else BASE_DIFFERENT, held_fingerprint)


@app.query("provision")
def provision(msg: Message, context: Context) -> Message:
    """Take one chunk of the server's base; once all of it is here and its fingerprint checks, keep it."""
    try:
        config, extras = task_config(msg, "base-fingerprint", "offset", "total-bytes")
        expected, offset, total = str(extras["base-fingerprint"]), extras["offset"], extras["total-bytes"]
        if not (isinstance(offset, int) and isinstance(total, int) and 0 <= offset < total):
            raise Refusal(BAD_REQUEST, f"bad provisioning chunk: offset {offset!r} of {total!r} bytes")
        try:
            chunk = record_chunk(msg.content.array_records[CHUNK_KEY])
        except (KeyError, ValueError) as exc:
            raise Refusal(BAD_REQUEST, f"bad provisioning chunk: {exc}") from exc
        partial = PartialBase(node_base_path(context, config))
        try:
            held = partial.write(expected, total, offset, chunk)
        except ProvisioningError as exc:
            raise Refusal(BAD_REQUEST, f"bad provisioning chunk: {exc}") from exc
        if held < total:
            return provision_reply(msg, held, verified=False)
        try:
            finish_download(partial, expected)
        except ValueError as exc:
            raise Refusal(BASE_MISMATCH, f"provisioned base rejected: {exc}") from exc
        return provision_reply(msg, total, verified=True)
    except Refusal as refusal:
        return Message(Error(code=refusal.code, reason=str(refusal)), reply_to=msg)


def finish_download(partial: PartialBase, expected: str) -> None:
    """Keep a complete download if it is a checkpoint with the ``expected`` fingerprint, else discard it."""
    try:
        partial.finish(expected, checkpoint_fingerprint(partial.part))
    except ValueError:
        partial.discard()
        raise


def node_key(context: Context) -> str:
    """``partition-<id>`` for a simulated node, else the deployed node's ``node-name``."""
    if "partition-id" in context.node_config:
        return partition_key(int(context.node_config["partition-id"]))
    return str(context.node_config.get("node-name") or f"node-{context.node_id}")


def node_seed(context: Context) -> int:
    """This node's share of the training seed: its partition id, or a hash of its client key."""
    if "partition-id" in context.node_config:
        return int(context.node_config["partition-id"])
    return zlib.crc32(node_key(context).encode())


@app.query("sync")
def final_sync(msg: Message, context: Context) -> Message:
    """The end-of-run sync: take the server's final fast state and confirm its digest."""
    try:
        synced = synced_task(msg, context)
    except Refusal as refusal:
        return Message(Error(code=refusal.code, reason=str(refusal)), reply_to=msg)
    return Message(replica_report(synced.replica), reply_to=msg)


@dataclass(frozen=True)
class SyncedTask:
    """A server instruction, checked, with this node's replica brought to the server's version."""

    config: RunConfig
    base: ResidentBase
    server_round: int
    role: str
    replica: ClientReplica
    drop_residual: bool


def synced_task(msg: Message, context: Context) -> SyncedTask:
    """Parse the task config, check the resident base against the server's, and sync the replica.

    Raises :class:`Refusal` when the request cannot be honoured: the resident
    base is missing or differs from the server's, the replica cannot reach the
    server's version, or the request is malformed.
    """
    config, extras = task_config(
        msg, "base-fingerprint", "server-round", "replica-version", "replica-digest", ROLE_KEY, DROP_RESIDUAL_KEY
    )
    expected_fingerprint = str(extras["base-fingerprint"] or "")
    server_round = extras["server-round"] or 0
    target_version = extras["replica-version"]
    target_digest = str(extras["replica-digest"] or "")
    role = extras[ROLE_KEY] or TRAIN_ROLE
    if role not in (TRAIN_ROLE, ANCHOR_ROLE, MINER_ROLE):
        raise Refusal(BAD_REQUEST, f"bad task config: unknown role {role!r}")
    if not isinstance(server_round, int) or not isinstance(target_version, int):
        raise Refusal(BAD_REQUEST, "bad task config: server-round and replica-version must be integers")

    base = resident_base(context, config)
    if base.fingerprint != expected_fingerprint:
        raise Refusal(
            BASE_MISMATCH,
            f"base fingerprint mismatch: the server expects {expected_fingerprint[:16]}..., "
            f"this node's base {base.path} is {base.fingerprint[:16]}...; refusing to train on a different base",
        )
    replica = sync_replica(msg, context, base, config.fast, target_version, target_digest)
    return SyncedTask(config, base, server_round, str(role), replica, bool(extras[DROP_RESIDUAL_KEY]))


def handle_train(msg: Message, context: Context) -> RecordDict:
    """Sync the replica, train the fast layer from it, and return the reply content (see :func:`synced_task`)."""
    task = synced_task(msg, context)
    config, base, server_round, role, replica = task.config, task.base, task.server_round, task.role, task.replica
    model = fast_model(base, config.fast)
    model.load_fast_state(replica.state)

    data = local_data(context, config)
    seed = [config.seed, server_round, node_seed(context)]
    metrics = MetricRecord({NUM_EXAMPLES_KEY: len(data)})
    if role == ANCHOR_ROLE:
        # FedAMD anchor: the full local gradient at the synced state, sent as it is (no error feedback).
        gradient, loss = full_gradient(model.module, model.fast_parameters(), data)
        upload = dict(zip(model.fast_state(), gradient))
        blob = encode_plain(config, upload, base.fingerprint, replica.version, seed)
        metrics["train-loss"] = loss
        metrics[ANCHOR_METRIC] = 1
    else:
        if role == MINER_ROLE:
            direction = decode_direction(msg, model.fast_shapes())
            loss = train_variance_reduced(
                model.module,
                model.fast_parameters(),
                data,
                config.local_step_count(len(data)),
                config.lr,
                config.batch_size,
                [direction[name] for name in model.fast_state()],
                seed,
            )
        elif config.local_steps:
            loss = train_steps(
                model.module, model.fast_parameters(), data, config.local_steps, config.lr, config.batch_size, seed
            )
        else:
            loss = train_epochs(
                model.module,
                model.fast_parameters(),
                data,
                epochs=config.local_epochs,
                lr=config.lr,
                batch_size=config.batch_size,
                seed=seed,
            )
        trained = model.fast_state()
        delta = {name: trained[name] - replica.state[name] for name in trained}
        blob = encode_delta(context, config, delta, base.fingerprint, replica.version, seed, task.drop_residual)
        metrics["train-loss"] = float(loss)
    return RecordDict(
        {
            DELTA_KEY: update_record(blob),
            METRICS_KEY: metrics,
        }
    )


def sync_replica(
    msg: Message, context: Context, base: ResidentBase, spec: FastSpec, target_version: int, target_digest: str
) -> ClientReplica:
    """Bring this node's replica (kept in its Flower context) to the server's version, and store it back."""
    held = context.state.config_records.get(REPLICA_META_KEY)
    if held is not None and held.get("base") == base.fingerprint and REPLICA_KEY in context.state.array_records:
        state = {name: array.numpy() for name, array in context.state.array_records[REPLICA_KEY].items()}
        replica = ClientReplica(state, int(held["version"]))  # type: ignore[arg-type]
    else:
        replica = ClientReplica(initial_fast_state(base, spec), 0)
    try:
        blobs = record_sync(msg.content.array_records[FAST_KEY])
        replica = replica.synced(
            blobs, fast_model(base, spec).fast_shapes(), base.fingerprint, target_version, target_digest
        )
    except (KeyError, ValueError) as exc:
        if isinstance(exc, ReplicaMismatch):
            for key in (REPLICA_KEY, REPLICA_META_KEY):
                context.state.pop(key, None)
            raise Refusal(REPLICA_MISMATCH, f"cannot sync the fast state: {exc}") from exc
        raise Refusal(BAD_REQUEST, f"bad fast-state sync from the server: {exc}") from exc
    context.state[REPLICA_KEY] = ArrayRecord({name: Array(value) for name, value in replica.state.items()})
    context.state[REPLICA_META_KEY] = ConfigRecord({"version": replica.version, "base": base.fingerprint})
    return replica


def encode_delta(
    context: Context,
    config: RunConfig,
    delta: dict[str, np.ndarray],
    base_fingerprint: str,
    version: int,
    seed: list[int],
    drop_residual: bool,
) -> bytes:
    """Compress the delta with the uplink codec, with error feedback for biased codecs (residual in the context).

    ``drop_residual``: the server rejected this node's last update, so the
    residual left from it (part of a diverged run, say) is discarded, not sent.
    """
    pipeline = config.uplink
    use_feedback = config.error_feedback and pipeline.biased
    residual = load_residual(context) if use_feedback and not drop_residual else None
    sent = compensate(delta, residual, version, config.error_feedback_decay)
    try:
        encoded = encode_update(
            sent,
            pipeline,
            kind=DELTA,
            base_fingerprint=base_fingerprint,
            state_version=version,
            seed=int(np.random.SeedSequence(seed).generate_state(1)[0]),
        )
    except ValueError as exc:
        raise Refusal(NON_FINITE_UPDATE, f"cannot encode the local update: {exc}") from exc
    if use_feedback:
        store_residual(context, new_residual(sent, encoded.decoded, version))
    return encoded.blob


def encode_plain(
    config: RunConfig, tensors: dict[str, np.ndarray], base_fingerprint: str, version: int, seed: list[int]
) -> bytes:
    """Compress with the uplink codec, without error feedback (a FedAMD anchor gradient is not a delta)."""
    try:
        encoded = encode_update(
            tensors,
            config.uplink,
            kind=DELTA,
            base_fingerprint=base_fingerprint,
            state_version=version,
            seed=int(np.random.SeedSequence(seed).generate_state(1)[0]),
        )
    except ValueError as exc:
        raise Refusal(NON_FINITE_UPDATE, f"cannot encode the local gradient: {exc}") from exc
    return encoded.blob


def decode_direction(msg: Message, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """FedAMD's global direction v sent to a miner."""
    try:
        return decode_update(record_update(msg.content.array_records[DIRECTION_KEY]), shapes).tensors
    except (KeyError, ValueError) as exc:
        raise Refusal(BAD_REQUEST, f"miner instruction without a valid direction: {exc}") from exc


def load_residual(context: Context) -> Residual | None:
    if RESIDUAL_KEY not in context.state.array_records:
        return None
    tensors = {name: array.numpy() for name, array in context.state.array_records[RESIDUAL_KEY].items()}
    return Residual(tensors, int(context.state.config_records[RESIDUAL_META_KEY]["version"]))  # type: ignore[arg-type]


def store_residual(context: Context, residual: Residual) -> None:
    context.state[RESIDUAL_KEY] = ArrayRecord({name: Array(value) for name, value in residual.tensors.items()})
    context.state[RESIDUAL_META_KEY] = ConfigRecord({"version": residual.version})


def task_config(msg: Message, *extra_keys: str) -> tuple[RunConfig, dict[str, Any]]:
    """The run config in a server message's task record, and the values of ``extra_keys`` (None where absent)."""
    task = dict(msg.content.config_records[CONFIG_KEY]) if CONFIG_KEY in msg.content.config_records else {}
    extras = {key: task.pop(key, None) for key in extra_keys}
    try:
        return RunConfig.from_flat(task), extras
    except (ConfigError, TypeError) as exc:
        raise Refusal(BAD_REQUEST, f"bad task config: {exc}") from exc


def node_base_path(context: Context, config: RunConfig) -> Path:
    """Where this node keeps the base: ``base-path`` from the node config, else the benchmark cache."""
    return Path(str(context.node_config.get("base-path") or default_base_path(config)))


def resident_base(context: Context, config: RunConfig) -> ResidentBase:
    """The base checkpoint this node holds."""
    try:
        return load_base(node_base_path(context, config), config.dataset)
    except FileNotFoundError as exc:
        raise Refusal(BASE_MISSING, f"no resident base on this node: {exc}") from exc


@lru_cache(maxsize=4)
def initial_fast_state(base: ResidentBase, spec: FastSpec) -> dict[str, np.ndarray]:
    """Version 0 of the replica: the fast layer as attached to the base, before any training."""
    return {name: value.copy() for name, value in base.build(spec).fast_state().items()}


@lru_cache(maxsize=4)
def fast_model(base: ResidentBase, spec: FastSpec) -> FastSlowModel:
    """The base with the fast layer attached, built once per process and reused across rounds."""
    return base.build(spec)


def local_data(context: Context, config: RunConfig) -> ArrayDataset:
    """This node's training data: its own file (``data-path``), else the simulated partition (``partition-id``)."""
    if "data-path" in context.node_config:
        try:
            return load_array_file(Path(str(context.node_config["data-path"])))
        except (DatasetMissingError, ValueError) as exc:
            raise Refusal(BAD_REQUEST, str(exc)) from exc
    if "partition-id" not in context.node_config:
        raise Refusal(BAD_REQUEST, "node_config has neither data-path nor partition-id: this node has no training data")
    partition_id = int(context.node_config["partition-id"])
    try:
        clients = load_federation(config).clients
    except DatasetMissingError as exc:
        raise Refusal(BAD_REQUEST, str(exc)) from exc
    if not 0 <= partition_id < len(clients):
        raise Refusal(BAD_REQUEST, f"partition-id {partition_id} out of range for {len(clients)} clients")
    return clients[partition_id]
