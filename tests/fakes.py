"""Test doubles shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedslim.config import RunConfig
from fedslim.task import prepared_base


class ListGrid:
    """The one part of a Flower Grid that sampling uses: a fixed list of node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


def other_base(config: RunConfig, path: Path) -> Path:
    """A checkpoint of the run's architecture whose weights differ from the server's base in one entry."""
    checkpoint = torch.load(prepared_base(config).path, weights_only=True)
    first = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][first].view(-1)[0] += 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


DOCS = Path(__file__).resolve().parent.parent / "docs"


def docs_example_task() -> str:
    """The complete task of docs/tasks.md: its first Python block."""
    text = (DOCS / "tasks.md").read_text(encoding="utf-8")
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def write_docs_example(folder: Path, train: int = 1200, test: int = 400) -> tuple[Path, Path]:
    """The docs example as ``my_task.py`` in ``folder/tasks``, and its data in ``folder/data``: the first
    ``train`` and ``test`` Fashion-MNIST images (Debian's files). Returns (tasks folder, data folder)."""
    from fedslim.data.datasets import load_fashion_mnist

    tasks, data = folder / "tasks", folder / "data"
    tasks.mkdir(parents=True)
    data.mkdir(parents=True)
    (tasks / "my_task.py").write_text(docs_example_task(), encoding="utf-8")
    train_set, test_set = load_fashion_mnist(Path("/usr/share/datasets/fashion-mnist"))
    np.savez(data / "train.npz", x=train_set.x[:train], y=train_set.y[:train])
    np.savez(data / "test.npz", x=test_set.x[:test], y=test_set.y[:test])
    return tasks, data
