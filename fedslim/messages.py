"""The message contract between fedslim's server and clients: record keys, blobs and the identity exchange.

A train instruction carries ``fast`` (ArrayRecord: the replica sync, one
fedslim.v1.Sync under "sync": zero or more blobs applied in order) and
``config`` (ConfigRecord: the client task, the base fingerprint, the round,
the replica version and digest to reach). A train reply carries ``delta``
(ArrayRecord: one blob under "update", the client's compressed delta) and
``metrics`` (MetricRecord: ``num-examples``, ``train-loss``, and the device's
footprint: ``cpu-s`` and ``peak-rss-bytes``).

The identity query (round 0) carries the client task and the server's base
fingerprint; its reply carries ``identity``: ``client-key`` and what the node
holds of the base (``base``: ok, missing or mismatch; ``base-fingerprint``;
``partial-bytes`` of an interrupted download). A node without the base is sent
it in chunks (``query.provision``: ``config`` with ``offset`` and
``total-bytes``, ``chunk``; the reply says ``received-bytes`` and ``verified``).
After the last round, ``query.sync`` may bring every node to the exact final
fast state; the reply reports the digest of what the node holds.

FedAMD adds ``role`` to the task config (``anchor``: reply with the full
local gradient; ``miner``: run variance-reduced steps from ``direction``, an
ArrayRecord holding the global direction as one fedslim.v1 blob). On the
server, the loop annotates each accepted reply for the strategy with
``client`` (its client key) and ``wire`` (the blob as received); neither is sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from google.protobuf.message import DecodeError

from fedslim.protos.fedslim.v1 import update_pb2 as pb
from fedslim.replica import ClientReplica, state_digest

FAST_KEY = "fast"
CONFIG_KEY = "config"
DELTA_KEY = "delta"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"
# Set (to 1) in the metrics of a FedAMD anchor reply: a full local gradient, not the delta of a local run.
ANCHOR_METRIC = "anchor"
# Set in a node's train config when the server rejected its last update: the node drops its error-feedback residual.
DROP_RESIDUAL_KEY = "drop-residual"
# A train reply's footprint on the device: CPU seconds of the handler and the process's peak resident memory.
CPU_KEY = "cpu-s"
PEAK_RSS_KEY = "peak-rss-bytes"
IDENTITY_KEY = "identity"
CLIENT_KEY = "client-key"
UPDATE_KEY = "update"
SYNC_KEY = "sync"
# Server-side annotations of an accepted reply, for strategies (never sent).
CLIENT_RECORD = "client"
WIRE_KEY = "wire"
# FedAMD: the role of a sampled client, and the global direction sent to miners.
ROLE_KEY = "role"
DIRECTION_KEY = "direction"
# Base provisioning (a custom query action): the server's base checkpoint in chunks, resumable.
PROVISION_TYPE = f"{MessageType.QUERY}.provision"
PROVISION_RECORD = "provision"
CHUNK_KEY = "chunk"
CHUNK_STYPE = "fedslim.base-chunk"
# What a node says of its resident base in its identity reply.
BASE_OK, BASE_MISSING_STATUS, BASE_DIFFERENT = "ok", "missing", "mismatch"
# The end-of-run sync (a custom query action): the server's final state in, the node's digest out.
FINAL_SYNC_TYPE = f"{MessageType.QUERY}.sync"
REPLICA_RECORD = "replica"
BLOB_STYPE = "fedslim.v1.Envelope"
SYNC_STYPE = "fedslim.v1.Sync"

# Error codes of a client's refusals (Flower's own codes are below 100).
BASE_MISMATCH = 1001
BASE_MISSING = 1002
BAD_REQUEST = 1003
REPLICA_MISMATCH = 1004
NON_FINITE_UPDATE = 1005


def sync_record(blobs: Sequence[bytes]) -> ArrayRecord:
    """A replica sync (blobs applied in order) as one Flower Array."""
    data = pb.Sync(steps=blobs).SerializeToString()
    return ArrayRecord({SYNC_KEY: Array(dtype="uint8", shape=(len(data),), stype=SYNC_STYPE, data=data)})


def update_record(blob: bytes) -> ArrayRecord:
    return ArrayRecord({UPDATE_KEY: Array(dtype="uint8", shape=(len(blob),), stype=BLOB_STYPE, data=blob)})


def record_sync(record: ArrayRecord) -> list[bytes]:
    """The blobs of a ``sync_record``; ValueError if it is not one."""
    data = _single(record, SYNC_KEY, SYNC_STYPE)
    try:
        return list(pb.Sync.FromString(data).steps)
    except DecodeError as exc:
        raise ValueError(f"corrupt sync record: {exc}") from exc


def record_update(record: ArrayRecord) -> bytes:
    return _single(record, UPDATE_KEY, BLOB_STYPE)


def _single(record: ArrayRecord, key: str, stype: str) -> bytes:
    if set(record.keys()) != {key}:
        raise ValueError(f"record must hold exactly {key!r}, got {sorted(record.keys())}")
    if record[key].stype != stype:
        raise ValueError(f"expected a {stype} blob, got an array of type {record[key].stype!r}")
    return record[key].data


def partition_key(partition_id: int) -> str:
    """The client key of a simulated node."""
    return f"partition-{partition_id}"


def identity_requests(node_ids: Iterable[int], task: ConfigRecord | None = None) -> list[Message]:
    """The round-0 query; ``task`` (the client task and the server's base fingerprint) lets nodes check their base."""
    content = RecordDict({CONFIG_KEY: task}) if task is not None else RecordDict()
    return [Message(content, dst_node_id=node_id, message_type=MessageType.QUERY) for node_id in node_ids]


@dataclass(frozen=True)
class BaseReport:
    """What a node holds of the server's base: ``ok``, ``missing`` (with the bytes of a partial download) or
    ``mismatch`` (with the fingerprint of the base it holds instead)."""

    status: str
    fingerprint: str = ""
    partial_bytes: int = 0


def identity_reply(request: Message, key: str, base: BaseReport | None = None) -> Message:
    identity = ConfigRecord({CLIENT_KEY: key})
    if base is not None:
        identity["base"] = base.status
        identity["base-fingerprint"] = base.fingerprint
        identity["partial-bytes"] = base.partial_bytes
    return Message(RecordDict({IDENTITY_KEY: identity}), reply_to=request)


def base_report(reply: Message) -> BaseReport | None:
    """The base status a node reported with its identity, or None if it reported none."""
    if reply.has_error() or IDENTITY_KEY not in reply.content.config_records:
        return None
    identity = reply.content.config_records[IDENTITY_KEY]
    status, fingerprint, partial = identity.get("base"), identity.get("base-fingerprint"), identity.get("partial-bytes")
    if status not in (BASE_OK, BASE_MISSING_STATUS, BASE_DIFFERENT):
        return None
    return BaseReport(str(status), str(fingerprint or ""), partial if isinstance(partial, int) and partial > 0 else 0)


def chunk_record(data: bytes) -> ArrayRecord:
    return ArrayRecord({CHUNK_KEY: Array(dtype="uint8", shape=(len(data),), stype=CHUNK_STYPE, data=data)})


def record_chunk(record: ArrayRecord) -> bytes:
    return _single(record, CHUNK_KEY, CHUNK_STYPE)


def provision_reply(request: Message, received: int, verified: bool) -> Message:
    """A node's answer to a chunk: the bytes of the base it now holds, and whether it has verified the whole."""
    report = ConfigRecord({"received-bytes": received, "verified": int(verified)})
    return Message(RecordDict({PROVISION_RECORD: report}), reply_to=request)


def provision_progress(reply: Message) -> tuple[int, bool] | None:
    """(bytes received, verified) from a node's chunk reply, or None if it is an error or malformed."""
    if reply.has_error() or PROVISION_RECORD not in reply.content.config_records:
        return None
    report = reply.content.config_records[PROVISION_RECORD]
    received, verified = report.get("received-bytes"), report.get("verified")
    if not isinstance(received, int) or verified not in (0, 1):
        return None
    return received, bool(verified)


def client_key(reply: Message) -> str | None:
    """The client key a node reported, or None if its reply is an error or malformed."""
    if reply.has_error() or IDENTITY_KEY not in reply.content.config_records:
        return None
    key = reply.content.config_records[IDENTITY_KEY].get(CLIENT_KEY)
    return key if isinstance(key, str) and key else None


def replica_report(replica: ClientReplica) -> RecordDict:
    """A node's answer to the final sync: the version and digest of the fast state it now holds."""
    report = ConfigRecord({"version": replica.version, "digest": state_digest(replica.state)})
    return RecordDict({REPLICA_RECORD: report})


def reported_digest(reply: Message) -> str | None:
    """The digest a node reported in its final-sync reply, or None if the reply is an error or malformed."""
    if reply.has_error() or REPLICA_RECORD not in reply.content.config_records:
        return None
    digest = reply.content.config_records[REPLICA_RECORD].get("digest")
    return digest if isinstance(digest, str) else None


def error_text(reply: Message) -> str:
    """A refusal's code and reason, for logs."""
    return f"client error {reply.error.code}: {reply.error.reason}" if reply.has_error() else "malformed reply"
