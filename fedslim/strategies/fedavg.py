"""FedAvg over fast-layer deltas (McMahan et al., 2017), in the two forms the participation papers compare.

Over participants (the default), with S_t the clients whose update was
accepted in round t and n_i their example counts:

    x_{t+1} = x_t + eta_g * sum_{i in S_t} (n_i / sum_{j in S_t} n_j) * Delta_i

1/p-reweighted (unbiased over all N clients when the 1/p_i are right),
chosen with ``p_estimate``:

    x_{t+1} = x_t + eta_g * (1/N) * sum_{i in S_t} w_i * Delta_i,   w_i ~ 1/p_i

where x is the fast state only and Delta_i = (client's local fast state) - x_t.
"""

from __future__ import annotations

import math

from fedslim.channel.updates import ClientUpdate
from fedslim.config import StrategyConfigError
from fedslim.strategies.base import FastStrategy, Step, weighted_sum

WEIGHTINGS = ("examples", "uniform")


class FastFedAvg(FastStrategy):
    """FedAvg whose messages carry only the fast layer.

    Parameters
    ----------
    weighting : str (default: "examples")
        Over participants: weight by example count (``examples``) or equally
        (``uniform``). Ignored when ``p_estimate`` is set.
    p_estimate : str, optional
        The 1/p-reweighted form, with 1/p_i from ``known``, ``fedau`` or
        ``sample-fraction`` (see :mod:`fedslim.strategies.estimators`).
    cutoff : float (default: inf)
        FedAU's K when ``p_estimate="fedau"``.
    **kwargs
        ``fraction_train`` (default 1.0 here and 0.2 from the CLI without a
        participation model), ``min_train_nodes``, ``server_lr``, ``seed``.
    """

    def __init__(
        self, weighting: str = "examples", p_estimate: str | None = None, cutoff: float = math.inf, **kwargs: float
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if weighting not in WEIGHTINGS:
            raise StrategyConfigError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        self.weighting = weighting
        self.p_estimate = p_estimate
        self.cutoff = cutoff

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Step:
        if self.p_estimate is None:
            raw = {u.client: float(u.num_examples if self.weighting == "examples" else 1) for u in updates}
            total = sum(raw.values())
            weights = {client: w / total for client, w in raw.items()}
        else:
            participants = [u.client for u in updates]
            weights = {c: w / self.num_clients for c, w in self.estimator.weights(participants).items()}
            self.estimator.observe(participants)
        direction = weighted_sum(((weights[u.client], u.delta) for u in updates), self.federation.shapes)
        return Step(direction, weights)
