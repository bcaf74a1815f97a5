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

from fedslim.strategies.fedavg import FastFedAvg


class FedAU(FastFedAvg):
    """FedAU over fast deltas: FedAvg's 1/p form with FedAU's interval weights
    (:class:`~fedslim.strategies.estimators.FedAUWeights`).

    Parameters
    ----------
    cutoff : float (default: inf)
        K of the interval statistics (``inf``: no cutoff). The paper also uses 50.
    **kwargs
        ``fraction_train``, ``min_train_nodes``, ``server_lr``, ``seed``
        (see :class:`~fedslim.strategies.base.FastStrategy`).
    """

    def __init__(self, cutoff: float = math.inf, **kwargs: float) -> None:
        super().__init__(p_estimate="fedau", cutoff=cutoff, **kwargs)
