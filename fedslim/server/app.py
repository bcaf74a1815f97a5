"""The fedslim ServerApp, as loaded by `flwr run .` and by `fedslim simulate`."""

from __future__ import annotations

from collections.abc import Callable
from logging import ERROR

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedslim.commlog import RoundTotals
from fedslim.config import ConfigError, RunConfig
from fedslim.report import log_round_table
from fedslim.server.loop import RunResult, run_federation


def make_server_app(
    config: RunConfig | None = None,
    on_round: Callable[[RoundTotals], None] | None = None,
    on_finish: Callable[[RunResult], None] | None = None,
    wrap_grid: Callable[[Grid], Grid] | None = None,
) -> ServerApp:
    """A ServerApp running ``config``, or the run config Flower passes when None.

    ``on_round`` is called after each round is logged, ``on_finish`` with the
    result of the whole run; ``wrap_grid``, if given, wraps Flower's grid
    before the run uses it (simulated attackers).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = config or RunConfig.from_flat(context.run_config)
        try:
            result = run_federation(wrap_grid(grid) if wrap_grid else grid, run_config, on_round=on_round)
        except ConfigError as exc:  # the task's inputs or the run config: one line before Flower's own report
            log(ERROR, "fedslim: the run stops: %s", exc)
            raise
        if on_finish:
            on_finish(result)
        else:
            log_round_table(result.run_id, result.rounds, run_config.num_clients)

    return server_app


app = make_server_app()
