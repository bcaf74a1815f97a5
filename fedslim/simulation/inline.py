"""An in-process grid: every message goes straight to the ClientApp, one Flower context per node.

It runs the same ServerApp loop and ClientApp code as Flower's simulation
engine, sequentially in this process, without Ray workers or a SuperLink.
It is what the strategy benchmarks use (dozens of runs of hundreds of
rounds), and it gives the same result as the engine for the same seed
(tests/test_participation.py checks it).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import ERROR
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.supercore.task_identity import TaskIdentity

from fedslim.channel.protocol import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
from fedslim.server.checkpoint import deserialise_state, serialise_state

FIRST_NODE_ID = 1000


class InlineGrid:
    """The Grid methods fedslim's loop calls, answered by ``client_app`` in this process.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs.
    num_nodes : int
        Number of virtual nodes; node k holds partition k.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        # Flower stamps messages with the identity of the task running in the process: here, one run.
        TaskIdentity.run_id = TaskIdentity.task_id = 1
        TaskIdentity.node_id = 0
        self.client_app = client_app
        self.node_ids = [FIRST_NODE_ID + k for k in range(num_nodes)]
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={PARTITION_ID_KEY: k, NUM_PARTITIONS_KEY: num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for k, node in enumerate(self.node_ids)
        }
        self.touched = set(self.node_ids)  # nodes whose context may have changed since the last checkpoint

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def changed_states(self) -> dict[int, bytes]:
        """The context state (replica, error-feedback residual) of each node messaged since the last call."""
        changed, self.touched = self.touched, set()
        return {node: serialise_state(self.contexts[node].state) for node in sorted(changed)}

    def restore_states(self, states: dict[int, bytes]) -> None:
        for node, blob in states.items():
            self.contexts[node].state = deserialise_state(blob)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return [self.deliver(message) for message in messages]

    def deliver(self, message: Message) -> Message:
        """The reply of the message's node; a ClientApp that raises answers with Flower's error reply, as in its
        engine (the node's context keeps what the app changed before it raised)."""
        message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grid does when it pushes a message
        self.touched.add(message.metadata.dst_node_id)
        try:
            return self.client_app(message, self.contexts[message.metadata.dst_node_id])
        except Exception as exc:  # Flower's engine turns any exception into an error reply
            log(ERROR, "ClientApp of node %d raised an exception", message.metadata.dst_node_id, exc_info=exc)
            reason = f"{type(exc)}:<'{exc}'>"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Nothing: an inline reply comes with its instruction, never after the round."""
        return []
