"""Test doubles shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import torch

from fedslim.base import ensure_pretrained_base
from fedslim.config import RunConfig


class ListGrid:
    """The one part of a Flower Grid that sampling uses: a fixed list of node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


def other_base(config: RunConfig, path: Path) -> Path:
    """A checkpoint of the run's architecture whose weights differ from the server's base in one entry."""
    checkpoint = torch.load(ensure_pretrained_base(config), weights_only=True)
    first = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][first].view(-1)[0] += 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path
