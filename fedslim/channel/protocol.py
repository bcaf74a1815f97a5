"""The contract between fedslim's server and clients: every record key, message type and refusal code, once.

Train instructions and replies carry one record each: every Flower record and array is an object of
its own in the message's object tree, named by a 64-hex-digit id in the tree,
in its parent and in the push list (about 400 bytes each on the Fleet API),
so fedslim's blobs travel as bytes entries beside the config rather than as
arrays of their own.

A train instruction carries ``config`` (ConfigRecord): ``sync`` (the replica
sync, one fedslim.v1.Sync: zero or more blobs applied in order), the round,
the replica version and digest to reach, ``role`` when the strategy gives
clients different work, ``drop-residual`` after a rejected update, and the
``task-digest`` of the run's task: the client task and the base fingerprint,
which are static, so they are sent in full only to a client that may not hold
them yet; a client keeps them in its context and refuses with ``TASK_UNKNOWN``
when it holds no task of that digest. After a consolidation every instruction
names the consolidated base (``base-chain``) and carries the merges its client
lacks (``merges``, one fedslim.v1.Chain); a client whose merges do not lead to
that base refuses with ``CHAIN_BROKEN``. FedAMD's miners also get ``direction``:
the global direction as one fedslim.v1 blob. A train reply carries ``delta``
(ConfigRecord): ``update`` (the client's compressed delta, one fedslim.v1
blob), ``num-examples``, ``train-loss``, and the device's footprint:
``cpu-s`` and ``peak-rss-bytes``.

The identity query (round 0) carries the client task, the server's base
fingerprint and its size; its reply carries ``identity``: ``client-key``,
``num-examples`` (the training examples the node holds: no train reply may
claim more) and what the node holds of the base (``base``: a :class:`BaseStatus`;
``base-fingerprint``; ``partial-bytes`` of an interrupted download). A node
without the base is sent it in chunks (``query.provision``: ``config`` with
``offset`` and ``total-bytes``, ``chunk``; the reply says ``received-bytes``
and ``verified``). After the last round, ``query.sync`` (a config with
``sync``, as a train instruction) may bring every node to the exact final
fast state; the reply reports the digest of what it holds.

A client that cannot honour a request answers with a Flower error whose code
is a :class:`RefusalCode`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.app.typing import ConfigRecordValues
from google.protobuf.message import DecodeError

from fedslim.protos.fedslim.v1 import update_pb2 as pb

# Records of a message's content.
CONFIG_KEY = "config"
DELTA_KEY = "delta"
IDENTITY_KEY = "identity"
CHUNK_KEY = "chunk"
PROVISION_RECORD = "provision"
REPLICA_RECORD = "replica"
EVALUATION_RECORD = "evaluation"

# Entries of the task config (``config``) beyond the run config's client task.
BASE_FINGERPRINT_KEY = "base-fingerprint"
BASE_BYTES_KEY = "base-bytes"
SERVER_ROUND_KEY = "server-round"
REPLICA_VERSION_KEY = "replica-version"
REPLICA_DIGEST_KEY = "replica-digest"
ROLE_KEY = "role"
DROP_RESIDUAL_KEY = "drop-residual"
TASK_DIGEST_KEY = "task-digest"
BASE_CHAIN_KEY = "base-chain"  # the consolidated base's fingerprint; absent until the first consolidation
OFFSET_KEY = "offset"
TOTAL_BYTES_KEY = "total-bytes"

# Entries of a train reply's ``delta`` beside its ``update``: the client's claims, which the server checks.
NUM_EXAMPLES_KEY = "num-examples"
TRAIN_LOSS_KEY = "train-loss"
ANCHOR_METRIC = "anchor"  # 1 in a FedAMD anchor's reply; the server goes by the role it asked for, not by this
CPU_KEY = "cpu-s"
PEAK_RSS_KEY = "peak-rss-bytes"

# Entries of an evaluate reply's ``evaluation`` (claims too): the round's replica on the client's held-out examples.
EVAL_EXAMPLES_KEY = "examples"
EVAL_CORRECT_KEY = "correct"
EVAL_LOSS_KEY = "loss"

# Entries of the identity, provisioning and final-sync replies.
CLIENT_KEY = "client-key"
BASE_STATUS_KEY = "base"
PARTIAL_BYTES_KEY = "partial-bytes"
RECEIVED_BYTES_KEY = "received-bytes"
VERIFIED_KEY = "verified"
VERSION_KEY = "version"
DIGEST_KEY = "digest"

# Bytes entries: fedslim's blobs (an instruction's ``sync`` and ``direction``, a reply's ``update``).
UPDATE_KEY = "update"
SYNC_KEY = "sync"
DIRECTION_KEY = "direction"
MERGES_KEY = "merges"  # an instruction's consolidations the client lacks (fedslim.v1.Chain); a node's kept ones

# A base chunk travels as one uint8 Array of this stype.
CHUNK_STYPE = "fedslim.base-chunk"

# Message types beyond Flower's train and query: custom query actions.
TRAIN_TYPE = MessageType.TRAIN
EVALUATE_TYPE = MessageType.EVALUATE
IDENTIFY_TYPE = MessageType.QUERY
PROVISION_TYPE = f"{MessageType.QUERY}.provision"
FINAL_SYNC_TYPE = f"{MessageType.QUERY}.sync"

# Keys of a node's config (Flower's node_config): set by the simulation engine or by `fedslim deploy supernode`.
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
NODE_NAME_KEY = "node-name"
DATA_PATH_KEY = "data-path"
BASE_PATH_KEY = "base-path"
TASKS_KEY = "tasks"  # the module:object tasks a deployed node agrees to import, comma-separated
MODEL_OUT_KEY = "model-out"  # where a node writes its model (shared fast layer, its own head) at the final sync

# Keys of a node's Flower context state (kept by the SuperNode across rounds and ClientApp restarts).
REPLICA_STATE_KEY = "fedslim-replica"
REPLICA_META_KEY = "fedslim-replica-meta"
RESIDUAL_STATE_KEY = "fedslim-ef-residual"
RESIDUAL_META_KEY = "fedslim-ef-residual-meta"
PERSONAL_STATE_KEY = "fedslim-personal"  # the node's personal fast tensors: trained here, never sent
PERSONAL_META_KEY = "fedslim-personal-meta"
BASE_META_KEY = "base"
TASK_STATE_KEY = "fedslim-task"
CHAIN_STATE_KEY = "fedslim-chain"  # the consolidations this node holds: its root base and each merge (bytes)

# Keys of a train instruction's config that change from one instruction to the next; the rest is the static task.
INSTRUCTION_KEYS = frozenset(
    {SERVER_ROUND_KEY, REPLICA_VERSION_KEY, REPLICA_DIGEST_KEY, ROLE_KEY, DROP_RESIDUAL_KEY, BASE_CHAIN_KEY}
)
# Keys of an instruction's config that hold its payload (bytes), not config.
PAYLOAD_KEYS = frozenset({SYNC_KEY, DIRECTION_KEY, MERGES_KEY})


class Role(StrEnum):
    """What a train instruction asks of a client: plain local training, or FedAMD's anchor or miner work."""

    TRAIN = "train"
    ANCHOR = "anchor"
    MINER = "miner"


class BaseStatus(StrEnum):
    """What a node holds of the server's base, as its identity reply says."""

    OK = "ok"
    MISSING = "missing"
    MISMATCH = "mismatch"


class RefusalCode(IntEnum):
    """Error codes of a client's refusals (Flower's own codes are below 100)."""

    BASE_MISMATCH = 1001
    BASE_MISSING = 1002
    BAD_REQUEST = 1003
    REPLICA_MISMATCH = 1004
    NON_FINITE_UPDATE = 1005
    TASK_UNKNOWN = 1006
    CHAIN_BROKEN = 1007  # the node's consolidations do not lead to the server's base: it drops them
    NO_DATA = 1008  # the node holds no training examples (it declared none and was left out; or they are gone)
    BAD_DATA = 1009  # the node's data fails a check (fedslim.data.checks): nothing trains on it


class Refusal(Exception):
    """A request that cannot be honoured; the reply carries ``code`` and the reason."""

    def __init__(self, code: RefusalCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code

    def reply_to(self, request: Message) -> Message:
        return Message(Error(code=int(self.code), reason=str(self)), reply_to=request)


def instruction_content(
    config: Mapping[str, ConfigRecordValues],
    sync: Sequence[bytes],
    direction: bytes | None = None,
    merges: Sequence[bytes] = (),
) -> RecordDict:
    """A train or final-sync instruction: ``config`` with the replica sync (and FedAMD's direction, and the
    consolidations the client lacks) beside it."""
    record = ConfigRecord({**config, SYNC_KEY: pb.Sync(steps=sync).SerializeToString()})
    if direction is not None:
        record[DIRECTION_KEY] = direction
    if merges:
        record[MERGES_KEY] = pb.Chain(merges=merges).SerializeToString()
    return RecordDict({CONFIG_KEY: record})


def instruction_merges(content: RecordDict) -> list[bytes]:
    """The consolidations an :func:`instruction_content` carries (none: empty); ValueError if they are corrupt."""
    if MERGES_KEY not in content.config_records.get(CONFIG_KEY, {}):
        return []
    data = _bytes_entry(content, CONFIG_KEY, MERGES_KEY)
    try:
        return list(pb.Chain.FromString(data).merges)
    except DecodeError as exc:
        raise ValueError(f"corrupt merges: {exc}") from exc


def instruction_sync(content: RecordDict) -> list[bytes]:
    """The sync blobs of an :func:`instruction_content`: KeyError if it has none, ValueError if they are corrupt."""
    data = _bytes_entry(content, CONFIG_KEY, SYNC_KEY)
    try:
        return list(pb.Sync.FromString(data).steps)
    except DecodeError as exc:
        raise ValueError(f"corrupt sync: {exc}") from exc


def instruction_direction(content: RecordDict) -> bytes:
    """The direction blob of an :func:`instruction_content`: KeyError if it has none, ValueError if not bytes."""
    return _bytes_entry(content, CONFIG_KEY, DIRECTION_KEY)


def update_content(blob: bytes, claims: Mapping[str, int | float]) -> RecordDict:
    """A train reply: the update blob and the client's claims (``num-examples``, ``train-loss``, footprint)."""
    return RecordDict({DELTA_KEY: ConfigRecord({UPDATE_KEY: blob, **claims})})


def update_blob(content: RecordDict) -> bytes:
    """The update blob of an :func:`update_content`: KeyError if it has none, ValueError if not bytes."""
    return _bytes_entry(content, DELTA_KEY, UPDATE_KEY)


def update_claims(content: RecordDict) -> dict[str, ConfigRecordValues]:
    """The entries of a train reply beside its update blob (KeyError if the reply has no ``delta``)."""
    return {key: value for key, value in content.config_records[DELTA_KEY].items() if key != UPDATE_KEY}


def _bytes_entry(content: RecordDict, record: str, key: str) -> bytes:
    value = content.config_records[record][key]
    if not isinstance(value, bytes):
        raise ValueError(f"{record}.{key} must be bytes, got {type(value).__name__}")
    return value


def chunk_record(data: bytes) -> ArrayRecord:
    """One chunk of the base as one uint8 Array."""
    return ArrayRecord({CHUNK_KEY: Array(dtype="uint8", shape=(len(data),), stype=CHUNK_STYPE, data=data)})


def record_chunk(record: ArrayRecord) -> bytes:
    """The bytes of a :func:`chunk_record`; ValueError if it is not one."""
    if set(record.keys()) != {CHUNK_KEY}:
        raise ValueError(f"record must hold exactly {CHUNK_KEY!r}, got {sorted(record.keys())}")
    if record[CHUNK_KEY].stype != CHUNK_STYPE:
        raise ValueError(f"expected a {CHUNK_STYPE} blob, got an array of type {record[CHUNK_KEY].stype!r}")
    return record[CHUNK_KEY].data


def partition_key(partition_id: int) -> str:
    """The client key of a simulated node."""
    return f"partition-{partition_id}"


def identity_requests(node_ids: Iterable[int], task: ConfigRecord | None = None) -> list[Message]:
    """The round-0 query; ``task`` (the client task and the server's base fingerprint) lets nodes check their base."""
    content = RecordDict({CONFIG_KEY: task}) if task is not None else RecordDict()
    return [Message(content, dst_node_id=node_id, message_type=IDENTIFY_TYPE) for node_id in node_ids]


@dataclass(frozen=True)
class BaseReport:
    """What a node holds of the server's base: its status, the fingerprint it holds instead (mismatch), and the
    bytes of a partial download (missing)."""

    status: BaseStatus
    fingerprint: str = ""
    partial_bytes: int = 0


def identity_reply(
    request: Message, key: str, base: BaseReport | None = None, num_examples: int | None = None
) -> Message:
    """A node's identity: its client key, what it holds of the base, and how many training examples it has."""
    identity = ConfigRecord({CLIENT_KEY: key})
    if num_examples is not None:
        identity[NUM_EXAMPLES_KEY] = num_examples
    if base is not None:
        identity[BASE_STATUS_KEY] = base.status.value
        identity[BASE_FINGERPRINT_KEY] = base.fingerprint
        identity[PARTIAL_BYTES_KEY] = base.partial_bytes
    return Message(RecordDict({IDENTITY_KEY: identity}), reply_to=request)


def base_report(reply: Message) -> BaseReport | None:
    """The base status a node reported with its identity, or None if it reported none."""
    if reply.has_error() or IDENTITY_KEY not in reply.content.config_records:
        return None
    identity = reply.content.config_records[IDENTITY_KEY]
    status, fingerprint = identity.get(BASE_STATUS_KEY), identity.get(BASE_FINGERPRINT_KEY)
    partial = identity.get(PARTIAL_BYTES_KEY)
    if status not in tuple(BaseStatus):
        return None
    partial_bytes = partial if isinstance(partial, int) and partial > 0 else 0
    return BaseReport(BaseStatus(status), str(fingerprint or ""), partial_bytes)


def declared_examples(reply: Message) -> int | None:
    """The training examples a node declared with its identity, or None if it declared no positive integer."""
    if reply.has_error() or IDENTITY_KEY not in reply.content.config_records:
        return None
    declared = reply.content.config_records[IDENTITY_KEY].get(NUM_EXAMPLES_KEY)
    return declared if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0 else None


def declares_no_examples(reply: Message) -> bool:
    """Whether a node declared with its identity that it holds no training examples (it takes no part)."""
    if reply.has_error() or IDENTITY_KEY not in reply.content.config_records:
        return False
    declared = reply.content.config_records[IDENTITY_KEY].get(NUM_EXAMPLES_KEY)
    return isinstance(declared, int) and not isinstance(declared, bool) and declared == 0


def client_key(reply: Message) -> str | None:
    """The client key a node reported, or None if its reply is an error or malformed."""
    if reply.has_error() or IDENTITY_KEY not in reply.content.config_records:
        return None
    key = reply.content.config_records[IDENTITY_KEY].get(CLIENT_KEY)
    return key if isinstance(key, str) and key else None


def provision_reply(request: Message, received: int, verified: bool) -> Message:
    """A node's answer to a chunk: the bytes of the base it now holds, and whether it has verified the whole."""
    report = ConfigRecord({RECEIVED_BYTES_KEY: received, VERIFIED_KEY: int(verified)})
    return Message(RecordDict({PROVISION_RECORD: report}), reply_to=request)


def provision_progress(reply: Message) -> tuple[int, bool] | None:
    """(bytes received, verified) from a node's chunk reply, or None if it is an error or malformed."""
    if reply.has_error() or PROVISION_RECORD not in reply.content.config_records:
        return None
    report = reply.content.config_records[PROVISION_RECORD]
    received, verified = report.get(RECEIVED_BYTES_KEY), report.get(VERIFIED_KEY)
    if not isinstance(received, int) or verified not in (0, 1):
        return None
    return received, bool(verified)


def replica_report(version: int, digest: str) -> RecordDict:
    """A node's answer to the final sync: the version and digest of the fast state it now holds."""
    return RecordDict({REPLICA_RECORD: ConfigRecord({VERSION_KEY: version, DIGEST_KEY: digest})})


def evaluation_content(claims: Mapping[str, int | float]) -> RecordDict:
    """An evaluate reply: held-out ``examples``, how many were ``correct``, their mean ``loss``, and the footprint."""
    return RecordDict({EVALUATION_RECORD: ConfigRecord(dict(claims))})


def evaluation_claims(reply: Message) -> dict[str, ConfigRecordValues]:
    """The entries of an evaluate reply (KeyError if it has no ``evaluation``)."""
    return dict(reply.content.config_records[EVALUATION_RECORD].items())


def reported_digest(reply: Message) -> str | None:
    """The digest a node reported in its final-sync reply, or None if the reply is an error or malformed."""
    if reply.has_error() or REPLICA_RECORD not in reply.content.config_records:
        return None
    digest = reply.content.config_records[REPLICA_RECORD].get(DIGEST_KEY)
    return digest if isinstance(digest, str) else None


def error_text(reply: Message) -> str:
    """A refusal's code and reason, for logs (cut and escaped: they are the client's text)."""
    from fedslim.channel.bounds import client_text, shown  # bounds reads this module's keys

    if not reply.has_error():
        return "malformed reply"
    return f"client error {shown(reply.error.code)}: {client_text(str(reply.error.reason))}"
