"""The built-in benchmark tasks: Synthetic transfer and Synthetic(1, 1) with an MLP, Fashion-MNIST with a small CNN.

Each pretrains its base centrally on the public slice of its data (data the
server may use), once per machine, and caches it keyed by
:meth:`BenchmarkTask.base_identity`: a changed recipe pretrains a new base
instead of reusing one cached before the change. A change to the code that
pretrains is not in the key: the results check (tests/test_results.py) sees
it as a base fingerprint that published numbers no longer match.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedslim.config import RunConfig
from fedslim.data.datasets import (
    TRANSFER_PUBLIC_EXAMPLES,
    TRANSFER_SHIFT,
    ArrayDataset,
    DataSpec,
    federation_source,
)
from fedslim.models import FashionCNN, SyntheticMLP
from fedslim.task import Task
from fedslim.training import train_epochs


@dataclass(frozen=True)
class PretrainRecipe:
    """How a built-in benchmark's base is pretrained on the public slice (SGD with momentum, one thread)."""

    epochs: int
    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.9


PRETRAIN_RECIPES = {
    "synthetic-transfer": PretrainRecipe(epochs=2),
    "synthetic": PretrainRecipe(epochs=2),
    "fmnist": PretrainRecipe(epochs=10),
}


class BenchmarkTask(Task):
    """A built-in benchmark: its federation from :func:`fedslim.data.datasets.federation_source` (each part made
    when asked for), its base pretrained on the federation's public slice."""

    def __init__(self, name: str) -> None:
        if name not in PRETRAIN_RECIPES:
            raise ValueError(f"no built-in benchmark {name!r}; choose one of {', '.join(PRETRAIN_RECIPES)}")
        self.name = name

    @property
    def recipe(self) -> PretrainRecipe:
        return PRETRAIN_RECIPES[self.name]

    def build_base(self) -> nn.Module:
        return FashionCNN() if self.name == "fmnist" else SyntheticMLP()

    def base_identity(self, config: RunConfig) -> dict[str, Any]:
        spec = DataSpec.of(config)
        identity: dict[str, Any] = {"dataset": spec.dataset, "seed": spec.seed}
        if spec.dataset == "synthetic":
            identity |= {"synthetic_alpha": spec.synthetic_alpha, "synthetic_beta": spec.synthetic_beta}
        if spec.dataset == "synthetic-transfer":
            identity |= {"transfer_shift": TRANSFER_SHIFT, "public_examples": TRANSFER_PUBLIC_EXAMPLES}
        return identity | {"recipe": asdict(self.recipe)}

    def pretrain(self, config: RunConfig) -> nn.Module:
        public = federation_source(config).public()
        # One thread: parallel reductions would make the checkpoint depend on the caller's thread count.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch.manual_seed(config.seed)
            module = self.build_base()
            optimizer = torch.optim.SGD(module.parameters(), lr=self.recipe.lr, momentum=self.recipe.momentum)
            train_epochs(module, public, self, optimizer, self.recipe.epochs, self.recipe.batch_size, seed=config.seed)
        finally:
            torch.set_num_threads(threads)
        return module

    def client_data(self, config: RunConfig, partition_id: int) -> ArrayDataset:
        return federation_source(config).client(partition_id)

    def label_counts(self, config: RunConfig, partition_id: int) -> np.ndarray:
        return federation_source(config).label_counts()[partition_id]

    def test_data(self, config: RunConfig) -> ArrayDataset:
        return federation_source(config).test()
