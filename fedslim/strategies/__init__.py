"""Aggregation strategies over fast-layer updates, one file per algorithm."""

from fedslim.strategies.fedavg import FastFedAvg, fedavg_step

__all__ = ["FastFedAvg", "fedavg_step"]
