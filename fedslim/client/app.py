"""The fedslim ClientApp: check the resident base, sync the fast replica, train it, reply with the compressed delta."""

from __future__ import annotations

import resource
import time
import zlib
from collections.abc import Callable, Sized
from dataclasses import dataclass
from functools import lru_cache, wraps
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from torch import nn

from fedslim.adapters import FastSlowModel
from fedslim.base import ResidentBase, checkpoint_fingerprint, load_base
from fedslim.channel.downlink import (
    ClientReplica,
    instruction_task,
    received_direction,
    state_digest,
    sync_replica,
)
from fedslim.channel.protocol import (
    ANCHOR_METRIC,
    BASE_BYTES_KEY,
    BASE_CHAIN_KEY,
    BASE_FINGERPRINT_KEY,
    BASE_META_KEY,
    BASE_PATH_KEY,
    CHAIN_STATE_KEY,
    CHUNK_KEY,
    CONFIG_KEY,
    CPU_KEY,
    DATA_PATH_KEY,
    DROP_RESIDUAL_KEY,
    EVAL_CORRECT_KEY,
    EVAL_EXAMPLES_KEY,
    EVAL_LOSS_KEY,
    MERGES_KEY,
    MODEL_OUT_KEY,
    NODE_NAME_KEY,
    NUM_EXAMPLES_KEY,
    OFFSET_KEY,
    PARTITION_ID_KEY,
    PEAK_RSS_KEY,
    PERSONAL_META_KEY,
    PERSONAL_STATE_KEY,
    REPLICA_DIGEST_KEY,
    REPLICA_VERSION_KEY,
    ROLE_KEY,
    SERVER_ROUND_KEY,
    TASK_DIGEST_KEY,
    TASKS_KEY,
    TOTAL_BYTES_KEY,
    TRAIN_LOSS_KEY,
    BaseReport,
    BaseStatus,
    Refusal,
    RefusalCode,
    Role,
    evaluation_content,
    identity_reply,
    instruction_merges,
    partition_key,
    provision_reply,
    record_chunk,
    replica_report,
    update_content,
)
from fedslim.channel.uplink import UplinkEncoder
from fedslim.client.provisioning import PartialBase, ProvisioningError
from fedslim.config import BUILTIN_TASKS, ConfigError, FastSpec, RunConfig
from fedslim.consolidation import header, keep_merged, replayed_base
from fedslim.data.checks import DataError, NoExamplesError, check_data
from fedslim.export import run_manifest, write_model
from fedslim.task import Task, task_for
from fedslim.training import full_gradient, train_epochs, train_steps, train_variance_reduced

app = ClientApp()

Handler = Callable[[Message, Context], Message]


def answers_refusals(handler: Handler) -> Handler:
    """A handler whose :class:`~fedslim.channel.protocol.Refusal` becomes the error reply to the request."""

    @wraps(handler)
    def answer(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Refusal as refusal:
            return refusal.reply_to(msg)

    return answer


@app.train()
@answers_refusals
def train(msg: Message, context: Context) -> Message:
    started = time.process_time()
    blob, claims = handle_train(msg, context)
    claims[CPU_KEY] = time.process_time() - started
    claims[PEAK_RSS_KEY] = peak_rss_bytes()
    return Message(update_content(blob, claims), reply_to=msg)


def peak_rss_bytes() -> int:
    """The largest resident memory this process has had (in simulation every virtual node shares the process)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@app.evaluate()
@answers_refusals
def evaluate(msg: Message, context: Context) -> Message:
    """Sync the replica and evaluate it on this node's held-out examples (client-side evaluation)."""
    started = time.process_time()
    instruction = synced_instruction(msg, context)
    _, held_out = checked_split(context, instruction)
    if held_out is None:
        raise Refusal(
            RefusalCode.BAD_REQUEST,
            f"no held-out examples to evaluate on (client-holdout {instruction.config.client_holdout:g})",
        )
    model = fast_model(instruction.base, instruction.config.fast, instruction.device)
    model.load_fast_state(instruction.replica.state)
    load_personal(model, context, instruction.base, instruction.config.fast)
    result = instruction.base.task.evaluate(model.module, held_out)
    claims: dict[str, int | float] = {
        EVAL_EXAMPLES_KEY: result.num_examples,
        EVAL_CORRECT_KEY: round(result.accuracy * result.num_examples),
        EVAL_LOSS_KEY: result.loss,
        CPU_KEY: time.process_time() - started,
        PEAK_RSS_KEY: peak_rss_bytes(),
    }
    return Message(evaluation_content(claims), reply_to=msg)


@app.query()
@answers_refusals
def identify(msg: Message, context: Context) -> Message:
    """Report this node's stable client key (the server orders and samples by it), what it holds of the base, and
    how many training examples it has (the most any of its train replies may claim)."""
    if CONFIG_KEY not in msg.content.config_records:
        return identity_reply(msg, node_key(context))
    config, _ = task_config(msg, BASE_FINGERPRINT_KEY, BASE_BYTES_KEY)
    try:
        examples: int | None = len(local_data(context, config))
    except Refusal:
        examples = None  # no data to declare: the node's train replies will say why
    return identity_reply(msg, node_key(context), base_report(msg, context), examples)


def base_report(msg: Message, context: Context) -> BaseReport:
    """ok, mismatch (with the fingerprint held instead), or missing (with the bytes of a partial download)."""
    config, extras = task_config(msg, BASE_FINGERPRINT_KEY, BASE_BYTES_KEY)
    expected, total = str(extras[BASE_FINGERPRINT_KEY]), extras[BASE_BYTES_KEY]
    path = node_base_path(context, config)
    task = node_task(config, context)
    if not path.is_file() and isinstance(total, int):
        partial = PartialBase(path)
        held = partial.held(expected, total)
        if held < total:
            return BaseReport(BaseStatus.MISSING, partial_bytes=held)
        try:  # the last chunk arrived but the node stopped before verifying it
            finish_download(partial, expected, task)
        except ValueError:
            return BaseReport(BaseStatus.MISSING)
    if not path.is_file():
        return BaseReport(BaseStatus.MISSING)
    try:
        held_fingerprint = load_base(path, task).fingerprint
    except (OSError, ValueError) as exc:
        # Another file sits where the base belongs: refused, never overwritten.
        return BaseReport(BaseStatus.MISMATCH, f"unreadable ({exc})")
    return BaseReport(BaseStatus.OK if held_fingerprint == expected else BaseStatus.MISMATCH, held_fingerprint)


@app.query("provision")
@answers_refusals
def provision(msg: Message, context: Context) -> Message:
    """Take one chunk of the server's base; once all of it is here and its fingerprint checks, keep it."""
    config, extras = task_config(msg, BASE_FINGERPRINT_KEY, OFFSET_KEY, TOTAL_BYTES_KEY)
    expected, offset, total = str(extras[BASE_FINGERPRINT_KEY]), extras[OFFSET_KEY], extras[TOTAL_BYTES_KEY]
    if not (isinstance(offset, int) and isinstance(total, int) and 0 <= offset < total):
        raise Refusal(RefusalCode.BAD_REQUEST, f"bad provisioning chunk: offset {offset!r} of {total!r} bytes")
    partial = PartialBase(node_base_path(context, config))
    try:
        held = partial.write(expected, total, offset, record_chunk(msg.content.array_records[CHUNK_KEY]))
    except (KeyError, ValueError, ProvisioningError) as exc:
        raise Refusal(RefusalCode.BAD_REQUEST, f"bad provisioning chunk: {exc}") from exc
    if held < total:
        return provision_reply(msg, held, verified=False)
    try:
        finish_download(partial, expected, node_task(config, context))
    except ValueError as exc:
        raise Refusal(RefusalCode.BASE_MISMATCH, f"provisioned base rejected: {exc}") from exc
    return provision_reply(msg, total, verified=True)


def finish_download(partial: PartialBase, expected: str, task: Task) -> None:
    """Keep a complete download if it is a checkpoint of ``task`` with the ``expected`` fingerprint, else discard it."""
    try:
        partial.finish(expected, checkpoint_fingerprint(partial.part, task))
    except ValueError:
        partial.discard()
        raise


def node_key(context: Context) -> str:
    """``partition-<id>`` for a simulated node, else the deployed node's ``node-name``."""
    if PARTITION_ID_KEY in context.node_config:
        return partition_key(int(context.node_config[PARTITION_ID_KEY]))
    return str(context.node_config.get(NODE_NAME_KEY) or f"node-{context.node_id}")


def node_seed(context: Context) -> int:
    """This node's share of the training seed: its partition id, or a hash of its client key."""
    if PARTITION_ID_KEY in context.node_config:
        return int(context.node_config[PARTITION_ID_KEY])
    return zlib.crc32(node_key(context).encode())


@app.query("sync")
@answers_refusals
def final_sync(msg: Message, context: Context) -> Message:
    """The end-of-run sync: take the server's final fast state and confirm its digest (and, with ``model-out`` in
    the node config, write this node's model there)."""
    instruction = synced_instruction(msg, context)
    replica = instruction.replica
    if MODEL_OUT_KEY in context.node_config:
        write_node_model(context, instruction, Path(str(context.node_config[MODEL_OUT_KEY])))
    return Message(replica_report(replica.version, state_digest(replica.state)), reply_to=msg)


def write_node_model(context: Context, instruction: SyncedInstruction, folder: Path) -> None:
    """This node's model after the run: the final shared fast state with its own personal tensors, as a model
    folder (:mod:`fedslim.export`; ``fedslim.load_model(folder)`` loads it). A folder that cannot be written is
    logged; the sync is confirmed all the same."""
    config, base, replica = instruction.config, instruction.base, instruction.replica
    model = fast_model(base, config.fast, instruction.device)
    model.load_fast_state(replica.state)
    load_personal(model, context, base, config.fast)
    kept = context.state.config_records.get(CHAIN_STATE_KEY)
    merges = [bytes(blob) for blob in kept[MERGES_KEY]] if kept is not None and base.generation else []
    root = resident_base(context, config)
    personal = model.personal_state() if model.personal_names else None
    manifest = run_manifest(
        config,
        str(context.run_id),
        root,
        base.fingerprint,
        instruction.server_round,
        True,
        replica.state,
        len(merges),
        node=node_key(context) if personal is not None else "",
    )
    try:
        write_model(folder, manifest, replica.state, merges, personal)
    except OSError as exc:
        log(WARNING, "cannot write this node's model to %s: %s", folder, exc)


@dataclass(frozen=True)
class SyncedInstruction:
    """A server instruction, checked, with this node's replica brought to the server's version."""

    config: RunConfig
    base: ResidentBase
    device: str
    server_round: int
    role: Role
    replica: ClientReplica
    drop_residual: bool


def synced_instruction(msg: Message, context: Context) -> SyncedInstruction:
    """Parse the task config, check the resident base against the server's, and sync the replica.

    Raises :class:`Refusal` when the request cannot be honoured: the resident
    base is missing or differs from the server's, the replica cannot reach the
    server's version, or the request is malformed.
    """
    config, extras = parse_task(
        instruction_task(msg, context),
        BASE_FINGERPRINT_KEY,
        SERVER_ROUND_KEY,
        REPLICA_VERSION_KEY,
        REPLICA_DIGEST_KEY,
        ROLE_KEY,
        DROP_RESIDUAL_KEY,
        BASE_CHAIN_KEY,
    )
    expected_fingerprint = str(extras[BASE_FINGERPRINT_KEY] or "")
    server_round = extras[SERVER_ROUND_KEY] or 0
    target_version = extras[REPLICA_VERSION_KEY]
    target_digest = str(extras[REPLICA_DIGEST_KEY] or "")
    role = extras[ROLE_KEY] or Role.TRAIN
    if role not in tuple(Role):
        raise Refusal(RefusalCode.BAD_REQUEST, f"bad task config: unknown role {role!r}")
    if not isinstance(server_round, int) or not isinstance(target_version, int):
        raise Refusal(RefusalCode.BAD_REQUEST, "bad task config: server-round and replica-version must be integers")

    root = resident_base(context, config)
    device = node_device(config)
    if root.fingerprint != expected_fingerprint:
        raise Refusal(
            RefusalCode.BASE_MISMATCH,
            f"base fingerprint mismatch: the server expects {expected_fingerprint[:16]}..., "
            f"this node's base {root.path} is {root.fingerprint[:16]}...; refusing to train on a different base",
        )
    base, origin = consolidated_base(msg, context, root, config.fast, str(extras[BASE_CHAIN_KEY] or ""))
    replica = sync_replica(
        msg,
        context,
        base.fingerprint,
        lambda: initial_states(base, config.fast)[0],
        fast_model(base, config.fast, device).fast_shapes(),
        target_version,
        target_digest,
        origin,
    )
    return SyncedInstruction(config, base, device, server_round, Role(role), replica, bool(extras[DROP_RESIDUAL_KEY]))


def consolidated_base(
    msg: Message, context: Context, root: ResidentBase, spec: FastSpec, head: str
) -> tuple[ResidentBase, int]:
    """The base the server trains on (fingerprint ``head``; none: the resident checkpoint ``root``), made from
    ``root`` by the consolidations this node keeps and those the instruction carries, checked link by link; and
    the replica version its fresh fast layer started as.

    A merge this node holds already is skipped. Raises :class:`Refusal` (``CHAIN_BROKEN``) when the merges do not
    lead to ``head``, and forgets the ones it kept: the server then sends them all again, with the full state.
    """
    if not head:
        return root, 0
    kept = context.state.config_records.get(CHAIN_STATE_KEY)
    held = list(kept[MERGES_KEY]) if kept is not None and kept.get(BASE_META_KEY) == root.fingerprint else []
    try:
        sent = instruction_merges(msg.content)
    except ValueError as exc:
        raise Refusal(RefusalCode.BAD_REQUEST, f"bad consolidations from the server: {exc}") from exc
    # A merge sent again (this node held it, or the server did not hear that it applied it) is applied once.
    chain = list(dict.fromkeys(held + sent))
    try:
        base = replayed_base(root, spec, tuple(chain))
    except ValueError as exc:
        context.state.pop(CHAIN_STATE_KEY, None)
        raise Refusal(RefusalCode.CHAIN_BROKEN, f"cannot rebuild the server's base: {exc}") from exc
    if base.fingerprint != head:
        context.state.pop(CHAIN_STATE_KEY, None)
        raise Refusal(
            RefusalCode.CHAIN_BROKEN,
            f"this node's consolidations lead to base {base.fingerprint[:16]}..., the server's is {head[:16]}...",
        )
    keep_merged(root, base)
    if chain != held:
        context.state[CHAIN_STATE_KEY] = ConfigRecord({BASE_META_KEY: root.fingerprint, MERGES_KEY: chain})
    return base, int(header(chain[-1]).version) if chain else 0


def handle_train(msg: Message, context: Context) -> tuple[bytes, dict[str, int | float]]:
    """Sync the replica, do the work the instruction asks for from it, and return the update blob and its claims."""
    instruction = synced_instruction(msg, context)
    config, base, replica = instruction.config, instruction.base, instruction.replica
    model = fast_model(base, config.fast, instruction.device)
    model.load_fast_state(replica.state)
    load_personal(model, context, base, config.fast)
    data, _ = checked_split(context, instruction)
    seed = [config.seed, instruction.server_round, node_seed(context)]
    codec_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    uplink = UplinkEncoder(context, config.uplink, config.error_feedback, config.error_feedback_decay)
    claims: dict[str, int | float] = {NUM_EXAMPLES_KEY: len(data)}
    if instruction.role == Role.ANCHOR:
        # FedAMD anchor: the full local gradient at the synced state, sent as it is (no error feedback).
        gradient, loss = full_gradient(model.module, model.shared_parameters(), data, instruction.base.task)
        upload = dict(zip(model.fast_state(), gradient))
        blob = uplink.encode_plain(upload, base.fingerprint, replica.version, codec_seed)
        claims[TRAIN_LOSS_KEY] = loss
        claims[ANCHOR_METRIC] = 1
    else:
        loss = train_locally(msg, instruction, model, data, seed)
        keep_personal(model, context, base)
        trained = model.fast_state()
        delta = {name: trained[name] - replica.state[name] for name in trained}
        blob = uplink.encode_delta(delta, base.fingerprint, replica.version, codec_seed, instruction.drop_residual)
        claims[TRAIN_LOSS_KEY] = float(loss)
    return blob, claims


def train_locally(
    msg: Message, instruction: SyncedInstruction, model: FastSlowModel, data: Sized, seed: list[int]
) -> float:
    """Local training of the fast layer: variance-reduced steps for a FedAMD miner, else the task's optimizer for
    ``local_steps`` steps or ``local_epochs`` epochs."""
    config, objective = instruction.config, instruction.base.task
    if instruction.role == Role.MINER:
        direction = received_direction(msg, model.fast_shapes())
        return train_variance_reduced(
            model.module,
            model.shared_parameters(),
            data,
            objective,
            config.local_step_count(len(data)),
            config.lr,
            config.batch_size,
            [direction[name] for name in model.fast_state()],
            seed,
        )
    optimizer = objective.optimizer(model.fast_parameters(), config)
    if config.local_steps:
        return train_steps(model.module, data, objective, optimizer, config.local_steps, config.batch_size, seed)
    return train_epochs(model.module, data, objective, optimizer, config.local_epochs, config.batch_size, seed)


def task_config(msg: Message, *extra_keys: str) -> tuple[RunConfig, dict[str, Any]]:
    """The run config in a server message's task record, and the values of ``extra_keys`` (None where absent)."""
    config = dict(msg.content.config_records[CONFIG_KEY]) if CONFIG_KEY in msg.content.config_records else {}
    return parse_task(config, *extra_keys)


def parse_task(config: dict[str, Any], *extra_keys: str) -> tuple[RunConfig, dict[str, Any]]:
    """The run config in a task config, and the values of ``extra_keys`` (None where absent)."""
    task = {key: value for key, value in config.items() if key != TASK_DIGEST_KEY}
    extras = {key: task.pop(key, None) for key in extra_keys}
    try:
        return RunConfig.from_flat(task), extras
    except (ConfigError, TypeError) as exc:
        raise Refusal(RefusalCode.BAD_REQUEST, f"bad task config: {exc}") from exc


def node_task(config: RunConfig, context: Context) -> Task:
    """The task the server's config names, as this node loads it (a Refusal if it cannot or may not).

    A deployed node imports a task of the form ``module:object`` only if its node config lists it under
    ``tasks``: the server's run config must not make a device import whatever module it names.
    """
    agreed = str(context.node_config.get(TASKS_KEY, "")).split(",")
    if config.task not in BUILTIN_TASKS and PARTITION_ID_KEY not in context.node_config and config.task not in agreed:
        raise Refusal(
            RefusalCode.BAD_REQUEST,
            f"this node does not import task {config.task!r}: start it with --task {config.task} "
            f"(node config {TASKS_KEY}) to agree to it",
        )
    try:
        return task_for(config)
    except ConfigError as exc:
        raise Refusal(RefusalCode.BAD_REQUEST, f"bad task config: {exc}") from exc


def node_device(config: RunConfig) -> str:
    """Where this node trains: the run's ``device`` on this machine (a Refusal if it has no such device)."""
    try:
        return config.torch_device()
    except ConfigError as exc:
        raise Refusal(RefusalCode.BAD_REQUEST, str(exc)) from exc


def node_base_path(context: Context, config: RunConfig) -> Path:
    """Where this node keeps the base: ``base-path`` from the node config, else where the task caches it."""
    return Path(str(context.node_config.get(BASE_PATH_KEY) or node_task(config, context).base_path(config)))


def resident_base(context: Context, config: RunConfig) -> ResidentBase:
    """The base checkpoint this node holds."""
    try:
        return load_base(node_base_path(context, config), node_task(config, context))
    except FileNotFoundError as exc:
        raise Refusal(RefusalCode.BASE_MISSING, f"no resident base on this node: {exc}") from exc
    except ValueError as exc:
        raise Refusal(RefusalCode.BASE_MISMATCH, f"this node's base is unreadable: {exc}") from exc


@lru_cache(maxsize=4)
def initial_states(base: ResidentBase, spec: FastSpec) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The fast layer as attached to the base, before any training, from one build: version 0 of the replica, and
    the personal tensors a node starts from."""
    model = base.build(spec)
    return model.fast_state(), model.personal_state()


def load_personal(model: FastSlowModel, context: Context, base: ResidentBase, spec: FastSpec) -> None:
    """Put this node's personal tensors into ``model`` (shared by the nodes of a process): the ones it trained on
    this base, else the base's own."""
    if not model.personal_names:
        return
    held = context.state.array_records.get(PERSONAL_STATE_KEY)
    meta = context.state.config_records.get(PERSONAL_META_KEY)
    if held is not None and meta is not None and meta.get(BASE_META_KEY) == base.root_fingerprint:
        try:
            model.load_personal_state({name: array.numpy() for name, array in held.items()})
            return
        except ValueError:
            pass  # kept for another fast layer on this base: start again from the base's
    model.load_personal_state(initial_states(base, spec)[1])


def keep_personal(model: FastSlowModel, context: Context, base: ResidentBase) -> None:
    """Keep the personal tensors ``model`` has just trained in this node's context, for its next rounds."""
    if model.personal_names:
        context.state[PERSONAL_STATE_KEY] = ArrayRecord({n: Array(v) for n, v in model.personal_state().items()})
        context.state[PERSONAL_META_KEY] = ConfigRecord({BASE_META_KEY: base.root_fingerprint})


@lru_cache(maxsize=4)
def fast_model(base: ResidentBase, spec: FastSpec, device: str) -> FastSlowModel:
    """The base with the fast layer attached, on ``device``: built once per process and reused across rounds."""
    model = base.build(spec)
    model.module.to(device)
    return model


def local_data(context: Context, config: RunConfig) -> Sized:
    """This node's training examples (its held-out ones, with ``client-holdout``, are not among them)."""
    return local_split(context, config)[0]


def local_split(context: Context, config: RunConfig) -> tuple[Sized, Sized | None]:
    """This node's data as training and held-out examples: its own file (``data-path``), else the simulated
    partition (``partition-id``). No held-out part without ``client-holdout``."""
    task = node_task(config, context)
    if DATA_PATH_KEY in context.node_config:
        try:
            data = task.node_data(config, Path(str(context.node_config[DATA_PATH_KEY])))
        except FileNotFoundError as exc:
            raise Refusal(RefusalCode.NO_DATA, str(exc)) from exc
        except ValueError as exc:
            raise Refusal(RefusalCode.BAD_DATA, str(exc)) from exc
        return held_out_split(task, config, data, node_seed(context))
    if PARTITION_ID_KEY not in context.node_config:
        raise Refusal(
            RefusalCode.BAD_REQUEST,
            "node_config has neither data-path nor partition-id: this node has no training data",
        )
    try:
        return partition_split(task, config, int(context.node_config[PARTITION_ID_KEY]))
    except (FileNotFoundError, IndexError) as exc:
        raise Refusal(
            RefusalCode.BAD_REQUEST, f"no data for partition-id {context.node_config[PARTITION_ID_KEY]}: {exc}"
        ) from exc


def checked_split(context: Context, instruction: SyncedInstruction) -> tuple[Sized, Sized | None]:
    """This node's data (:func:`local_split`) once it passes the checks of :mod:`fedslim.data.checks`, else a
    Refusal: ``NO_DATA`` without a training example, ``BAD_DATA`` naming the problem. Nothing trains or is evaluated
    on data that fails them. A simulated partition's verdict is kept for the process, as its data is."""
    config, base, device = instruction.config, instruction.base, instruction.device
    split = local_split(context, config)
    if DATA_PATH_KEY in context.node_config:
        verdict = split_verdict(base.task, split, fast_model(base, config.fast, device).module)
    else:
        verdict = partition_verdict(base.task, config, int(context.node_config[PARTITION_ID_KEY]), base, device)
    if verdict is not None:
        code, problem = verdict
        raise Refusal(code, f"{node_key(context)}: {problem}")
    return split


Verdict = tuple[RefusalCode, str] | None
"""What :func:`split_verdict` finds: None, or the refusal code and the problem."""

PARTITION_VERDICTS: dict[tuple[Task, RunConfig, int], Verdict] = {}
"""Each simulated partition's verdict in this process, by its task, run config and id: what determines its data,
and the model's architecture (a consolidated base has its root's), so no base is kept alive for it."""


def partition_verdict(task: Task, config: RunConfig, partition_id: int, base: ResidentBase, device: str) -> Verdict:
    """:func:`split_verdict` of a simulated partition, once per process."""
    key = (task, config, partition_id)
    if key not in PARTITION_VERDICTS:
        split = partition_split(task, config, partition_id)
        PARTITION_VERDICTS[key] = split_verdict(task, split, fast_model(base, config.fast, device).module)
    return PARTITION_VERDICTS[key]


def split_verdict(task: Task, split: tuple[Sized, Sized | None], module: nn.Module) -> Verdict:
    """None if both parts of a node's data pass the checks, else the refusal code and the problem."""
    for part, data in zip(("training", "held-out"), split):
        if data is None:
            continue
        try:
            check_data(task, data, module)
        except NoExamplesError:
            return RefusalCode.NO_DATA, f"no {part} examples"
        except DataError as exc:
            return RefusalCode.BAD_DATA, f"its {part} data fails a check: {exc}"
    return None


@lru_cache(maxsize=1024)
def partition_split(task: Task, config: RunConfig, partition_id: int) -> tuple[Sized, Sized | None]:
    """A simulated client's data, loaded and split once per process (every virtual node a process hosts asks each
    round)."""
    return held_out_split(task, config, task.client_data(config, partition_id), partition_id)


def held_out_split(task: Task, config: RunConfig, data: Sized, seed: int) -> tuple[Sized, Sized | None]:
    """``data`` as the task splits it for ``client-holdout`` (all of it trains without one)."""
    if not config.client_holdout:
        return data, None
    try:
        return task.hold_out(data, config.client_holdout, [config.seed, seed])
    except TypeError as exc:
        raise Refusal(RefusalCode.BAD_REQUEST, f"cannot hold out examples for client-side evaluation: {exc}") from exc
