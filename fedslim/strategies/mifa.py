"""MIFA (Gu et al., NeurIPS 2021, arXiv 2106.04159): average the latest update of every client.

The server keeps G_i, the latest update of client i, overwritten when it participates:

    G_i <- Delta_i for i in S_t
    x_{t+1} = x_t + eta_g * (1/N) sum_{i=1..N} G_i

with no 1/p scaling. Clients never heard from count as G_i = 0 (``init="zeros"``),
or the server waits, leaving x unchanged, until every client has reported once
(``init="wait"``).
"""

from __future__ import annotations

from fedslim.channel.updates import ClientUpdate
from fedslim.config import StrategyConfigError
from fedslim.strategies.base import FastStrategy, Step, weighted_sum

MIFA_INITS = ("zeros", "wait")


class MIFA(FastStrategy):
    """MIFA over fast deltas.

    Parameters
    ----------
    init : str (default: "zeros")
        ``zeros``: unseen clients contribute G_i = 0. ``wait``: no server step
        until every client has sent one update.
    memory : str (default: "wire")
        How the G_i are stored (``wire``, ``fp16``, ``bf16``, ``fp32``).
    **kwargs
        ``fraction_train``, ``min_train_nodes``, ``server_lr``, ``seed``.
    """

    def __init__(self, init: str = "zeros", memory: str = "wire", **kwargs: float) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if init not in MIFA_INITS:
            raise StrategyConfigError(f"unknown MIFA init {init!r}; choose one of {', '.join(MIFA_INITS)}")
        self.init = init
        self.memory_form = memory

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Step:
        for u in updates:
            self.stored.put(u.client, u.delta, u.blob)
        clients = self.federation.clients
        if self.init == "wait" and any(c not in self.stored for c in clients):
            return Step(weighted_sum([], self.federation.shapes), {u.client: 0.0 for u in updates})
        n = self.num_clients
        fresh = {u.client for u in updates}
        weights = {client: 1.0 / n for client in fresh}
        memory_weights = {c: 1.0 / n for c in clients if c in self.stored and c not in fresh}
        return Step({k: v / n for k, v in self.stored.total().items()}, weights, memory_weights)
