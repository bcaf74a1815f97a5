"""FedVARP (Jhunjhunwala et al., UAI 2022, arXiv 2207.14130): variance reduction with the clients' last updates.

The server keeps y_i, the last update of client i (0 before its first).
With S_t the M clients whose update was accepted in round t:

    v = (1/N) sum_{j=1..N} y_j + (1/M) sum_{i in S_t} (Delta_i - y_i)
    x_{t+1} = x_t + eta_g * v
    y_i <- Delta_i for i in S_t

The stored y_j are the sum's old values: participants are overwritten after the step.
"""

from __future__ import annotations

from fedslim.channel.updates import ClientUpdate
from fedslim.strategies.base import FastStrategy, Step, weighted_sum


class FedVARP(FastStrategy):
    """FedVARP over fast deltas.

    Parameters
    ----------
    memory : str (default: "wire")
        How the y_i are stored: ``wire`` (the blobs as received), ``fp16``,
        ``bf16`` or ``fp32`` (see :class:`~fedslim.strategies.memory.ClientMemory`).
    **kwargs
        ``fraction_train``, ``min_train_nodes``, ``server_lr``, ``seed``.
    """

    def __init__(self, memory: str = "wire", **kwargs: float) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.memory_form = memory

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Step:
        n, m = self.num_clients, len(updates)
        weights = {u.client: 1.0 / m for u in updates}
        memory_weights = {client: 1.0 / n for client in self.federation.clients if client in self.stored}
        for u in updates:
            if u.client in self.stored:
                memory_weights[u.client] -= 1.0 / m
        # (1/N) sum_j y_j comes from the running sum; only the participants' y_i are read.
        terms = [(1.0 / n, self.stored.total())]
        terms += [(1.0 / m, u.delta) for u in updates]
        terms += [(-1.0 / m, self.stored.get(u.client)) for u in updates if u.client in self.stored]
        direction = weighted_sum(terms, self.federation.shapes)
        for u in updates:
            self.stored.put(u.client, u.delta, u.blob)
        return Step(direction, weights, memory_weights)
