"""The message contract between fedslim's server and clients: record keys, blobs and the identity exchange.

A train instruction carries ``fast`` (ArrayRecord: the replica sync, one
fedslim.v1.Sync under "sync": zero or more blobs applied in order) and
``config`` (ConfigRecord: the client task, the base fingerprint, the round,
the replica version and digest to reach). A train reply carries ``delta``
(ArrayRecord: one blob under "update", the client's compressed delta) and
``metrics`` (MetricRecord: ``num-examples``, ``train-loss``, and the device's
footprint: ``cpu-s`` and ``peak-rss-bytes``). An identity
query is empty; its reply carries ``identity`` with ``client-key``.

FedAMD adds ``role`` to the task config (``anchor``: reply with the full
local gradient; ``miner``: run variance-reduced steps from ``direction``, an
ArrayRecord holding the global direction as one fedslim.v1 blob). On the
server, the loop annotates each accepted reply for the strategy with
``client`` (its client key) and ``wire`` (the blob as received); neither is sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from google.protobuf.message import DecodeError

from fedslim.protos.fedslim.v1 import update_pb2 as pb
from fedslim.replica import ClientReplica, state_digest

FAST_KEY = "fast"
CONFIG_KEY = "config"
DELTA_KEY = "delta"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"
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


def identity_requests(node_ids: Iterable[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.QUERY) for node_id in node_ids]


def identity_reply(request: Message, key: str) -> Message:
    return Message(RecordDict({IDENTITY_KEY: ConfigRecord({CLIENT_KEY: key})}), reply_to=request)


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
