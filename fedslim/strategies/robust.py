"""Robust aggregation in front of any strategy: the round's updates are clipped, clamped or replaced by their median.

:class:`RobustStrategy` wraps any :class:`~fedslim.strategies.base.FastStrategy`
(Flower's, through their adapter, too) and transforms the round's accepted
updates before the wrapped strategy sees them; so FedVARP, MIFA and FedStale
store the transformed updates, and an outlier is not replayed from their
memory. The ``robust`` spec names the stages, applied in the order given and
joined by ``+`` (``clip:3+trimmed:0.1``); ``none`` is no stage.

Over the round's n updates of one role (a FedAMD anchor's gradient is never
compared with a miner's delta), each update Delta_i taken as one vector over
all fast tensors:

- ``clip[:F]`` (F >= 1, default 2): with m = median_i ||Delta_i||_2,

      Delta_i <- Delta_i * min(1, F * m / ||Delta_i||_2)

  Every update at or below the median passes unchanged (so a single update is
  never clipped), and no update weighs more than F typical ones.
- ``trimmed:B`` (0 < B < 0.5): with k = floor(B * n) and, for each coordinate
  c, x_(1) <= ... <= x_(n) the round's values sorted,

      Delta_i[c] <- min(max(Delta_i[c], x_(k+1)), x_(n-k))

  The coordinate-wise trimmed mean made composable: the plain mean of the
  clamped updates is the winsorized mean, and any mean of them with weights
  >= 0 summing to 1 lies in [x_(k+1), x_(n-k)], which up to k outliers per
  coordinate cannot push outside the honest values. k is Flower's
  FedTrimmedAvg's cut (int(B * n) from each end); with n < 1/B, k = 0 and
  nothing changes.
- ``median``: the same at B = 0.5,

      Delta_i[c] <- median_j Delta_j[c]      (the mean of the two middle values when n is even)

  so every update is the coordinate-wise median, and so is any mean of them
  with weights summing to 1 (FedAvg's step; a 1/p-reweighted mean is the
  median times the sum of its weights).

F = 2 by default: a bound relative to the round's median needs no tuning per
task and follows the updates as they shrink over training; at twice the
median an attacker scaling its update by 100 counts as two typical updates,
while the bulk of the honest spread passes. It also shortens honest clients
that move much further than most (many local steps on a large partition):
on Synthetic(1, 1) that helped rather than hurt (benchmarks/results/robust.md).
The server's size screen (``screen_factor``, default 10) still rejects what
is far beyond that.

A changed update's blob no longer decodes to its delta. Its blob becomes the
dense float32 encoding of the transformed delta (codec ``none``, empty base
fingerprint, version 0: the memory reads only the tensors) when the wrapped
strategy stores its memory as ``wire``, so that memory stays exact, at 4 bytes
per number instead of the uplink codec's size for each changed entry (with
``median``, every entry of a round with differing updates); otherwise it
becomes ``b""`` (no blob). An unchanged update keeps the blob it came with.

The reported num-examples are not touched: none of these stages bounds a
liar's weight in an example-weighted mean. After ``median`` the weights no
longer matter (for weights summing to 1); after ``trimmed`` the liar's update
is clamped into the honest range but can still make up nearly the whole
step; ``clip`` bounds the size of the liar's update, not its share. The
server rejects a reply claiming more examples than its node declared when it
joined (docs/wire.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from fedslim.channel.updates import ClientUpdate, Instruction
from fedslim.codecs.pipeline import DELTA, encode_update, parse_codec
from fedslim.config import StrategyConfigError
from fedslim.strategies.base import FastStrategy, Federation, Outcome, Step
from fedslim.strategies.estimators import InverseProbability
from fedslim.strategies.memory import ClientMemory

Tensors = dict[str, np.ndarray]

DEFAULT_CLIP_FACTOR = 2.0
STAGES_HELP = "clip[:F] (F >= 1, default 2), median, trimmed:B (0 < B < 0.5), joined by +, or none"


@dataclass(frozen=True)
class Clip:
    """Per-update L2-norm clipping to ``factor`` times the median norm of the round's updates."""

    factor: float = DEFAULT_CLIP_FACTOR

    @property
    def spec(self) -> str:
        return f"clip:{self.factor:g}"

    def __call__(self, deltas: list[Tensors]) -> list[Tensors]:
        norms = [math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in d.values())) for d in deltas]
        bound = self.factor * float(np.median(norms))
        return [
            d
            if norm <= bound
            else {name: (v.astype(np.float64) * (bound / norm)).astype(np.float32) for name, v in d.items()}
            for d, norm in zip(deltas, norms)
        ]


@dataclass(frozen=True)
class Trimmed:
    """Each coordinate clamped to its (k+1)-th smallest and (k+1)-th largest value over the round, k = floor(B n)."""

    share: float

    @property
    def spec(self) -> str:
        return f"trimmed:{self.share:g}"

    def __call__(self, deltas: list[Tensors]) -> list[Tensors]:
        k = math.floor(self.share * len(deltas) + 1e-9)  # 0.29 * 100 is 28.999...: still cut 29
        if k == 0:
            return deltas
        clamped: list[Tensors] = [{} for _ in deltas]
        for name in deltas[0]:
            stacked = np.stack([d[name] for d in deltas])
            ordered = np.sort(stacked, axis=0)
            for row, values in zip(clamped, np.clip(stacked, ordered[k], ordered[-k - 1])):
                row[name] = values
        return clamped


@dataclass(frozen=True)
class Median:
    """Every update replaced by the coordinate-wise median of the round's updates."""

    @property
    def spec(self) -> str:
        return "median"

    def __call__(self, deltas: list[Tensors]) -> list[Tensors]:
        medians = {name: np.median(np.stack([d[name] for d in deltas]), axis=0) for name in deltas[0]}
        return [{name: value.astype(np.float32) for name, value in medians.items()} for _ in deltas]


Stage = Clip | Trimmed | Median


def parse_robust(spec: str) -> tuple[Stage, ...]:
    """The stages a ``robust`` spec names, in order (none for ``none``); StrategyConfigError if it is not one."""
    text = spec.strip().lower()
    if text == "none":
        return ()
    if not text:
        raise StrategyConfigError(f"bad robust spec {spec!r}: it is empty (none is no stage); stages are {STAGES_HELP}")
    stages: list[Stage] = []
    for part in text.split("+"):
        name, sep, arg = part.strip().partition(":")
        try:
            if not name:
                raise ValueError("an empty stage: '+' joins two stages")
            if name in {stage.spec.partition(":")[0] for stage in stages}:
                raise ValueError(f"{name} is given twice; each stage appears at most once")
            if name == "clip":
                factor = float(arg) if sep else DEFAULT_CLIP_FACTOR
                if not 1.0 <= factor < math.inf:
                    raise ValueError(f"clip factor must be >= 1 and finite, got {arg}")
                stages.append(Clip(factor))
            elif name == "trimmed":
                if not arg:
                    raise ValueError("trimmed needs its share, e.g. trimmed:0.1")
                share = float(arg)
                if not 0.0 < share < 0.5:
                    raise ValueError(f"trimmed share must be in (0, 0.5), got {arg}")
                stages.append(Trimmed(share))
            elif name == "median":
                if sep:
                    raise ValueError("median takes no argument")
                stages.append(Median())
            else:
                raise ValueError(f"unknown stage {part.strip()!r}")
        except ValueError as exc:
            raise StrategyConfigError(f"bad robust spec {spec!r}: {exc}; stages are {STAGES_HELP}") from exc
    return tuple(stages)


def _differs(new: Tensors, old: Tensors) -> bool:
    return any(not np.array_equal(new[name], old[name]) for name in old)


class RobustStrategy(FastStrategy):
    """Any strategy, fed the round's updates after the ``robust`` stages.

    Sampling, instructions, memory and the server step are the wrapped
    strategy's; only the updates it aggregates differ (see the module docstring).

    Parameters
    ----------
    inner : FastStrategy
        The wrapped strategy.
    spec : str
        The stages: ``clip[:F]``, ``median``, ``trimmed:B``, joined by ``+``; ``none``.
    """

    def __init__(self, inner: FastStrategy, spec: str) -> None:
        super().__init__(inner.fraction_train, inner.min_train_nodes, inner.server_lr, inner.seed)
        self.inner = inner
        self.stages = parse_robust(spec)

    @property
    def spec(self) -> str:
        """The normalised spec of the stages (``clip:2+trimmed:0.1``, ``none``)."""
        return "+".join(stage.spec for stage in self.stages) or "none"

    def transform(self, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
        """The updates after every stage, in the same order; each role's updates are transformed among themselves."""
        result = list(updates)
        for role in dict.fromkeys(u.role for u in updates):
            indices = [i for i, u in enumerate(updates) if u.role == role]
            deltas = [updates[i].delta for i in indices]
            for stage in self.stages:
                deltas = stage(deltas)
            for i, delta in zip(indices, deltas):
                if _differs(delta, updates[i].delta):
                    result[i] = replace(updates[i], delta=delta, blob=self._blob(delta))
        return result

    def _blob(self, delta: Tensors) -> bytes:
        """What a changed update carries as its blob: a dense float32 encoding if the memory stores blobs, else none."""
        if self.inner.memory_form != "wire":
            return b""
        return encode_update(delta, parse_codec("none"), kind=DELTA, base_fingerprint="", state_version=0).blob

    # ------------------------------------------------------------- the wrapped strategy's

    def bind(self, federation: Federation) -> None:
        super().bind(federation)
        self.inner.bind(federation)

    def add_client(self, node: int, client: str) -> None:
        super().add_client(node, client)
        self.inner.add_client(node, client)

    def rebind(self, federation: Federation) -> None:
        super().rebind(federation)
        self.inner.rebind(federation)

    @property
    def consolidates(self) -> bool:  # type: ignore[override]
        return self.inner.consolidates

    def forget_memory(self) -> None:
        self.inner.forget_memory()

    def memory_problem(self) -> str | None:
        return self.inner.memory_problem()

    @property
    def stored(self) -> ClientMemory:
        return self.inner.stored

    @property
    def estimator(self) -> InverseProbability:
        return self.inner.estimator

    def memory_bytes(self) -> int:
        return self.inner.memory_bytes()

    def sample(self, server_round: int, available: Sequence[str]) -> list[str]:
        return self.inner.sample(server_round, available)

    def configure(
        self, server_round: int, state: Mapping[str, np.ndarray], available: Sequence[str]
    ) -> list[Instruction]:
        return self.inner.configure(server_round, state, available)

    def instruct(self, server_round: int, client: str) -> Instruction:
        return self.inner.instruct(server_round, client)

    def apply(self, server_round: int, updates: list[ClientUpdate]) -> Outcome:
        return self.inner.apply(server_round, self.transform(updates))

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Step:
        return self.inner.aggregate(server_round, self.transform(updates))
