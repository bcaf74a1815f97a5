"""`simulate`: run a fedslim federation in Flower's simulation engine, in this process."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable

from flwr.app import ConfigRecordValues
from flwr.serverapp import Grid

from fedslim.commlog import RoundTotals
from fedslim.config import ConfigError, RunConfig
from fedslim.data.checks import attached_model, check_partitions, checked_test_data
from fedslim.server.loop import RunResult
from fedslim.simulation.interrupt import ServerStopper, stop_on_interrupt
from fedslim.task import prepared_base, task_for


def _hide_run_simulation_deprecation(record: logging.LogRecord) -> bool:
    # fedslim calls run_simulation on purpose (in-process, with a progress display).
    return "run_simulation` function is deprecated" not in record.getMessage()


BACKENDS = ("flower", "inline")


def _composed(*wrappers: Callable[[Grid], Grid] | None) -> Callable[[Grid], Grid] | None:
    """The given wrappers applied in turn, the first innermost (None without any)."""
    present = [wrap for wrap in wrappers if wrap is not None]
    if not present:
        return None

    def wrap(grid: Grid) -> Grid:
        for each in present:
            grid = each(grid)
        return grid

    return wrap


def check_inputs(config: RunConfig) -> None:
    """What the task gives the run, checked before any node starts (a ConfigError naming the first problem): the
    fast layer attaches to its base, its test data and every simulated client's data pass the checks of
    :mod:`fedslim.data.checks`. All the clients' data comes from the task's one ``client_data``, so a bad
    partition is the task's error, not a client's; a partition without examples is left out of the run."""
    task = task_for(config)
    module = attached_model(prepared_base(config), config.fast, config.task).module
    checked_test_data(task, task.test_data(config), module, config.task)
    check_partitions(task, config, module)


def check_backend(config: RunConfig, backend: str) -> None:
    """A ConfigError where the run config asks for what ``backend`` does not have (a Ray cluster)."""
    if config.ray_address and backend != "flower":
        raise ConfigError(
            f"ray-address {config.ray_address} needs --backend flower (the {backend} backend runs no Ray)"
        )


def simulate(
    config: RunConfig,
    on_round: Callable[[RoundTotals], None] | None = None,
    verbose: bool = False,
    backend: str = "flower",
) -> RunResult:
    """Run ``config`` with one virtual SuperNode per client.

    The data is loaded and checked and the base pretrained (once, cached)
    before any node starts, so a missing dataset or task, or bad data, fails
    fast with its own message.

    ``backend="flower"`` runs Flower's simulation engine (Ray workers);
    ``"inline"`` delivers every message to the ClientApp in this process
    (:class:`~fedslim.simulation.inline.InlineGrid`): the same loop and client
    code, sequential, no start-up cost, for sweeps of many runs.

    Ctrl-C raises ``KeyboardInterrupt`` here once the server has stopped,
    its last checkpoint as it was (:mod:`fedslim.simulation.interrupt`).
    """
    from fedslim.client.app import app as client_app
    from fedslim.server.loop import run_federation
    from fedslim.simulation.attacks import attack_wrapper
    from fedslim.simulation.faults import fault_wrapper
    from fedslim.strategies.registry import strategy_for

    if backend not in BACKENDS:
        raise ValueError(f"unknown simulation backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_backend(config, backend)
    strategy_for(config)  # a bad strategy or argument fails here, before any node starts
    wrap_grid = _composed(attack_wrapper(config), fault_wrapper(config))  # so does a bad attack spec
    config.torch_device()  # so does a device this machine does not have
    check_inputs(config)
    if backend == "inline":
        from fedslim.simulation.inline import InlineGrid

        grid = InlineGrid(client_app, config.num_clients)
        return run_federation(
            wrap_grid(grid) if wrap_grid else grid,  # type: ignore[arg-type]
            config,
            on_round=on_round,
            node_states=grid,
        )

    from flwr.simulation import run_simulation

    from fedslim.server.app import make_server_app

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:
        flwr_logger = logging.getLogger("flwr")
        flwr_logger.setLevel(logging.WARNING)
        flwr_logger.addFilter(_hide_run_simulation_deprecation)  # a no-op when already added
    results: list[RunResult] = []
    backend_config: dict[str, dict[str, ConfigRecordValues]] = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"logging_level": "ERROR" if not verbose else "INFO", "log_to_driver": verbose},
    }
    if config.ray_address:
        from fedslim.simulation.ray_cluster import join_cluster

        base = prepared_base(config)
        join_cluster(config.ray_address, base.path, base.root_fingerprint, verbose)
    # Ctrl-C stops the server's thread too, at its next grid call, instead of leaving it waiting out a round.
    stopper = ServerStopper()
    try:
        with warnings.catch_warnings(), stop_on_interrupt(stopper.stop, quiet=not verbose):
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(
                server_app=make_server_app(
                    config, stopper.on_round(on_round), results.append, wrap_grid=_composed(stopper.wrap, wrap_grid)
                ),
                client_app=client_app,
                num_supernodes=config.num_clients,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
    except KeyboardInterrupt:
        stopper.stop_server()
        raise
    if not results:
        raise RuntimeError("the simulation ended before the server finished its rounds (see the log above)")
    return results[0]
