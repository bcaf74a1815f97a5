"""The local training loops and evaluation shared by clients, the server and base pretraining.

Each loop reads its examples through an :class:`Objective` (a task: how to
batch the data, score a batch and measure the loss), so a task's own
batching and loss run in the same loops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class EvalResult:
    """A model's loss and accuracy on some data (each the mean over its targets: one per example for a
    classifier, one per token for a language model), and any metrics of the task's own (perplexity, F1, ...)."""

    loss: float
    accuracy: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    """What the loops need of a task (see :class:`fedslim.task.Task` for the defaults)."""

    def batch(self, data: Any, indices: np.ndarray | slice) -> tuple[Any, torch.Tensor]: ...

    def logits(self, module: nn.Module, inputs: Any) -> torch.Tensor: ...

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor: ...


def on_device(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor, or a dict, list or tuple of them) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: on_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_device(item, device) for item in value)
    return value


def device_batch(
    module: nn.Module, objective: Objective, data: Any, indices: np.ndarray | slice
) -> tuple[Any, torch.Tensor]:
    """The examples ``indices`` as the objective batches them, on the device of ``module``'s parameters."""
    device = next(module.parameters()).device
    inputs, targets = objective.batch(data, indices)
    return on_device(inputs, device), targets.to(device)


def _batch_loss(module: nn.Module, objective: Objective, data: Any, indices: np.ndarray) -> torch.Tensor:
    inputs, targets = device_batch(module, objective, data, indices)
    return objective.loss(objective.logits(module, inputs), targets)


def train_epochs(
    module: nn.Module,
    data: Sized,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    seed: int | list[int],
) -> float:
    """Train with ``optimizer`` for whole epochs; returns the mean loss of the last epoch."""
    rng = np.random.default_rng(seed)
    module.train()
    last_epoch_loss = float("nan")
    for _ in range(epochs):
        order = rng.permutation(len(data))
        total = 0.0
        for start in range(0, len(data), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = _batch_loss(module, objective, data, batch)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        last_epoch_loss = total / len(data)
    return last_epoch_loss


def minibatches(size: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless minibatch indices: one shuffled pass over the data after another."""
    while True:
        order = rng.permutation(size)
        for start in range(0, size, batch_size):
            yield order[start : start + batch_size]


def train_steps(
    module: nn.Module,
    data: Sized,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    steps: int,
    batch_size: int,
    seed: int | list[int],
) -> float:
    """``steps`` minibatch steps with ``optimizer`` (FedAU's local iterations); returns their mean loss."""
    batches = minibatches(len(data), batch_size, np.random.default_rng(seed))
    module.train()
    total = 0.0
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = _batch_loss(module, objective, data, next(batches))
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / steps


def full_gradient(
    module: nn.Module, params: list[nn.Parameter], data: Sized, objective: Objective, chunk: int = 1024
) -> tuple[list[np.ndarray], float]:
    """Gradient of the mean loss over all of ``data`` w.r.t. ``params`` (FedAMD's anchor), and that loss."""
    module.train()
    total = [torch.zeros_like(p) for p in params]
    loss_sum = 0.0
    for start in range(0, len(data), chunk):
        inputs, targets = device_batch(module, objective, data, slice(start, start + chunk))
        loss = objective.loss(objective.logits(module, inputs), targets, reduction="sum")
        for acc, grad in zip(total, torch.autograd.grad(loss, params)):
            acc += grad
        loss_sum += loss.item()
    return [(t / len(data)).cpu().float().numpy() for t in total], loss_sum / len(data)


def train_variance_reduced(
    module: nn.Module,
    params: list[nn.Parameter],
    data: Sized,
    objective: Objective,
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
    batches = minibatches(len(data), batch_size, np.random.default_rng(seed))
    module.train()
    v = [torch.from_numpy(np.asarray(d, dtype=np.float32)).to(p.device, copy=True) for d, p in zip(direction, params)]
    total = 0.0
    for k in range(steps):
        previous = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, vk in zip(params, v):
                p.sub_(lr * vk)
        if k == steps - 1:
            break  # v_K is never used
        batch = next(batches)
        loss = _batch_loss(module, objective, data, batch)
        total += loss.item()
        grad_new = torch.autograd.grad(loss, params)
        current = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, old in zip(params, previous):
                p.copy_(old)
        grad_old = torch.autograd.grad(_batch_loss(module, objective, data, batch), params)
        with torch.no_grad():
            for p, new in zip(params, current):
                p.copy_(new)
            for vk, g_new, g_old in zip(v, grad_new, grad_old):
                vk += g_new - g_old
    return total / max(1, steps - 1)


IGNORED_TARGET = -100
"""cross_entropy's ``ignore_index``: a padding target, neither in the loss nor scored."""


@torch.no_grad()
def evaluate(module: nn.Module, data: Sized, objective: Objective, batch_size: int = 1024) -> EvalResult:
    """Mean loss and accuracy of ``module`` on ``data``, over the targets: the examples' labels, or every target of
    each example (a language model's next tokens, its logits one row per token, in the targets' order)."""
    module.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(data), batch_size):
        inputs, targets = device_batch(module, objective, data, slice(start, start + batch_size))
        logits = objective.logits(module, inputs)
        loss_sum += objective.loss(logits, targets, reduction="sum").item()
        scored = targets != IGNORED_TARGET
        correct += int(((logits.argmax(1).reshape(targets.shape) == targets) & scored).sum())
        count += int(scored.sum())
    return EvalResult(loss_sum / max(count, 1), correct / max(count, 1), len(data))
