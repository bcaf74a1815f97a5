"""Strategies by name or import path, configured from ``key=value`` arguments.

``--strategy fedstale --strategy-arg beta=0.5 --strategy-arg p-estimate=fedau``
and ``--strategy mypkg.mod:MyStrategy --strategy-arg alpha=2`` both end in
:func:`build_strategy`. Argument names may use dashes; values are read as
int, float (``inf`` included), bool (``true``/``false``) or else string. In
the run config the arguments are one string, ``beta=0.5,p-estimate=fedau``
(commas or blanks between them), where a value holding a comma or a blank is
quoted: ``name='a, b'``.

A ``module:Class`` may be a :class:`~fedslim.strategies.base.FastStrategy` or
one of Flower's own strategies (``flwr.serverapp.strategy:FedAdam``), which
runs through :class:`~fedslim.strategies.flower.FlowerStrategy`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedslim.config import ConfigError, RunConfig, StrategyConfigError, split_repeated
from fedslim.strategies.base import FastStrategy
from fedslim.strategies.fedamd import FedAMD
from fedslim.strategies.fedau import FedAU
from fedslim.strategies.fedavg import FastFedAvg
from fedslim.strategies.fedstale import FedStale
from fedslim.strategies.fedvarp import FedVARP
from fedslim.strategies.flower import FlowerStrategy
from fedslim.strategies.mifa import MIFA

STRATEGIES: dict[str, type[FastStrategy] | type[Strategy]] = {
    "fedavg": FastFedAvg,
    "fedau": FedAU,
    "fedvarp": FedVARP,
    "mifa": MIFA,
    "fedstale": FedStale,
    "fedamd": FedAMD,
}


def _is_strategy(candidate: object) -> bool:
    return isinstance(candidate, type) and issubclass(candidate, FastStrategy | Strategy)


def register(name: str, strategy: type[FastStrategy] | type[Strategy]) -> None:
    """Make ``strategy`` available as ``--strategy NAME``."""
    if not _is_strategy(strategy):
        raise StrategyConfigError(f"{strategy!r} is neither a fedslim FastStrategy nor a Flower Strategy")
    STRATEGIES[name] = strategy


def strategy_class(spec: str) -> type[FastStrategy] | type[Strategy]:
    """The class a registered name or a ``module:Class`` import path names."""
    if ":" not in spec:
        if spec not in STRATEGIES:
            raise StrategyConfigError(
                f"unknown strategy {spec!r}; choose one of {', '.join(sorted(STRATEGIES))} or give module:Class"
            )
        return STRATEGIES[spec]
    module_name, _, attribute = spec.partition(":")
    if not module_name.strip() or not attribute.strip():
        raise StrategyConfigError(f"strategy {spec!r} is not module:Class, e.g. mypkg.strategies:MyStrategy")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except Exception as exc:  # whatever the user's module raises while it is imported
        raise StrategyConfigError(f"cannot import strategy {spec!r}: {type(exc).__name__}: {exc}") from exc
    if not _is_strategy(found):
        raise StrategyConfigError(f"{spec} is neither a fedslim FastStrategy nor a Flower Strategy")
    return found


def parse_strategy_args(items: str | Iterable[str]) -> dict[str, Any]:
    """``["beta=0.5", "p-estimate=fedau"]`` or ``"beta=0.5,p-estimate=fedau"`` -> keyword arguments."""
    if isinstance(items, str):
        try:
            items = split_repeated(items)
        except ConfigError as exc:
            raise StrategyConfigError(f"strategy arguments: {exc}") from exc
    args: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise StrategyConfigError(f"strategy argument {item!r} is not key=value")
        name = key.strip().replace("-", "_")
        if name in args:
            raise StrategyConfigError(f"strategy argument {key.strip()} is given twice")
        args[name] = _value(text.strip())
    return args


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build_strategy(spec: str, args: Mapping[str, Any], defaults: Mapping[str, Any]) -> FastStrategy:
    """Instantiate ``spec`` with ``args``, plus each of ``defaults`` that it accepts and ``args`` does not set.

    ``defaults`` carries what the run config decides (``fraction_train``,
    ``server_lr``, ``seed``). A Flower strategy comes wrapped in the adapter.
    """
    cls = strategy_class(spec)
    parameters = _accepted_parameters(cls)
    kwargs = {k: v for k, v in defaults.items() if k in parameters}
    kwargs.update(args)
    try:
        strategy = cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:
        raise StrategyConfigError(f"{spec}: {exc} (it takes {inspect.signature(cls)})") from exc
    except Exception as exc:  # a plug-in's constructor may raise anything
        raise StrategyConfigError(f"{spec}: {type(exc).__name__}: {exc}") from exc
    if isinstance(strategy, FastStrategy):
        return strategy
    return FlowerStrategy(strategy, seed=int(defaults.get("seed", 0)))


def _accepted_parameters(cls: type) -> set[str]:
    """Keyword names ``cls(...)`` accepts, following **kwargs up the class chain."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            return names - {"self"}
    return names - {"self"}


def strategy_for(config: RunConfig) -> FastStrategy:
    """The strategy a run config names, with its fraction, server step size and seed, behind its ``robust`` stages."""
    from fedslim.strategies.robust import RobustStrategy

    defaults = {"fraction_train": config.fraction, "server_lr": config.server_lr, "seed": config.seed}
    strategy = build_strategy(config.strategy, parse_strategy_args(config.strategy_args), defaults)
    return strategy if config.robust == "none" else RobustStrategy(strategy, config.robust)
