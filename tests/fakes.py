"""Test doubles shared by several test modules."""

from __future__ import annotations


class ListGrid:
    """The one part of a Flower Grid that sampling uses: a fixed list of node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids
