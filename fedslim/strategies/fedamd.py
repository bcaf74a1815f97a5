"""FedAMD anchor sampling (Wu et al., ICML 2023, arXiv 2206.05891): anchors refresh gradients, miners reduce variance.

The server stores g_i, a large-batch gradient of client i's loss (its
"anchor"), and at the start of round t forms the global direction

    v = (1/N) sum_{i=1..N} g_i

Each sampled client is independently an ANCHOR with probability p, else a
MINER, so one round sends different instructions to different clients:

- anchor: g_i <- grad f_i(x_t) on its whole local data; used from round t+1.
- miner: y_0 = x_t, v_0 = v; K steps of
  y_{k+1} = y_k - eta v_k,  v_{k+1} = v_k + grad f_i(y_{k+1}; B_k) - grad f_i(y_k; B_k);
  uploads Delta_i = y_K - x_t.

    x_{t+1} = x_t + eta_g * mean over miners of Delta_i    (no step without miners)

Before a client's first anchor its g_i is 0 (``initial_direction="zeros"``),
or it is made an anchor the first time it is sampled (``"anchor-first"``, the
online counterpart of the paper's g_i(x_0) for every client: with uneven
participation not every client can be asked at round 0). While no anchor
gradient exists at all, v = 0 and the recursion above would never move
(it only adds gradient differences to v_0), so miners then run plain local
SGD instead: with p = 0 and zero initial directions FedAMD is FedAvg with
equal weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedslim.channel.protocol import Role
from fedslim.channel.updates import ClientUpdate, Instruction
from fedslim.codecs.pipeline import parse_codec
from fedslim.config import StrategyConfigError
from fedslim.strategies.base import FastStrategy, Step, weighted_sum

INITIAL_DIRECTIONS = ("zeros", "anchor-first")


class FedAMD(FastStrategy):
    """FedAMD over the fast layer.

    Parameters
    ----------
    anchor_probability : float (default: 0.2)
        p: probability that a sampled client is an anchor this round.
    initial_direction : str (default: "anchor-first")
        ``zeros`` or ``anchor-first`` (see the module docstring).
    memory : str (default: "wire")
        How the anchor gradients are stored (``wire``, ``fp16``, ``bf16``, ``fp32``).
    direction_codec : str (default: "none")
        Codec of v on its way to the miners (a codec spec; ``none`` is float32).
    **kwargs
        ``fraction_train``, ``min_train_nodes``, ``server_lr``, ``seed``.
    """

    def __init__(
        self,
        anchor_probability: float = 0.2,
        initial_direction: str = "anchor-first",
        memory: str = "wire",
        direction_codec: str = "none",
        **kwargs: float,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if not 0.0 <= anchor_probability <= 1.0:
            raise StrategyConfigError(f"anchor_probability must be in [0, 1], got {anchor_probability}")
        if initial_direction not in INITIAL_DIRECTIONS:
            raise StrategyConfigError(
                f"unknown initial_direction {initial_direction!r}; choose one of {', '.join(INITIAL_DIRECTIONS)}"
            )
        self.anchor_probability = anchor_probability
        self.initial_direction = initial_direction
        self.memory_form = memory  # the anchor gradients g_i
        self.direction_codec = parse_codec(direction_codec).spec
        self._round_direction: dict[str, np.ndarray] | None = None

    def forget_memory(self) -> None:
        """As the base class; the anchors' gradients go, so the next round's sampled clients are anchors again
        (``anchor-first``) or train plainly."""
        super().forget_memory()
        self._round_direction = None

    def direction(self) -> dict[str, np.ndarray]:
        """v = (1/N) sum_i g_i."""
        return {name: (total / self.num_clients).astype(np.float32) for name, total in self.stored.total().items()}

    def role(self, server_round: int, client: str) -> Role:
        if self.initial_direction == "anchor-first" and client not in self.stored:
            return Role.ANCHOR
        index = self.federation.clients.index(client)
        draw = np.random.default_rng([self.seed, server_round, index, 1]).random()
        if draw < self.anchor_probability:
            return Role.ANCHOR
        # Without any anchor gradient v = 0, and a variance-reduced miner would not move: train plainly.
        return Role.MINER if len(self.stored) else Role.TRAIN

    def configure(
        self, server_round: int, state: Mapping[str, np.ndarray], available: Sequence[str]
    ) -> list[Instruction]:
        """As the base class, with v computed once for the round's miners."""
        self._round_direction = None
        return super().configure(server_round, state, available)

    def instruct(self, server_round: int, client: str) -> Instruction:
        role = self.role(server_round, client)
        if role != Role.MINER:
            return Instruction(client, role)
        if self._round_direction is None:
            self._round_direction = self.direction()
        return Instruction(client, role, self._round_direction, self.direction_codec)

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Step:
        miners = [u for u in updates if u.role != Role.ANCHOR]
        for u in updates:
            if u.role == Role.ANCHOR:
                self.stored.put(u.client, u.delta, u.blob)  # an anchor's upload is its gradient g_i
        weights = {u.client: 0.0 for u in updates}
        weights.update({u.client: 1.0 / len(miners) for u in miners})
        direction = weighted_sum(((weights[u.client], u.delta) for u in miners), self.federation.shapes)
        return Step(direction, weights)
