"""Stable node identities: Flower's node ids are random per run, the clients behind them are not.

At the start of a run the server asks every node for its *client key*
(``partition-<id>`` in simulation, the ``node-name`` from the node config in
deployment). :class:`OrderedGrid` then lists nodes sorted by that key, so
seeded sampling picks the same clients in every run with the same seed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run

NODE_WAIT_TIMEOUT_S = 120.0


class NodesMissingError(RuntimeError):
    """Fewer nodes connected or answered than the run needs."""


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float = NODE_WAIT_TIMEOUT_S) -> list[int]:
    """Block until ``expected`` nodes are connected (they register asynchronously), or the wait is over.

    After ``timeout_s`` the run goes on with the nodes connected then (the
    others may join in a later round); it is refused only if none is.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            if not nodes:
                raise NodesMissingError(
                    f"no node connected after {timeout_s:.0f} s; check that the SuperNodes reach the SuperLink"
                )
            log(
                WARNING,
                "only %d of %d nodes connected after %.0f s; the run goes on without the others (they may join "
                "later; check that num-clients matches the federation's number of SuperNodes)",
                len(nodes),
                expected,
                timeout_s,
            )
            return nodes
        time.sleep(0.2)


class ForwardingGrid(Grid):
    """A Flower grid that passes every call to the grid it wraps; subclasses change what they need."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class OrderedGrid(ForwardingGrid):
    """A grid that lists nodes by their client key; every other call goes to the wrapped grid.

    Parameters
    ----------
    grid : Grid
        The grid of the run.
    keys : dict[int, str]
        Client key of each identified node id. Nodes without a key (connected
        later, or that did not answer) are listed after the others, by id.
    excluded : frozenset[int]
        Nodes never listed: refused at the start of the run (another base, a
        base that could not be provisioned).
    declared : dict[int, int]
        The training examples each node declared with its identity.
    """

    def __init__(
        self,
        grid: Grid,
        keys: dict[int, str],
        excluded: frozenset[int] = frozenset(),
        declared: dict[int, int] | None = None,
    ) -> None:
        super().__init__(grid)
        self.keys = keys
        self.excluded = excluded
        self.declared = declared or {}

    @property
    def admitted(self) -> dict[int, str]:
        """The client key of every identified node that is not excluded."""
        return {node: key for node, key in self.keys.items() if node not in self.excluded}

    def clients(self) -> list[str]:
        """The admitted clients' keys, in natural order (partition-10 after partition-9)."""
        return sorted(self.admitted.values(), key=_natural)

    def declared_by_client(self) -> dict[str, int]:
        """The training examples each admitted client declared when it joined."""
        return {key: self.declared[node] for node, key in self.admitted.items() if node in self.declared}

    def nodes_of(self) -> dict[str, int]:
        """The node id of each admitted client."""
        return {key: node for node, key in self.admitted.items()}

    def get_node_ids(self) -> list[int]:
        nodes = [n for n in self.grid.get_node_ids() if n not in self.excluded]
        known = sorted((n for n in nodes if n in self.keys), key=lambda n: _natural(self.keys[n]))
        return known + sorted(n for n in nodes if n not in self.keys)


def _natural(key: str) -> tuple[str, int]:
    """Sort key so that partition-10 follows partition-9."""
    stem, _, number = key.rpartition("-")
    return (stem, int(number)) if number.isdigit() else (key, -1)
