"""FedAvg over fast deltas against hand-computed weighted means."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import ListGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedslim.strategies.fedavg import FastFedAvg, fedavg_step


def _reply(delta: dict[str, list[float]], num_examples: int, loss: float = 1.0) -> Message:
    content = RecordDict(
        {
            "delta": ArrayRecord({k: Array(np.array(v, dtype=np.float32)) for k, v in delta.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss}),
        }
    )
    return Message(content=content, dst_node_id=0, message_type="train")


def test_fedavg_step_is_the_example_weighted_mean() -> None:
    current = {"w": np.array([1.0, 2.0], np.float32)}
    deltas = [{"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 3.0])}]
    # weights 1:3 -> mean delta = [0.25, 2.25]
    np.testing.assert_allclose(fedavg_step(current, deltas, [1, 3], 1.0)["w"], [1.25, 4.25])
    np.testing.assert_allclose(fedavg_step(current, deltas, [1, 3], 0.5)["w"], [1.125, 3.125])


def test_fedavg_step_without_updates_keeps_the_state() -> None:
    current = {"w": np.array([1.0], np.float32)}
    assert fedavg_step(current, [], [], 1.0)["w"] == pytest.approx([1.0])


def test_aggregate_train_applies_the_weighted_mean_to_the_sent_state() -> None:
    strategy = FastFedAvg(fraction_train=1.0)
    state = ArrayRecord({"a": Array(np.array([0.0, 0.0], np.float32)), "b": Array(np.array([10.0], np.float32))})
    list(strategy.configure_train(1, state, ConfigRecord(), ListGrid([7, 8])))
    replies = [
        _reply({"a": [2.0, -2.0], "b": [1.0]}, num_examples=10, loss=1.0),
        _reply({"a": [8.0, 4.0], "b": [-1.0]}, num_examples=30, loss=3.0),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    # a: (10*[2,-2] + 30*[8,4]) / 40 = [6.5, 2.5]; b: 10 + (10*1 - 30*1)/40 = 9.5
    np.testing.assert_allclose(arrays["a"].numpy(), [6.5, 2.5])
    np.testing.assert_allclose(arrays["b"].numpy(), [9.5])
    assert metrics["train-loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)
    assert metrics["num-examples"] == 40


def test_no_accepted_updates_means_no_new_state() -> None:
    assert FastFedAvg().aggregate_train(1, []) == (None, None)


def test_sampling_is_seeded_and_keeps_64_bit_node_ids() -> None:
    node_ids = [2**64 - 1 - i for i in range(10)]
    strategy = FastFedAvg(fraction_train=0.3, seed=5)
    first = strategy.sample_nodes(1, node_ids)
    assert len(first) == 3 and set(first) <= set(node_ids)
    assert strategy.sample_nodes(1, node_ids) == first
    assert any(strategy.sample_nodes(r, node_ids) != first for r in range(2, 6))


def test_configure_train_sends_fast_state_and_round() -> None:
    strategy = FastFedAvg(fraction_train=0.5)
    state = ArrayRecord({"a": Array(np.zeros(2, np.float32))})
    messages = list(strategy.configure_train(4, state, ConfigRecord({"lr": 0.1}), ListGrid([1, 2, 3, 4])))
    assert len(messages) == 2
    for message in messages:
        assert message.metadata.message_type == "train"
        assert message.content["config"]["server-round"] == 4
        assert list(message.content["fast"].keys()) == ["a"]
