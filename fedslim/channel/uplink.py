"""The uplink, both ends: the client's error-feedback encoder, and the server's decode, check and screen.

Client end (:class:`UplinkEncoder`): a local delta plus the error-feedback
residual goes through the uplink codec into one fedslim.v1 blob; what the
codec dropped stays in the node's Flower context for next time.

Server end (:class:`UplinkReceiver`): every reply is matched to the
instruction the server sent that node, decoded once, checked against the
fast layer and the round (:func:`check_update`), screened for size
(:class:`SizeScreen`), and handed on as a typed
:class:`~fedslim.channel.updates.ClientUpdate`, or rejected with its reason.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from fedslim.channel.bounds import TRAIN_CLAIMS, bounded, claims_problem, client_text, finite_numbers, version_lag
from fedslim.channel.matching import SECOND_REPLY, Exchange
from fedslim.channel.protocol import (
    BASE_META_KEY,
    CPU_KEY,
    DELTA_KEY,
    EVALUATION_RECORD,
    NUM_EXAMPLES_KEY,
    PEAK_RSS_KEY,
    RESIDUAL_META_KEY,
    RESIDUAL_STATE_KEY,
    VERSION_KEY,
    Refusal,
    RefusalCode,
    Role,
    error_text,
    update_blob,
    update_claims,
)
from fedslim.channel.updates import ClientUpdate, Instruction
from fedslim.codecs.feedback import Residual, compensate, new_residual
from fedslim.codecs.pipeline import DELTA, DecodeBudget, DecodedUpdate, Pipeline, decode_update, encode_update

# ----------------------------------------------------------------------------------------------- client end


class UplinkEncoder:
    """The client end: compress with the uplink codec, with error feedback for biased codecs.

    The residual lives in the node's Flower context state (kept by the
    SuperNode across rounds and ClientApp restarts), like the state object of
    a communication hook.

    Parameters
    ----------
    context : Context
        The node's Flower context.
    pipeline : Pipeline
        The uplink codec.
    error_feedback : bool
        Keep what a biased codec drops and send it with the next delta.
    decay : float
        Share of the residual kept per fast-state version the node missed.
    """

    def __init__(self, context: Context, pipeline: Pipeline, error_feedback: bool, decay: float) -> None:
        self.context = context
        self.pipeline = pipeline
        self.use_feedback = error_feedback and pipeline.biased
        self.decay = decay

    def encode_delta(
        self, delta: Mapping[str, np.ndarray], base_fingerprint: str, version: int, seed: int, drop_residual: bool
    ) -> bytes:
        """C(delta + decay^missed * residual); the new residual is stored.

        ``drop_residual``: the server rejected this node's last update, so the
        residual left from it (part of a diverged run, say) is discarded, not sent.
        A residual left on another base (before a consolidation) is discarded
        too: its coordinates are those of a fast layer that no longer exists.
        """
        residual = self._residual(base_fingerprint) if self.use_feedback and not drop_residual else None
        sent = compensate(delta, residual, version, self.decay)
        encoded = self._encode(sent, base_fingerprint, version, seed, "local update")
        if self.use_feedback:
            self._store(new_residual(sent, encoded.decoded, version), base_fingerprint)
        return encoded.blob

    def encode_plain(self, tensors: Mapping[str, np.ndarray], base_fingerprint: str, version: int, seed: int) -> bytes:
        """The codec alone, without error feedback (a FedAMD anchor gradient is not a delta)."""
        return self._encode(tensors, base_fingerprint, version, seed, "local gradient").blob

    def _encode(self, tensors: Mapping[str, np.ndarray], fingerprint: str, version: int, seed: int, what: str):  # type: ignore[no-untyped-def]
        try:
            return encode_update(
                tensors, self.pipeline, kind=DELTA, base_fingerprint=fingerprint, state_version=version, seed=seed
            )
        except ValueError as exc:
            raise Refusal(RefusalCode.NON_FINITE_UPDATE, f"cannot encode the {what}: {exc}") from exc

    def _residual(self, base_fingerprint: str) -> Residual | None:
        state = self.context.state
        if RESIDUAL_STATE_KEY not in state.array_records:
            return None
        if state.config_records[RESIDUAL_META_KEY].get(BASE_META_KEY, base_fingerprint) != base_fingerprint:
            return None
        tensors = {name: array.numpy() for name, array in state.array_records[RESIDUAL_STATE_KEY].items()}
        return Residual(tensors, int(state.config_records[RESIDUAL_META_KEY][VERSION_KEY]))  # type: ignore[arg-type]

    def _store(self, residual: Residual, base_fingerprint: str) -> None:
        self.context.state[RESIDUAL_STATE_KEY] = ArrayRecord({n: Array(v) for n, v in residual.tensors.items()})
        self.context.state[RESIDUAL_META_KEY] = ConfigRecord(
            {VERSION_KEY: residual.version, BASE_META_KEY: base_fingerprint}
        )


# ----------------------------------------------------------------------------------------------- server end


@dataclass(frozen=True)
class UpdateCheck:
    """The server's expectations of a train reply in one round."""

    shapes: dict[str, tuple[int, ...]]
    base_fingerprint: str
    state_version: int
    budget: DecodeBudget | None = None


def check_update(reply: Message, expected: UpdateCheck) -> tuple[DecodedUpdate | None, str | None]:
    """The decoded update of ``reply`` (None if it cannot be decoded) and the reason it cannot be aggregated.

    The reason is None exactly when the update can be aggregated. Nothing a
    client sends makes it raise: a missing record is a KeyError, a record or
    blob that is not what it should be a ValueError (decode_update raises
    nothing but UpdateError, one of those), and both are reasons.
    """
    if reply.has_error():
        return None, error_text(reply)
    try:
        blob = update_blob(reply.content)
        claims = update_claims(reply.content)
        update = decode_update(blob, expected.shapes, expected.budget)
    except (KeyError, ValueError) as exc:
        return None, f"malformed update: {exc}"
    # Every claim inside its bound (fedslim/channel/bounds.py) before anything stores, logs or weights with it.
    problem = claims_problem(claims, TRAIN_CLAIMS, required=(NUM_EXAMPLES_KEY,))
    if problem is not None:
        return update, f"malformed update: {problem}"
    if update.kind != DELTA:
        return update, "malformed update: a client sent a full state, not a delta"
    if update.base_fingerprint != expected.base_fingerprint:
        return update, f"wrong base fingerprint {client_text(update.base_fingerprint[:16])}... in the update"
    if update.state_version != expected.state_version:
        return update, (
            f"stale update: computed against fast-state version {update.state_version}, "
            f"the round trains version {expected.state_version}"
        )
    return update, None


class SizeScreen:
    """Rejects updates whose size marks a diverged local run, before a strategy (or its memory) sees them.

    A client whose local SGD diverged can still send a finite update,
    thousands of times the usual size. Averaged in, it wrecks the global model
    in one round; a strategy that stores updates (FedVARP, MIFA, FedStale)
    would also replay it every round it keeps the entry. An update's size is
    its L2 norm over the square root of its local steps (:func:`update_size`).

    The reference is the lower median of the positive sizes among the last
    ``window`` screened updates, rejected ones included, and this round's
    candidates: the middle size, or the smaller of the two middle ones. It
    comes from the updates themselves, so it means the same for every fast
    layer (the norm of a LoRA state, whose B starts at zero, says nothing of
    the size of an honest step), and it exists from the first round. It
    cannot exceed an honest size while honest sizes are at least half of
    those it is taken over: of two first-round candidates it is the smaller,
    so one client sending 100x its update beside one honest client is
    rejected. A diverged client barely moves it, and a lasting change in
    every client's step size moves it within a window instead of locking
    everyone out. What it cannot judge: a lone first update (nothing to
    compare with, so it passes), and a round whose smaller half is too
    small (then honest updates of that round may be rejected; their sizes
    are remembered, so the reference recovers once they are the majority).
    Zero sizes (an update that did not move) are no reference.

    Parameters
    ----------
    factor : float
        An update larger than ``factor`` times the reference is rejected;
        0 turns the screen off.
    window : int (default: 200)
        Number of recent sizes the reference remembers.
    """

    def __init__(self, factor: float, window: int = 200) -> None:
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=window)

    def reference(self, sizes: Sequence[float | None]) -> float:
        """The lower median of the positive sizes remembered and among ``sizes`` (0.0 if there are none)."""
        known = sorted(size for size in (*self.recent, *sizes) if size is not None and size > 0.0)
        return known[(len(known) - 1) // 2] if known else 0.0

    def reasons(self, sizes: Sequence[float | None]) -> list[str | None]:
        """Why each candidate is rejected (None: it passes; a None size is not screened)."""
        reference = self.reference(sizes) if self.factor else 0.0
        return [
            None
            if size is None or not reference or size <= self.factor * reference
            else (
                f"update too large: {size:.4g} per root local step, {size / reference:,.0f}x the median of recent "
                f"updates ({reference:.4g}; the screen rejects above {self.factor:g}x): local training diverged?"
            )
            for size in sizes
        ]

    def remember(self, size: float) -> None:
        """Add the size of a screened update to the reference."""
        self.recent.append(size)


def state_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """The L2 norm over every tensor of a fast state or update."""
    return float(np.sqrt(sum(np.sum(np.square(value, dtype=np.float64)) for value in tensors.values())))


def update_size(update: DecodedUpdate, num_examples: int, local_steps: Callable[[int], int]) -> float:
    """L2 norm of a decoded delta over the square root of its local steps (``local_steps`` gives the steps of
    so many examples).

    Under local epochs a client with more data takes more steps, and its
    update's norm grows with them: as s (steps that agree), s^0.5 (noise), or
    barely (a local loss near its minimum). Dividing by s^0.5 keeps two
    honest clients' sizes within the square root of their step ratio in
    every one of these cases; dividing by s leaves up to the whole ratio
    (measured: 11x between a 3-step and a 59-step client of one round).
    """
    return state_norm(update.tensors) / math.sqrt(local_steps(num_examples))


@dataclass(frozen=True)
class Received:
    """One train reply as the server received it: accepted (``update``) or rejected (``reason``).

    ``payload_bytes`` is the size of the update blob it carried (0 if none
    could be read), ``version_lag`` how many fast-state versions behind the
    round it was computed (None if it could not be decoded, or names a version the round has not reached).
    """

    reply: Message
    instruction: Instruction | None
    update: ClientUpdate | None
    reason: str | None
    payload_bytes: int
    version_lag: int | None

    @property
    def node(self) -> int:
        return self.reply.metadata.src_node_id


class UplinkReceiver:
    """The server end: match, decode, check and screen a round's train replies.

    Parameters
    ----------
    shapes : dict[str, tuple[int, ...]]
        Shape of each fast tensor.
    base_fingerprint : str
        The base every update must name.
    screen : SizeScreen
        The size screen (its history spans the run).
    local_steps : callable
        The local steps a client with so many examples takes (sizes are per step).
    declared : Mapping[str, int]
        The training examples each client declared when it joined: a reply
        claiming more is rejected (docs/wire.md says what this does and does
        not stop).
    budget : DecodeBudget, optional
        What decoding one update may cost (``decode_budget`` of the run's
        uplink codec): a blob beyond it is rejected before it is decoded.
        Default: any encoding of the shapes.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        base_fingerprint: str,
        screen: SizeScreen,
        local_steps: Callable[[int], int],
        declared: Mapping[str, int] | None = None,
        budget: DecodeBudget | None = None,
    ) -> None:
        self.shapes = shapes
        self.base_fingerprint = base_fingerprint
        self.screen = screen
        self.local_steps = local_steps
        self.declared = dict(declared or {})
        self.budget = budget

    def receive(
        self,
        replies: Sequence[Message],
        asked: Mapping[int, Instruction],
        state_version: int,
        message_ids: Mapping[int, str] | None = None,
    ) -> list[Received]:
        """Every reply, accepted or rejected; ``asked`` is the instruction sent to each node this round, and
        ``message_ids`` the id the grid gave it (a node not named there: none, "").

        A reply from a node that was not asked, one naming another message than
        its node's instruction (replayed or forged), or a second reply is
        rejected, and so is one claiming more examples than its node declared.
        An anchor's upload (a gradient, not a local run) is not screened for
        size.
        """
        expected = UpdateCheck(self.shapes, self.base_fingerprint, state_version, self.budget)
        exchange = Exchange({node: (message_ids or {}).get(node, "") for node in asked})
        checked: list[tuple[Instruction | None, DecodedUpdate | None, str | None]] = []
        for reply in replies:
            problem = exchange.problem(reply)
            if problem is not None:
                # A second reply is still its node's (the node answered); a reply to another message is not.
                instruction = asked.get(reply.metadata.src_node_id) if problem == SECOND_REPLY else None
                checked.append((instruction, None, f"unexpected reply: {problem} in this round"))
                continue
            instruction = asked[reply.metadata.src_node_id]
            update, reason = check_update(reply, expected)
            checked.append((instruction, update, reason or self._overclaim(reply, instruction)))
        screened = [
            update is not None and reason is None and instruction is not None and instruction.work != Role.ANCHOR
            for instruction, update, reason in checked
        ]
        sizes = [
            update_size(update, _examples(reply), self.local_steps) if screen and update is not None else None
            for reply, (_, update, _), screen in zip(replies, checked, screened)
        ]
        received = []
        for reply, (instruction, update, reason), size, too_large in zip(
            replies, checked, sizes, self.screen.reasons(sizes)
        ):
            reason = reason or too_large
            if size is not None:
                self.screen.remember(size)
            accepted = None
            if update is not None and reason is None and instruction is not None:
                accepted = _client_update(reply, instruction, update)
            lag = version_lag(state_version, update.state_version) if update is not None else None
            received.append(Received(reply, instruction, accepted, reason, payload_bytes(reply), lag))
        return received

    def _overclaim(self, reply: Message, instruction: Instruction) -> str | None:
        """Why the examples a reply claims cannot be right for its client (None: they can)."""
        claimed, declared = _examples(reply), self.declared.get(instruction.client)
        if declared is not None and claimed > declared:
            return (
                f"num-examples {claimed:,} is more than the {declared:,} training examples "
                f"{instruction.client} declared when it joined"
            )
        return None


def _examples(reply: Message) -> int:
    return int(update_claims(reply.content)[NUM_EXAMPLES_KEY])  # type: ignore[arg-type]


def payload_bytes(reply: Message) -> int:
    """The size of the update blob a train reply carries (0 if none can be read)."""
    if reply.has_error():
        return 0
    try:
        return len(update_blob(reply.content))
    except (KeyError, ValueError):
        return 0


def _client_update(reply: Message, instruction: Instruction, update: DecodedUpdate) -> ClientUpdate:
    return ClientUpdate(
        client=instruction.client,
        delta=update.tensors,
        num_examples=_examples(reply),
        metrics=finite_numbers(update_claims(reply.content)),
        blob=update_blob(reply.content),
        role=instruction.work,
    )


def footprint(reply: Message) -> tuple[float | None, int | None]:
    """The CPU seconds and peak memory a client reported with its train or evaluate reply (None where it did not, or
    where what it reported is outside its bound: a reply carrying such a claim is rejected, and still logged)."""
    records = reply.content.config_records if not reply.has_error() else {}
    record = next((records[key] for key in (DELTA_KEY, EVALUATION_RECORD) if key in records), None)
    if record is None:
        return None, None
    claims = dict(record.items())
    cpu, rss = bounded(claims, CPU_KEY), bounded(claims, PEAK_RSS_KEY)
    return cpu, int(rss) if rss is not None else None
