"""An in-process grid: every message goes straight to the ClientApp, one Flower context per node.

It runs the same ServerApp loop and ClientApp code as Flower's simulation
engine, sequentially in this process, without Ray workers or a SuperLink.
It is what the strategy benchmarks use (dozens of runs of hundreds of
rounds), and it gives the same result as the engine for the same seed
(tests/test_participation.py checks it).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedslim.channel.protocol import NUM_PARTITIONS_KEY, PARTITION_ID_KEY

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

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return [self.client_app(message, self.contexts[message.metadata.dst_node_id]) for message in messages]
