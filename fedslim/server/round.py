"""One federated round, as it happens: sample, sync down, collect, check, aggregate, evaluate, log.

:class:`ServerRun` holds what lasts across rounds (the fast state, the
replica and the version each client holds, the channel's two ends, the
strategy, the log); :meth:`ServerRun.run_round` is one round, one call per
step, and a test can drive it round by round.

Every train instruction gets one outcome row in the log: its reply accepted
(``ok``), ``rejected`` by the server's checks, the client's ``error``, or, when
no reply came by the round timeout, a ``no-reply`` row. The server remembers
the message ids of unanswered instructions for :data:`LATE_REPLY_ROUNDS`
rounds and pulls them at the end of each later round: a reply found then is
logged as ``late`` under the round it arrived in, and discarded. Its update
was computed from a fast state the run has since left, and every strategy
here aggregates fresh updates only (those with memory store what they
aggregate); the client's next instruction brings it up to date.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Message
from flwr.common.logger import log

from fedslim.adapters import FastSlowModel
from fedslim.channel.accounting import RunWire, WireAccounting
from fedslim.channel.downlink import Downlink
from fedslim.channel.matching import shown
from fedslim.channel.protocol import IDENTIFY_TYPE, RefusalCode, error_text, partition_key
from fedslim.channel.updates import ClientUpdate, Instruction
from fedslim.channel.uplink import Received, UplinkReceiver, footprint
from fedslim.commlog import ConsolidationRow, RoundRow, RoundTotals
from fedslim.config import RunConfig
from fedslim.data.participation import Schedule
from fedslim.server.evaluation import check_evaluations, evaluators
from fedslim.server.identity import IdentityQuery
from fedslim.server.nodes import OrderedGrid
from fedslim.strategies.base import FastStrategy
from fedslim.task import Task
from fedslim.training import EvalResult

LATE_REPLY_ROUNDS = 3  # rounds after its own in which an unanswered instruction's reply is still pulled
# Refusals after which the server no longer knows what the client holds: its next instruction carries the task,
# every consolidation and the full fast state.
RESYNC_CODES = (RefusalCode.REPLICA_MISMATCH, RefusalCode.TASK_UNKNOWN, RefusalCode.CHAIN_BROKEN)


def non_finite(tensors: dict[str, np.ndarray], what: str) -> str | None:
    """Which of ``tensors`` (each a ``what``) holds NaN or Inf (None: every one is finite)."""
    bad = next((name for name, value in tensors.items() if not np.all(np.isfinite(value))), None)
    return f"{what} {bad!r} would hold NaN or Inf" if bad is not None else None


@dataclass(frozen=True)
class Unanswered:
    """An instruction without a reply by its round's timeout: its round, client, the replica version it sent, and
    the node it went to."""

    round: int
    client: str
    version: int
    node: int


@dataclass
class ServerRun:
    """A run's server side between rounds.

    Parameters
    ----------
    config : RunConfig
        The run.
    grid : OrderedGrid
        The identified nodes, by client key.
    strategy : FastStrategy
        The aggregation rule, bound to the federation.
    model : FastSlowModel
        The base with the fast layer, for central evaluation.
    task : Task
        The run's task: it evaluates the model.
    test : Sized
        The task's central test data.
    fast_state : dict[str, np.ndarray]
        The exact fast state x.
    downlink : Downlink
        The replica and the train messages that carry its sync.
    uplink : UplinkReceiver
        Decode, check and screen of the replies.
    wire : RunWire
        What every log row of the run shares.
    schedule : Schedule, optional
        Simulated availability (None: every admitted client is available).
    on_round : callable, optional
        Called with each round's totals once it is logged.
    joining : IdentityQuery, optional
        The identity query that asks connected nodes without a client key
        again (None: the federation is the one identified at the start).
    """

    config: RunConfig
    grid: OrderedGrid
    strategy: FastStrategy
    model: FastSlowModel
    task: Task
    test: Sized
    fast_state: dict[str, np.ndarray]
    downlink: Downlink
    uplink: UplinkReceiver
    wire: RunWire
    schedule: Schedule | None = None
    on_round: Callable[[RoundTotals], None] | None = None
    joining: IdentityQuery | None = None
    # The replica version each client holds, by client key (0: the initial state every client builds; None: unknown).
    client_versions: dict[str, int | None] = field(default_factory=dict)
    # Clients whose last update the server rejected: they drop their error-feedback residual.
    rejected: set[str] = field(default_factory=set)
    # Instructions without a reply by their round's timeout, by message id: their replies are pulled later.
    unanswered: dict[str, Unanswered] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.client_versions = {key: 0 for key in self.grid.admitted.values()}

    def available(self, server_round: int) -> list[str]:
        """The admitted clients available this round, in the grid's (natural key) order."""
        clients = self.grid.clients()
        if self.schedule is None:
            return clients
        present = {partition_key(i) for i in self.schedule.clients_in(server_round)}
        return [client for client in clients if client in present]

    def run_round(self, server_round: int) -> RoundTotals:
        """One round; returns its logged totals."""
        started = time.monotonic()
        available = self.available(server_round)
        instructions = self.strategy.configure(server_round, self.fast_state, available)  # sample
        messages = self.sync_down(server_round, instructions)
        queries = self.joining.requests(self.joining.due(server_round, self.grid)) if self.joining else []
        replies = self.collect(messages + queries)
        if queries:
            self.admit(server_round, queries, [r for r in replies if r.metadata.message_type == IDENTIFY_TYPE])
            replies = [r for r in replies if r.metadata.message_type != IDENTIFY_TYPE]
        received = self.check(server_round, instructions, messages, replies)
        self.pull_late(server_round)
        accepted = self.aggregate(server_round, [r.update for r in received if r.update is not None])
        totals = self.finish_round(server_round, len(messages), len(accepted), len(available), started)
        if self.consolidation_due(server_round):
            self.consolidate(server_round)
        return totals

    def consolidation_due(self, server_round: int) -> bool:
        """Every ``consolidate_every`` rounds, but not after the last (the run's fast state is its result)."""
        every = self.config.consolidate_every
        return bool(every) and server_round % every == 0 and server_round < self.config.rounds

    def consolidate(self, server_round: int) -> None:
        """Merge the fast state clients can hold (the replica, once it has this round's step) into the base, and
        start the fast layer again on the merged base (see :mod:`fedslim.consolidation`).

        The server's exact state differs from the replica only by what the
        downstream codec has not sent yet; that remainder is expressed in the
        old adapters and is dropped with them. Clients drop their
        error-feedback residuals for the same reason (they are kept per
        base), and the strategy forgets its stored updates.
        """
        chain, replica = self.downlink.chain, self.downlink.replica
        assert chain is not None
        replica.publish_once(self.fast_state)
        merged = chain.consolidate(
            server_round,
            replica.state,
            replica.version + 1,
            replica.full_state_pipeline,
            replica.steps_from_origin(),
            replica.origin,
        )
        self.model = merged.build(self.config.fast)
        self.model.module.to(self.config.torch_device())
        self.fast_state = self.model.fast_state()
        replica.rebase(self.fast_state, merged.fingerprint)
        merge = ConsolidationRow(
            server_round,
            merged.generation,
            chain.merges[-1].parent,
            merged.fingerprint,
            replica.version,
            len(chain.blobs[-1]),
        )
        self.wire.commlog.record_consolidation(self.wire.run_id, merge)
        self.uplink.base_fingerprint = merged.fingerprint
        self.strategy.forget_memory()
        log(
            INFO,
            "round %d: fast layer merged into the base (consolidation %d): base %s..., replica version %d",
            server_round,
            merged.generation,
            merged.fingerprint[:16],
            replica.version,
        )

    def sync_down(self, server_round: int, instructions: list[Instruction]) -> list[Message]:
        """Publish the replica's step towards x; one train message per instruction, with its node's sync."""
        self.downlink.replica.publish_once(self.fast_state)
        nodes = self.grid.nodes_of()
        held = {i.client: self.client_versions.get(i.client) for i in instructions}
        return self.downlink.train_messages(server_round, instructions, nodes, held, self.rejected)

    def collect(self, messages: list[Message]) -> list[Message]:
        """Send the round's messages and wait for the replies (until the round timeout)."""
        if not messages:
            return []
        return list(self.grid.send_and_receive(messages, timeout=self.config.round_timeout))

    def check(
        self,
        server_round: int,
        instructions: list[Instruction],
        messages: list[Message],
        replies: list[Message],
    ) -> list[Received]:
        """Log what went down; decode, check and screen what came up, and log it; track each client's replica."""
        wire = WireAccounting(self.wire, server_round)
        version = self.downlink.replica.version
        asked: dict[int, Instruction] = {}
        for instruction, message in zip(instructions, messages):
            node = message.metadata.dst_node_id
            asked[node] = instruction
            wire.record_down(message, self.client_versions.get(instruction.client), version)
        sent = {message.metadata.dst_node_id: message.metadata.message_id for message in messages}
        received = self.uplink.receive(replies, asked, version, sent)
        answered = {item.node for item in received if item.instruction is not None}
        for instruction, message in zip(instructions, messages):
            if message.metadata.dst_node_id in answered:
                continue
            timeout = f"{self.config.round_timeout:g}"
            wire.record_no_reply(message, f"no reply within the round timeout of {timeout} s")
            log(WARNING, "round %d: no reply from node %d", server_round, message.metadata.dst_node_id)
            if message.metadata.message_id:  # the grid gave it an id: its reply may still come
                self.unanswered[message.metadata.message_id] = Unanswered(
                    server_round, instruction.client, version, message.metadata.dst_node_id
                )
        for item in received:
            wire.record_received(item)
            client = item.instruction.client if item.instruction is not None else None
            if item.update is not None:
                self.rejected.discard(item.update.client)
                self.client_versions[item.update.client] = version
                continue
            log(WARNING, "round %d: rejected update from node %d: %s", server_round, item.node, item.reason)
            if client is None:
                continue
            if not item.reply.has_error():
                self.rejected.add(client)
            elif item.reply.error.code in RESYNC_CODES:
                self.client_versions[client] = None  # unknown: the next instruction carries the state and the task
        return received

    def pull_late(self, server_round: int) -> None:
        """Pull the replies of earlier rounds' unanswered instructions; log each as late, and discard it.

        A late reply that is not an error says the client synced to the
        version its instruction sent, which the server then counts on (a
        lower bound: the client skips steps it already applied). Instructions
        older than :data:`LATE_REPLY_ROUNDS` rounds are forgotten.
        """
        earlier = [i for i, asked in self.unanswered.items() if asked.round < server_round]
        if not earlier:
            return
        try:
            replies = list(self.grid.pull_messages(earlier))
        except Exception as exc:  # a late reply is only reported: failing to fetch one must not end the run
            log(WARNING, "round %d: could not pull late replies: %s", server_round, exc)
            replies = []
        wire = WireAccounting(self.wire, server_round)
        for reply in replies:
            asked = self.unanswered.get(reply.metadata.reply_to_message_id)
            if asked is None or asked.node != reply.metadata.src_node_id:
                node, named = reply.metadata.src_node_id, shown(reply.metadata.reply_to_message_id)
                reason = f"unexpected reply: it names {named}, no unanswered instruction to node {node}"
                wire.record_reply(reply, reason)
                log(WARNING, "round %d: late reply from node %d: %s", server_round, node, reason)
                continue
            del self.unanswered[reply.metadata.reply_to_message_id]
            reason = f"late reply to round {asked.round}'s instruction, after its timeout: discarded"
            wire.record_late(reply, f"{reason} ({error_text(reply)})" if reply.has_error() else reason)
            held = self.client_versions.get(asked.client)
            if not reply.has_error() and held is not None:
                self.client_versions[asked.client] = max(held, asked.version)
        self.unanswered = {
            i: asked for i, asked in self.unanswered.items() if server_round - asked.round < LATE_REPLY_ROUNDS
        }

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """The strategy's step over the round's accepted updates, checked and applied; returns the updates in it.

        Finite updates can still make a non-finite state: float32 ends at
        3.4e38, so one update of 3e38 (the size screen off) added to the state,
        or a stored update that overflowed its memory form (fp16), gives Inf.
        Such a step is refused whole: the fast state and the strategy go back to
        what they were before the round (the strategy's per-client memory too,
        so it never replays the poison), each update in the step is logged
        ``rejected`` with the reason, and its client drops its error-feedback
        residual, as after any rejection. The run goes on.
        """
        before = self.strategy.snapshot()
        outcome = self.strategy.apply(server_round, updates)
        problem = self.step_problem(outcome.state) if outcome.state is not None else None
        problem = problem or self.strategy.memory_problem()
        if problem is not None:
            self.strategy.restore(before)
            stored = sorted(client for client, weight in outcome.step.memory_weights.items() if weight)
            self.refuse_step(server_round, updates, stored, problem)
            return []
        self.wire.commlog.record_weights(
            self.wire.run_id, server_round, outcome.step.weights, outcome.step.memory_weights
        )
        if outcome.state is not None:
            self.fast_state = outcome.state
            self.model.load_fast_state(self.fast_state)
        return updates

    def step_problem(self, state: dict[str, np.ndarray]) -> str | None:
        """Why the fast state cannot become ``state`` (None: it can): NaN or Inf in it, or in the replica's step
        towards it (``x - x_hat`` in float32: two finite states of opposite signs near 3.4e38 differ by Inf)."""
        replica = self.downlink.replica.state
        with np.errstate(over="ignore", invalid="ignore"):
            step = {name: np.subtract(value, replica[name], dtype=np.float32) for name, value in state.items()}
        return non_finite(state, "fast tensor") or non_finite(step, "the replica's step of fast tensor")

    def refuse_step(self, server_round: int, updates: list[ClientUpdate], stored: list[str], problem: str) -> None:
        """Log a refused step, naming the clients whose fresh and ``stored`` updates were in it: a WARNING, and
        each fresh update's row ``rejected`` with the reason. Those clients drop their residuals."""
        clients = sorted({update.client for update in updates})
        named = f"fresh updates of {', '.join(clients) or 'none'}; stored updates of {', '.join(stored) or 'none'}"
        reason = f"step refused: {problem} ({named}); the round keeps the fast state it had"
        self.wire.commlog.reject_updates(self.wire.run_id, server_round, clients, reason)
        self.rejected.update(clients)
        log(WARNING, "round %d: %s", server_round, reason)

    def admit(self, server_round: int, queries: Sequence[Message], replies: Sequence[Message]) -> None:
        """Settle this round's identity queries: each node that answered takes part from the next round."""
        assert self.joining is not None
        found = self.joining.settle(self.grid, list(queries), list(replies), WireAccounting(self.wire, server_round))
        self.grid.excluded = self.grid.excluded | found.refused
        self.grid.declared.update(found.declared)
        for node, client in found.keys.items():
            if node in found.refused:
                continue
            for old in [n for n, key in self.grid.admitted.items() if key == client and n != node]:
                self.grid.excluded = self.grid.excluded | {old}  # the client came back on another node
            self.grid.keys[node] = client
            if node in found.declared:
                self.uplink.declared[client] = found.declared[node]
            # A client on a new node holds what that node holds (unknown); one that joins late, the initial state.
            self.client_versions[client] = None if client in self.client_versions else 0
            self.strategy.add_client(node, client)

    def evaluation_due(self, server_round: int) -> bool:
        """Every ``eval_every`` rounds, and at the first and last."""
        return server_round % self.config.eval_every == 0 or server_round in (0, self.config.rounds)

    def evaluate(self, server_round: int) -> EvalResult | None:
        """Central evaluation, when due."""
        return self.task.evaluate(self.model.module, self.test) if self.evaluation_due(server_round) else None

    def evaluate_on_clients(self, server_round: int) -> None:
        """Client-side evaluation, when due and asked for (``client-holdout``, ``fraction-evaluate``).

        The sampled clients sync to the replica of the round's fast state and
        evaluate it on their held-out examples; each reply is logged, and each
        accepted evaluation with it. The replica step this publishes is the one
        the next round would have published, so training is that of a run
        without client-side evaluation; only the bytes differ.
        """
        if not (self.config.client_holdout and self.evaluation_due(server_round)):
            return
        candidates = self.available(server_round) if server_round else self.grid.clients()
        clients = evaluators(candidates, self.config.fraction_evaluate, self.config.seed, server_round)
        if not clients:
            return
        replica = self.downlink.replica
        replica.publish_ahead(self.fast_state)
        held = {client: self.client_versions.get(client) for client in clients}
        messages = self.downlink.evaluate_messages(server_round, clients, self.grid.nodes_of(), held)
        replies = self.collect(messages)
        wire = WireAccounting(self.wire, server_round)
        for client, message in zip(clients, messages):
            wire.record_down(message, held[client], replica.version)
        answered = self.settle_evaluations(server_round, wire, messages, replies)
        for client, message in zip(clients, messages):
            if client not in answered:
                timeout = f"{self.config.round_timeout:g}"
                wire.record_no_reply(message, f"no evaluation within the round timeout of {timeout} s")

    def settle_evaluations(
        self, server_round: int, wire: WireAccounting, messages: list[Message], replies: list[Message]
    ) -> set[str]:
        """Check and log each evaluate reply, keep the accepted evaluations, and track the replica each client
        now holds; returns the clients that answered."""
        asked = {message.metadata.dst_node_id: self.grid.keys[message.metadata.dst_node_id] for message in messages}
        version = self.downlink.replica.version
        answered: set[str] = set()
        sent = {message.metadata.dst_node_id: message.metadata.message_id for message in messages}
        checks = check_evaluations(replies, asked, self.uplink.declared, self.config.client_holdout, sent)
        for reply, (client, evaluation, reason) in zip(replies, checks):
            wire.record_reply(reply, reason, footprint(reply))
            if reason is not None:
                node = reply.metadata.src_node_id
                log(WARNING, "round %d: client-side evaluation from node %d: %s", server_round, node, reason)
            if client is None:
                continue
            answered.add(client)
            if evaluation is not None:
                self.wire.commlog.record_client_evaluation(self.wire.run_id, server_round, evaluation)
            if not reply.has_error():
                self.client_versions[client] = version
            elif reply.error.code in RESYNC_CODES:
                self.client_versions[client] = None
        return answered

    def finish_round(
        self, server_round: int, sampled: int, accepted: int, available: int, started: float
    ) -> RoundTotals:
        """Evaluate and log the round; report it to ``on_round``."""
        result = self.evaluate(server_round)
        self.evaluate_on_clients(server_round)
        self.wire.commlog.record_round(
            self.wire.run_id,
            RoundRow(
                round=server_round,
                sampled=sampled,
                accepted=accepted,
                available=available,
                accuracy=result.accuracy if result else None,
                loss=result.loss if result else None,
                wall_time_s=time.monotonic() - started,
                strategy_memory_bytes=self.strategy.memory_bytes(),
                metrics={name: float(value) for name, value in result.metrics.items()} if result else {},
            ),
        )
        (totals,) = self.wire.commlog.round_totals(self.wire.run_id, only_round=server_round)
        if result:
            log(
                INFO,
                "round %d: accuracy %.4f loss %.4f%s, %d/%d updates accepted",
                server_round,
                result.accuracy,
                result.loss,
                "".join(f" {name} {value:.4f}" for name, value in sorted(result.metrics.items())),
                accepted,
                sampled,
            )
        if self.on_round:
            self.on_round(totals)
        return totals
