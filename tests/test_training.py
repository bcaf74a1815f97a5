"""Local training procedures: minibatch steps, FedAMD's anchor gradient and its variance-reduced miner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedslim.data.datasets import ArrayDataset
from fedslim.task import load_task
from fedslim.training import full_gradient, train_steps, train_variance_reduced

ARRAYS = load_task("synthetic")  # the default batching and cross-entropy of a task


def _softmax_regression() -> tuple[torch.nn.Module, list[torch.nn.Parameter], ArrayDataset]:
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 4)
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.normal(size=(32, 3)).astype(np.float32), rng.integers(0, 4, 32).astype(np.int64))
    return module, list(module.parameters()), data


def test_fedamd_miner_with_v_equal_to_the_full_gradient_and_full_batches_is_gradient_descent() -> None:
    module, params, data = _softmax_regression()
    start = [p.detach().clone() for p in params]
    gradient, _ = full_gradient(module, params, data, ARRAYS)
    train_variance_reduced(module, params, data, ARRAYS, 4, 0.3, len(data), gradient, seed=0)
    miner = [p.detach().clone() for p in params]

    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    for _ in range(4):  # plain full-batch gradient descent
        step, _ = full_gradient(module, params, data, ARRAYS)
        with torch.no_grad():
            for p, g in zip(params, step):
                p -= 0.3 * torch.from_numpy(g)
    for m, p in zip(miner, params):
        torch.testing.assert_close(m, p.detach(), rtol=1e-5, atol=1e-6)


def test_fedamd_miner_with_zero_direction_never_moves() -> None:
    module, params, data = _softmax_regression()
    start = [p.detach().clone() for p in params]
    zero = [np.zeros(tuple(p.shape), np.float32) for p in params]
    train_variance_reduced(module, params, data, ARRAYS, 5, 0.3, 8, zero, seed=0)
    for s, p in zip(start, params):
        torch.testing.assert_close(s, p.detach(), rtol=0, atol=0)


def test_train_steps_takes_exactly_k_steps() -> None:
    module, params, data = _softmax_regression()
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    train_steps(module, data, ARRAYS, torch.optim.SGD(params, lr=0.1), steps=7, batch_size=5, seed=0)
    assert len(calls) == 7


def test_evaluation_scores_no_padding_target() -> None:
    from torch import nn

    from fedslim.task import Task
    from fedslim.training import IGNORED_TARGET, evaluate

    class Tokens(Task):
        def build_base(self) -> nn.Module:
            return nn.Identity()

        def client_data(self, config, partition_id):  # type: ignore[no-untyped-def]
            raise IndexError(partition_id)

        def test_data(self, config):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def batch(self, data, indices):  # type: ignore[no-untyped-def]
            return data.x[indices], data.y[indices]

        def logits(self, module, inputs):  # type: ignore[no-untyped-def]
            return inputs.reshape(-1, inputs.shape[-1])  # one row of scores per token

        def loss(self, logits, targets, reduction="mean"):  # type: ignore[no-untyped-def]
            return nn.functional.cross_entropy(logits, targets.reshape(-1), reduction=reduction)

    # 2 sequences of 3 tokens over 2 classes; the last token of each is padding
    scores = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]], [[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]]])
    targets = torch.tensor([[0, 1, IGNORED_TARGET], [0, 1, IGNORED_TARGET]])
    data = type("Data", (), {"x": scores, "y": targets, "__len__": lambda self: 2})()
    result = evaluate(nn.Linear(1, 1), data, Tokens())  # the task scores its inputs; a module with parameters
    assert result.accuracy == 3 / 4  # 4 real tokens, 3 right; the padding neither counts nor scores
    expected = nn.functional.cross_entropy(scores.reshape(-1, 2), targets.reshape(-1), reduction="sum") / 4
    assert result.loss == pytest.approx(float(expected))
