"""Robust aggregation stages on hand-checked updates, over fedslim's and Flower's strategies; simulated attackers."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from fedslim.channel.protocol import NUM_EXAMPLES_KEY, TRAIN_TYPE, Role, update_blob, update_claims, update_content
from fedslim.channel.updates import ClientUpdate
from fedslim.client.app import app as client_app
from fedslim.codecs.pipeline import DELTA, decode_update, encode_update, parse_codec
from fedslim.config import ConfigError, RunConfig, StrategyConfigError
from fedslim.server.loop import run_federation
from fedslim.simulation.attacks import (
    DEFAULT_CLAIMED_EXAMPLES,
    FLOAT32_MAX,
    Attack,
    AttackingGrid,
    assign_attackers,
    attack_wrapper,
    largest_sendable,
    parse_attacks,
)
from fedslim.simulation.inline import InlineGrid
from fedslim.simulation.simulate import simulate
from fedslim.strategies import FastFedAvg, FastStrategy, Federation, FedVARP, FlowerStrategy
from fedslim.strategies.registry import strategy_for
from fedslim.strategies.robust import Clip, Median, RobustStrategy, Trimmed, parse_robust

SHAPES = {"w": (2,), "b": (1,)}
CLIENTS = ["a", "b", "c", "d", "e"]


def update(client: str, w: list[float], b: float = 0.0, examples: int = 10, role: Role = Role.TRAIN) -> ClientUpdate:
    delta = {"w": np.array(w, np.float32), "b": np.array([b], np.float32)}
    blob = encode_update(delta, parse_codec("fp16"), kind=DELTA, base_fingerprint="f" * 64, state_version=3).blob
    return ClientUpdate(client, delta, examples, {}, blob=blob, role=role)


def ws(updates: Iterable[ClientUpdate]) -> list[list[float]]:
    return [u.delta["w"].tolist() for u in updates]


def robust(inner: FastStrategy, spec: str) -> RobustStrategy:
    strategy = RobustStrategy(inner, spec)
    strategy.bind(Federation({100 + i: c for i, c in enumerate(CLIENTS)}, SHAPES))
    return strategy


ZERO = {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}


# ----------------------------------------------------------------- the stages


def test_clip_scales_each_update_above_f_times_the_median_norm_over_all_tensors() -> None:
    # Norms over w and b together: 5, 1, 50 (median 5); F = 2 clips to norm 10.
    updates = [update("a", [3, 0], 4), update("b", [0, 1]), update("c", [30, 0], 40)]
    clipped = RobustStrategy(FastFedAvg(), "clip").transform(updates)
    assert ws(clipped) == [[3, 0], [0, 1], [6, 0]] and clipped[2].delta["b"].tolist() == [8]
    assert clipped[:2] == updates[:2]  # unchanged: the same updates, blobs included
    # F = 1: everything above the median norm comes down to it.
    assert ws(RobustStrategy(FastFedAvg(), "clip:1").transform(updates)) == [[3, 0], [0, 1], [3, 0]]
    # One update is its own median: never clipped, whatever its size.
    alone = [update("a", [300, 400])]
    assert RobustStrategy(FastFedAvg(), "clip").transform(alone) == alone


def test_trimmed_clamps_each_coordinate_to_its_k_plus_1_th_smallest_and_largest_value() -> None:
    updates = [update("a", [1, -50]), update("b", [2, 0]), update("c", [3, 1]), update("d", [100, 2])]
    # k = floor(0.25 * 4) = 1: w[0] into [2, 3], w[1] into [0, 1].
    assert ws(RobustStrategy(FastFedAvg(), "trimmed:0.25").transform(updates)) == [[2, 0], [2, 0], [3, 1], [3, 1]]
    # k = floor(0.2 * 4) = 0: nothing is clamped.
    assert RobustStrategy(FastFedAvg(), "trimmed:0.2").transform(updates) == updates
    # 0.29 * 100 is 28.999... in floating point: still 29 cut from each end.
    many = [update(f"c{i}", [float(i), 0]) for i in range(100)]
    clamped = RobustStrategy(FastFedAvg(), "trimmed:0.29").transform(many)
    assert min(u.delta["w"][0] for u in clamped) == 29 and max(u.delta["w"][0] for u in clamped) == 70


def test_median_replaces_every_update_by_the_coordinate_wise_median() -> None:
    odd = [update("a", [1, 7], examples=1), update("b", [5, -1], examples=2), update("c", [100, 3], examples=3)]
    assert ws(RobustStrategy(FastFedAvg(), "median").transform(odd)) == [[5, 3]] * 3
    even = odd + [update("d", [2, 0], examples=4)]  # the mean of the two middle values
    transformed = RobustStrategy(FastFedAvg(), "median").transform(even)
    assert ws(transformed) == [[3.5, 1.5]] * 4 and [u.delta["b"].tolist() for u in transformed] == [[0]] * 4
    assert [u.num_examples for u in transformed] == [1, 2, 3, 4]  # claims are not touched


def test_stages_compose_in_the_order_given() -> None:
    # Norms 1, 2, 3, 5, 100: clip:1 brings d and e to norm 3, then trimmed:0.2 (k = 1) clamps each coordinate.
    updates = [
        update("a", [1, 0]),
        update("b", [0, 2]),
        update("c", [0, 3]),
        update("d", [3, 4]),
        update("e", [-60, 80]),
    ]
    strategy = RobustStrategy(FastFedAvg(), "clip:1+trimmed:0.2")
    assert strategy.stages == (Clip(1.0), Trimmed(0.2)) and strategy.spec == "clip:1+trimmed:0.2"
    # After clipping, w[0] is 1, 0, 0, 1.8, -1.8 (into [0, 1]) and w[1] is 0, 2, 3, 2.4, 2.4 (into [2, 2.4]).
    np.testing.assert_allclose(
        ws(strategy.transform(updates)), [[1, 2], [0, 2], [0, 2.4], [1, 2.4], [0, 2.4]], rtol=1e-6
    )


def test_each_role_is_transformed_among_its_own_updates() -> None:
    updates = [
        update("a", [1, 0], role=Role.MINER),
        update("b", [1000, 0], role=Role.ANCHOR),
        update("c", [3, 0], role=Role.MINER),
        update("d", [5, 0], role=Role.MINER),
    ]
    # The anchor's gradient is alone in its group (unchanged); the miners' median is 3.
    assert ws(RobustStrategy(FastFedAvg(), "median").transform(updates)) == [[3, 0], [1000, 0], [3, 0], [3, 0]]


# ----------------------------------------------------------------- over strategies


def test_fedavg_behind_median_steps_by_the_median_whatever_the_claimed_examples() -> None:
    strategy = robust(FastFedAvg(), "median")
    strategy.configure(1, ZERO, CLIENTS)
    updates = [update("a", [1, 7], examples=1), update("b", [5, -1], examples=10**12), update("c", [100, 3])]
    outcome = strategy.apply(1, updates)
    assert outcome.state is not None and outcome.state["w"].tolist() == [5, 3]


def test_fedavg_behind_trimmed_steps_by_the_example_weighted_winsorized_mean() -> None:
    strategy = robust(FastFedAvg(), "trimmed:0.25")
    strategy.configure(1, ZERO, CLIENTS)
    updates = [update("a", [1, -50], examples=10), update("b", [2, 0], examples=30), update("c", [3, 1])]
    updates.append(update("d", [100, 2], examples=50))
    # Clamped: [2, 0], [2, 0], [3, 1], [3, 1] with weights 10, 30, 10, 50 (of 100).
    outcome = strategy.apply(1, updates)
    assert outcome.state is not None
    np.testing.assert_allclose(outcome.state["w"], [0.4 * 2 + 0.6 * 3, 0.6], rtol=1e-6)
    assert outcome.step.weights == {"a": 0.1, "b": 0.3, "c": 0.1, "d": 0.5}


@pytest.mark.parametrize("memory", ["wire", "fp32"])
def test_fedvarp_stores_the_transformed_updates(memory: str) -> None:
    strategy = robust(FedVARP(memory=memory), "median")
    strategy.configure(1, ZERO, CLIENTS)
    first = [update("a", [1, 7]), update("b", [5, -1]), update("c", [100, 3])]
    outcome = strategy.apply(1, first)
    # Round 1, nothing stored: v = (1/3) sum of the (all-median) updates.
    assert outcome.state is not None and outcome.state["w"].tolist() == [5, 3]
    assert [strategy.stored.get(c)["w"].tolist() for c in "abc"] == [[5, 3]] * 3
    # A changed update's blob: the dense fp32 encoding of its new delta for a memory of blobs, else none.
    median = {"w": np.array([5, 3], np.float32), "b": np.array([0], np.float32)}
    dense = encode_update(median, parse_codec("none"), kind=DELTA, base_fingerprint="", state_version=0).blob
    assert {u.blob for u in strategy.transform(first)} == {dense if memory == "wire" else b""}
    # Round 2, b alone: v = (1/5)(3 * [5, 3]) + ([1, 1] - [5, 3]) from its stored (median) y_b.
    strategy.configure(2, ZERO, CLIENTS)
    second = strategy.apply(2, [update("b", [1, 1])])
    assert second.state is not None
    np.testing.assert_allclose(second.state["w"], [3 - 4, 1.8 - 2], rtol=1e-6)


def test_a_median_behind_flowers_adapter_matches_flowers_fedmedian() -> None:
    from flwr.serverapp.strategy import FedAvg, FedMedian

    ours = robust(FlowerStrategy(FedAvg(min_available_nodes=1, min_train_nodes=1)), "median")
    theirs = robust(FlowerStrategy(FedMedian(min_available_nodes=1, min_train_nodes=1)), "none")
    state = {"w": np.array([0.5, -0.5], np.float32), "b": np.zeros(1, np.float32)}
    assert ours.configure(1, state, CLIENTS) == theirs.configure(1, state, CLIENTS)
    updates = [update("a", [1, 10], 1, 3), update("b", [2, -4], 2, 300), update("c", [100, 0], 3)]
    found, expected = ours.apply(1, updates).state, theirs.apply(1, updates).state
    assert found is not None and expected is not None
    np.testing.assert_allclose(found["w"], expected["w"], rtol=1e-6)
    np.testing.assert_allclose(found["w"], [0.5 + 2, -0.5 + 0], rtol=1e-6)


def test_the_wrapper_hands_over_sampling_memory_and_binding() -> None:
    inner = FedVARP(memory="fp16", fraction_train=0.4, seed=3)
    strategy = robust(inner, "clip")
    assert strategy.configure(1, ZERO, CLIENTS) == inner.configure(1, ZERO, CLIENTS)
    assert len(strategy.configure(1, ZERO, CLIENTS)) == 2
    assert inner.federation is strategy.federation and strategy.stored is inner.stored
    strategy.apply(1, [update("a", [1, 0])])
    assert strategy.memory_bytes() == inner.memory_bytes() > 0


def test_strategy_for_puts_the_configs_robust_stages_in_front(small_config: RunConfig) -> None:
    plain = strategy_for(small_config)
    assert isinstance(plain, FastFedAvg)
    wrapped = strategy_for(replace(small_config, strategy="fedvarp", robust="clip:3+trimmed:0.1"))
    assert isinstance(wrapped, RobustStrategy) and isinstance(wrapped.inner, FedVARP)
    assert wrapped.stages == (Clip(3.0), Trimmed(0.1)) and parse_robust("MEDIAN") == (Median(),)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("", "it is empty (none is no stage)"),
        (" ", "it is empty (none is no stage)"),
        ("clip:0.5", "clip factor must be >= 1 and finite, got 0.5"),
        ("clip:inf", "clip factor must be >= 1 and finite"),
        ("clip:big", "could not convert string to float"),
        ("trimmed", "trimmed needs its share, e.g. trimmed:0.1"),
        ("trimmed:0.5", "trimmed share must be in (0, 0.5), got 0.5"),
        ("trimmed:0", "trimmed share must be in (0, 0.5)"),
        ("median:0.5", "median takes no argument"),
        ("clip+", "an empty stage: '+' joins two stages"),
        ("+median", "an empty stage"),
        ("median+median", "median is given twice; each stage appears at most once"),
        ("clip:3+median+clip:2", "clip is given twice"),
        ("trimmed:0.1+trimmed:0.2", "trimmed is given twice"),
        ("none+clip", "unknown stage 'none'"),
        ("krum:2", "unknown stage 'krum:2'"),
    ],
)
def test_bad_robust_specs_are_one_line_errors(spec: str, problem: str, small_config: RunConfig) -> None:
    with pytest.raises(StrategyConfigError) as caught:
        strategy_for(replace(small_config, robust=spec))
    message = str(caught.value)
    assert f"bad robust spec {spec!r}: {problem}" in message and "\n" not in message
    with pytest.raises(StrategyConfigError, match="bad robust spec"):  # before any node starts
        simulate(replace(small_config, robust=spec), backend="inline")


# ----------------------------------------------------------------- attackers


def test_attack_specs_parse_to_kinds_values_and_shares() -> None:
    assert parse_attacks("scale:100@0.1, sign-flip@0.2,sign-flip:4@0.1,lie-examples@0.1,lie-examples:500@0.3") == (
        Attack("scale", 100.0, 0.1),
        Attack("sign-flip", 1.0, 0.2),
        Attack("sign-flip", 4.0, 0.1),
        Attack("lie-examples", DEFAULT_CLAIMED_EXAMPLES, 0.1),
        Attack("lie-examples", 500, 0.3),
    )
    assert parse_attacks("") == () and parse_attacks("  ") == ()
    assert [a.factor for a in parse_attacks("scale:3@0.1,sign-flip:2@0.1,lie-examples@0.1")] == [3.0, -2.0, None]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("scale@0.1", "scale needs its factor"),
        ("scale:2", "needs @SHARE"),
        ("scale:2@1.5", "share must be in (0, 1)"),
        ("scale:2@0", "share must be in (0, 1)"),
        ("scale:nan@0.1", "the factor must be a float32, |F| <= 3.402823e+38"),
        ("scale:1e39@0.1", "the factor must be a float32, |F| <= 3.402823e+38"),
        ("scale:-1e39@0.1", "the factor must be a float32"),
        ("scale:inf@0.1", "the factor must be a float32"),
        ("sign-flip:1e39@0.1", "the sign-flip multiplier must be in (0, 3.402823e+38]"),
        ("sign-flip:nan@0.1", "the sign-flip multiplier must be in (0, 3.402823e+38]"),
        ("sign-flip:0@0.1", "the sign-flip multiplier must be in (0, 3.402823e+38]"),
        ("scale:2@nan", "share must be in (0, 1)"),
        ("lie-examples:-5@0.1", "the claimed examples must be in [1, 2**63)"),
        ("lie-examples:1e3@0.1", "invalid literal for int()"),
        ("flip@0.1", "unknown attack 'flip'"),
        ("sign-flip:-1@0.1", "the sign-flip multiplier must be in (0, 3.402823e+38]"),
        ("lie-examples:0@0.1", "the claimed examples must be in [1, 2**63)"),
        ("scale:2@0.1,", "needs @SHARE"),
    ],
)
def test_bad_attack_specs_are_one_line_errors_before_any_node_starts(
    spec: str, problem: str, small_config: RunConfig
) -> None:
    with pytest.raises(ConfigError) as caught:
        simulate(replace(small_config, attack=spec), backend="inline")
    message = str(caught.value)
    assert message.startswith(f"bad attack spec {spec!r}: ") and problem in message and "\n" not in message


def test_the_largest_float32_factors_are_accepted() -> None:
    assert [a.value for a in parse_attacks("scale:3.4e38@0.1,scale:-3.4e38@0.1,sign-flip:3.4e38@0.1")] == [
        3.4e38,
        -3.4e38,
        3.4e38,
    ]


@pytest.mark.parametrize(
    ("codec", "largest", "second"),
    [
        ("none", FLOAT32_MAX, -1.5e38),
        ("fp16", 65504.0, -65504.0),
        ("bf16", 3.3895313892515355e38, -1.5020276e38),  # 0x7F7F: bf16's largest; -1.5e38 rounded to bf16
    ],
)
def test_an_altered_entry_past_the_codecs_range_is_sent_as_its_largest_value(
    codec: str, largest: float, second: float
) -> None:
    pipeline = parse_codec(codec)
    scale = parse_attacks("scale:3e38@0.5")[0]
    attacking = AttackingGrid(InlineGrid(client_app, 1), {"partition-0": scale}, {"w": (3,)}, pipeline)
    attacking.keys[5] = "partition-0"
    delta = {"w": np.array([2.0, -0.5, 0.0], np.float32)}
    honest = encode_update(delta, pipeline, kind=DELTA, base_fingerprint="b", state_version=1)
    request = Message(RecordDict(), dst_node_id=5, message_type=TRAIN_TYPE)
    reply = attacking.intercept(Message(update_content(honest.blob, {NUM_EXAMPLES_KEY: 10}), reply_to=request))
    sent = decode_update(update_blob(reply.content), {"w": (3,)}).tensors["w"]
    assert largest_sendable(pipeline) == largest
    np.testing.assert_array_equal(sent, np.array([largest, second, 0.0], np.float32))


def test_attackers_are_a_seeded_disjoint_set_per_entry_and_one_client_stays_honest() -> None:
    attacks = parse_attacks("scale:100@0.1,sign-flip@0.2,lie-examples@0.05")
    assigned = assign_attackers(attacks, 30, seed=0)
    assert [sum(a == attack for a in assigned.values()) for attack in attacks] == [3, 6, 2]  # 1.5 rounds up to 2
    assert assign_attackers(attacks, 30, seed=0) == assigned
    assert assign_attackers(attacks, 30, seed=1) != assigned
    assert set(assigned) <= {f"partition-{i}" for i in range(30)}
    assert len(assign_attackers(parse_attacks("scale:2@0.01"), 30, seed=0)) == 1  # at least one
    with pytest.raises(ConfigError, match="4 of 4 clients attackers; at least one must stay honest"):
        assign_attackers(parse_attacks("scale:2@0.5,sign-flip@0.5"), 4, seed=0)


class Recording:
    """A grid that notes what each train reply carries as it passes: node, blob, claimed examples."""

    def __init__(self, grid: object) -> None:
        self.grid = grid
        self.seen: list[tuple[int, bytes, int]] = []

    def get_node_ids(self) -> list[int]:
        return self.grid.get_node_ids()  # type: ignore[attr-defined]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))  # type: ignore[attr-defined]
        for reply in replies:
            if reply.metadata.message_type == TRAIN_TYPE and not reply.has_error():
                content = reply.content
                blob = update_blob(content)
                examples = update_claims(content)[NUM_EXAMPLES_KEY]
                self.seen.append((reply.metadata.src_node_id, blob, int(examples)))  # type: ignore[arg-type]
        return replies


def test_each_attack_alters_exactly_its_attackers_train_replies(small_config: RunConfig) -> None:
    config = replace(small_config, rounds=2, fraction=1.0, attack="scale:3@0.25,sign-flip:2@0.25,lie-examples:77@0.25")
    wrap = attack_wrapper(config)
    assert wrap is not None
    sent = Recording(InlineGrid(client_app, config.num_clients))
    attacking = wrap(sent)  # type: ignore[arg-type]
    received = Recording(attacking)
    run_federation(received, config)  # type: ignore[arg-type]

    assert isinstance(attacking, AttackingGrid)
    attack_of = {node: attacking.attackers.get(key) for node, key in attacking.keys.items()}
    assert sorted(a.kind if a else "honest" for a in attack_of.values()) == [
        "honest",
        "lie-examples",
        "scale",
        "sign-flip",
    ]
    assert len(sent.seen) == len(received.seen) == 2 * 4
    shapes = attacking.shapes
    for (node, blob, examples), (same_node, altered, claimed) in zip(sent.seen, received.seen):
        assert same_node == node
        attack = attack_of[node]
        if attack is None or attack.kind == "lie-examples":
            assert altered == blob
            assert claimed == (77 if attack else examples)
            continue
        assert claimed == examples
        before, after = decode_update(blob, shapes), decode_update(altered, shapes)
        assert (after.kind, after.base_fingerprint, after.state_version) == (
            before.kind,
            before.base_fingerprint,
            before.state_version,
        )
        factor = 3.0 if attack.kind == "scale" else -2.0
        assert any(np.any(value) for value in before.tensors.values())
        for name, value in before.tensors.items():
            np.testing.assert_array_equal(after.tensors[name], (factor * value).astype(np.float32))


def test_a_median_keeps_a_run_on_course_under_scaled_attackers_and_a_plain_mean_does_not(
    small_config: RunConfig,
) -> None:
    # One attacker of 8 sends 100x its update. The size screen would reject that on its own: off, to see the
    # aggregation alone. The median's reference is the median's own run without attackers.
    config = replace(small_config, num_clients=8, rounds=3, fraction=1.0, screen_factor=0.0, robust="median")
    clean = simulate(replace(config, out=config.out + "-clean"), backend="inline")
    attacked = replace(config, attack="scale:100@0.125")
    defended = simulate(replace(attacked, out=config.out + "-median"), backend="inline")
    plain = simulate(replace(attacked, robust="none", out=config.out + "-plain"), backend="inline")

    start, clean_loss, defended_loss = clean.rounds[0].loss, clean.rounds[-1].loss, defended.rounds[-1].loss
    assert start is not None and clean_loss is not None and defended_loss is not None
    assert defended_loss < start and abs(defended_loss - clean_loss) < 0.05 * clean_loss
    # The plain mean takes a 100/8 times too large step: the loss explodes (NaN is logged as NULL).
    plain_losses = [r.loss for r in plain.rounds[1:]]
    assert all(loss is None or not math.isfinite(loss) or loss > 100 * start for loss in plain_losses)
