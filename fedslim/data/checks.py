"""Checks on what a task returns, before anything trains or is evaluated on it.

A task's data is checked through the task's own API (:meth:`~fedslim.task.Task.batch`,
:meth:`~fedslim.task.Task.logits`), so a data type of its own is checked as
the loops will read it: at least one example; features and labels of equal
lengths; finite features; and, for a task with the default classification
loss, one integer label per example within the model's outputs (the width of
the logits of one forward pass on a few examples). A task with a ``loss`` of
its own (a regression, a causal-LM loss) is checked for finite labels only:
what its targets mean is its own.

The server checks its test data and the fast layer before round 1; each
client checks its data before it trains (:mod:`fedslim.client.app`), and
``fedslim simulate`` checks every simulated partition before a node starts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch import nn

from fedslim.adapters import FastSlowModel
from fedslim.base import ResidentBase
from fedslim.config import ConfigError, FastSpec, RunConfig
from fedslim.task import Task
from fedslim.training import on_device

WIDTH_EXAMPLES = 8
"""Examples in the forward pass that gives the model's output width."""
CHUNK_EXAMPLES = 1024
"""Examples the data is read in, through the task's ``batch``."""


class DataError(ValueError):
    """What is wrong with a task's data, in one line."""


class NoExamplesError(DataError):
    """The data holds no examples."""


def check_data(task: Task, data: Sized, module: nn.Module) -> None:
    """Raise :class:`NoExamplesError` or :class:`DataError` naming the first problem of ``data``.

    ``module`` is the task's model (the base, with or without its fast layer):
    one forward pass on the first examples gives its output width, and shows
    that the features fit it.
    """
    size = len(data)
    if size == 0:
        raise NoExamplesError("no examples")
    x, y = getattr(data, "x", None), getattr(data, "y", None)
    if isinstance(x, Sized) and isinstance(y, Sized) and len(x) != len(y):
        raise DataError(f"{len(x)} feature rows but {len(y)} labels")
    classify = classifies(task)
    classes = output_width(task, data, module) if classify else None
    non_finite: list[int] = []  # the examples whose features hold NaN or inf
    outside: list[tuple[int, int]] = []  # (index, label) of the labels outside the model's outputs
    for start, inputs, targets in _chunks(task, data, size):
        count = min(start + CHUNK_EXAMPLES, size) - start
        non_finite += [start + row for row in _non_finite_rows(inputs, start, count)]
        _check_targets(targets, start, count, classify)
        if classes is not None:
            rows = torch.nonzero((targets < 0) | (targets >= classes)).flatten().tolist()
            outside += [(start + row, int(targets[row])) for row in rows]
    if non_finite:
        raise DataError(
            f"NaN or inf in the features of {_count(len(non_finite), 'example')} (first: example {non_finite[0]})"
        )
    if outside:
        index, label = outside[0]
        raise DataError(
            f"{_count(len(outside), 'label')} outside the model's {classes} outputs (first: {label} at index {index})"
        )


def classifies(task: Task) -> bool:
    """Whether ``task`` trains with the default loss (cross-entropy over class indices)."""
    return type(task).loss is Task.loss


def output_width(task: Task, data: Any, module: nn.Module) -> int | None:
    """The number of class scores ``module`` gives (None if its logits are not [examples, classes, ...])."""
    inputs, _ = _batch(task, data, slice(0, WIDTH_EXAMPLES))
    device = next(module.parameters()).device
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            logits = task.logits(module, on_device(inputs, device))
    except Exception as exc:  # the task's model on the task's data: anything it raises is the mismatch
        raise DataError(f"the features do not fit the model: logits() raised {_one_line(exc)}") from exc
    finally:
        module.train(training)
    return int(logits.shape[1]) if isinstance(logits, torch.Tensor) and logits.ndim >= 2 else None


def _batch(task: Task, data: Any, indices: slice) -> tuple[Any, Any]:
    try:
        return task.batch(data, indices)
    except Exception as exc:  # a task's own batching on its own data type
        raise DataError(f"batch() raised {_one_line(exc)}") from exc


def _chunks(task: Task, data: Any, size: int) -> Iterator[tuple[int, Any, Any]]:
    for start in range(0, size, CHUNK_EXAMPLES):
        inputs, targets = _batch(task, data, slice(start, start + CHUNK_EXAMPLES))
        yield start, inputs, targets


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a batch's inputs (a tensor, or a dict, list or tuple of them)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _non_finite_rows(inputs: Any, start: int, count: int) -> list[int]:
    """The examples of a chunk whose floating features hold NaN or inf (a DataError if its rows do not match)."""
    rows: set[int] = set()
    for tensor in _tensors(inputs):
        if tensor.ndim == 0:
            continue  # a setting passed with the batch, not a feature of each example
        if len(tensor) != count:
            raise DataError(f"batch() gave {len(tensor)} rows of features for {count} examples (from index {start})")
        if tensor.is_floating_point() or tensor.is_complex():
            rows.update(torch.nonzero(~torch.isfinite(tensor).reshape(count, -1).all(1)).flatten().tolist())
    return sorted(rows)


def _check_targets(targets: Any, start: int, count: int, classify: bool) -> None:
    """One label per example, finite; for a classifier, integer class indices."""
    if not isinstance(targets, torch.Tensor):
        raise DataError(f"batch() gave labels of type {type(targets).__name__}, not a tensor")
    if targets.ndim == 0 or len(targets) != count:
        raise DataError(f"batch() gave {targets.numel()} labels for {count} examples (from index {start})")
    if targets.is_floating_point() and not bool(torch.isfinite(targets).all()):
        first = int(torch.nonzero(~torch.isfinite(targets).reshape(count, -1).all(1)).flatten()[0])
        raise DataError(f"NaN or inf among the labels (first: index {start + first})")
    if not classify:
        return
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise DataError(f"labels are {str(targets.dtype).removeprefix('torch.')}, not integer class indices")
    if targets.ndim != 1:
        raise DataError(f"labels have shape {tuple(targets.shape)}: one integer class per example expected")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def attached_model(base: ResidentBase, spec: FastSpec, reference: str) -> FastSlowModel:
    """``base`` with the fast layer ``spec`` attached; a ConfigError naming ``attach_fast`` when the task's
    ``attach_fast`` cannot attach it to the task's architecture (e.g. ``lora`` on a model without nn.Linear)."""
    try:
        return base.build(spec)
    except Exception:
        try:  # is it the attachment itself? Try it on the bare architecture
            base.task.attach_fast(base.task.build_base(), spec, base.fingerprint)
        except Exception as attach_exc:
            raise ConfigError(
                f"task {reference} attach_fast(): cannot attach the {spec.kind} fast layer: {_one_line(attach_exc)}; "
                "override Task.attach_fast to name the fast tensors (docs/tasks.md)"
            ) from attach_exc
        raise


def checked_test_data(task: Task, data: Sized, module: nn.Module, reference: str) -> Sized:
    """``data`` (the task's ``test_data``) if it passes :func:`check_data`, else a ConfigError naming it."""
    try:
        check_data(task, data, module)
    except DataError as exc:
        raise ConfigError(f"task {reference} test_data(): {exc}") from exc
    return data


def check_partitions(task: Task, config: RunConfig, module: nn.Module) -> None:
    """Check every simulated client's data (``client_data``) before a node starts: a ConfigError naming the first
    bad partition, or saying that none holds an example. A partition without examples is no error: its client
    declares none and is left out of the run."""
    empty = 0
    for partition in range(config.num_clients):
        try:
            check_data(task, task.client_data(config, partition), module)
        except NoExamplesError:
            empty += 1
        except DataError as exc:
            raise ConfigError(f"task {config.task} client_data(config, {partition}): {exc}") from exc
    if empty == config.num_clients:
        raise ConfigError(f"task {config.task} client_data(): none of the {empty} clients has a training example")
