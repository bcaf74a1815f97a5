"""The fedslim ClientApp: check the resident base, train the fast layer, reply with its delta."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedslim.adapters import FastSlowModel
from fedslim.base import ResidentBase, default_base_path, load_base
from fedslim.codec import DenseCodec
from fedslim.config import ConfigError, FastSpec, RunConfig
from fedslim.messages import CONFIG_KEY, DELTA_KEY, FAST_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, identity_reply
from fedslim.simulation.datasets import ArrayDataset, DatasetMissingError, load_federation
from fedslim.training import train_epochs

# Error codes of fedslim's refusals (Flower's own codes are below 100).
BASE_MISMATCH = 1001
BASE_MISSING = 1002
BAD_REQUEST = 1003

app = ClientApp()


class Refusal(Exception):
    """The client refuses the request; the reply carries ``code`` and the reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        return Message(handle_train(msg, context), reply_to=msg)
    except Refusal as refusal:
        return Message(Error(code=refusal.code, reason=str(refusal)), reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Report this node's stable client key (the server orders and samples nodes by it)."""
    if "partition-id" in context.node_config:
        key = f"partition-{context.node_config['partition-id']}"
    else:
        key = str(context.node_config.get("node-name") or f"node-{context.node_id}")
    return identity_reply(msg, key)


def handle_train(msg: Message, context: Context) -> RecordDict:
    """Train the fast layer received in ``msg`` and return the reply content.

    Raises :class:`Refusal` when the request cannot be honoured: the resident
    base is missing or differs from the server's, or the request is malformed.
    """
    task = dict(msg.content.config_records[CONFIG_KEY])
    expected_fingerprint = str(task.pop("base-fingerprint", ""))
    server_round = task.pop("server-round", 0)
    if not isinstance(server_round, int):
        raise Refusal(BAD_REQUEST, f"bad task config: server-round must be an integer, got {server_round!r}")
    try:
        config = RunConfig.from_flat(task)
    except (ConfigError, TypeError) as exc:
        raise Refusal(BAD_REQUEST, f"bad task config: {exc}") from exc

    base = resident_base(context, config)
    if base.fingerprint != expected_fingerprint:
        raise Refusal(
            BASE_MISMATCH,
            f"base fingerprint mismatch: the server expects {expected_fingerprint[:16]}..., "
            f"this node's base {base.path} is {base.fingerprint[:16]}...; refusing to train on a different base",
        )

    model = fast_model(base, config.fast)
    codec = DenseCodec()
    try:
        received = codec.decode(msg.content.array_records[FAST_KEY], model.fast_shapes())
    except (KeyError, ValueError) as exc:
        raise Refusal(BAD_REQUEST, f"bad fast state from the server: {exc}") from exc
    model.load_fast_state(received)

    data = local_data(context, config)
    partition_id = int(context.node_config.get("partition-id", 0))
    loss = train_epochs(
        model.module,
        model.fast_parameters(),
        data,
        epochs=config.local_epochs,
        lr=config.lr,
        batch_size=config.batch_size,
        seed=[config.seed, server_round, partition_id],
    )
    trained = model.fast_state()
    delta = {name: trained[name] - received[name] for name in trained}
    return RecordDict(
        {
            DELTA_KEY: codec.encode(delta),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: len(data), "train-loss": float(loss)}),
        }
    )


def resident_base(context: Context, config: RunConfig) -> ResidentBase:
    """The base checkpoint this node holds: ``base-path`` from the node config, else the benchmark cache."""
    path = Path(str(context.node_config.get("base-path") or default_base_path(config)))
    try:
        return load_base(path, config.dataset)
    except FileNotFoundError as exc:
        raise Refusal(BASE_MISSING, f"no resident base on this node: {exc}") from exc


@lru_cache(maxsize=4)
def fast_model(base: ResidentBase, spec: FastSpec) -> FastSlowModel:
    """The base with the fast layer attached, built once per process and reused across rounds."""
    return base.build(spec)


def local_data(context: Context, config: RunConfig) -> ArrayDataset:
    """This node's training partition (simulation: by ``partition-id``)."""
    if "partition-id" not in context.node_config:
        raise Refusal(BAD_REQUEST, "node_config has no partition-id: this node has no training data assigned")
    partition_id = int(context.node_config["partition-id"])
    try:
        clients = load_federation(config).clients
    except DatasetMissingError as exc:
        raise Refusal(BAD_REQUEST, str(exc)) from exc
    if not 0 <= partition_id < len(clients):
        raise Refusal(BAD_REQUEST, f"partition-id {partition_id} out of range for {len(clients)} clients")
    return clients[partition_id]
