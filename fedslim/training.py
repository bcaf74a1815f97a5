"""Minibatch SGD and evaluation shared by clients, the server and base pretraining."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedslim.data.datasets import ArrayDataset


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


def minibatches(size: int, batch_size: int, rng: np.random.Generator) -> Iterator[torch.Tensor]:
    """Endless minibatch indices: one shuffled pass over the data after another."""
    while True:
        order = torch.from_numpy(rng.permutation(size))
        for start in range(0, size, batch_size):
            yield order[start : start + batch_size]


def train_steps(
    module: nn.Module,
    params: list[nn.Parameter],
    data: ArrayDataset,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int | list[int],
) -> float:
    """``steps`` minibatch SGD steps on ``params`` (FedAU's local iterations); returns their mean loss."""
    optimizer = torch.optim.SGD(params, lr=lr)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    batches = minibatches(len(data), batch_size, np.random.default_rng(seed))
    module.train()
    total = 0.0
    for _ in range(steps):
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(module(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / steps


def _gradient(module: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    loss = nn.functional.cross_entropy(module(x), y)
    return list(torch.autograd.grad(loss, params))


def full_gradient(
    module: nn.Module, params: list[nn.Parameter], data: ArrayDataset, chunk: int = 1024
) -> tuple[list[np.ndarray], float]:
    """Gradient of the mean loss over all of ``data`` w.r.t. ``params`` (FedAMD's anchor), and that loss."""
    module.train()
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    total = [torch.zeros_like(p) for p in params]
    loss_sum = 0.0
    for start in range(0, len(data), chunk):
        loss = nn.functional.cross_entropy(module(x[start : start + chunk]), y[start : start + chunk], reduction="sum")
        for acc, grad in zip(total, torch.autograd.grad(loss, params)):
            acc += grad
        loss_sum += loss.item()
    return [(t / len(data)).numpy() for t in total], loss_sum / len(data)


def train_variance_reduced(
    module: nn.Module,
    params: list[nn.Parameter],
    data: ArrayDataset,
    steps: int,
    lr: float,
    batch_size: int,
    direction: list[np.ndarray],
    seed: int | list[int],
) -> float:
    """FedAMD's miner: K recursive variance-reduced steps starting from the global direction v.

    y_0 = x, v_0 = v; for k = 0..K-1: y_{k+1} = y_k - lr v_k and
    v_{k+1} = v_k + grad f(y_{k+1}; B_k) - grad f(y_k; B_k), both gradients on
    the same minibatch B_k. Returns the mean minibatch loss at the y_{k+1}.
    """
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    batches = minibatches(len(data), batch_size, np.random.default_rng(seed))
    module.train()
    v = [torch.from_numpy(np.asarray(d, dtype=np.float32)).clone() for d in direction]
    total = 0.0
    for k in range(steps):
        previous = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, vk in zip(params, v):
                p.sub_(lr * vk)
        if k == steps - 1:
            break  # v_K is never used
        batch = next(batches)
        loss = nn.functional.cross_entropy(module(x[batch]), y[batch])
        total += loss.item()
        grad_new = torch.autograd.grad(loss, params)
        current = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, old in zip(params, previous):
                p.copy_(old)
        grad_old = _gradient(module, params, x[batch], y[batch])
        with torch.no_grad():
            for p, new in zip(params, current):
                p.copy_(new)
            for vk, g_new, g_old in zip(v, grad_new, grad_old):
                vk += g_new - g_old
    return total / max(1, steps - 1)


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
