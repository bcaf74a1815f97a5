"""FedStale (Rodio and Neglia, arXiv 2405.04171): a beta-weighted mix of fresh and stale updates.

The server keeps h_i, the last update received from client i (0 before its
first). With data weights q_i = 1/N and w_i an estimate of 1/p_i:

    D = sum_{i in S_t} (q_i w_i) Delta_i
        + beta * [ sum_{j=1..N} q_j h_j - sum_{i in S_t} (q_i w_i) h_i ]
    x_{t+1} = x_t + eta_g * D
    h_i <- Delta_i for i in S_t            (the history term uses the old h)

beta = 0 is 1/p-reweighted FedAvg; beta = 1 with w_i = N/|S_t| is FedVARP.
When p is unknown, FedAU's interval estimate supplies w_i (``p_estimate="fedau"``).
"""

from __future__ import annotations

import math

from fedslim.channel.updates import ClientUpdate
from fedslim.config import StrategyConfigError
from fedslim.strategies.base import FastStrategy, Step, weighted_sum


class FedStale(FastStrategy):
    """FedStale over fast deltas.

    Parameters
    ----------
    beta : float (default: 0.5)
        Weight of the stale (history) term, in [0, 1].
    p_estimate : str (default: "fedau")
        Source of w_i ~ 1/p_i: ``known``, ``fedau`` or ``sample-fraction``.
    cutoff : float (default: inf)
        FedAU's K when ``p_estimate="fedau"``.
    memory : str (default: "wire")
        How the h_i are stored (``wire``, ``fp16``, ``bf16``, ``fp32``).
    **kwargs
        ``fraction_train``, ``min_train_nodes``, ``server_lr``, ``seed``.
    """

    def __init__(
        self,
        beta: float = 0.5,
        p_estimate: str = "fedau",
        cutoff: float = math.inf,
        memory: str = "wire",
        **kwargs: float,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if not 0.0 <= beta <= 1.0:
            raise StrategyConfigError(f"FedStale beta must be in [0, 1], got {beta}")
        self.beta = beta
        self.p_estimate = p_estimate
        self.cutoff = cutoff
        self.memory_form = memory

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Step:
        history = self.stored  # the h_i
        n = self.num_clients
        participants = [u.client for u in updates]
        weights = {c: w / n for c, w in self.estimator.weights(participants).items()}
        self.estimator.observe(participants)

        memory_weights = {}
        if self.beta:
            memory_weights = {c: self.beta / n for c in self.federation.clients if c in history}
            for u in updates:
                if u.client in history:
                    memory_weights[u.client] -= self.beta * weights[u.client]
        terms = [(weights[u.client], u.delta) for u in updates]
        if self.beta:
            terms.append((self.beta / n, history.total()))
            terms += [(-self.beta * weights[u.client], history.get(u.client)) for u in updates if u.client in history]
        direction = weighted_sum(terms, self.federation.shapes)
        for u in updates:
            history.put(u.client, u.delta, u.blob)
        return Step(direction, weights, memory_weights)
