"""What every fedslim strategy shares: who is asked to train, the per-client memory, and the step it returns.

A strategy is pure: it never touches a Flower message. The server round tells
it the available clients and the fast state (:meth:`FastStrategy.configure`,
which returns one :class:`~fedslim.channel.updates.Instruction` per sampled
client), then hands it the round's accepted, decoded updates
(:meth:`FastStrategy.apply`), and gets back the new fast state and the
weights it gave each update. A paper's update rule fits in one method::

    def aggregate(self, server_round, updates) -> Step

whose :class:`Step` is the direction the server adds to the fast state,
``x <- x + server_lr * direction``, together with the coefficient it gave
each fresh update and each stored one, which the communication log records
so that a round can be recomputed from it.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fedslim.channel.updates import ClientUpdate, Instruction
from fedslim.config import StrategyConfigError
from fedslim.strategies.estimators import InverseProbability, make_estimator
from fedslim.strategies.memory import ClientMemory

State = dict[str, np.ndarray]


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
class Outcome:
    """A round's result: the new fast state (None: unchanged) and the step that led there."""

    state: State | None
    step: Step


@dataclass(frozen=True)
class Federation:
    """What the server knows about the federation when the run starts.

    Parameters
    ----------
    node_keys : dict[int, str]
        Client key of each admitted Flower node id.
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


def zeros_like_state(shapes: Mapping[str, tuple[int, ...]]) -> State:
    return {name: np.zeros(shape, np.float64) for name, shape in shapes.items()}


def weighted_sum(
    terms: Iterable[tuple[float, Mapping[str, np.ndarray]]], shapes: Mapping[str, tuple[int, ...]]
) -> State:
    """sum_k c_k * t_k in float64, tensor by tensor."""
    total = zeros_like_state(shapes)
    for coefficient, tensors in terms:
        for name in total:
            total[name] += coefficient * np.asarray(tensors[name], dtype=np.float64)
    return total


class FastStrategy(ABC):
    """Base of fedslim's strategies: seeded sampling, the per-client memory and 1/p estimate, the server step.

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Fraction of the *available* clients sampled each round (at least
        ``min_train_nodes``). With a participation model, availability already
        decides who takes part; 1.0 asks every available client.
    min_train_nodes : int (default: 1)
        Minimum number of clients sampled each round (when that many are available).
    server_lr : float (default: 1.0)
        Server step size eta_g applied to the step's direction.
    seed : int (default: 0)
        Seed of the sampling and of any other randomness of the strategy.

    A subclass that keeps one stored update per client sets ``memory_form``
    (``wire``, ``fp16``, ``bf16``, ``fp32``) and finds it in ``self.stored``;
    one that weights by an estimate of 1/p_i sets ``p_estimate`` (and
    ``cutoff``) and finds it in ``self.estimator``. Both exist once the
    strategy is bound to its federation.
    """

    memory_form: str | None = None
    p_estimate: str | None = None
    cutoff: float = float("inf")
    consolidates: bool = True
    """Whether the strategy can go on after a consolidation (:meth:`forget_memory` forgets all it must)."""

    def __init__(
        self, fraction_train: float = 1.0, min_train_nodes: int = 1, server_lr: float = 1.0, seed: int = 0
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise StrategyConfigError(f"fraction_train must be in (0, 1], got {fraction_train}")
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.server_lr = server_lr
        self.seed = seed
        self.current: State = {}
        self._federation: Federation | None = None
        self._stored: ClientMemory | None = None
        self._estimator: InverseProbability | None = None

    # ------------------------------------------------------------- set-up

    def bind(self, federation: Federation) -> None:
        """Called by the server once the nodes are identified, before round 1."""
        self._federation = federation
        if self.memory_form is not None:
            self._stored = ClientMemory(federation.shapes, self.memory_form)
        if self.p_estimate is not None:
            self._estimator = make_estimator(self.p_estimate, federation, self.cutoff)

    def rebind(self, federation: Federation) -> None:
        """Called instead of :meth:`bind` when a run resumes: the same clients, maybe behind new Flower node ids.

        The per-client memory and 1/p estimates restored with the strategy are kept.
        """
        self._federation = federation

    def add_client(self, node: int, client: str) -> None:
        """A client that joined after the start, or came back on another node; memory and estimates are kept."""
        federation = self.federation
        known = client in federation.node_keys.values()
        node_keys = {n: key for n, key in federation.node_keys.items() if key != client}
        self._federation = replace(federation, node_keys={**node_keys, node: client})
        if self._estimator is not None and not known:
            self._estimator.add_client(client)

    def forget_memory(self) -> None:
        """The fast layer was merged into the base and starts again (a consolidation): forget every stored update.

        A stored update is a step of adapters that no longer exist: after a
        merge A is drawn anew and B is zero, so an old step of B would move
        the new layer along the old A's directions, and the merged product
        of rank r cannot be written back in the new factors. Participation
        statistics (the 1/p estimates) are about clients, not coordinates,
        and are kept. A subclass with more state in fast-layer coordinates
        extends this.
        """
        if self._stored is not None:
            self._stored = ClientMemory(self.federation.shapes, self._stored.form)

    def snapshot(self) -> FastStrategy:
        """A copy of the strategy as it is, for :meth:`restore` when the server refuses the step :meth:`apply`
        returns (it would make the fast state non-finite): the round's updates then leave no trace in it.

        The per-client memory is copied by reference to its entries
        (:meth:`ClientMemory.snapshot`), the federation (immutable, replaced
        when it changes) not at all; everything else a subclass holds is
        copied deeply, so a strategy of its own is rolled back whole.
        """
        copied = copy.copy(self)
        copied.__dict__ = {name: _snapshot(value) for name, value in vars(self).items()}
        return copied

    def restore(self, snapshot: FastStrategy) -> None:
        """Go back to what :meth:`snapshot` copied."""
        vars(self).clear()
        vars(self).update(vars(snapshot))

    def memory_problem(self) -> str | None:
        """Why the per-client memory cannot be kept after a step (None: it can): an entry that is not finite."""
        if self._stored is not None and self._stored.non_finite():
            return f"a stored update of {type(self).__name__} holds NaN or Inf (memory form {self._stored.form})"
        return None

    @property
    def federation(self) -> Federation:
        if self._federation is None:
            raise StrategyConfigError(f"{type(self).__name__} was not bound to a federation (call bind() first)")
        return self._federation

    @property
    def stored(self) -> ClientMemory:
        """The per-client memory (``memory_form``)."""
        if self._stored is None:
            raise StrategyConfigError(f"{type(self).__name__} keeps no per-client memory, or was not bound")
        return self._stored

    @property
    def estimator(self) -> InverseProbability:
        """The 1/p_i estimate (``p_estimate``)."""
        if self._estimator is None:
            raise StrategyConfigError(f"{type(self).__name__} has no p estimate, or was not bound")
        return self._estimator

    @property
    def num_clients(self) -> int:
        """N: every client of the federation, participating this round or not."""
        return len(self.federation.clients)

    def memory_bytes(self) -> int:
        """Bytes of per-client state the strategy holds on the server."""
        stored = self._stored.nbytes() if self._stored is not None else 0
        return stored + (self._estimator.nbytes() if self._estimator is not None else 0)

    # ------------------------------------------------------------- a round

    def sample(self, server_round: int, available: Sequence[str]) -> list[str]:
        """A seeded uniform sample without replacement of the ``available`` clients (in the order given)."""
        clients = list(available)
        size = min(len(clients), max(self.min_train_nodes, round(self.fraction_train * len(clients))))
        rng = np.random.default_rng([self.seed, server_round])
        return [clients[i] for i in sorted(rng.choice(len(clients), size=size, replace=False))]

    def configure(
        self, server_round: int, state: Mapping[str, np.ndarray], available: Sequence[str]
    ) -> list[Instruction]:
        """The round's instructions: one per sampled client (see :meth:`instruct`)."""
        self.current = {name: np.asarray(value, dtype=np.float32) for name, value in state.items()}
        return [self.instruct(server_round, client) for client in self.sample(server_round, available)]

    def instruct(self, server_round: int, client: str) -> Instruction:
        """What one sampled client is asked to do; override to instruct clients differently."""
        return Instruction(client)

    def apply(self, server_round: int, updates: list[ClientUpdate]) -> Outcome:
        """Apply :meth:`aggregate` to the round's accepted updates and the state sent this round.

        Called every round, also when no update was accepted (rules with
        per-client statistics count the absences).
        """
        step = self.aggregate(server_round, updates)
        if not updates and not any(np.any(d) for d in step.direction.values()):
            return Outcome(None, step)
        with np.errstate(over="ignore", invalid="ignore"):  # an Inf here is the server's to refuse (ServerRun)
            new_state = {
                name: (value + self.server_lr * step.direction[name]).astype(np.float32)
                for name, value in self.current.items()
            }
        return Outcome(new_state, step)

    @abstractmethod
    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Step:
        """The round's step from its accepted updates (the paper's update rule)."""


def _snapshot(value: object) -> object:
    """One attribute of a strategy as :meth:`FastStrategy.snapshot` keeps it."""
    if isinstance(value, ClientMemory | FastStrategy):
        return value.snapshot()
    if isinstance(value, Federation):
        return value
    return copy.deepcopy(value)
