"""Flower's own strategies over fedslim's fast layer: an adapter from a stock ``flwr`` Strategy to a pure one.

Flower's strategies (FedAvg, FedAdam, FedMedian, FedTrimmedAvg, ...) aggregate
the models their clients return. The adapter shows them fedslim's round as
one: the fast state is the model, each accepted update becomes the reply of a
client holding ``x + Delta_i`` (with its example count under the strategy's
weighting key), and the arrays the strategy returns are the new fast state.
Sampling is the strategy's own ``configure_train`` over the available
clients' nodes, with Python's ``random`` seeded per round so runs repeat.

What is not carried over: the messages Flower's ``configure_train`` builds are
not sent (fedslim's instruction, with its replica sync, is), so a strategy
that changes local training through its config (FedProx's proximal term)
trains plainly here; federated evaluation is not run (fedslim evaluates on
the server). The weight a Flower strategy gives each update is not known to
fedslim, so its steps log no weights.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from fedslim.channel.protocol import NUM_EXAMPLES_KEY, TRAIN_TYPE
from fedslim.channel.updates import ClientUpdate, Instruction
from fedslim.strategies.base import FastStrategy, Step


class _AvailableNodes:
    """The part of a Flower Grid that a stock strategy's sampling reads: the node ids it may choose from."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


class FlowerStrategy(FastStrategy):
    """A stock Flower strategy aggregating fast-layer updates.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The Flower strategy, configured as usual (``fraction_train``,
        ``min_train_nodes``, ``min_available_nodes``, its own server step sizes).
    seed : int (default: 0)
        Seed of the strategy's node sampling, per round.
    """

    consolidates = False  # a Flower strategy's own state (FedAdam's moments) cannot be told of a consolidation

    def __init__(self, strategy: Strategy, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.strategy = strategy

    def configure(
        self, server_round: int, state: Mapping[str, np.ndarray], available: Sequence[str]
    ) -> list[Instruction]:
        self.current = {name: np.asarray(value, dtype=np.float32) for name, value in state.items()}
        needed = max(getattr(self.strategy, "min_available_nodes", 0), getattr(self.strategy, "min_train_nodes", 0))
        if len(available) < needed:
            # Flower's sampling would wait for more nodes to connect, for ever.
            log(
                WARNING,
                "round %d: %d clients available, %s needs %d: no training",
                server_round,
                len(available),
                type(self.strategy).__name__,
                needed,
            )
            return []
        node_of = {client: node for node, client in self.federation.node_keys.items()}
        arrays = ArrayRecord({name: Array(value) for name, value in self.current.items()})
        saved = random.getstate()
        random.seed(f"{self.seed}-{server_round}")
        try:
            messages = self.strategy.configure_train(
                server_round,
                arrays,
                ConfigRecord(),
                _AvailableNodes([node_of[c] for c in available]),  # type: ignore[arg-type]
            )
            chosen = {self.federation.node_keys[message.metadata.dst_node_id] for message in messages}
        finally:
            random.setstate(saved)
        return [Instruction(client) for client in available if client in chosen]

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Step:
        arrays, _ = self.strategy.aggregate_train(server_round, self._replies(updates))
        if arrays is None:
            return Step({name: np.zeros_like(value, np.float64) for name, value in self.current.items()}, {})
        new_state = {name: array.numpy() for name, array in arrays.items()}
        # The exact difference of two float32 states: x + 1.0 * direction gives back the strategy's state.
        direction = {name: new_state[name].astype(np.float64) - value for name, value in self.current.items()}
        return Step(direction, {})

    def _replies(self, updates: list[ClientUpdate]) -> Iterable[Message]:
        """Each update as the reply of a Flower client that trained the fast state to ``x + Delta_i``."""
        array_key = getattr(self.strategy, "arrayrecord_key", "arrays")
        weight_key = getattr(self.strategy, "weighted_by_key", NUM_EXAMPLES_KEY)
        metrics_key = "metrics"  # where Flower's strategies read a reply's metrics
        node_of = {client: node for node, client in self.federation.node_keys.items()}
        return [
            Message(
                RecordDict(
                    {
                        array_key: ArrayRecord(
                            {
                                name: Array(np.add(value, u.delta[name], dtype=np.float32))
                                for name, value in self.current.items()
                            }
                        ),
                        metrics_key: MetricRecord({weight_key: u.num_examples}),
                    }
                ),
                dst_node_id=node_of[u.client],
                message_type=TRAIN_TYPE,
            )
            for u in updates
        ]
