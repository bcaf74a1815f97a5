"""What every fedslim strategy shares: node sampling, client identity, the fast state, and the weights it reports.

A fedslim strategy is a Flower :class:`~flwr.serverapp.strategy.Strategy`
whose ``aggregate_train`` is reduced to one method a paper's update rule fits
in::

    def aggregate(self, server_round, updates) -> Step

``updates`` are the round's accepted client updates (decoded float32 deltas,
keyed by stable client keys); the returned :class:`Step` is the direction the
server adds to the fast state, ``x <- x + server_lr * direction``, together
with the coefficient it gave each fresh update and each stored one, which the
communication log records so that a round can be recomputed from it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedslim.config import StrategyConfigError
from fedslim.messages import (
    CLIENT_RECORD,
    CONFIG_KEY,
    DELTA_KEY,
    FAST_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    WIRE_KEY,
    record_update,
)


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted train reply, as a strategy sees it.

    Parameters
    ----------
    client : str
        The client's stable key (``partition-3``, a deployment node name).
    delta : dict[str, np.ndarray]
        The decoded float32 update, one array per fast tensor.
    num_examples : int
        Local training examples the client reported.
    metrics : dict[str, float]
        Every numeric metric of the reply (``train-loss``, a role flag, ...).
    blob : bytes
        The update as it came over the wire, for storing it in its encoded form.
    """

    client: str
    delta: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    blob: bytes = b""


@dataclass(frozen=True)
class Step:
    """The server's move in one round: ``x <- x + server_lr * direction``.

    Parameters
    ----------
    direction : dict[str, np.ndarray]
        The aggregate, tensor by tensor.
    weights : dict[str, float]
        Coefficient of each fresh update in ``direction``, by client key.
    memory_weights : dict[str, float]
        Coefficient of each stored update (as held before this round's
        updates were stored), by client key: the stale terms of FedVARP,
        MIFA, FedStale. ``direction = sum_i weights[i] * delta_i +
        sum_j memory_weights[j] * stored_j``.
    """

    direction: dict[str, np.ndarray]
    weights: dict[str, float]
    memory_weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Federation:
    """What the server knows about the federation when the run starts.

    Parameters
    ----------
    node_keys : dict[int, str]
        Client key of each identified Flower node id.
    shapes : dict[str, tuple[int, ...]]
        Shape of each fast tensor.
    probabilities : dict[str, float] | None
        The true participation probability of each client, only when the user
        declares it known (``--p-known``); None otherwise.
    """

    node_keys: dict[int, str]
    shapes: dict[str, tuple[int, ...]]
    probabilities: dict[str, float] | None = None

    @property
    def clients(self) -> list[str]:
        return sorted(set(self.node_keys.values()))


def zeros_like_state(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, np.float64) for name, shape in shapes.items()}


def weighted_sum(
    terms: Iterable[tuple[float, Mapping[str, np.ndarray]]], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """sum_k c_k * t_k in float64, tensor by tensor."""
    total = zeros_like_state(shapes)
    for coefficient, tensors in terms:
        for name in total:
            total[name] += coefficient * np.asarray(tensors[name], dtype=np.float64)
    return total


class FastStrategy(Strategy):
    """Base of fedslim's strategies: sample nodes, send the task, turn replies into :class:`ClientUpdate`.

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Fraction of the *available* nodes sampled each round (at least
        ``min_train_nodes``). With a participation model, availability already
        decides who takes part; 1.0 contacts every available node.
    min_train_nodes : int (default: 1)
        Minimum number of nodes sampled each round (when that many are available).
    server_lr : float (default: 1.0)
        Server step size eta_g applied to the step's direction.
    seed : int (default: 0)
        Seed of the node sampling and of any other randomness of the strategy.
    """

    def __init__(
        self, fraction_train: float = 1.0, min_train_nodes: int = 1, server_lr: float = 1.0, seed: int = 0
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise StrategyConfigError(f"fraction_train must be in (0, 1], got {fraction_train}")
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.server_lr = server_lr
        self.seed = seed
        self.current: dict[str, np.ndarray] = {}
        self.last_step: Step | None = None
        self._federation: Federation | None = None

    # ------------------------------------------------------------- set-up

    def bind(self, federation: Federation) -> None:
        """Called by the server loop once the nodes are identified, before round 1."""
        self._federation = federation

    @property
    def federation(self) -> Federation:
        if self._federation is None:
            raise StrategyConfigError(f"{type(self).__name__} was not bound to a federation (call bind() first)")
        return self._federation

    @property
    def num_clients(self) -> int:
        """N: every client of the federation, participating this round or not."""
        return len(self.federation.clients)

    def memory_bytes(self) -> int:
        """Bytes of per-client state the strategy holds on the server (0 for memoryless rules)."""
        return 0

    def summary(self) -> None:
        log(
            INFO,
            "%s: fraction_train=%.3f, server_lr=%g",
            type(self).__name__,
            self.fraction_train,
            self.server_lr,
        )

    # ------------------------------------------------------------- train

    def sample_nodes(self, server_round: int, node_ids: Iterable[int]) -> list[int]:
        """A seeded uniform sample without replacement of the available nodes.

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
        """Send the fast state and the task config to the sampled nodes (see :meth:`instruction`)."""
        self.current = {name: array.numpy() for name, array in arrays.items()}
        config["server-round"] = server_round
        return [
            Message(
                content=self.instruction(server_round, node_id, arrays, config),
                dst_node_id=node_id,
                message_type=MessageType.TRAIN,
            )
            for node_id in self.sample_nodes(server_round, grid.get_node_ids())
        ]

    def instruction(self, server_round: int, node_id: int, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        """The content sent to one sampled node; override to instruct nodes differently."""
        return RecordDict({FAST_KEY: arrays, CONFIG_KEY: config})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply :meth:`aggregate` to the round's accepted updates.

        Called every round, also when no update was accepted (rules with
        per-client statistics count the absences).
        """
        updates = [client_update(reply) for reply in replies]
        step = self.aggregate(server_round, updates)
        self.last_step = step
        if not updates and not any(np.any(d) for d in step.direction.values()):
            return None, None
        new_state = {
            name: (value + self.server_lr * step.direction[name]).astype(np.float32)
            for name, value in self.current.items()
        }
        return ArrayRecord({n: Array(v) for n, v in new_state.items()}), train_metrics(updates)

    @abstractmethod
    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Step:
        """The round's step from its accepted updates (the paper's update rule)."""

    # ------------------------------------------------------------- no federated evaluation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: fedslim evaluates centrally on the server."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def client_update(reply: Message) -> ClientUpdate:
    """The :class:`ClientUpdate` of an accepted reply, as the server loop hands it over."""
    metrics = reply.content.metric_records[METRICS_KEY]
    numbers = {key: float(value) for key, value in metrics.items() if isinstance(value, int | float)}
    client = str(reply.content.config_records[CLIENT_RECORD]["key"]) if CLIENT_RECORD in reply.content else ""
    blob = record_update(reply.content.array_records[WIRE_KEY]) if WIRE_KEY in reply.content else b""
    return ClientUpdate(
        client=client or str(reply.metadata.src_node_id),
        delta={name: array.numpy() for name, array in reply.content.array_records[DELTA_KEY].items()},
        num_examples=int(numbers.get(NUM_EXAMPLES_KEY, 0)),
        metrics=numbers,
        blob=blob,
    )


def train_metrics(updates: list[ClientUpdate]) -> MetricRecord:
    """Example-weighted mean train loss and the examples of the round."""
    examples = sum(u.num_examples for u in updates)
    with_loss = [(u.num_examples, u.metrics["train-loss"]) for u in updates if "train-loss" in u.metrics]
    weight = sum(n for n, _ in with_loss)
    loss = sum(n * value for n, value in with_loss) / weight if weight else 0.0
    return MetricRecord({"train-loss": loss, NUM_EXAMPLES_KEY: examples})
