"""Simulated attackers (simulation only): a seeded share of the clients whose train replies are altered on the way.

An attack spec (``--attack``) is comma-separated ``KIND[:ARG]@SHARE``:

- ``scale:F@S``: the attacker's delta is multiplied by F;
- ``sign-flip[:M]@S``: the delta is negated and multiplied by M (default 1): Delta <- -M * Delta;
- ``lie-examples[:N]@S``: the reply claims N local examples (default 10**12); the delta is the honest one.

S, in (0, 1), is the share of the run's clients that attack that way:
round(S * num_clients) of them (halves up, at least one). They are drawn once
from the run seed: one permutation of the clients, cut into consecutive
pieces, one per entry in the spec's order; so each entry's attackers are
fixed for the whole run and no client runs two attacks. At least one client
stays honest. Attackers are named by client key (``partition-<id>``).

:class:`AttackingGrid` wraps the run's grid, the inline one or Flower's
engine's: every message passes through unchanged except the train replies of
attacker nodes. Flower's node ids are random, so the node of each client is
learned from the round-0 identity replies as they pass. A delta is decoded,
altered, and encoded again with the run's uplink pipeline, keeping the
update's kind, base fingerprint and state version: the server receives a
well-formed reply. Under a lossy codec the altered delta goes through the
codec a second time; under random-k the second encoding keeps other entries
than the first did, so the attack arrives weaker than stated. An altered
entry beyond what the codec's values can hold (float32's range; fp16's,
bf16's) is sent as the largest they hold, as a client could.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedslim.channel.protocol import (
    DELTA_KEY,
    NUM_EXAMPLES_KEY,
    TRAIN_TYPE,
    UPDATE_KEY,
    client_key,
    partition_key,
    update_blob,
)
from fedslim.codecs.pipeline import Pipeline, decode_update, encode_update
from fedslim.codecs.values import BFloat16, Float16
from fedslim.config import ConfigError, RunConfig
from fedslim.server.nodes import ForwardingGrid
from fedslim.task import prepared_base

ATTACK_KINDS = ("scale", "sign-flip", "lie-examples")
DEFAULT_CLAIMED_EXAMPLES = 10**12
ATTACKER_SEED_SALT = 0xA77AC  # keeps the attackers' draw apart from the run's other seeded draws
FLOAT32_MAX = float(np.finfo(np.float32).max)  # a factor beyond it makes every nonzero entry of a float32 delta inf
SPEC_HELP = "entries are scale:F@S, sign-flip[:M]@S, lie-examples[:N]@S with S in (0, 1), separated by commas"


@dataclass(frozen=True)
class Attack:
    """One entry of an attack spec.

    Parameters
    ----------
    kind : str
        ``scale``, ``sign-flip`` or ``lie-examples``.
    value : float
        The scale factor F, the sign-flip multiplier M, or the claimed number of examples N.
    share : float
        Share of the clients that run this attack.
    """

    kind: str
    value: float
    share: float

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.value:g}@{self.share:g}"

    @property
    def factor(self) -> float | None:
        """What the attacker's delta is multiplied by (None: the delta is left as it is)."""
        if self.kind == "scale":
            return self.value
        if self.kind == "sign-flip":
            return -self.value
        return None


def parse_attacks(spec: str) -> tuple[Attack, ...]:
    """The entries of an attack spec (none for an empty one); ConfigError naming the problem."""
    attacks = []
    for entry in (part.strip() for part in spec.split(",")) if spec.strip() else ():
        try:
            head, at, share_text = entry.rpartition("@")
            if not at:
                raise ValueError(f"{entry!r} needs @SHARE")
            share = float(share_text)
            if not 0.0 < share < 1.0:
                raise ValueError(f"{entry!r}: share must be in (0, 1)")
            kind, sep, arg = head.partition(":")
            if kind == "scale":
                if not arg:
                    raise ValueError(f"{entry!r}: scale needs its factor, e.g. scale:100@0.1")
                value = float(arg)
                if not abs(value) <= FLOAT32_MAX:
                    raise ValueError(f"{entry!r}: the factor must be a float32, |F| <= {FLOAT32_MAX:.7g}")
            elif kind == "sign-flip":
                value = float(arg) if sep else 1.0
                if not 0.0 < value <= FLOAT32_MAX:
                    raise ValueError(f"{entry!r}: the sign-flip multiplier must be in (0, {FLOAT32_MAX:.7g}]")
            elif kind == "lie-examples":
                value = int(arg) if sep else DEFAULT_CLAIMED_EXAMPLES
                if not 1 <= value < 2**63:  # a metric is a 64-bit integer on the wire
                    raise ValueError(f"{entry!r}: the claimed examples must be in [1, 2**63)")
            else:
                raise ValueError(f"unknown attack {kind!r} in {entry!r}")
        except ValueError as exc:
            raise ConfigError(f"bad attack spec {spec!r}: {exc}; {SPEC_HELP}") from exc
        attacks.append(Attack(kind, value, share))
    return tuple(attacks)


def assign_attackers(attacks: Iterable[Attack], num_clients: int, seed: int) -> dict[str, Attack]:
    """The attack each attacking client runs, by client key; ConfigError if no client would stay honest."""
    attacks = list(attacks)
    counts = [max(1, int(attack.share * num_clients + 0.5)) for attack in attacks]
    if sum(counts) >= num_clients:
        raise ConfigError(
            f"the attack spec makes {sum(counts)} of {num_clients} clients attackers; at least one must stay honest"
        )
    order = np.random.default_rng([seed, ATTACKER_SEED_SALT]).permutation(num_clients)
    assigned: dict[str, Attack] = {}
    start = 0
    for attack, count in zip(attacks, counts):
        assigned |= {partition_key(int(i)): attack for i in order[start : start + count]}
        start += count
    return assigned


class AttackingGrid(ForwardingGrid):
    """A grid whose attacker nodes' train replies are altered before the server sees them.

    Parameters
    ----------
    grid : Grid
        The run's grid (an :class:`~fedslim.simulation.inline.InlineGrid` or Flower's).
    attackers : Mapping[str, Attack]
        The attack of each attacking client, by client key.
    shapes : Mapping[str, tuple[int, ...]]
        Shape of each fast tensor (to decode the deltas).
    uplink : Pipeline
        The run's uplink codec (to encode the altered deltas).
    """

    def __init__(
        self, grid: Grid, attackers: Mapping[str, Attack], shapes: Mapping[str, tuple[int, ...]], uplink: Pipeline
    ) -> None:
        super().__init__(grid)
        self.attackers = dict(attackers)
        self.shapes = dict(shapes)
        self.uplink = uplink
        self.keys: dict[int, str] = {}  # client key of each node id, from the identity replies

    def intercept(self, reply: Message) -> Message:
        """The reply as the server receives it: an attacker's train reply altered, any other as it came."""
        node = reply.metadata.src_node_id
        key = client_key(reply)
        if key:
            self.keys[node] = key
            return reply
        attack = self.attackers.get(self.keys.get(node, ""))
        if attack is None or reply.metadata.message_type != TRAIN_TYPE or reply.has_error():
            return reply
        content = reply.content
        factor = attack.factor
        if factor is None:
            if DELTA_KEY in content.config_records:
                content.config_records[DELTA_KEY][NUM_EXAMPLES_KEY] = int(attack.value)
            return reply
        try:
            update = decode_update(update_blob(content), self.shapes)
        except (KeyError, ValueError):
            return reply  # malformed already: the server rejects it as it is
        largest = largest_sendable(self.uplink)
        with np.errstate(over="ignore"):  # an overflow to inf is clipped to the largest value the codec sends
            altered = {
                name: np.clip(np.float32(factor) * value, -largest, largest).astype(np.float32)
                for name, value in update.tensors.items()
            }
        encoded = encode_update(
            altered,
            self.uplink,
            kind=update.kind,
            base_fingerprint=update.base_fingerprint,
            state_version=update.state_version,
        )
        content.config_records[DELTA_KEY][UPDATE_KEY] = encoded.blob
        return reply

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [self.intercept(reply) for reply in self.grid.send_and_receive(messages, timeout=timeout)]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.intercept(reply) for reply in self.grid.pull_messages(message_ids)]


def largest_sendable(pipeline: Pipeline) -> float:
    """The largest magnitude ``pipeline``'s value coding encodes: an altered entry beyond it is sent as it.

    No client can send more; an inf would stop the attacker's encoder, not reach the server.
    """
    if isinstance(pipeline.values, Float16):
        return float(np.finfo(np.float16).max)
    if isinstance(pipeline.values, BFloat16):
        return float(np.array(0x7F7F0000, dtype=np.uint32).view(np.float32))
    return FLOAT32_MAX


def attack_wrapper(config: RunConfig) -> Callable[[Grid], Grid] | None:
    """What wraps the run's grid in its attackers (None without an attack); a bad spec is a ConfigError now."""
    attacks = parse_attacks(config.attack)
    if not attacks:
        return None
    attackers = assign_attackers(attacks, config.num_clients, config.seed)

    def wrap(grid: Grid) -> Grid:
        model = prepared_base(config).build(config.fast)
        return AttackingGrid(grid, attackers, model.fast_shapes(), config.uplink)

    return wrap
