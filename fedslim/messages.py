"""The message contract between fedslim's server and clients: record keys and the identity exchange.

A train instruction carries ``fast`` (ArrayRecord: the fast state) and
``config`` (ConfigRecord: the client task, the base fingerprint, the round).
A train reply carries ``delta`` (ArrayRecord: trained minus received fast
state) and ``metrics`` (MetricRecord: ``num-examples``, ``train-loss``). An
identity query is empty; its reply carries ``identity`` with ``client-key``.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

FAST_KEY = "fast"
CONFIG_KEY = "config"
DELTA_KEY = "delta"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"
IDENTITY_KEY = "identity"
CLIENT_KEY = "client-key"


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
