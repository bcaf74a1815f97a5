"""Who is available in each simulated round: the participation models of the FedAU and FedStale papers, and traces.

A model gives every client a stationary probability p_i and a way of being
available over time:

- ``all``: every client, every round (the strategy's own sampling decides);
- ``bernoulli``: independently each round with heterogeneous p_i, evenly
  spread over [0.2, 1.8] x the mean (shuffled);
- ``label``: Bernoulli with FedAU's label-correlated p_i:
  p_i = max(0.02, mean * C * sum_c pi_{i,c} m_c), m ~ Dirichlet(0.1) over the
  C classes, pi_i client i's label distribution;
- ``markov``: on/off chain with P(off->on) = 0.05 and
  P(on->off) = 0.05 (1/p_i - 1) (both rescaled if that exceeds 1), started
  from its stationary law, label-correlated p_i;
- ``cyclic``: available for round(100 p_i) consecutive rounds of every
  100-round cycle, random phase, label-correlated p_i;
- ``trace:FILE``: replay a file with one line per round listing the available
  client indices (comma or space separated, ``#`` comments). Every simulated
  run writes its own trace to the run directory, so any run can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

PARTICIPATION_KINDS = ("all", "bernoulli", "label", "markov", "cyclic")
TRACE_PREFIX = "trace:"
TRACE_FILENAME = "participation.trace"
P_MIN = 0.02
LABEL_DIRICHLET = 0.1
MARKOV_RATE = 0.05
CYCLE = 100


class ParticipationError(ValueError):
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


def check_participation_spec(spec: str) -> None:
    if spec.startswith(TRACE_PREFIX):
        if not spec[len(TRACE_PREFIX) :]:
            raise ParticipationError("trace: needs a file, e.g. trace:runs/x/participation.trace")
        return
    if spec not in PARTICIPATION_KINDS:
        raise ParticipationError(
            f"unknown participation model {spec!r}; choose one of {', '.join(PARTICIPATION_KINDS)} or trace:FILE"
        )


def spread_probabilities(num_clients: int, mean: float, rng: np.random.Generator) -> np.ndarray:
    """Heterogeneous p_i evenly spread over [0.2, 1.8] x mean, in random order."""
    spread = mean * np.linspace(0.2, 1.8, num_clients) if num_clients > 1 else np.array([mean])
    return np.clip(rng.permutation(spread), P_MIN, 1.0)


def label_probabilities(label_counts: np.ndarray, mean: float, rng: np.random.Generator) -> np.ndarray:
    """FedAU's label-correlated p_i from each client's label counts (shape: clients x classes)."""
    num_classes = label_counts.shape[1]
    distributions = label_counts / np.maximum(label_counts.sum(axis=1, keepdims=True), 1)
    multiplier = rng.dirichlet(LABEL_DIRICHLET * np.ones(num_classes))
    return np.clip(mean * num_classes * distributions @ multiplier, P_MIN, 1.0)


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
    active = np.clip(np.round(cycle * p), 1, cycle - 1)
    phase = rng.integers(0, cycle, len(p))
    t = np.arange(rounds)[:, None]
    return (t + phase[None, :]) % cycle < active[None, :]


def read_trace(path: Path, num_clients: int, rounds: int) -> np.ndarray:
    """A trace file's availability matrix; ParticipationError naming the line if it does not fit the run."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ParticipationError(f"cannot read participation trace {path}: {exc}") from exc
    rows = [line.split("#", 1)[0] for line in lines]
    rows = [row for row, line in zip(rows, lines) if row.strip() or not line.lstrip().startswith("#")]
    if len(rows) < rounds:
        raise ParticipationError(f"trace {path} has {len(rows)} rounds, the run needs {rounds}")
    available = np.zeros((rounds, num_clients), dtype=bool)
    for t, row in enumerate(rows[:rounds]):
        for item in row.replace(",", " ").split():
            if not item.isdigit() or int(item) >= num_clients:
                raise ParticipationError(
                    f"trace {path}, round {t + 1}: {item!r} is not a client index in [0, {num_clients})"
                )
            available[t, int(item)] = True
    return available


def write_trace(path: Path, available: np.ndarray) -> None:
    lines = ["# fedslim participation trace: one line per round, the available client indices"]
    lines += [" ".join(str(i) for i in np.flatnonzero(row)) for row in available]
    Path(path).write_text("\n".join(lines) + "\n")


def participation_schedule(spec: str, label_counts: np.ndarray, rounds: int, mean: float, seed: int) -> Schedule:
    """The schedule ``spec`` names for clients with ``label_counts`` (shape: clients x classes)."""
    check_participation_spec(spec)
    num_clients = len(label_counts)
    if not 0.0 < mean <= 1.0:
        raise ParticipationError(f"mean participation probability must be in (0, 1], got {mean}")
    if spec.startswith(TRACE_PREFIX):
        available = read_trace(Path(spec[len(TRACE_PREFIX) :]), num_clients, rounds)
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
