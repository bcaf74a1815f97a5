"""Who is available in each simulated round: the participation models of the FedAU and FedStale papers, and traces.

A model gives every client a stationary probability p_i and a way of being
available over time:

- ``all``: every client, every round (the strategy's own sampling decides);
- ``bernoulli``: independently each round with heterogeneous p_i, evenly
  spread over [0.2, 1.8] x the mean (shuffled); above a mean of 5/9 the top
  would pass 1, so the range narrows to [2 mean - 1, 1];
- ``label``: Bernoulli with FedAU's label-correlated p_i:
  p_i = min(1, max(0.02, s * C * sum_c pi_{i,c} m_c)), m ~ Dirichlet(0.1) over
  the C classes, pi_i client i's label distribution, and s the scale that
  makes the mean of the p_i the asked mean (FedAU's s = mean leaves it off by
  the draw of m and by the clipping);
- ``markov``: on/off chain with P(off->on) = 0.05 and
  P(on->off) = 0.05 (1/p_i - 1) (both rescaled if that exceeds 1), started
  from its stationary law, label-correlated p_i;
- ``cyclic``: available for round(100 p_i) consecutive rounds of every
  100-round cycle, random phase, label-correlated p_i;
- ``trace:FILE``: replay a file with one line per round listing the available
  client indices (comma or space separated, ``#`` comments). Every simulated
  run writes its own trace to the run directory, so any run can be replayed.

Every model's stationary p_i average to the asked mean, so the fraction of
client-rounds available is the mean up to sampling noise (and, for
``cyclic``, rounding to whole rounds). The label-correlated models cannot go
below the floor of 0.02, nor above the mean at which every client with a
nonzero weight is always available; :func:`participation_schedule` refuses
such a mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedslim.config import ConfigError

PARTICIPATION_KINDS = ("all", "bernoulli", "label", "markov", "cyclic")
TRACE_PREFIX = "trace:"
TRACE_FILENAME = "participation.trace"
P_MIN = 0.02
"""Floor of the label-correlated p_i (FedAU's)."""
LABEL_MODELS = ("label", "markov", "cyclic")
LABEL_DIRICHLET = 0.1
MARKOV_RATE = 0.05
CYCLE = 100


class ParticipationError(ConfigError):
    """A participation model or trace cannot be used."""


@dataclass(frozen=True)
class Schedule:
    """Availability of every client in every round.

    Attributes
    ----------
    available : np.ndarray
        Boolean, shape (rounds, clients); row t-1 is round t.
    probabilities : np.ndarray
        Each client's stationary participation probability (for a trace: its
        empirical availability frequency).
    """

    available: np.ndarray
    probabilities: np.ndarray

    def clients_in(self, server_round: int) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.available[server_round - 1])]


def check_participation_spec(spec: str, mean: float) -> None:
    """Refuse an unknown model, a trace without a file name, or a mean below the label-correlated models' floor."""
    if spec.startswith(TRACE_PREFIX):
        if not trace_path(spec).name:
            raise ParticipationError("trace: needs a file, e.g. trace:runs/x/participation.trace")
        return
    if spec not in PARTICIPATION_KINDS:
        raise ParticipationError(
            f"unknown participation model {spec!r}; choose one of {', '.join(PARTICIPATION_KINDS)} or trace:FILE"
        )
    if spec in LABEL_MODELS and mean < P_MIN:
        raise ParticipationError(
            f"participation_mean {mean} is below {P_MIN}, the least p_i of the {spec} model; "
            "use bernoulli for rarer participation"
        )


def trace_path(spec: str) -> Path:
    return Path(spec[len(TRACE_PREFIX) :].strip())


def spread_probabilities(num_clients: int, mean: float, rng: np.random.Generator) -> np.ndarray:
    """Heterogeneous p_i evenly spread over [0.2, 1.8] x mean, in random order.

    Above mean 5/9 the top would pass 1: the range narrows to [2 mean - 1, 1], which keeps the mean.
    """
    low, high = (0.2, 1.8) if 1.8 * mean <= 1.0 else (2.0 - 1.0 / mean, 1.0 / mean)
    spread = mean * np.linspace(low, high, num_clients) if num_clients > 1 else np.array([mean])
    return np.minimum(rng.permutation(spread), 1.0)


def label_probabilities(label_counts: np.ndarray, mean: float, rng: np.random.Generator) -> np.ndarray:
    """FedAU's label-correlated p_i from each client's label counts (shape: clients x classes), scaled to ``mean``."""
    num_classes = label_counts.shape[1]
    distributions = label_counts / np.maximum(label_counts.sum(axis=1, keepdims=True), 1)
    multiplier = rng.dirichlet(LABEL_DIRICHLET * np.ones(num_classes))
    return scaled_to_mean(num_classes * distributions @ multiplier, mean)


def scaled_to_mean(weights: np.ndarray, mean: float) -> np.ndarray:
    """p_i = clip(s * weights_i, P_MIN, 1) with the scale s at which the p_i average to ``mean``.

    The average grows continuously with s, from P_MIN (s = 0) to its ceiling, where every client with a positive
    weight is at 1; s is found by bisection on log s. A mean outside that range is refused.
    """
    positive = weights[weights > 0]
    ceiling = (len(positive) + P_MIN * (len(weights) - len(positive))) / len(weights)
    if not P_MIN <= mean <= ceiling:
        raise ParticipationError(
            f"participation_mean {mean} is out of reach of the label-correlated p_i of this federation: "
            f"they are at least {P_MIN} and average at most {ceiling:.4f}"
        )
    if mean == P_MIN:
        return np.full(len(weights), P_MIN)
    # Below P_MIN / max(w) every p_i is P_MIN; from 1 / min(w) on, every positive one is 1.
    low, high = np.log(P_MIN / positive.max()), np.log(1.0 / positive.min())
    for _ in range(200):
        middle = (low + high) / 2
        if np.clip(np.exp(middle) * weights, P_MIN, 1.0).mean() < mean:
            low = middle
        else:
            high = middle
    return np.clip(np.exp(high) * weights, P_MIN, 1.0)


def bernoulli_schedule(p: np.ndarray, rounds: int, rng: np.random.Generator) -> np.ndarray:
    return rng.random((rounds, len(p))) < p


def markov_schedule(p: np.ndarray, rounds: int, rng: np.random.Generator, rate: float = MARKOV_RATE) -> np.ndarray:
    to_on = np.full(len(p), rate)
    to_off = rate * (1.0 / p - 1.0)
    too_fast = to_off > 1.0
    to_on[too_fast] /= to_off[too_fast]
    to_off[too_fast] = 1.0
    state = rng.random(len(p)) < p
    available = np.empty((rounds, len(p)), dtype=bool)
    for t in range(rounds):
        draw = rng.random(len(p))
        state = np.where(state, draw >= to_off, draw < to_on)
        available[t] = state
    return available


def cyclic_schedule(p: np.ndarray, rounds: int, rng: np.random.Generator, cycle: int = CYCLE) -> np.ndarray:
    active = np.clip(np.round(cycle * p), 1, cycle)
    phase = rng.integers(0, cycle, len(p))
    t = np.arange(rounds)[:, None]
    return (t + phase[None, :]) % cycle < active[None, :]


def check_trace(spec: str, num_clients: int, rounds: int) -> None:
    """Read a ``trace:FILE`` spec's file, so that a bad trace is refused before a run starts (models pass)."""
    if spec.startswith(TRACE_PREFIX):
        read_trace(trace_path(spec), num_clients, rounds)


def read_trace(path: Path, num_clients: int, rounds: int) -> np.ndarray:
    """A trace file's availability matrix; ParticipationError naming the line if it does not fit the run."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ParticipationError(f"cannot read participation trace {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ParticipationError(f"participation trace {path} is not a text file ({exc.reason})") from exc
    rows = [line.split("#", 1)[0] for line in lines]
    rows = [row for row, line in zip(rows, lines) if row.strip() or not line.lstrip().startswith("#")]
    if len(rows) < rounds:
        raise ParticipationError(f"trace {path} has {len(rows)} rounds, the run needs {rounds}")
    available = np.zeros((rounds, num_clients), dtype=bool)
    for t, row in enumerate(rows[:rounds]):
        for item in row.replace(",", " ").split():
            if not (item.isascii() and item.isdigit()) or int(item) >= num_clients:
                shown = item if len(item) <= 20 else item[:20] + "..."
                raise ParticipationError(
                    f"trace {path}, round {t + 1}: {shown!r} is not a client index in [0, {num_clients})"
                )
            available[t, int(item)] = True
    return available


def write_trace(path: Path, available: np.ndarray) -> None:
    lines = ["# fedslim participation trace: one line per round, the available client indices"]
    lines += [" ".join(str(i) for i in np.flatnonzero(row)) for row in available]
    Path(path).write_text("\n".join(lines) + "\n")


def label_count_matrix(rows: list[np.ndarray]) -> np.ndarray:
    """Clients' label counts (one row each, of any length) as one matrix, clients x classes: as many classes as
    the largest label any client holds, plus one. ParticipationError naming the client whose row is not a
    vector of non-negative integers."""
    for client, row in enumerate(rows):
        if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer) or (len(row) and row.min() < 0):
            raise ParticipationError(
                f"label_counts of client {client} must be non-negative integer counts per class, got {row.dtype} "
                f"of shape {row.shape}"
            )
    width = max((int(np.flatnonzero(row)[-1]) + 1 for row in rows if row.any()), default=0)
    matrix = np.zeros((len(rows), width), dtype=np.int64)
    for client, row in enumerate(rows):
        present = row[:width]
        matrix[client, : len(present)] = present
    return matrix


def participation_schedule(spec: str, label_counts: np.ndarray, rounds: int, mean: float, seed: int) -> Schedule:
    """The schedule ``spec`` names for clients with ``label_counts`` (shape: clients x classes)."""
    if not 0.0 < mean <= 1.0:
        raise ParticipationError(f"participation_mean must be in (0, 1], got {mean}")
    check_participation_spec(spec, mean)
    num_clients = len(label_counts)
    if spec.startswith(TRACE_PREFIX):
        available = read_trace(trace_path(spec), num_clients, rounds)
        return Schedule(available, np.maximum(available.mean(axis=0), 1.0 / rounds))
    if spec == "all":
        return Schedule(np.ones((rounds, num_clients), dtype=bool), np.ones(num_clients))
    rng = np.random.default_rng([seed, 7])
    if spec == "bernoulli":
        p = spread_probabilities(num_clients, mean, rng)
        return Schedule(bernoulli_schedule(p, rounds, rng), p)
    p = label_probabilities(label_counts, mean, rng)
    dynamics = {"label": bernoulli_schedule, "markov": markov_schedule, "cyclic": cyclic_schedule}[spec]
    return Schedule(dynamics(p, rounds, rng), p)
