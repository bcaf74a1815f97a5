"""The message contract between fedslim's server and clients: record keys, blobs and the identity exchange.

A train instruction carries ``fast`` (ArrayRecord: the replica sync, zero or
more fedslim.v1 blobs under keys "0", "1", ... applied in that order) and
``config`` (ConfigRecord: the client task, the base fingerprint, the round,
the replica version and digest to reach). A train reply carries ``delta``
(ArrayRecord: one blob under "update", the client's compressed delta) and
``metrics`` (MetricRecord: ``num-examples``, ``train-loss``). An identity
query is empty; its reply carries ``identity`` with ``client-key``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

FAST_KEY = "fast"
CONFIG_KEY = "config"
DELTA_KEY = "delta"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"
IDENTITY_KEY = "identity"
CLIENT_KEY = "client-key"
UPDATE_KEY = "update"

# Error codes of a client's refusals (Flower's own codes are below 100).
BASE_MISMATCH = 1001
BASE_MISSING = 1002
BAD_REQUEST = 1003
REPLICA_MISMATCH = 1004
NON_FINITE_UPDATE = 1005
BLOB_STYPE = "fedslim.v1.Envelope"


def blob_record(blobs: Sequence[bytes]) -> ArrayRecord:
    """Blobs as Flower Arrays (chunked and content-addressed like any array), keyed by position."""
    return ArrayRecord({str(i): _blob_array(blob) for i, blob in enumerate(blobs)})


def update_record(blob: bytes) -> ArrayRecord:
    return ArrayRecord({UPDATE_KEY: _blob_array(blob)})


def _blob_array(blob: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(blob),), stype=BLOB_STYPE, data=blob)


def record_blobs(record: ArrayRecord) -> list[bytes]:
    """The blobs of a ``blob_record`` in order; ValueError if keys or array types are not fedslim blobs."""
    if sorted(record.keys(), key=lambda k: int(k) if k.isdigit() else -1) != [str(i) for i in range(len(record))]:
        raise ValueError(f"sync record keys must be 0..{len(record) - 1}, got {sorted(record.keys())}")
    return [_blob(record[str(i)]) for i in range(len(record))]


def record_update(record: ArrayRecord) -> bytes:
    if set(record.keys()) != {UPDATE_KEY}:
        raise ValueError(f"update record must hold exactly {UPDATE_KEY!r}, got {sorted(record.keys())}")
    return _blob(record[UPDATE_KEY])


def _blob(array: Array) -> bytes:
    if array.stype != BLOB_STYPE:
        raise ValueError(f"expected a {BLOB_STYPE} blob, got an array of type {array.stype!r}")
    return array.data


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
