"""FedAU (Wang and Ji, ICLR 2024, arXiv 2306.03401): weights from participation intervals, p unknown.

Online weight of client n, with cutoff K (state: S_n rounds missed in a
row, M_n intervals recorded, w_n their mean, 1 before any):

- n participates in round t: its weight is the current w_n (from rounds
  before t); then the interval L = S_n + 1 is recorded,
  w_n <- (M_n w_n + L) / (M_n + 1), M_n <- M_n + 1, S_n <- 0;
- n misses round t: S_n <- S_n + 1; if S_n reaches K, L = K is recorded the
  same way and S_n <- 0.

Under Bernoulli(p_n) participation w_n -> (1 - (1 - p_n)^K) / p_n, about
1/p_n for large K. The server step divides by N, not by the participants:

    x_{t+1} = x_t + eta_g * (1/N) * sum_{n in S_t} w_n Delta_n
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedslim.strategies.base import ClientUpdate, FastStrategy, Step, weighted_sum


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


class FedAU(FastStrategy):
    """FedAU over fast deltas.

    Parameters
    ----------
    cutoff : float (default: inf)
        K of the interval statistics (``inf``: no cutoff). The paper also uses 50.
    **kwargs
        ``fraction_train``, ``min_train_nodes``, ``server_lr``, ``seed``
        (see :class:`~fedslim.strategies.base.FastStrategy`).
    """

    def __init__(self, cutoff: float = math.inf, **kwargs: float) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.cutoff = cutoff
        self.estimates: FedAUWeights | None = None

    def memory_bytes(self) -> int:
        return self.estimates.nbytes() if self.estimates else 0

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Step:
        if self.estimates is None:
            self.estimates = FedAUWeights(self.federation.clients, self.cutoff)
        participants = [u.client for u in updates]
        weights = {c: w / self.num_clients for c, w in self.estimates.weights(participants).items()}
        self.estimates.observe(participants)
        direction = weighted_sum(((weights[u.client], u.delta) for u in updates), self.federation.shapes)
        return Step(direction, weights)
