"""Estimates of 1/p_i, the inverse participation probability, for the unbiased (1/p-reweighted) rules.

Each estimator gives the weight of the round's participants *before* it sees
the round (:meth:`weights`), then records who took part (:meth:`observe`):

- ``known``: 1/p_i from the participation model, when the user declares p known;
- ``fedau``: FedAU's online estimate from participation intervals (no p needed);
- ``sample-fraction``: N/|S_t|, what uniform sampling of |S_t| of N clients implies
  (FedVARP's 1/M scaling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from fedslim.strategies.base import Federation, StrategyConfigError
from fedslim.strategies.fedau import FedAUWeights

ESTIMATORS = ("known", "fedau", "sample-fraction")


class InverseProbability(Protocol):
    def weights(self, participants: Sequence[str]) -> dict[str, float]: ...

    def observe(self, participants: Sequence[str]) -> None: ...


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


class SampledFraction:
    """w_i = N/|S_t|: every participant stands for N/|S_t| clients."""

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients

    def weights(self, participants: Sequence[str]) -> dict[str, float]:
        return {client: self.num_clients / len(participants) for client in participants}

    def observe(self, participants: Sequence[str]) -> None:
        pass


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
