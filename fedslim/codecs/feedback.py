"""Client-side error feedback (Seide et al., 2014; Karimireddy et al., 2019) with staleness decay.

A biased codec C drops part of every update. The client keeps what was
dropped, e = u - C(u), and adds it to its next update, so that nothing is
lost, only delayed. Under partial participation that delay can be long: the
residual of a client that last trained many rounds ago points along an old
model's gradient, and a large one arrives all at once. fedslim scales the
residual by ``decay ** rounds_missed`` before using it, where rounds_missed
counts the fast-state versions the client skipped since it computed the
residual. A client that trains every round keeps all of it (classic EF); a
client away for k rounds keeps decay**k of it, so what it can inject is
bounded by its recent updates rather than by its whole history. This needs
no server memory per client (FetchSGD's server-side error) and no change to
the aggregation rule (EF21), so any strategy can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Residual:
    """What the codec dropped from a client's last update, and the fast-state version it was computed at."""

    tensors: dict[str, np.ndarray]
    version: int


def compensate(
    delta: Mapping[str, np.ndarray], residual: Residual | None, version: int, decay: float
) -> dict[str, np.ndarray]:
    """u = delta + decay**missed * residual, with missed = version - residual.version - 1 rounds skipped."""
    if residual is None:
        return {name: np.asarray(value, dtype=np.float32) for name, value in delta.items()}
    missed = max(0, version - residual.version - 1)
    weight = np.float32(decay**missed)
    return {
        name: np.asarray(value + weight * residual.tensors[name], dtype=np.float32) for name, value in delta.items()
    }


def new_residual(sent: Mapping[str, np.ndarray], decoded: Mapping[str, np.ndarray], version: int) -> Residual:
    """e = u - C(u): the part of ``sent`` the receiver did not get."""
    return Residual({name: np.subtract(sent[name], decoded[name], dtype=np.float32) for name in sent}, version)
