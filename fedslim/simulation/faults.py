"""Simulated faults (simulation only): train instructions lost, clients that raise, replies after the timeout.

A fault spec (``--faults``) gives the share of the *sampled* clients each
fault hits, ``drop=S,error=S,late=S`` (see :func:`fedslim.config.parse_faults`).
Each round, each train instruction draws one number from (run seed, round,
client key): below ``drop`` it is lost, below ``drop + error`` its client
raises, below ``drop + error + late`` its reply comes late; so the faulty
clients are the same in every run with the same seed, and change from round
to round.

:class:`FaultyGrid` wraps the run's grid, the inline one or Flower's engine's:

- drop: the instruction is never delivered (it gets a message id, as a pushed
  message does, and no reply ever comes);
- error: the instruction is delivered and the client does its work (its
  replica and error-feedback residual move on), but the server gets the
  error reply Flower makes when a ClientApp raises;
- late: the instruction is delivered and answered, but the reply is held back
  from ``send_and_receive`` and handed out only by a later ``pull_messages``
  for its message id, as a straggler's reply is pulled after the timeout.

Identity queries, final syncs and every other message pass unchanged.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from uuid import uuid4

import numpy as np
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedslim.channel.protocol import CONFIG_KEY, SERVER_ROUND_KEY, TRAIN_TYPE, client_key
from fedslim.config import FaultShares, RunConfig, parse_faults
from fedslim.server.nodes import ForwardingGrid

FAULT_SEED_SALT = 0xFA017  # keeps the faults' draws apart from the run's other seeded draws
RAISED = "<class 'RuntimeError'>:<'simulated fault: the ClientApp raised'>"  # as Flower words a raised exception


class FaultyGrid(ForwardingGrid):
    """A grid that drops, fails or delays a seeded share of the train instructions of each round.

    Parameters
    ----------
    grid : Grid
        The run's grid.
    shares : FaultShares
        The share of the sampled clients each fault hits.
    seed : int
        The run's seed.
    """

    def __init__(self, grid: Grid, shares: FaultShares, seed: int) -> None:
        super().__init__(grid)
        self.shares = shares
        self.seed = seed
        self.keys: dict[int, str] = {}  # client key of each node id, from the identity replies
        self.dropped: set[str] = set()  # message ids of instructions never delivered
        self.held: dict[str, Message] = {}  # late replies, by the message id of their instruction

    def fault(self, message: Message) -> str | None:
        """``drop``, ``error``, ``late`` or None (no fault) for one message."""
        if message.metadata.message_type != TRAIN_TYPE:
            return None
        server_round = int(message.content.config_records[CONFIG_KEY][SERVER_ROUND_KEY])  # type: ignore[arg-type]
        node = message.metadata.dst_node_id
        client = zlib.crc32(self.keys.get(node, str(node)).encode())
        draw = np.random.default_rng([self.seed, FAULT_SEED_SALT, server_round, client]).random()
        bound = 0.0
        for kind in ("drop", "error", "late"):
            bound += getattr(self.shares, kind)
            if draw < bound:
                return kind
        return None

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        faults = [self.fault(message) for message in messages]
        for message, fault in zip(messages, faults):
            if fault == "drop":
                message.metadata.__dict__["_message_id"] = str(uuid4())  # pushed, never pulled by its node
                self.dropped.add(message.metadata.message_id)
        delivered = [message for message, fault in zip(messages, faults) if fault != "drop"]
        replies = list(self.grid.send_and_receive(delivered, timeout=timeout))
        # The grid gave each delivered instruction its message id as it pushed it.
        fault_of = {message.metadata.message_id: (message, fault) for message, fault in zip(messages, faults)}
        passed = []
        for reply in replies:
            key = client_key(reply)
            if key:
                self.keys[reply.metadata.src_node_id] = key
            instruction, fault = fault_of.get(reply.metadata.reply_to_message_id, (None, None))
            if fault == "error":
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=RAISED)
                raised = Message(error, reply_to=instruction)  # type: ignore[arg-type]
                raised.metadata.__dict__["_message_id"] = reply.metadata.message_id
                reply = raised
            elif fault == "late":
                self.held[reply.metadata.reply_to_message_id] = reply
                continue
            passed.append(reply)
        return passed

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        ids = set(message_ids)
        late = [self.held.pop(i) for i in sorted(ids & set(self.held))]
        # A dropped instruction never reached the grid, which would not know its id.
        rest = ids - self.dropped - {reply.metadata.reply_to_message_id for reply in late}
        return [*late, *(self.grid.pull_messages(rest) if rest else [])]


def fault_wrapper(config: RunConfig) -> Callable[[Grid], Grid] | None:
    """What wraps the run's grid in its faults (None without any)."""
    shares = parse_faults(config.faults)
    if not shares:
        return None
    return lambda grid: FaultyGrid(grid, shares, config.seed)
