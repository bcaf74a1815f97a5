"""The task: the user's side of a federation, one Python object.

A task says what the resident base is (its architecture, and where its
checkpoint comes from), which of its tensors are fast, what data each client
holds, how a client trains (batching, loss, optimizer) and how a model is
evaluated. Everything else (the channel, the strategies, the log, simulation
and deployment) is fedslim's. The built-in benchmarks
(:mod:`fedslim.tasks.benchmarks`) are tasks written with this same API;
docs/tasks.md writes one for a model and data of your own.

A run names its task with ``--task`` (run config ``task``): a built-in name,
``module:object`` or ``path/to/file.py:object``, where ``object`` is a
:class:`Task` instance or a :class:`Task` subclass that takes no arguments.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import textwrap
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sized
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from fedslim.adapters import FastSlowModel, attach_fast_layer
from fedslim.base import ResidentBase, cache_dir, ensure_base, load_base, read_checkpoint_state
from fedslim.config import BUILTIN_TASKS, ConfigError, FastSpec, RunConfig, TaskSettingValue
from fedslim.data.datasets import load_array_file
from fedslim.training import EvalResult, evaluate

Batch = tuple[Any, torch.Tensor]
"""What :meth:`Task.batch` returns: the model's inputs and the integer class targets."""


class Task(ABC):
    """The user's model and data, and how a client trains on them.

    Subclass it and implement :meth:`build_base`, :meth:`client_data` and
    :meth:`test_data`; every other method has a default that fits a
    classifier trained by SGD on an :class:`~fedslim.data.datasets.ArrayDataset`
    (features ``x``, integer labels ``y``). A task must build the same thing
    in every process that loads it: the server and each client construct it
    from its name.
    """

    name: str = "task"
    """Short name: it starts the base checkpoint's cache file name."""

    base_version: str | int | None = None
    """The version of the base's making, when the task names it: then the cache key holds it instead of the source
    of :meth:`build_base` and :meth:`pretrain` (an edit that leaves the weights as they were keeps the cached base;
    change the version when the weights change)."""

    settings: Mapping[str, TaskSettingValue] = MappingProxyType({})
    """The run's settings for this task (run config keys ``task.NAME``); read them with :meth:`setting`."""

    def setting(self, name: str, default: TaskSettingValue) -> Any:
        """The run's task setting ``name`` (``--task-setting NAME=VALUE``, run config ``task.NAME``), else
        ``default``; ConfigError when the run gives it a value of another type than the default's."""
        value = self.settings.get(name, default)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not type(default):
            raise ConfigError(
                f"task setting {name} must be of type {type(default).__name__} (task {self.name}), got {value!r}"
            )
        return value

    # ----------------------------------------------------------------- the resident base

    @abstractmethod
    def build_base(self) -> nn.Module:
        """The base architecture, freshly built: the checkpoint's weights are loaded into it."""

    def base_identity(self, config: RunConfig) -> dict[str, Any]:
        """What determines this task's base checkpoint: the key of its cache file (see :meth:`base_path`).

        By default the task's class, the run's seed and task settings, and the
        source of :meth:`build_base` and :meth:`pretrain` (or :attr:`base_version`
        where the task sets one), so that a changed pretraining makes a new
        checkpoint instead of reusing a cached one. Extend it
        (``super().base_identity(config) | {...}``) when your base depends on
        more: a pretrained file, a dataset's version.
        """
        identity: dict[str, Any] = {"task": f"{type(self).__module__}.{type(self).__qualname__}", "seed": config.seed}
        if config.task_settings:
            identity["settings"] = dict(config.task_settings)
        if self.base_version is not None:
            return identity | {"version": self.base_version}
        return identity | {"code": base_code_digest(type(self).build_base, type(self).pretrain)}

    def base_path(self, config: RunConfig) -> Path:
        """Where this machine keeps the base checkpoint (a deployed node may name another with ``base-path``)."""
        key = hashlib.sha256(json.dumps(self.base_identity(config), sort_keys=True).encode()).hexdigest()[:12]
        return cache_dir() / "bases" / f"{self.name}-{key}.pt"

    def pretrain(self, config: RunConfig) -> nn.Module:
        """The base to save when this machine has no checkpoint yet (once, then it is cached).

        By default the architecture as :meth:`build_base` initialises it under
        the run's seed. Override it to load your pretrained weights or to
        train on public data; it must give the same weights wherever it runs.
        """
        torch.manual_seed(config.seed)
        return self.build_base()

    def load_base_state(self, path: Path) -> dict[str, torch.Tensor]:
        """The tensors of the checkpoint at ``path`` (ValueError if it is not one)."""
        return read_checkpoint_state(path)

    # ----------------------------------------------------------------- the fast layer

    def attach_fast(self, base: nn.Module, spec: FastSpec, base_fingerprint: str) -> FastSlowModel:
        """Attach the fast layer ``spec`` (``--fast`` and its settings) to ``base``, in place.

        Override it to choose the fast tensors yourself: return a
        :class:`~fedslim.adapters.FastSlowModel` naming them, and any that each
        client keeps to itself as ``personal_names`` (they train but never
        travel); ``spec.personal`` says what the run asked for.
        """
        return attach_fast_layer(base, spec, base_fingerprint)

    # ----------------------------------------------------------------- data

    @abstractmethod
    def client_data(self, config: RunConfig, partition_id: int) -> Sized:
        """The training data of simulated client ``partition_id`` (0 to ``config.num_clients`` - 1).

        IndexError when there is no such partition. Called in every process
        that hosts the client; fedslim keeps what it returns for the run.
        """

    def node_data(self, config: RunConfig, path: Path) -> Sized:
        """A deployed node's training data, from the ``data-path`` of its node config (default: an ``.npz``)."""
        return load_array_file(path)

    @abstractmethod
    def test_data(self, config: RunConfig) -> Sized:
        """The server's held-out data for central evaluation."""

    def hold_out(self, data: Any, fraction: float, seed: list[int]) -> tuple[Sized, Sized | None]:
        """A client's data split for client-side evaluation: what it trains on, and ``fraction`` of it held out.

        By default a seeded random share of the examples, each part in the
        data's own order, through the data's ``subset(indices)`` method. None
        for the held-out part when the share rounds to none or to all. An
        override must hold out at most ``round(fraction * len(data))``
        examples: the server rejects evaluations on more.
        """
        count = round(fraction * len(data))
        if count == 0 or count >= len(data):
            return data, None
        if not hasattr(data, "subset"):
            raise TypeError(f"{type(data).__name__} has no subset(indices): override Task.hold_out to split it")
        order = np.random.default_rng(seed).permutation(len(data))
        return data.subset(np.sort(order[count:])), data.subset(np.sort(order[:count]))

    def labels(self, data: Any) -> np.ndarray:
        """The class labels of ``data`` (label-correlated participation models read them)."""
        return np.asarray(data.y)

    def label_counts(self, config: RunConfig, partition_id: int) -> np.ndarray:
        """How many examples of each class simulated client ``partition_id`` trains on (index: class), for the
        label-correlated participation models; the server asks for every client's, one after another.

        By default counted in :meth:`client_data` (through :meth:`labels`), which is then dropped; override it when
        the counts come cheaper than the data (the built-in benchmarks count them once for all their clients).
        """
        return np.bincount(self.labels(self.client_data(config, partition_id)))

    # ----------------------------------------------------------------- local training

    def batch(self, data: Any, indices: np.ndarray | slice) -> Batch:
        """The examples ``indices`` (an index array, or a slice for a run of examples) as inputs and targets."""
        # Indexed by torch, not numpy: torch's allocator aligns the batch as the pretrained bases were made with
        # (a differently aligned input can change the last bits of a convolution, and so the base's fingerprint).
        index = indices if isinstance(indices, slice) else torch.from_numpy(np.asarray(indices))
        return torch.from_numpy(data.x)[index], torch.from_numpy(data.y)[index]

    def logits(self, module: nn.Module, inputs: Any) -> torch.Tensor:
        """The model's class scores for a batch's inputs."""
        return module(inputs)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The training loss (default: cross-entropy, in float32 for a half-precision model's logits);
        ``reduction`` is ``mean`` or ``sum``."""
        return nn.functional.cross_entropy(logits.float(), targets, reduction=reduction)

    def optimizer(self, params: list[nn.Parameter], config: RunConfig) -> torch.optim.Optimizer:
        """The client's optimizer for one round's local training (a fresh one each round)."""
        return torch.optim.SGD(params, lr=config.lr)

    def evaluate(self, module: nn.Module, data: Any) -> EvalResult:
        """Loss and accuracy of ``module`` on ``data``, means over the targets :meth:`batch` gives; override it to
        add metrics of your own: ``replace(super().evaluate(module, data), metrics={"perplexity": ...})``, which
        the log keeps per round."""
        return evaluate(module, data, self)


@lru_cache(maxsize=64)
def base_code_digest(*methods: Callable[..., Any]) -> str:
    """SHA-256 (16 hex digits) of the source of ``methods``: what a task's default base identity holds of the code
    that makes its base. ConfigError naming :attr:`Task.base_version` when a method's source cannot be read."""
    digest = hashlib.sha256()
    for method in methods:
        try:
            source = textwrap.dedent(inspect.getsource(method))
        except (OSError, TypeError) as exc:
            raise ConfigError(
                f"the source of {method.__qualname__} cannot be read ({exc}): set base_version on the task"
            ) from exc
        digest.update(f"{method.__qualname__}\0{source}\0".encode())
    return digest.hexdigest()[:16]


def task_for(config: RunConfig) -> Task:
    """The task ``config.task`` names, with the run's task settings (ConfigError naming the problem if it names
    none)."""
    return load_task(config.task, tuple(sorted(config.task_settings.items())))


def prepared_base(config: RunConfig) -> ResidentBase:
    """The run's base on this machine, loaded; made once by the task's :meth:`Task.pretrain` if it is missing."""
    task = task_for(config)
    return load_base(ensure_base(task, config), task)


@lru_cache(maxsize=8)
def load_task(reference: str, settings: tuple[tuple[str, TaskSettingValue], ...] = ()) -> Task:
    """The task a name refers to, given ``settings`` (its :attr:`Task.settings`, as name-value pairs): a built-in
    one, or ``module:object`` or ``path/to/file.py:object`` (an instance or a no-argument subclass)."""
    task = _referenced_task(reference)
    if settings:
        task = copy.copy(task)  # the module's own instance keeps its settings
        task.settings = MappingProxyType(dict(settings))
    return task


@lru_cache(maxsize=8)
def _referenced_task(reference: str) -> Task:
    """The task ``reference`` names, as its module defines it (loaded once per process)."""
    if reference == "text":
        from fedslim.tasks.text import FortunesTask

        return FortunesTask()
    if reference in BUILTIN_TASKS:
        from fedslim.tasks.benchmarks import BenchmarkTask

        return BenchmarkTask(reference)
    module_name, _, attribute = reference.rpartition(":")
    if not module_name or not attribute:
        raise ConfigError(
            f"unknown task {reference!r}: use {', '.join(BUILTIN_TASKS)}, module:object or path/to/file.py:object"
        )
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # a task module next to where fedslim runs, as for `python -m`
    try:
        found: Any = (
            import_task_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
        )
        for part in attribute.split("."):
            found = getattr(found, part)
        if isinstance(found, type) and issubclass(found, Task):
            found = found()
    except Exception as exc:  # the user's module may raise anything while it loads: one line naming it
        raise ConfigError(f"task {reference!r} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if not isinstance(found, Task):
        raise ConfigError(f"task {reference!r} is a {type(found).__name__}, not a fedslim.task.Task")
    try:
        hash(found)
    except TypeError as exc:
        raise ConfigError(f"task {reference!r} must be hashable (a @dataclass task needs eq=False)") from exc
    return found


def task_module_name(path: Path) -> str:
    """The module name a task file is imported under: its stem and a digest of its absolute path, the same in every
    process (the server's, each client's, Ray's workers), so that what one pickles another loads."""
    stem = re.sub(r"\W", "_", path.stem)
    return f"fedslim_task_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def import_task_file(file: str) -> ModuleType:
    """The module of the Python file ``file``, imported once per process (its folder joins ``sys.path``, so that
    it imports its neighbours as a script does)."""
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no task file {path}")
    name = task_module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} cannot be imported as a module")
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs: dataclasses and pickle look their module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
