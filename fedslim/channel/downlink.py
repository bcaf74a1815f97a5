"""The downlink, both ends: the replica clients hold, kept bit-identical on server and clients, and its sync.

The server keeps the exact fast state x and the replica x_hat that clients
hold. Each round it publishes one compressed step x_hat <- x_hat + C(x - x_hat)
(one realisation for everyone; what C drops stays in x - x_hat and goes out
with later steps, as in DoubleSqueeze and MCM). Steps are versioned: step v
turns version v into v + 1. A client at version v gets the steps since v, or
the whole replica when that is smaller; both sides apply steps with the same
float32 addition, and the client checks the result against the server's digest.

Version 0 is the initial fast state, which every client builds from the
resident base and the shared seed, so it never needs to be sent. A
consolidation (:mod:`fedslim.consolidation`) starts the replica again from
the fresh fast layer on the merged base, a version every client builds the
same way once it holds the merge: its *origin*. No step leads across a merge.

Server end: :class:`ServerReplica` and :class:`Downlink`, which turns a
strategy's :class:`~fedslim.channel.updates.Instruction` into the train message
for its node. Client end: :class:`ClientReplica` and :func:`sync_replica`,
which keeps the replica in the node's Flower context.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from fedslim.adapters import state_digest
from fedslim.channel.protocol import (
    BASE_CHAIN_KEY,
    BASE_META_KEY,
    CONFIG_KEY,
    DROP_RESIDUAL_KEY,
    EVALUATE_TYPE,
    INSTRUCTION_KEYS,
    PAYLOAD_KEYS,
    REPLICA_DIGEST_KEY,
    REPLICA_META_KEY,
    REPLICA_STATE_KEY,
    REPLICA_VERSION_KEY,
    ROLE_KEY,
    SERVER_ROUND_KEY,
    TASK_DIGEST_KEY,
    TASK_STATE_KEY,
    TRAIN_TYPE,
    VERSION_KEY,
    Refusal,
    RefusalCode,
    instruction_content,
    instruction_direction,
    instruction_sync,
)
from fedslim.channel.updates import Instruction
from fedslim.codecs.pipeline import (
    DELTA,
    STATE,
    Pipeline,
    UpdateError,
    apply_step,
    decode_update,
    encode_update,
    parse_codec,
)
from fedslim.consolidation import BaseChain


class ServerReplica:
    """The server's copy of what clients hold, and the steps that bring a client up to date.

    Parameters
    ----------
    initial : mapping of str to ndarray
        Version 0 of the fast state (clients build the same one themselves).
    pipeline : Pipeline
        Downstream codec for the steps. Full-state syncs are sent as exact
        float32 with the pipeline's lossless stage.
    base_fingerprint : str
        Written into every blob, so a client on another base refuses it.
    seed : int
        Seed for codecs that draw random numbers (random-k, PowerSGD).
    """

    _ahead: str | None = None  # digest of the state publish_ahead published towards (a class default: old checkpoints)
    origin = 0  # the version clients build from the base themselves, 0 until a consolidation

    def __init__(
        self, initial: Mapping[str, np.ndarray], pipeline: Pipeline, base_fingerprint: str, seed: int = 0
    ) -> None:
        self.pipeline = pipeline
        self.base_fingerprint = base_fingerprint
        self.seed = seed
        self.state = {name: np.array(value, dtype=np.float32) for name, value in initial.items()}
        self.version = 0
        self._steps: dict[int, bytes] = {}  # from-version -> blob of the step to from-version + 1
        self._full: tuple[int, bytes] | None = None

    @property
    def digest(self) -> str:
        return state_digest(self.state)

    def publish(self, exact: Mapping[str, np.ndarray]) -> None:
        """Move the replica towards ``exact`` by one compressed step (nothing if they are equal)."""
        difference = {name: np.subtract(exact[name], value, dtype=np.float32) for name, value in self.state.items()}
        if not any(np.any(d) for d in difference.values()):
            return
        step = encode_update(
            difference,
            self.pipeline,
            kind=DELTA,
            base_fingerprint=self.base_fingerprint,
            state_version=self.version,
            seed=self.seed,
        )
        self.state = apply_step(self.state, step.decoded)
        self._steps[self.version] = step.blob
        self.version += 1
        self._prune()

    def publish_ahead(self, exact: Mapping[str, np.ndarray]) -> None:
        """Publish now the step the next round would publish towards ``exact`` (client-side evaluation sends it
        early); that round's :meth:`publish_once` then adds none, so the replica's steps are those of a run
        without evaluation."""
        self.publish(exact)
        self._ahead = state_digest(exact)

    def publish_once(self, exact: Mapping[str, np.ndarray]) -> None:
        """:meth:`publish`, unless :meth:`publish_ahead` has just published towards this same ``exact``."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead != state_digest(exact):
            self.publish(exact)

    def settle(self, exact: Mapping[str, np.ndarray]) -> None:
        """Make the replica ``exact`` itself, as a new version reached only by a full-state sync (end of a run)."""
        if state_digest(exact) == self.digest:
            return
        self.state = {name: np.array(exact[name], dtype=np.float32) for name in self.state}
        self.version += 1
        self._steps.clear()  # no step leads to this version: everyone gets the full state

    def rebase(self, initial: Mapping[str, np.ndarray], base_fingerprint: str) -> None:
        """Start again from ``initial`` on a consolidated base: a new version, the origin clients build themselves."""
        self.state = {name: np.array(value, dtype=np.float32) for name, value in initial.items()}
        self.base_fingerprint = base_fingerprint
        self.version += 1
        self.origin = self.version
        self._steps.clear()
        self._ahead = None

    def steps_from_origin(self) -> list[bytes] | None:
        """The steps from the origin to the current version, None if some were pruned (they cost more than the
        full state)."""
        if any(version not in self._steps for version in range(self.origin, self.version)):
            return None
        return [self._steps[version] for version in range(self.origin, self.version)]

    @property
    def full_state_pipeline(self) -> Pipeline:
        """How a full-state sync is encoded: exact float32, then the downstream codec's lossless stage."""
        return Pipeline(lossless=self.pipeline.lossless)

    def full_state_blob(self) -> bytes:
        if self._full is None or self._full[0] != self.version:
            blob = encode_update(
                self.state,
                self.full_state_pipeline,
                kind=STATE,
                base_fingerprint=self.base_fingerprint,
                state_version=self.version,
            ).blob
            self._full = (self.version, blob)
        return self._full[1]

    def sync_for(self, client_version: int | None) -> list[bytes]:
        """Blobs that bring a client at ``client_version`` (None: unknown) to the current version."""
        if client_version is not None and client_version < self.origin:
            client_version = self.origin  # it builds the origin from the consolidated base
        if client_version == self.version:
            return []
        full = self.full_state_blob()
        if client_version is None or client_version not in self._steps:
            return [full]
        chain = [self._steps[v] for v in range(client_version, self.version)]
        return chain if sum(map(len, chain)) < len(full) else [full]

    def _prune(self) -> None:
        """Forget old steps: a chain starting there would cost more than the full state."""
        budget = len(self.full_state_blob())
        total = 0
        for version in sorted(self._steps, reverse=True):
            total += len(self._steps[version])
            if total >= budget:
                for old in [v for v in self._steps if v < version]:
                    del self._steps[old]
                return


class ReplicaMismatch(ValueError):
    """The client cannot reach the server's replica from what it holds."""


@dataclass(frozen=True)
class ClientReplica:
    """What a client holds: the replica and its version."""

    state: dict[str, np.ndarray]
    version: int

    def synced(
        self,
        blobs: Sequence[bytes],
        shapes: Mapping[str, tuple[int, ...]],
        base_fingerprint: str,
        target_version: int,
        target_digest: str,
    ) -> ClientReplica:
        """The replica after applying the server's sync blobs; raises ReplicaMismatch or UpdateError."""
        state, version = self.state, self.version
        for blob in blobs:
            update = decode_update(blob, shapes)
            if update.base_fingerprint != base_fingerprint:
                raise UpdateError("sync blob belongs to another base")
            if update.kind == STATE:
                state, version = update.tensors, update.state_version
            elif update.state_version == version:
                state, version = apply_step(state, update.tensors), version + 1
            elif update.state_version > version:
                raise ReplicaMismatch(
                    f"replica is at version {version}, the next step starts at {update.state_version}"
                )
            # else: a step this client applied already (its reply was lost); skip it.
        if version != target_version:
            raise ReplicaMismatch(f"replica reached version {version}, the server is at {target_version}")
        if state_digest(state) != target_digest:
            raise ReplicaMismatch(f"replica at version {version} differs from the server's (digest mismatch)")
        return ClientReplica(state, version)


class Downlink:
    """The server end: one round's train messages, each carrying its node's replica sync.

    Parameters
    ----------
    replica : ServerReplica
        The replica of the run.
    task : Mapping[str, Any]
        The client task and base fingerprint: static for the run, so an
        instruction carries them in full only to a client that may not hold
        them yet, and their digest always.
    chain : BaseChain, optional
        The run's consolidations: once there is one, every instruction names
        the consolidated base, and carries the merges its client lacks.
    """

    def __init__(self, replica: ServerReplica, task: Mapping[str, Any], chain: BaseChain | None = None) -> None:
        self.replica = replica
        self.chain = chain
        self.task = dict(task)
        self.task_digest = hashlib.sha256(json.dumps(self.task, sort_keys=True).encode()).hexdigest()[:16]
        self._directions: dict[int, bytes] = {}

    def round_config(self, server_round: int) -> dict[str, Any]:
        """The task config of this round's instructions: the task, the replica to reach, the round (and the
        consolidated base, once there is one)."""
        config = {
            **self.task,
            TASK_DIGEST_KEY: self.task_digest,
            REPLICA_VERSION_KEY: self.replica.version,
            REPLICA_DIGEST_KEY: self.replica.digest,
            SERVER_ROUND_KEY: server_round,
        }
        if self.chain is not None and self.chain.merges:
            config[BASE_CHAIN_KEY] = self.chain.base.fingerprint
        return config

    def merges_for(self, held: int | None) -> list[bytes]:
        """The consolidations a client holding replica version ``held`` lacks."""
        return self.chain.missing(held) if self.chain is not None else []

    def train_messages(
        self,
        server_round: int,
        instructions: Sequence[Instruction],
        nodes: Mapping[str, int],
        held: Mapping[str, int | None],
        drop_residual: set[str],
    ) -> list[Message]:
        """One message per instruction, to the node of its client (``nodes``), which holds replica ``held``.

        Clients in ``drop_residual`` are told to discard their error-feedback residual.
        """
        config = self.round_config(server_round)
        self._directions = {}
        return [
            self._message(instruction, nodes[instruction.client], config, held[instruction.client], drop_residual)
            for instruction in instructions
        ]

    def evaluate_messages(
        self, server_round: int, clients: Sequence[str], nodes: Mapping[str, int], held: Mapping[str, int | None]
    ) -> list[Message]:
        """One evaluate message per client, to its node (``nodes``), which holds replica ``held``: the replica's
        sync, so that the client evaluates the state it would train from."""
        config = self.round_config(server_round)
        return [
            self._message(Instruction(client), nodes[client], config, held[client], set(), EVALUATE_TYPE)
            for client in clients
        ]

    def _message(
        self,
        instruction: Instruction,
        node: int,
        config: Mapping[str, Any],
        held: int | None,
        drop_residual: set[str],
        message_type: str = TRAIN_TYPE,
    ) -> Message:
        # A client past version 0 has answered an instruction since it last lost its replica, so it holds the task.
        task = {k: v for k, v in config.items() if not held or k not in self.task}
        if instruction.role is not None:
            task[ROLE_KEY] = instruction.role.value
        if instruction.client in drop_residual:
            task[DROP_RESIDUAL_KEY] = True
        direction = (
            None if instruction.direction is None else self._direction_blob(instruction, config[SERVER_ROUND_KEY])
        )
        content = instruction_content(task, self.replica.sync_for(held), direction, self.merges_for(held))
        return Message(content=content, dst_node_id=node, message_type=message_type)

    def _direction_blob(self, instruction: Instruction, server_round: int) -> bytes:
        """The instruction's direction, encoded once per round for every instruction sharing it."""
        key = id(instruction.direction)
        if key not in self._directions:
            self._directions[key] = encode_update(
                instruction.direction,  # type: ignore[arg-type]
                parse_codec(instruction.direction_codec),
                kind=STATE,
                base_fingerprint="",
                state_version=server_round,
            ).blob
        return self._directions[key]


def instruction_task(msg: Message, context: Context) -> dict[str, Any]:
    """The client end: the instruction's config with the run's task, from the message or from this node's context.

    A config carrying the task in full is remembered (under its digest) for
    the instructions that carry only the digest. Raises
    :class:`~fedslim.channel.protocol.Refusal` (``TASK_UNKNOWN``) when this
    node holds no task of the digest named.
    """
    record = msg.content.config_records.get(CONFIG_KEY, {})
    config = {key: value for key, value in record.items() if key not in PAYLOAD_KEYS}
    static = {key: value for key, value in config.items() if key not in INSTRUCTION_KEYS}
    if set(static) - {TASK_DIGEST_KEY}:
        context.state[TASK_STATE_KEY] = ConfigRecord(static)
        return config
    held = context.state.config_records.get(TASK_STATE_KEY)
    digest = config.get(TASK_DIGEST_KEY)
    if held is None or digest is None or held.get(TASK_DIGEST_KEY) != digest:
        raise Refusal(RefusalCode.TASK_UNKNOWN, f"this node holds no run task of digest {digest}; send it in full")
    return {**held, **config}


def sync_replica(
    msg: Message,
    context: Context,
    base_fingerprint: str,
    initial: Callable[[], dict[str, np.ndarray]],
    shapes: Mapping[str, tuple[int, ...]],
    target_version: int,
    target_digest: str,
    origin: int = 0,
) -> ClientReplica:
    """The client end: bring this node's replica (kept in its Flower context) to the server's version.

    ``initial`` builds version ``origin`` (0, or the version a consolidation
    started the fast layer at) when the node holds no replica of this base.
    Raises :class:`~fedslim.channel.protocol.Refusal` when the sync cannot be
    applied; a node that cannot reach the server's version forgets its replica
    (the server then sends the full state).
    """
    state = context.state
    held = state.config_records.get(REPLICA_META_KEY)
    if held is not None and held.get(BASE_META_KEY) == base_fingerprint and REPLICA_STATE_KEY in state.array_records:
        tensors = {name: array.numpy() for name, array in state.array_records[REPLICA_STATE_KEY].items()}
        replica = ClientReplica(tensors, int(held[VERSION_KEY]))  # type: ignore[arg-type]
    else:
        replica = ClientReplica(initial(), origin)
    try:
        blobs = instruction_sync(msg.content)
        replica = replica.synced(blobs, shapes, base_fingerprint, target_version, target_digest)
    except ReplicaMismatch as exc:
        for key in (REPLICA_STATE_KEY, REPLICA_META_KEY):
            state.pop(key, None)
        raise Refusal(RefusalCode.REPLICA_MISMATCH, f"cannot sync the fast state: {exc}") from exc
    except (KeyError, ValueError) as exc:
        raise Refusal(RefusalCode.BAD_REQUEST, f"bad fast-state sync from the server: {exc}") from exc
    state[REPLICA_STATE_KEY] = ArrayRecord({name: Array(value) for name, value in replica.state.items()})
    state[REPLICA_META_KEY] = ConfigRecord({VERSION_KEY: replica.version, BASE_META_KEY: base_fingerprint})
    return replica


def received_direction(msg: Message, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The client end of an instruction's direction (FedAMD's v for a miner)."""
    try:
        return decode_update(instruction_direction(msg.content), shapes).tensors
    except (KeyError, ValueError) as exc:
        raise Refusal(RefusalCode.BAD_REQUEST, f"miner instruction without a valid direction: {exc}") from exc
