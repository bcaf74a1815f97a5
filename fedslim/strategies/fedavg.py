"""FedAvg over fast-layer deltas (McMahan et al., 2017), over the participants.

Update rule, with S_t the clients whose update was accepted in round t:

    x_{t+1} = x_t + eta_g * sum_{i in S_t} (n_i / sum_{j in S_t} n_j) * Delta_i

where x is the fast state only and Delta_i = (client's local fast state) - x_t.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedslim.messages import CONFIG_KEY, DELTA_KEY, FAST_KEY, METRICS_KEY, NUM_EXAMPLES_KEY


def fedavg_step(
    current: Mapping[str, np.ndarray],
    deltas: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    server_lr: float,
) -> dict[str, np.ndarray]:
    """x + server_lr * sum_i (w_i / sum_j w_j) * delta_i, tensor by tensor."""
    if not deltas:
        return {name: value.copy() for name, value in current.items()}
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to a positive number, got {total}")
    new_state = {}
    for name, value in current.items():
        mean_delta = sum((w / total) * d[name].astype(np.float64) for w, d in zip(weights, deltas))
        new_state[name] = (value + server_lr * mean_delta).astype(np.float32)
    return new_state


class FastFedAvg(Strategy):
    """FedAvg whose messages carry only the fast layer.

    Parameters
    ----------
    fraction_train : float (default: 0.2)
        Fraction of connected nodes sampled each round (at least
        ``min_train_nodes``).
    min_train_nodes : int (default: 1)
        Minimum number of nodes sampled each round.
    server_lr : float (default: 1.0)
        Server step size eta_g applied to the weighted mean delta.
    seed : int (default: 0)
        Seed of the node sampling, so that a run is reproducible.
    """

    def __init__(
        self, fraction_train: float = 0.2, min_train_nodes: int = 1, server_lr: float = 1.0, seed: int = 0
    ) -> None:
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.server_lr = server_lr
        self.seed = seed
        self.current: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        log(
            INFO,
            "FastFedAvg: fraction_train=%.3f, min_train_nodes=%d, server_lr=%g",
            self.fraction_train,
            self.min_train_nodes,
            self.server_lr,
        )

    def sample_nodes(self, server_round: int, node_ids: Iterable[int]) -> list[int]:
        """A seeded uniform sample without replacement of the connected nodes.

        Positions are drawn over the order the grid lists the nodes, so a grid
        with a stable order (fedslim's, by client key) gives reproducible runs.
        """
        nodes = list(node_ids)
        size = min(len(nodes), max(self.min_train_nodes, round(self.fraction_train * len(nodes))))
        rng = np.random.default_rng([self.seed, server_round])
        # Choose positions, not ids: node ids are unsigned 64-bit and overflow numpy's int64.
        return sorted(nodes[i] for i in rng.choice(len(nodes), size=size, replace=False))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the current fast state and the task config to the sampled nodes."""
        self.current = {name: array.numpy() for name, array in arrays.items()}
        config["server-round"] = server_round
        content = RecordDict({FAST_KEY: arrays, CONFIG_KEY: config})
        return [
            Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)
            for node_id in self.sample_nodes(server_round, grid.get_node_ids())
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted mean of the accepted deltas, applied to the current fast state.

        ``replies`` are the updates the server accepted: each carries a decoded
        float32 delta under ``"delta"`` and ``num-examples`` under ``"metrics"``.
        """
        replies = list(replies)
        if not replies:
            return None, None
        deltas = [{n: a.numpy() for n, a in r.content.array_records[DELTA_KEY].items()} for r in replies]
        weights = [_metric(r, NUM_EXAMPLES_KEY) for r in replies]
        new_state = fedavg_step(self.current, deltas, weights, self.server_lr)
        total = sum(weights)
        with_loss = [(w, _metric(r, "train-loss")) for w, r in zip(weights, replies) if _has_metric(r, "train-loss")]
        train_loss = sum(w * loss for w, loss in with_loss) / sum(w for w, _ in with_loss) if with_loss else 0.0
        metrics = MetricRecord({"train-loss": train_loss, NUM_EXAMPLES_KEY: int(total)})
        return ArrayRecord({n: Array(v) for n, v in new_state.items()}), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: fedslim evaluates centrally on the server."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def _has_metric(reply: Message, key: str) -> bool:
    return key in reply.content.metric_records[METRICS_KEY]


def _metric(reply: Message, key: str) -> float:
    value = reply.content.metric_records[METRICS_KEY][key]
    if not isinstance(value, int | float):
        raise ValueError(f"metric {key!r} must be a number, got {value!r}")
    return float(value)
