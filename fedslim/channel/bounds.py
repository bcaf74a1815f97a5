"""What a number in a client's reply may be: the bounds the server checks before it stores, logs or uses one.

Every reply is a claim, and every number in it becomes a Python ``int`` or
``float`` that the server weights with, formats into a reason, or writes to
SQLite (whose INTEGER is signed 64-bit and whose REAL holds no NaN). In the
inline simulation a reply is never serialised, so an ``int`` can even exceed
Flower's 64-bit wire. A value outside its bound rejects the reply with a
one-line reason naming the key and the value; nothing downstream sees it.

The bounds are wide on purpose: they keep what can be true (a count that
SQLite stores, a loss, seconds and bytes a machine can report) and refuse
only what cannot be.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fedslim.channel.protocol import (
    ANCHOR_METRIC,
    CPU_KEY,
    EVAL_CORRECT_KEY,
    EVAL_EXAMPLES_KEY,
    EVAL_LOSS_KEY,
    NUM_EXAMPLES_KEY,
    PEAK_RSS_KEY,
    TRAIN_LOSS_KEY,
)

MAX_COUNT = 2**63 - 1  # examples: the largest integer SQLite (and Flower's sint64 metric) stores
MAX_LOSS = 1e30  # a training loss beyond this is no loss of a run that produced a finite update
MAX_CPU_S = 1e7  # CPU seconds of one round on one node: 115 days of one core
MAX_RSS_BYTES = 2**50  # peak resident memory of one process: 1 PiB
MAX_TEXT = 300  # characters of a client's text (an error reason, a digest) that go into a log line
TRAIN_CLAIMS = (NUM_EXAMPLES_KEY, TRAIN_LOSS_KEY, ANCHOR_METRIC, CPU_KEY, PEAK_RSS_KEY)
EVALUATION_CLAIMS = (EVAL_EXAMPLES_KEY, EVAL_CORRECT_KEY, EVAL_LOSS_KEY, CPU_KEY, PEAK_RSS_KEY)


@dataclass(frozen=True)
class Bound:
    """The values one numeric claim may take: an integer or any number, in ``[low, high]``.

    ``unknown_ok``: a NaN or infinite float passes (and is read as unknown):
    the honest loss of a diverged model.
    """

    integer: bool
    low: float
    high: float
    unknown_ok: bool = False

    def problem(self, value: object) -> str | None:
        """Why ``value`` is outside this bound (None: it is inside)."""
        # type(), not isinstance: a bool is an int to Python, but no count or measure.
        if self.integer and type(value) is not int:
            return f"must be an integer, got {shown(value)}"
        if type(value) not in (int, float):
            return f"must be a number, got {shown(value)}"
        number = _as_float(value)  # type: ignore[arg-type]
        if number is None:
            return f"must be in [{self.low:g}, {self.high:g}], got {shown(value)}"
        if math.isfinite(number) and self.low <= number <= self.high:
            return None
        if not math.isfinite(number) and self.unknown_ok:
            return None
        return f"must be in [{self.low:g}, {self.high:g}], got {shown(value)}"


BOUNDS: dict[str, Bound] = {
    NUM_EXAMPLES_KEY: Bound(integer=True, low=1, high=MAX_COUNT),
    TRAIN_LOSS_KEY: Bound(integer=False, low=-MAX_LOSS, high=MAX_LOSS),
    ANCHOR_METRIC: Bound(integer=False, low=0, high=1),
    CPU_KEY: Bound(integer=False, low=0, high=MAX_CPU_S),
    PEAK_RSS_KEY: Bound(integer=False, low=0, high=MAX_RSS_BYTES),
    EVAL_EXAMPLES_KEY: Bound(integer=True, low=1, high=MAX_COUNT),
    EVAL_CORRECT_KEY: Bound(integer=True, low=0, high=MAX_COUNT),
    EVAL_LOSS_KEY: Bound(integer=False, low=0, high=math.inf, unknown_ok=True),
}


def claims_problem(claims: Mapping[str, object], keys: Iterable[str], required: Iterable[str] = ()) -> str | None:
    """Why ``claims`` cannot be true: the first of ``keys`` out of its bound, or one of ``required`` missing."""
    for key in required:
        if key not in claims:
            return f"{key} is missing"
    for key in keys:
        if key in claims:
            problem = BOUNDS[key].problem(claims[key])
            if problem is not None:
                return f"{key} {problem}"
    return None


def bounded(claims: Mapping[str, object], key: str) -> float | None:
    """The claim ``key`` as a float when it is inside its bound and finite (None: absent, outside, or unknown)."""
    value = claims.get(key)
    if value is None or BOUNDS[key].problem(value) is not None:
        return None
    number = _as_float(value)  # type: ignore[arg-type]
    return number if number is not None and math.isfinite(number) else None


def finite_numbers(claims: Mapping[str, object]) -> dict[str, float]:
    """Every claim that is a number (not a bool) with a finite float value, as a float."""
    numbers = {}
    for key, value in claims.items():
        number = _as_float(value) if type(value) in (int, float) else None  # type: ignore[arg-type]
        if number is not None and math.isfinite(number):
            numbers[key] = number
    return numbers


def version_lag(round_version: int, update_version: int) -> int | None:
    """How many fast-state versions an update trails the round (None: it names a version the round has not
    reached, so no lag can be stored)."""
    return round_version - update_version if 0 <= update_version <= round_version else None


def plausible_time(value: object) -> bool:
    """Whether ``value`` (a message's ``created_at``, the sender's clock) is a Unix time SQLite stores as one:
    a finite float in [0, 2**32) seconds (before 2106)."""
    return type(value) in (int, float) and 0 <= value < 2**32  # type: ignore[operator]


def shown(value: object, limit: int = 60) -> str:
    """``value`` as it goes into a reason: its repr, cut to ``limit`` characters."""
    if isinstance(value, bytes | str | list) and len(value) > limit:
        value = value[:limit]  # the repr of the rest would be cut anyway
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4,300 digits has no repr
        return f"an integer of {value.bit_length():,} bits" if type(value) is int else f"a {type(value).__name__}"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def client_text(text: str, limit: int = MAX_TEXT) -> str:
    """A client's text (an error reason, a digest) as it goes into a log line: cut to ``limit`` characters,
    with anything that is not printable escaped."""
    cut = text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
    return cut if cut.isprintable() else cut.encode("unicode_escape", "backslashreplace").decode("ascii")


def _as_float(value: int | float) -> float | None:
    """``value`` as a float (None: an integer too large for one)."""
    try:
        return float(value)
    except OverflowError:
        return None
