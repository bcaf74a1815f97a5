"""Who takes part: the identity query (client key, base, declared examples), at the start and for nodes that join later.

At the start (round 0) every connected node is asked; a node that does not
answer is left out, with a warning and a ``no-reply`` row, and the run goes
on with the others. Later, a connected node without a client key (silent at
the start, or connected since) is asked again along with a round's train
instructions, with backoff (the rounds 1, 2, 4, 8, ... after its first
silent query), and takes part from the next round once it answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedslim.base import BaseOrigin, BaseProvenance, ResidentBase, provenance_of
from fedslim.channel.accounting import RunWire, WireAccounting
from fedslim.channel.bounds import MAX_COUNT, MAX_TEXT, client_text, shown
from fedslim.channel.matching import Exchange
from fedslim.channel.protocol import (
    BASE_BYTES_KEY,
    BaseStatus,
    base_report,
    client_key,
    declared_examples,
    declares_no_examples,
    error_text,
    identity_requests,
)
from fedslim.commlog import SERVER_HOLDER, BaseRow
from fedslim.server.nodes import OrderedGrid
from fedslim.server.provisioning import provision_bases


@dataclass
class Identified:
    """What one identity exchange learned: each answering node's key and declared examples, and who is refused."""

    keys: dict[int, str] = field(default_factory=dict)
    declared: dict[int, int] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)
    """Nodes holding another base, or one that could not be given the server's, or no training examples."""
    silent: set[int] = field(default_factory=set)
    """Nodes asked that gave no client key: no reply by the timeout, or an error."""


@dataclass
class IdentityQuery:
    """The identity query of a run and what follows an answer (a refusal, base provisioning).

    Parameters
    ----------
    task : dict
        The client task with the server's base fingerprint.
    base_path : Path
        The resident base's checkpoint (its size goes with the query; provisioning sends it).
    base_fingerprint : str
        The server's base.
    timeout : float
        The round timeout (seconds).
    chunk_bytes : int
        Provisioning chunk size.
    """

    task: dict[str, Any]
    base_path: Path
    base_fingerprint: str
    timeout: float
    chunk_bytes: int
    tries: dict[int, int] = field(default_factory=dict)
    """Silent queries so far, by node id (for the backoff)."""
    next_round: dict[int, int] = field(default_factory=dict)
    """The round in which a silent node is asked again."""

    def requests(self, nodes: list[int]) -> list[Message]:
        query = ConfigRecord({**self.task, BASE_BYTES_KEY: self.base_path.stat().st_size})
        return identity_requests(nodes, query)

    def due(self, server_round: int, grid: OrderedGrid) -> list[int]:
        """Connected nodes without a client key, not refused, whose next query is due this round."""
        return [
            node
            for node in grid.get_node_ids()
            if node not in grid.keys and self.next_round.get(node, server_round) <= server_round
        ]

    def settle(self, grid: Grid, requests: list[Message], replies: list[Message], wire: WireAccounting) -> Identified:
        """Log the exchange (each request, each reply, a ``no-reply`` row for each node that did not answer),
        learn the keys, refuse nodes on another base, provision the base to nodes without it. A reply that
        answers no request (a node not asked, a replay or forgery, a second reply) is logged, rejected, and
        teaches nothing."""
        found = Identified()
        keys = wire.run.client_keys
        implausible: dict[int, str] = {}
        exchange = Exchange.of(requests)
        problems = [exchange.problem(reply) for reply in replies]
        unexpected = [(reply, problem) for reply, problem in zip(replies, problems) if problem is not None]
        replies = [reply for reply, problem in zip(replies, problems) if problem is None]
        for reply in replies:
            node, key, examples = reply.metadata.src_node_id, client_key(reply), declared_examples(reply)
            if key and not (len(key) <= MAX_TEXT and key.isprintable()):
                implausible[node] = f"client key {shown(key)} is not printable text of at most {MAX_TEXT} characters"
                key = client_text(key)
            if key:
                keys[node] = found.keys[node] = key
            if key and examples is not None:
                if examples > MAX_COUNT:
                    implausible[node] = f"it declared {shown(examples)} training examples, more than {MAX_COUNT:,}"
                found.declared[node] = min(examples, MAX_COUNT)
        for request in requests:
            wire.record_down(request)
        for reply, problem in unexpected:
            wire.record_reply(reply, f"unexpected reply: {problem} in the identity exchange")
            log(WARNING, "identity reply from node %d rejected: %s", reply.metadata.src_node_id, problem)
        missing: dict[int, int] = {}
        empty: set[int] = set()
        held: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            report = base_report(reply)
            reason = None if node in found.keys else f"no client key in the identity reply: {error_text(reply)}"
            if report is not None and report.status == BaseStatus.MISMATCH:
                reason = (
                    f"base fingerprint mismatch: node {keys[node]} holds {_short(report.fingerprint)}, "
                    f"the server's base is {_short(self.base_fingerprint)}; it takes no part in the run"
                )
                found.refused.add(node)
            elif node in implausible:
                reason = f"implausible identity: {implausible[node]}; it takes no part in the run"
            elif node in found.keys and declares_no_examples(reply):
                reason = f"no training examples: node {keys[node]} takes no part in the run"
                empty.add(node)
            elif report is not None and report.status == BaseStatus.MISSING:
                missing[node] = report.partial_bytes
            elif report is not None and report.status == BaseStatus.OK and node in found.keys:
                held.add(node)
            wire.record_reply(reply, reason)
        answered = {reply.metadata.src_node_id for reply in replies}
        for request in requests:
            node = request.metadata.dst_node_id
            if node not in answered:
                wire.record_no_reply(request, f"no identity reply within the round timeout of {self.timeout:g} s")
            if node not in found.keys:
                found.silent.add(node)
        if missing:
            provisioned = provision_bases(
                grid, missing, self.base_path, self.task, self.chunk_bytes, self.timeout, wire
            )
            found.refused |= set(missing) - provisioned
            self._record_bases(wire, provisioned, BaseOrigin.PROVISIONED)
        self._record_bases(wire, held, BaseOrigin.NODE_FILE)
        for node in sorted(found.refused):
            log(WARNING, "node %d (%s) is left out of the run: it lacks the server's base", node, keys[node])
        for node in sorted(empty):
            log(WARNING, "node %d (%s) is left out of the run: it has no training examples", node, keys[node])
        for node, problem in sorted(implausible.items()):
            log(WARNING, "node %d is left out of the run: %s", node, problem)
        found.refused |= empty | set(implausible)
        self._back_off(wire.server_round, found)
        return found

    def _record_bases(self, wire: WireAccounting, nodes: set[int], origin: BaseOrigin) -> None:
        """Log where each of ``nodes`` got the server's base: given it now, or its own file."""
        for node in sorted(nodes):
            row = BaseRow(origin.value, None, self.base_fingerprint)
            wire.run.commlog.record_base(wire.run.run_id, wire.server_round, wire.run.client_keys[node], row)

    def _back_off(self, server_round: int, found: Identified) -> None:
        """Schedule the next query of each silent node: 1, 2, 4, ... rounds after its silent queries."""
        for node in sorted(found.silent):
            self.tries[node] = self.tries.get(node, 0) + 1
            self.next_round[node] = server_round + 2 ** (self.tries[node] - 1)
            log(
                WARNING,
                "node %d did not identify itself in round %d; it is left out, and asked again in round %d",
                node,
                server_round,
                self.next_round[node],
            )
        for node, key in found.keys.items():
            self.tries.pop(node, None)
            self.next_round.pop(node, None)
            if server_round and node not in found.refused:
                log(INFO, "node %d (%s) joined the run in round %d", node, key, server_round)


def _short(fingerprint: str) -> str:
    """A hex fingerprint cut for a log line; anything else (a reason it could not be read) in full."""
    return f"{fingerprint[:16]}..." if len(fingerprint) == 64 else client_text(fingerprint)


def record_server_base(run: RunWire, server_round: int, base: ResidentBase) -> BaseProvenance:
    """Log (the communication log's ``bases``, and Flower's log) where the server's base came from."""
    provenance = provenance_of(base, run_starts=True)
    row = BaseRow(provenance.origin.value, str(provenance.path), provenance.fingerprint)
    run.commlog.record_base(run.run_id, server_round, SERVER_HOLDER, row)
    log(INFO, "fedslim run %s base: %s", run.run_id, provenance.describe())
    return provenance
