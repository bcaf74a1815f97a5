"""Minibatch SGD and evaluation shared by clients, the server and base pretraining."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedslim.simulation.datasets import ArrayDataset


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


def train_epochs(
    module: nn.Module,
    params: list[nn.Parameter],
    data: ArrayDataset,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int | list[int],
    momentum: float = 0.0,
) -> float:
    """Train ``params`` of ``module`` with SGD; returns the mean loss of the last epoch."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    rng = np.random.default_rng(seed)
    module.train()
    last_epoch_loss = float("nan")
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(data)))
        total = 0.0
        for start in range(0, len(data), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(module(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        last_epoch_loss = total / len(data)
    return last_epoch_loss


@torch.no_grad()
def evaluate(module: nn.Module, data: ArrayDataset, batch_size: int = 1024) -> EvalResult:
    """Mean cross-entropy and accuracy of ``module`` on ``data``."""
    module.eval()
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        logits = module(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum())
    return EvalResult(loss_sum / len(data), correct / len(data), len(data))
