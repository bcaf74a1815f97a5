"""Estimates of 1/p_i, the inverse participation probability, for the unbiased (1/p-reweighted) rules.

Each estimator gives the weight of the round's participants *before* it sees
the round (:meth:`weights`), then records who took part (:meth:`observe`):

- ``known``: 1/p_i from the participation model, when the user declares p known;
- ``fedau``: FedAU's online estimate from participation intervals (no p needed; see
  :class:`FedAUWeights`);
- ``sample-fraction``: N/|S_t|, what uniform sampling of |S_t| of N clients implies
  (FedVARP's 1/M scaling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from fedslim.config import StrategyConfigError

if TYPE_CHECKING:
    from fedslim.strategies.base import Federation

ESTIMATORS = ("known", "fedau", "sample-fraction")


class InverseProbability(Protocol):
    def weights(self, participants: Sequence[str]) -> dict[str, float]: ...

    def observe(self, participants: Sequence[str]) -> None: ...

    def nbytes(self) -> int: ...

    def add_client(self, client: str) -> None: ...


@dataclass
class FedAUWeights:
    """FedAU's per-client interval statistics (usable as the 1/p estimate of any rule).

    Parameters
    ----------
    clients : Sequence[str]
        Every client of the federation (absences are counted for all of them).
    cutoff : float (default: inf)
        K: a run of K missed rounds is recorded as an interval of length K.
    """

    clients: Sequence[str]
    cutoff: float = math.inf
    missed: dict[str, int] = field(default_factory=dict)
    intervals: dict[str, int] = field(default_factory=dict)
    mean_interval: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.cutoff >= 1:
            raise ValueError(f"FedAU cutoff K must be >= 1, got {self.cutoff}")

    def weight(self, client: str) -> float:
        return self.mean_interval.get(client, 1.0)

    def nbytes(self) -> int:
        """Three 8-byte numbers per client (S_n, M_n, w_n)."""
        return 24 * len(set(self.missed) | set(self.intervals))

    def weights(self, participants: Sequence[str]) -> dict[str, float]:
        return {client: self.weight(client) for client in participants}

    def add_client(self, client: str) -> None:
        """Count a client that joined late from now on (its first interval starts now)."""
        if client not in self.clients:
            self.clients = [*self.clients, client]

    def observe(self, participants: Sequence[str]) -> None:
        """Record one round: who participated; every other client missed it."""
        present = set(participants)
        for client in set(self.clients) | present:
            if client in present:
                self._record(client, self.missed.get(client, 0) + 1)
            else:
                self.missed[client] = self.missed.get(client, 0) + 1
                if self.missed[client] >= self.cutoff:
                    self._record(client, self.missed[client])

    def _record(self, client: str, interval: int) -> None:
        count = self.intervals.get(client, 0)
        self.mean_interval[client] = (count * self.weight(client) + interval) / (count + 1) if count else interval
        self.intervals[client] = count + 1
        self.missed[client] = 0


class KnownProbabilities:
    """w_i = 1/p_i with the true p_i."""

    def __init__(self, probabilities: dict[str, float]) -> None:
        bad = {c: p for c, p in probabilities.items() if not 0.0 < p <= 1.0}
        if bad:
            raise StrategyConfigError(f"participation probabilities must be in (0, 1], got {bad}")
        self.probabilities = probabilities

    def weights(self, participants: Sequence[str]) -> dict[str, float]:
        return {client: 1.0 / self.probabilities[client] for client in participants}

    def observe(self, participants: Sequence[str]) -> None:
        pass

    def add_client(self, client: str) -> None:
        pass  # the participation model gave every simulated client its p_i at the start

    def nbytes(self) -> int:
        return 0


class SampledFraction:
    """w_i = N/|S_t|: every participant stands for N/|S_t| clients."""

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients

    def weights(self, participants: Sequence[str]) -> dict[str, float]:
        return {client: self.num_clients / len(participants) for client in participants}

    def observe(self, participants: Sequence[str]) -> None:
        pass

    def add_client(self, client: str) -> None:
        self.num_clients += 1

    def nbytes(self) -> int:
        return 0


def make_estimator(name: str, federation: Federation, cutoff: float = math.inf) -> InverseProbability:
    """The estimator called ``name`` for ``federation`` (``cutoff`` is FedAU's K)."""
    if name == "known":
        if federation.probabilities is None:
            raise StrategyConfigError(
                "p-estimate=known needs the true participation probabilities: "
                "run with --p-known (simulation with a participation model), or use p-estimate=fedau"
            )
        return KnownProbabilities(federation.probabilities)
    if name == "fedau":
        return FedAUWeights(federation.clients, cutoff)
    if name == "sample-fraction":
        return SampledFraction(len(federation.clients))
    raise StrategyConfigError(f"unknown p-estimate {name!r}; choose one of {', '.join(ESTIMATORS)}")
