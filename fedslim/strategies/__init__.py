"""Aggregation strategies over fast-layer updates, one file per algorithm; pure: no Flower message inside."""

from fedslim.channel.updates import ClientUpdate, Instruction
from fedslim.config import StrategyConfigError
from fedslim.strategies.base import FastStrategy, Federation, Outcome, Step
from fedslim.strategies.estimators import FedAUWeights
from fedslim.strategies.fedamd import FedAMD
from fedslim.strategies.fedau import FedAU
from fedslim.strategies.fedavg import FastFedAvg
from fedslim.strategies.fedstale import FedStale
from fedslim.strategies.fedvarp import FedVARP
from fedslim.strategies.flower import FlowerStrategy
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
    "FlowerStrategy",
    "Instruction",
    "MIFA",
    "Outcome",
    "Step",
    "StrategyConfigError",
    "build_strategy",
    "parse_strategy_args",
    "register",
]
