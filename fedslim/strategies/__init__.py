"""Aggregation strategies over fast-layer updates, one file per algorithm."""

from fedslim.strategies.base import ClientUpdate, FastStrategy, Federation, Step, StrategyConfigError
from fedslim.strategies.fedamd import FedAMD
from fedslim.strategies.fedau import FedAU, FedAUWeights
from fedslim.strategies.fedavg import FastFedAvg
from fedslim.strategies.fedstale import FedStale
from fedslim.strategies.fedvarp import FedVARP
from fedslim.strategies.memory import ClientMemory
from fedslim.strategies.mifa import MIFA
from fedslim.strategies.registry import STRATEGIES, build_strategy, parse_strategy_args, register

__all__ = [
    "STRATEGIES",
    "ClientMemory",
    "ClientUpdate",
    "FastFedAvg",
    "FastStrategy",
    "FedAMD",
    "FedAU",
    "FedAUWeights",
    "FedStale",
    "FedVARP",
    "Federation",
    "MIFA",
    "Step",
    "StrategyConfigError",
    "build_strategy",
    "parse_strategy_args",
    "register",
]
