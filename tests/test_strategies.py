"""Each strategy's update rule on small hand-checked cases, and the equivalences between them."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from fedslim.channel.protocol import Role
from fedslim.codecs.pipeline import DELTA, encode_update, parse_codec
from fedslim.config import RunConfig
from fedslim.strategies import (
    MIFA,
    ClientMemory,
    ClientUpdate,
    FastFedAvg,
    FastStrategy,
    FedAMD,
    FedAU,
    FedAUWeights,
    Federation,
    FedStale,
    FedVARP,
    FlowerStrategy,
    Step,
    StrategyConfigError,
)

SHAPES = {"w": (2,)}


def federation(clients: list[str], probabilities: dict[str, float] | None = None) -> Federation:
    return Federation({100 + i: c for i, c in enumerate(clients)}, SHAPES, probabilities)


def update(client: str, values: list[float], examples: int = 10, role: Role = Role.TRAIN) -> ClientUpdate:
    return ClientUpdate(client, {"w": np.array(values, np.float32)}, examples, {"train-loss": 1.0}, role=role)


def bound(strategy: FastStrategy, clients: list[str], probabilities: dict[str, float] | None = None) -> FastStrategy:
    strategy.bind(federation(clients, probabilities))
    return strategy


def direction(step: Step) -> np.ndarray:
    return step.direction["w"]


def random_rounds(clients: list[str], rounds: int, per_round: int, seed: int = 0) -> list[list[ClientUpdate]]:
    """Uniform samples of ``per_round`` clients with random updates."""
    rng = np.random.default_rng(seed)
    return [
        [update(c, list(rng.normal(size=2))) for c in sorted(rng.choice(clients, per_round, replace=False))]
        for _ in range(rounds)
    ]


CLIENTS = ["a", "b", "c"]


# ----------------------------------------------------------------- FedAvg


def test_fedavg_over_participants_is_the_example_weighted_mean() -> None:
    strategy = bound(FastFedAvg(), CLIENTS)
    step = strategy.aggregate(1, [update("a", [1, 0], 10), update("b", [0, 3], 30)])
    # (10*[1,0] + 30*[0,3]) / 40
    np.testing.assert_allclose(direction(step), [0.25, 2.25])
    assert step.weights == {"a": 0.25, "b": 0.75}


def test_fedavg_uniform_weighting_ignores_example_counts() -> None:
    step = bound(FastFedAvg(weighting="uniform"), CLIENTS).aggregate(
        1, [update("a", [1, 0], 10), update("b", [0, 3], 30)]
    )
    np.testing.assert_allclose(direction(step), [0.5, 1.5])


def test_fedavg_with_known_p_divides_each_update_by_p_and_by_n() -> None:
    strategy = bound(FastFedAvg(p_estimate="known"), CLIENTS, {"a": 0.5, "b": 0.25, "c": 1.0})
    step = strategy.aggregate(1, [update("a", [1, 0]), update("b", [0, 1])])
    # (1/3) * ([1,0]/0.5 + [0,1]/0.25)
    np.testing.assert_allclose(direction(step), [2 / 3, 4 / 3])
    assert step.weights == pytest.approx({"a": 2 / 3, "b": 4 / 3})


def test_known_p_without_probabilities_is_a_clear_error_when_the_run_starts() -> None:
    with pytest.raises(StrategyConfigError, match="--p-known"):
        bound(FastFedAvg(p_estimate="known"), CLIENTS)


def test_apply_adds_the_step_to_the_configured_state_with_the_server_lr() -> None:
    strategy = FastFedAvg(server_lr=0.5)
    strategy.bind(Federation({7: "a", 8: "b"}, {"w": (2,), "b": (1,)}))
    state = {"w": np.array([0.0, 0.0], np.float32), "b": np.array([10.0], np.float32)}
    assert [i.client for i in strategy.configure(1, state, ["a", "b"])] == ["a", "b"]

    def sent(client: str, w: list[float], b: float, examples: int) -> ClientUpdate:
        return ClientUpdate(client, {"w": np.array(w, np.float32), "b": np.array([b], np.float32)}, examples, {})

    outcome = strategy.apply(1, [sent("a", [2, -2], 1, 10), sent("b", [8, 4], -1, 30)])
    # w: 0.5 * (10*[2,-2] + 30*[8,4]) / 40 = [3.25, 1.25]; b: 10 + 0.5 * (10 - 30) / 40 = 9.75
    assert outcome.state is not None
    np.testing.assert_allclose(outcome.state["w"], [3.25, 1.25])
    np.testing.assert_allclose(outcome.state["b"], [9.75])
    assert outcome.state["w"].dtype == np.float32 and outcome.step.weights == {"a": 0.25, "b": 0.75}
    assert strategy.apply(2, []).state is None


def test_sampling_is_seeded_and_keeps_the_order_of_the_available_clients() -> None:
    clients = [f"partition-{i}" for i in range(10)]
    strategy = FastFedAvg(fraction_train=0.3, seed=5)
    first = strategy.sample(1, clients)
    assert len(first) == 3 and set(first) <= set(clients)
    assert first == sorted(first, key=clients.index)
    assert strategy.sample(1, clients) == first
    assert FastFedAvg(fraction_train=0.3, seed=6).sample(1, clients) != first


# ----------------------------------------------------------------- FedVARP, FedStale


def test_fedvarp_by_hand() -> None:
    strategy = bound(FedVARP(memory="fp32"), CLIENTS)
    # round 1: y = 0, only a: v = (Delta_a - 0) / 1
    np.testing.assert_allclose(direction(strategy.aggregate(1, [update("a", [1, 0])])), [1, 0])
    # round 2: v = (1/3) y_a + (Delta_b - 0)
    np.testing.assert_allclose(direction(strategy.aggregate(2, [update("b", [0, 2])])), [1 / 3, 2])
    # round 3: v = (1/3)(y_a + y_b) + (1/2)((Delta_a - y_a) + (Delta_c - 0))
    step = strategy.aggregate(3, [update("a", [3, 3]), update("c", [1, 1])])
    np.testing.assert_allclose(direction(step), [1 / 3 + 1.5, 2 / 3 + 2])
    assert step.weights == {"a": 0.5, "c": 0.5}
    assert step.memory_weights == pytest.approx({"a": 1 / 3 - 1 / 2, "b": 1 / 3})


def test_fedstale_beta_0_is_fedavg_reweighted_by_1_over_p() -> None:
    clients = [f"c{i}" for i in range(6)]
    p = {c: 0.2 + 0.1 * i for i, c in enumerate(clients)}
    stale = bound(FedStale(beta=0.0, p_estimate="known", memory="fp32"), clients, p)
    fedavg = bound(FastFedAvg(p_estimate="known"), clients, p)
    for t, updates in enumerate(random_rounds(clients, 8, 3), 1):
        np.testing.assert_array_equal(direction(stale.aggregate(t, updates)), direction(fedavg.aggregate(t, updates)))


def test_fedstale_beta_1_is_fedvarp() -> None:
    clients = [f"c{i}" for i in range(6)]
    stale = bound(FedStale(beta=1.0, p_estimate="sample-fraction", memory="fp32"), clients)
    varp = bound(FedVARP(memory="fp32"), clients)
    for t, updates in enumerate(random_rounds(clients, 8, 3), 1):
        # Same sums in a different order: equal to float64 rounding.
        np.testing.assert_allclose(
            direction(stale.aggregate(t, updates)), direction(varp.aggregate(t, updates)), rtol=0, atol=1e-12
        )


def test_fedstale_beta_half_mixes_the_two() -> None:
    clients = [f"c{i}" for i in range(5)]
    rounds = random_rounds(clients, 6, 2)
    half = bound(FedStale(beta=0.5, p_estimate="sample-fraction", memory="fp32"), clients)
    zero = bound(FedStale(beta=0.0, p_estimate="sample-fraction", memory="fp32"), clients)
    one = bound(FedStale(beta=1.0, p_estimate="sample-fraction", memory="fp32"), clients)
    for t, updates in enumerate(rounds, 1):
        mixed = 0.5 * direction(zero.aggregate(t, updates)) + 0.5 * direction(one.aggregate(t, updates))
        np.testing.assert_allclose(direction(half.aggregate(t, updates)), mixed, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedVARP(memory="fp32"),
        lambda: MIFA(memory="fp32"),
        lambda: FedStale(beta=0.7, p_estimate="fedau", memory="fp32"),
        lambda: FedAU(cutoff=3),
        lambda: FastFedAvg(),
    ],
    ids=["fedvarp", "mifa", "fedstale", "fedau", "fedavg"],
)
def test_each_step_is_recomputable_from_its_weights(make) -> None:  # type: ignore[no-untyped-def]
    """direction = sum_i weight_i * Delta_i + sum_j memory_weight_j * (j's last update before the round)."""
    clients = [f"c{i}" for i in range(5)]
    strategy = bound(make(), clients)
    last: dict[str, np.ndarray] = {}
    for t, updates in enumerate(random_rounds(clients, 10, 2, seed=3), 1):
        step = strategy.aggregate(t, updates)
        recomputed = sum(step.weights[u.client] * u.delta["w"].astype(np.float64) for u in updates)
        recomputed = recomputed + sum(w * last[c] for c, w in step.memory_weights.items())
        np.testing.assert_allclose(direction(step), recomputed, atol=1e-9)
        last.update({u.client: u.delta["w"].astype(np.float64) for u in updates})


# ----------------------------------------------------------------- MIFA


def test_mifa_with_full_participation_is_fedavg() -> None:
    clients = [f"c{i}" for i in range(4)]
    mifa = bound(MIFA(memory="fp32"), clients)
    fedavg = bound(FastFedAvg(), clients)
    for t, updates in enumerate(random_rounds(clients, 5, 4), 1):  # everyone, equal example counts
        np.testing.assert_allclose(
            direction(mifa.aggregate(t, updates)), direction(fedavg.aggregate(t, updates)), atol=1e-12
        )


def test_mifa_averages_the_latest_update_of_every_client() -> None:
    mifa = bound(MIFA(memory="fp32"), CLIENTS)
    np.testing.assert_allclose(direction(mifa.aggregate(1, [update("a", [3, 0])])), [1, 0])  # unseen count as 0
    np.testing.assert_allclose(direction(mifa.aggregate(2, [update("b", [0, 3])])), [1, 1])
    np.testing.assert_allclose(direction(mifa.aggregate(3, [])), [1, 1])  # no one: the stored updates still move x
    np.testing.assert_allclose(direction(mifa.aggregate(4, [update("a", [0, 0])])), [0, 1])


def test_mifa_wait_makes_no_step_until_every_client_reported() -> None:
    mifa = bound(MIFA(init="wait", memory="fp32"), CLIENTS)
    assert not direction(mifa.aggregate(1, [update("a", [3, 0]), update("b", [0, 3])])).any()
    np.testing.assert_allclose(direction(mifa.aggregate(2, [update("c", [3, 3])])), [2, 2])


# ----------------------------------------------------------------- FedAU


def test_fedau_weights_by_hand() -> None:
    weights = FedAUWeights(["a", "b"])
    used = []
    for t in range(1, 7):
        present = ["a"] if t in (1, 3, 6) else []
        used += [weights.weights(present)["a"]] if present else []
        weights.observe(present)
    # intervals 1, 2, 3: weights used are 1 (none yet), mean(1) = 1, mean(1, 2) = 1.5
    assert used == [1.0, 1.0, 1.5] and weights.weight("a") == pytest.approx(2.0)
    assert weights.weight("b") == 1.0  # never participated, no cutoff: no interval recorded


def test_fedau_cutoff_records_an_interval_of_k() -> None:
    weights = FedAUWeights(["a"], cutoff=2)
    for present in (["a"], [], [], ["a"]):  # interval 1, then 2 misses = K, then interval 1
        weights.observe(present)
    assert weights.intervals["a"] == 3 and weights.weight("a") == pytest.approx((1 + 2 + 1) / 3)


@pytest.mark.parametrize(("p", "cutoff"), [(0.2, math.inf), (0.2, 5), (0.05, 10), (0.5, 50)])
def test_fedau_weights_converge_to_their_bernoulli_limit(p: float, cutoff: float) -> None:
    rng = np.random.default_rng(1)
    weights = FedAUWeights(["a"], cutoff)
    for present in rng.random(40_000) < p:
        weights.observe(["a"] if present else [])
    limit = (1 - (1 - p) ** cutoff) / p
    assert weights.weight("a") == pytest.approx(limit, rel=0.03)


def test_fedau_divides_by_n_with_its_interval_weights() -> None:
    strategy = bound(FedAU(), ["a", "b", "c", "d"])
    strategy.aggregate(1, [update("a", [1, 1])])  # a: interval 1 recorded
    strategy.aggregate(2, [])
    step = strategy.aggregate(3, [update("a", [4, 0]), update("b", [0, 4])])
    # a: mean interval 1 -> w = 1; b: no interval yet -> 1; (1/4) * (1*[4,0] + 1*[0,4])
    np.testing.assert_allclose(direction(step), [1, 1])
    step = strategy.aggregate(4, [update("a", [4, 0])])  # a's intervals 1, 2 -> mean 1.5
    np.testing.assert_allclose(direction(step), [1.5, 0])


# ----------------------------------------------------------------- FedAMD


def test_fedamd_roles_direction_and_step() -> None:
    strategy = FedAMD(anchor_probability=0.5, initial_direction="zeros", memory="fp32", seed=3)
    clients = [f"c{i}" for i in range(8)]
    strategy.bind(federation(clients))
    strategy.aggregate(0, [update("c0", [8.0, 0.0], role=Role.ANCHOR)])  # one anchor gradient stored: v = [1, 0]
    instructions = strategy.configure(1, {"w": np.zeros(2, np.float32)}, clients)
    roles = {i.client: i.role for i in instructions}
    assert set(roles.values()) == {Role.ANCHOR, Role.MINER}  # one round, different instructions
    directions = {id(i.direction) for i in instructions if i.direction is not None}
    assert len(directions) == 1  # v is computed once for the round's miners
    for i in instructions:
        assert (i.direction is not None) == (i.role == Role.MINER)
        if i.direction is not None:
            np.testing.assert_array_equal(i.direction["w"], [1.0, 0.0])
    anchors = [c for c, r in roles.items() if r == Role.ANCHOR]
    miners = [c for c, r in roles.items() if r == Role.MINER]
    updates = [update(c, [8.0, 8.0], role=Role.ANCHOR) for c in anchors]
    updates += [update(c, [float(i), 1.0], role=Role.MINER) for i, c in enumerate(miners)]
    step = strategy.aggregate(1, updates)
    np.testing.assert_allclose(direction(step), [np.mean(range(len(miners))), 1.0])  # mean over miners only
    assert all(step.weights[c] == 0 for c in anchors)
    # v = (1/N) sum of the stored anchor gradients (c0's unless it was an anchor again)
    stored = {"c0": [8.0, 0.0]} | {c: [8.0, 8.0] for c in anchors}
    np.testing.assert_allclose(strategy.direction()["w"], np.sum(list(stored.values()), axis=0) / 8)


def test_fedamd_miners_train_plainly_until_an_anchor_exists() -> None:
    strategy = FedAMD(anchor_probability=0.0, initial_direction="zeros", memory="fp32")
    strategy.bind(federation(["a", "b"]))
    instructions = strategy.configure(1, {"w": np.zeros(2, np.float32)}, ["a", "b"])
    assert [i.role for i in instructions] == [Role.TRAIN, Role.TRAIN]
    assert all(i.direction is None for i in instructions)
    step = strategy.aggregate(1, [update("a", [2, 0]), update("b", [0, 2])])
    np.testing.assert_allclose(direction(step), [1, 1])


def test_fedamd_anchor_first_and_probability_extremes() -> None:
    strategy = FedAMD(anchor_probability=0.0, initial_direction="anchor-first", memory="fp32")
    strategy.bind(federation(["a", "b"]))
    assert strategy.role(1, "a") == Role.ANCHOR  # no gradient stored yet
    strategy.aggregate(1, [])
    strategy.aggregate(1, [update("a", [1, 1], role=Role.ANCHOR)])
    assert strategy.role(2, "a") == Role.MINER and strategy.role(2, "b") == Role.ANCHOR
    always = FedAMD(anchor_probability=1.0, initial_direction="zeros")
    always.bind(federation(["a", "b"]))
    assert {always.role(t, "a") for t in range(1, 20)} == {Role.ANCHOR}


# ----------------------------------------------------------------- memory


def test_memory_forms_store_what_they_promise() -> None:
    shapes = {"w": (1000,)}
    values = {"w": np.random.default_rng(0).normal(size=1000).astype(np.float32)}
    blob = encode_update(values, parse_codec("topk:0.1+q8"), kind=DELTA, base_fingerprint="", state_version=1).blob
    sizes = {}
    for form in ("fp32", "fp16", "bf16", "wire"):
        memory = ClientMemory(shapes, form)
        memory.put("a", values, blob)
        memory.put("b", values, blob)
        stored = memory.get("a")["w"]
        sizes[form] = memory.bytes_of("a")
        np.testing.assert_allclose(memory.total()["w"], 2 * stored, rtol=1e-6)
        if form == "fp32":
            np.testing.assert_array_equal(stored, values["w"])
        elif form == "wire":
            assert sizes[form] == len(blob)
        else:
            np.testing.assert_allclose(stored, values["w"], rtol=2**-7, atol=1e-6)
    assert sizes["fp32"] == 4000 and sizes["fp16"] == sizes["bf16"] == 2000 and sizes["wire"] < 1000
    assert not ClientMemory(shapes).get("unknown")["w"].any()


def test_wire_memory_needs_the_blob_and_unknown_forms_are_refused() -> None:
    with pytest.raises(StrategyConfigError, match="blob"):
        ClientMemory(SHAPES, "wire").put("a", {"w": np.zeros(2, np.float32)})
    with pytest.raises(StrategyConfigError, match="unknown memory form"):
        ClientMemory(SHAPES, "int4")


def test_overwriting_keeps_the_running_total_exact() -> None:
    memory = ClientMemory(SHAPES, "fp32")
    memory.put("a", {"w": np.array([1.0, 2.0], np.float32)})
    memory.put("a", {"w": np.array([5.0, -1.0], np.float32)})
    memory.put("b", {"w": np.array([1.0, 1.0], np.float32)})
    np.testing.assert_array_equal(memory.total()["w"], [6.0, 0.0])
    assert memory.nbytes() == 2 * 8 + 16


def test_bad_strategy_arguments_are_refused() -> None:
    with pytest.raises(StrategyConfigError, match="beta"):
        FedStale(beta=1.5)
    with pytest.raises(StrategyConfigError, match="init"):
        MIFA(init="never")
    with pytest.raises(StrategyConfigError, match="anchor_probability"):
        FedAMD(anchor_probability=2)
    with pytest.raises(StrategyConfigError, match="p-estimate"):
        bound(FedStale(p_estimate="guess"), CLIENTS).aggregate(1, [])
    with pytest.raises(StrategyConfigError, match="bind"):
        FastFedAvg().aggregate(1, [update("a", [1, 1])])


def test_memory_is_reported_per_strategy() -> None:
    fedau = bound(FedAU(), CLIENTS)
    fedau.aggregate(1, [update("a", [1, 1])])
    assert fedau.memory_bytes() == 24 * 3  # S, M, w for every client
    varp = bound(FedVARP(memory="fp16"), CLIENTS)
    varp.aggregate(1, [update("a", [1, 1]), update("b", [1, 1])])
    assert varp.memory_bytes() == 2 * 2 * 2 + 2 * 8  # two clients' fp16 pairs + the float64 running sum
    assert bound(FastFedAvg(), CLIENTS).memory_bytes() == 0


# ----------------------------------------------------------------- Flower's own strategies


def flower(strategy: object, clients: list[str]) -> FlowerStrategy:
    adapter = FlowerStrategy(strategy, seed=4)  # type: ignore[arg-type]
    adapter.bind(federation(clients))
    return adapter


def test_flower_fedmedian_takes_the_coordinate_wise_median_of_the_fast_updates() -> None:
    from flwr.serverapp.strategy import FedMedian

    adapter = flower(FedMedian(min_available_nodes=1, min_train_nodes=1), CLIENTS)
    state = {"w": np.array([1.0, 1.0], np.float32)}
    assert [i.client for i in adapter.configure(1, state, CLIENTS)] == CLIENTS
    outcome = adapter.apply(1, [update("a", [1, 10]), update("b", [2, -4]), update("c", [100, 0])])
    assert outcome.state is not None
    np.testing.assert_array_equal(outcome.state["w"], [1 + 2, 1 + 0])
    assert outcome.step.weights == {}  # Flower's weights are not known to fedslim
    assert adapter.apply(2, []).state is None


def test_flower_fedavg_matches_fedslims_fedavg() -> None:
    from flwr.serverapp.strategy import FedAvg

    ours, theirs = bound(FastFedAvg(), CLIENTS), flower(FedAvg(min_available_nodes=1), CLIENTS)
    state = {"w": np.array([0.5, -0.5], np.float32)}
    for server_round, updates in enumerate(random_rounds(CLIENTS, 5, 2), start=1):
        updates = [replace(u, num_examples=10 * (i + 1)) for i, u in enumerate(updates)]
        ours.configure(server_round, state, CLIENTS)
        theirs.configure(server_round, state, CLIENTS)
        expected, found = ours.apply(server_round, updates).state, theirs.apply(server_round, updates).state
        assert expected is not None and found is not None
        np.testing.assert_allclose(found["w"], expected["w"], rtol=1e-6, atol=1e-7)
        state = expected


def test_flower_sampling_is_seeded_and_never_waits_for_missing_nodes() -> None:
    from flwr.serverapp.strategy import FedAvg

    clients = [f"c{i}" for i in range(10)]
    state = {"w": np.zeros(2, np.float32)}
    picks = [flower(FedAvg(fraction_train=0.3), clients).configure(1, state, clients) for _ in range(2)]
    assert picks[0] == picks[1] and len(picks[0]) == 3
    assert flower(FedAvg(fraction_train=0.3), clients).configure(2, state, clients) != picks[0]
    # Flower's sampling would wait for two nodes for ever; the adapter skips the round instead.
    assert flower(FedAvg(), clients).configure(1, state, ["c3"]) == []


@pytest.mark.parametrize("name", ["FedAvg", "FedAdam", "FedMedian", "FedTrimmedAvg"])
def test_flower_strategies_run_a_federation_over_fast_deltas(name: str, small_config: RunConfig) -> None:
    from fedslim.simulation.simulate import simulate

    args = "min-available-nodes=1,min-train-nodes=1" + (",beta=0.25" if name == "FedTrimmedAvg" else "")
    config = replace(small_config, rounds=3, strategy=f"flwr.serverapp.strategy:{name}", strategy_args=args)
    result = simulate(config, backend="inline")
    assert [r.accepted for r in result.rounds[1:]] == [2, 2, 2]
    assert result.rounds[-1].loss < result.rounds[0].loss
