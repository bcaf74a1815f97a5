"""Client-side evaluation: the global model on sampled clients' held-out examples, and the server's check of
what each client claims about it.

A client's evaluation is a claim the server cannot recompute (it never sees
the client's data); it accepts one only if it is well formed and consistent
with what the client declared when it joined (its training examples, which
with ``client-holdout`` bound how many it can hold out).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Message

from fedslim.channel.bounds import EVALUATION_CLAIMS, claims_problem, shown
from fedslim.channel.matching import Exchange
from fedslim.channel.protocol import (
    EVAL_CORRECT_KEY,
    EVAL_EXAMPLES_KEY,
    EVAL_LOSS_KEY,
    EVALUATION_RECORD,
    error_text,
    evaluation_claims,
)
from fedslim.commlog import ClientEvaluation

_SAMPLING_STREAM = 0x6576616C  # keeps the evaluators' draw apart from every other seeded draw of the round


def evaluators(available: Sequence[str], fraction: float, seed: int, server_round: int) -> list[str]:
    """The clients asked to evaluate this round: ``fraction`` of ``available`` (at least one), in their order."""
    if not available or fraction <= 0:
        return []
    count = min(len(available), max(1, math.ceil(round(fraction * len(available), 9))))  # 0.07 * 100 is 7.000...1
    chosen = np.random.default_rng([seed, server_round, _SAMPLING_STREAM]).choice(len(available), count, replace=False)
    return [available[i] for i in sorted(chosen)]


def most_held_out(declared_training: int, holdout: float) -> int:
    """The most examples a client that trains on ``declared_training`` can hold out with ``holdout``.

    A client of n examples holds out h = round(holdout * n) <= holdout * n + 1/2
    and trains on t = n - h, so h <= (holdout * t + 1/2) / (1 - holdout).
    """
    return math.floor((holdout * declared_training + 0.5) / (1 - holdout) + 1e-9)


def check_evaluations(
    replies: Sequence[Message],
    asked: Mapping[int, str],
    declared: Mapping[str, int],
    holdout: float,
    message_ids: Mapping[int, str] | None = None,
) -> list[tuple[str | None, ClientEvaluation | None, str | None]]:
    """For each reply: the client it answers for (None if not asked), its accepted evaluation, or why none.

    ``asked`` is the client asked on each node, ``message_ids`` the id the
    grid gave each node's message (a node not named there: none, ""). A reply
    from a node that was not asked, one naming another message (replayed or
    forged), a second reply, an error, a malformed record, or claims that
    cannot be true (more correct than examples, a negative loss, more
    held-out examples than the client's declared training examples allow, a
    claim outside its bound: see :mod:`fedslim.channel.bounds`) give no
    evaluation. A loss that is not finite is kept as unknown: a diverged
    model's accuracy still counts.
    """
    exchange = Exchange({node: (message_ids or {}).get(node, "") for node in asked})
    checked: list[tuple[str | None, ClientEvaluation | None, str | None]] = []
    for reply in replies:
        problem = exchange.problem(reply)
        if problem is not None:
            checked.append((None, None, f"unexpected reply: {problem} in this round's evaluation"))
            continue
        client = asked[reply.metadata.src_node_id]
        if reply.has_error() or EVALUATION_RECORD not in reply.content.config_records:
            checked.append((client, None, f"no evaluation: {error_text(reply)}"))
            continue
        evaluation, reason = _claimed(client, evaluation_claims(reply), declared.get(client), holdout)
        checked.append((client, evaluation, reason))
    return checked


def _claimed(
    client: str, claims: Mapping[str, object], declared: int | None, holdout: float
) -> tuple[ClientEvaluation | None, str | None]:
    examples, correct, loss = (claims.get(key) for key in (EVAL_EXAMPLES_KEY, EVAL_CORRECT_KEY, EVAL_LOSS_KEY))
    # type(), not isinstance: a bool is an int to Python, but not a count.
    if type(examples) is not int or type(correct) is not int or type(loss) not in (int, float):
        return None, "malformed evaluation: examples and correct must be integers, loss a number"
    if examples < 1 or not 0 <= correct <= examples:
        return None, f"impossible evaluation: {shown(correct)} correct of {shown(examples)} examples"
    if loss < 0:  # a NaN or infinite loss passes: the honest loss of a diverged model, kept as unknown
        return None, f"impossible evaluation: loss {shown(loss)}"
    problem = claims_problem(claims, EVALUATION_CLAIMS)
    if problem is not None:
        return None, f"malformed evaluation: {problem}"
    if declared is not None and examples > most_held_out(declared, holdout):
        return None, (
            f"evaluation on {examples:,} held-out examples: with client-holdout {holdout:g} and the {declared:,} "
            f"training examples {client} declared, it holds at most {most_held_out(declared, holdout):,}"
        )
    return ClientEvaluation(client, examples, correct, float(loss) if math.isfinite(loss) else None), None
