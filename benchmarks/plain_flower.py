"""A plain Flower 1.39 FedAvg app on fedslim's data, model and local SGD: the reference of benchmarks/overhead.py.

Nothing of fedslim's wire layer is used: the server is Flower's own
:class:`~flwr.serverapp.strategy.FedAvg` driven by its ``start()`` loop, the
client a bare :class:`~flwr.clientapp.ClientApp` that loads the full model
from the message's ArrayRecord, trains it and replies with the full model and
``num-examples``. What it shares with fedslim is the work both must do:

- the model: the pretrained base checkpoint of the run
  (:func:`fedslim.task.prepared_base`), every parameter trained, as
  fedslim's ``--fast full``;
- the data: ``load_federation(config).clients[partition_id]`` and the test set;
- the local SGD: :func:`fedslim.training.train_epochs` seeded with
  ``[seed, server_round, partition_id]``, as fedslim's client;
- the clients each round: :class:`SameSampleFedAvg` replaces only the node
  choice of FedAvg's ``configure_train`` (``random.sample``) with fedslim's
  rule (nodes ordered by partition id, positions drawn by
  ``np.random.default_rng([seed, server_round])``); the partition id of each
  node comes from one query message to every node before round 1;
- the central evaluation: :func:`fedslim.training.evaluate` on the test set,
  as FedAvg's ``evaluate_fn``, before round 1 and after every round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedslim.config import FastSpec, RunConfig
from fedslim.data.datasets import load_federation
from fedslim.task import prepared_base, task_for
from fedslim.training import train_epochs

ARRAYS_KEY, CONFIG_KEY, METRICS_KEY = "arrays", "config", "metrics"  # FedAvg's default record keys
IDENTITY_KEY = "identity"
NODE_WAIT_S = 120.0

app = ClientApp()


def task_record(config: RunConfig) -> ConfigRecord:
    """What a plain client needs to find its data and train: sent as FedAvg's train config."""
    return ConfigRecord(
        {
            "task": config.task,
            "num-clients": config.num_clients,
            "seed": config.seed,
            "dirichlet-alpha": config.dirichlet_alpha,
            "synthetic-alpha": config.synthetic_alpha,
            "synthetic-beta": config.synthetic_beta,
            "data-dir": str(config.resolved_data_dir()),
            "local-epochs": config.local_epochs,
            "lr": config.lr,
            "batch-size": config.batch_size,
        }
    )


def config_of(task: ConfigRecord) -> RunConfig:
    """The run config a plain client rebuilds from :func:`task_record` (its data and SGD fields)."""
    return RunConfig(
        overwrite=True,  # a benchmark's run directories are its own: a rerun replaces them
        task=str(task["task"]),
        num_clients=int(task["num-clients"]),  # type: ignore[arg-type]
        seed=int(task["seed"]),  # type: ignore[arg-type]
        dirichlet_alpha=float(task["dirichlet-alpha"]),  # type: ignore[arg-type]
        synthetic_alpha=float(task["synthetic-alpha"]),  # type: ignore[arg-type]
        synthetic_beta=float(task["synthetic-beta"]),  # type: ignore[arg-type]
        data_dir=str(task["data-dir"]),
        local_epochs=int(task["local-epochs"]),  # type: ignore[arg-type]
        lr=float(task["lr"]),  # type: ignore[arg-type]
        batch_size=int(task["batch-size"]),  # type: ignore[arg-type]
        fast=FastSpec(kind="full", seed=int(task["seed"])),  # type: ignore[arg-type]
    )


@lru_cache(maxsize=2)
def full_model(config: RunConfig) -> nn.Module:
    """The network on the run's pretrained base, built once per process (its weights are overwritten each round)."""
    return prepared_base(config).build(config.fast).module


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition id (it orders and samples nodes by it)."""
    partition_id = int(context.node_config["partition-id"])
    return Message(RecordDict({IDENTITY_KEY: ConfigRecord({"partition-id": partition_id})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global model, run the local epochs on this node's partition, reply with the model."""
    task = msg.content.config_records[CONFIG_KEY]
    config = config_of(task)
    server_round = int(task["server-round"])  # type: ignore[arg-type]
    partition_id = int(context.node_config["partition-id"])
    model = full_model(config)
    model.load_state_dict(msg.content.array_records[ARRAYS_KEY].to_torch_state_dict())
    data = load_federation(config).clients[partition_id]
    objective = task_for(config)
    loss = train_epochs(
        model,
        data,
        objective,
        objective.optimizer(list(model.parameters()), config),
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        seed=[config.seed, server_round, partition_id],
    )
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(model.state_dict()),
            METRICS_KEY: MetricRecord({"train-loss": float(loss), "num-examples": len(data)}),
        }
    )
    return Message(content, reply_to=msg)


class SameSampleFedAvg(FedAvg):
    """Flower's FedAvg, except that ``configure_train`` samples the nodes fedslim samples.

    fedslim's rule (:meth:`fedslim.strategies.base.FastStrategy.sample`):
    nodes listed by partition id, ``max(1, round(fraction * N))`` positions
    drawn without replacement by ``np.random.default_rng([seed, server_round])``,
    the chosen node ids sent in increasing order; and there is no federated
    evaluation (fedslim has none). Everything else (the messages, the
    aggregation, the metrics) is FedAvg's own.
    """

    def __init__(self, partition_of: dict[int, int], seed: int, fraction_train: float) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=1)
        self.partition_of = partition_of
        self.seed = seed
        self.sampled: dict[int, list[int]] = {}  # partition ids sampled in each round

    def sample(self, server_round: int) -> list[int]:
        nodes = sorted(self.partition_of, key=self.partition_of.__getitem__)
        size = min(len(nodes), max(1, round(self.fraction_train * len(nodes))))
        rng = np.random.default_rng([self.seed, server_round])
        chosen = sorted(nodes[i] for i in rng.choice(len(nodes), size=size, replace=False))
        self.sampled[server_round] = sorted(self.partition_of[node] for node in chosen)
        return chosen

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, self.sample(server_round), MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation, as in fedslim: the model is evaluated centrally (``evaluate_fn``)."""
        return []


def partition_ids(grid: Grid, num_nodes: int) -> dict[int, int]:
    """Wait for ``num_nodes`` nodes, then ask each for its partition id (one query message per node)."""
    deadline = time.monotonic() + NODE_WAIT_S
    while len(nodes := list(grid.get_node_ids())) < num_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {num_nodes} nodes connected after {NODE_WAIT_S:.0f} s")
        time.sleep(0.2)
    queries = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    replies = list(grid.send_and_receive(queries, timeout=NODE_WAIT_S))
    found = {
        reply.metadata.src_node_id: int(reply.content.config_records[IDENTITY_KEY]["partition-id"])  # type: ignore[arg-type]
        for reply in replies
        if not reply.has_error()
    }
    if len(found) < num_nodes:
        raise RuntimeError(f"only {len(found)} of {num_nodes} nodes reported their partition id")
    return found


@dataclass(frozen=True)
class PlainResult:
    """Central evaluation of each round, round 0 (the base) included, and the partitions each round sampled."""

    history: dict[int, tuple[float, float]]
    sampled: dict[int, list[int]]


def run_plain(
    grid: Grid, config: RunConfig, on_round: Callable[[int, float, float], None] | None = None
) -> PlainResult:
    """Run ``config.rounds`` rounds of plain FedAvg on ``grid``.

    ``on_round(server_round, accuracy, loss)`` is called as each round's
    central evaluation ends (round 0: the initial model).
    """
    base = prepared_base(config)
    test = load_federation(config).test
    server_model = base.build(FastSpec(kind="full", seed=config.seed)).module
    history: dict[int, tuple[float, float]] = {}

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        server_model.load_state_dict(arrays.to_torch_state_dict())
        result = base.task.evaluate(server_model, test)
        history[server_round] = (result.accuracy, result.loss)
        if on_round:
            on_round(server_round, result.accuracy, result.loss)
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    strategy = SameSampleFedAvg(partition_ids(grid, config.num_clients), config.seed, config.fraction)
    strategy.start(
        grid,
        ArrayRecord(base.state),
        num_rounds=config.rounds,
        timeout=config.round_timeout,
        train_config=task_record(config),
        evaluate_fn=central_evaluation,
    )
    return PlainResult(history, strategy.sampled)


def make_server_app(
    config: RunConfig,
    on_round: Callable[[int, float, float], None] | None = None,
    on_finish: Callable[[PlainResult], None] | None = None,
) -> ServerApp:
    """A ServerApp running :func:`run_plain` (for Flower's simulation engine)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_plain(grid, config, on_round)
        if on_finish:
            on_finish(result)

    return server_app
