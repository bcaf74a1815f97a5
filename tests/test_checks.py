"""Checked inputs: bad data or a model the fast layer cannot attach to stops before round 1 with one line, a client
without examples is left out with a log row, and a node with bad data refuses; nothing trains on bad data."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedslim.channel.protocol import RefusalCode
from fedslim.cli import main
from fedslim.commlog import LOG_FILENAME
from fedslim.config import ConfigError, FastSpec, RunConfig
from fedslim.data.checks import DataError, NoExamplesError, check_data
from fedslim.data.datasets import ArrayDataset
from fedslim.task import Task

CLASSES = 5
FEATURES = 4
EXAMPLES = 20  # per client


def gaussian_mixture(seed: int, count: int) -> ArrayDataset:
    """``count`` examples of a 5-class Gaussian mixture in 4 dimensions (class means one apart)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, count)
    x = rng.normal(size=(count, FEATURES)) + np.eye(CLASSES, FEATURES)[y] * 3
    return ArrayDataset(x.astype(np.float32), y.astype(np.int64))


class Gauss(Task):
    """A tiny task: 3 clients of a Gaussian mixture, an MLP 4-16-5. Subclasses spoil client 1's data or the test
    data through :meth:`client` and :meth:`test`."""

    name = "checks-gauss"

    def build_base(self) -> nn.Module:
        return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))

    def client_data(self, config: RunConfig, partition_id: int) -> ArrayDataset:
        if not 0 <= partition_id < config.num_clients:
            raise IndexError(f"no partition {partition_id}")
        return self.client(partition_id, gaussian_mixture(partition_id + 1, EXAMPLES))

    def test_data(self, config: RunConfig) -> ArrayDataset:
        return self.test(gaussian_mixture(99, 50))

    def client(self, partition_id: int, data: ArrayDataset) -> ArrayDataset:
        return data

    def test(self, data: ArrayDataset) -> ArrayDataset:
        return data


def spoil_client_1(spoil):  # type: ignore[no-untyped-def]
    """A Gauss task whose client 1 holds ``spoil(x, y)`` instead of its data."""

    class Spoilt(Gauss):
        def client(self, partition_id: int, data: ArrayDataset) -> ArrayDataset:
            return ArrayDataset(*spoil(data.x.copy(), data.y.copy())) if partition_id == 1 else data

    return Spoilt


def labels_outside(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y[[12, 15, 17]] = [7, 5, 9]
    return x, y


def negative_label(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y[3] = -1
    return x, y


def nan_feature(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x[5, 2] = np.nan
    return x, y


def inf_features(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x[[4, 9], 0] = np.inf
    x[9, 1] = -np.inf
    return x, y


LabelsOutside = spoil_client_1(labels_outside)
NegativeLabel = spoil_client_1(negative_label)
NanFeature = spoil_client_1(nan_feature)
InfFeatures = spoil_client_1(inf_features)
ShortLabels = spoil_client_1(lambda x, y: (x, y[:18]))
FloatLabels = spoil_client_1(lambda x, y: (x, y.astype(np.float64)))
TwoDimensionalLabels = spoil_client_1(lambda x, y: (x, np.stack([y, y], axis=1)))
NarrowFeatures = spoil_client_1(lambda x, y: (x[:, :3], y))
EmptyClient = spoil_client_1(lambda x, y: (x[:0], y[:0]))


class AllEmpty(Gauss):
    def client(self, partition_id: int, data: ArrayDataset) -> ArrayDataset:
        return data.subset(np.arange(0))


class NanTest(Gauss):
    def test(self, data: ArrayDataset) -> ArrayDataset:
        x = data.x.copy()
        x[[30, 31], 1] = np.nan
        return ArrayDataset(x, data.y)


class EmptyTest(Gauss):
    def test(self, data: ArrayDataset) -> ArrayDataset:
        return data.subset(np.arange(0))


class Affine(nn.Module):
    """A linear map without nn.Linear: nothing the built-in fast layers attach to."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(CLASSES, FEATURES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class NoLinear(Gauss):
    def build_base(self) -> nn.Module:
        return Affine()


class Regression(Gauss):
    """A task with a loss of its own: float targets are its business (only their finiteness is checked)."""

    def build_base(self) -> nn.Module:
        return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 1))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return nn.functional.mse_loss(logits.squeeze(1), targets, reduction=reduction)

    def client(self, partition_id: int, data: ArrayDataset) -> ArrayDataset:
        return ArrayDataset(data.x, data.x.sum(1))


def simulate(tmp_path: Path, task: str, *flags: str) -> int:
    """``fedslim simulate`` of a Gauss task: 3 clients, 1 round, in this process; its exit code."""
    args = ["simulate", "--task", f"test_checks:{task}", "--clients", "3", "--rounds", "1", "--fraction", "1"]
    args += ["--fast", "lora", "--backend", "inline", "--out", str(tmp_path / "run"), *flags]
    try:
        return main(args)
    except SystemExit as exit_info:
        return int(exit_info.code or 0)


@pytest.mark.parametrize(
    ("task", "problem"),
    [
        ("LabelsOutside", "client_data(config, 1): 3 labels outside the model's 5 outputs (first: 7 at index 12)"),
        ("NegativeLabel", "client_data(config, 1): 1 label outside the model's 5 outputs (first: -1 at index 3)"),
        ("ShortLabels", "client_data(config, 1): 20 feature rows but 18 labels"),
        ("NanFeature", "client_data(config, 1): NaN or inf in the features of 1 example (first: example 5)"),
        ("InfFeatures", "client_data(config, 1): NaN or inf in the features of 2 examples (first: example 4)"),
        ("FloatLabels", "client_data(config, 1): labels are float64, not integer class indices"),
        ("TwoDimensionalLabels", "client_data(config, 1): labels have shape (20, 2): one integer class per example"),
        ("NarrowFeatures", "client_data(config, 1): the features do not fit the model: logits() raised RuntimeError"),
        ("AllEmpty", "client_data(): none of the 3 clients has a training example"),
        ("NanTest", "test_data(): NaN or inf in the features of 2 examples (first: example 30)"),
        ("EmptyTest", "test_data(): no examples"),
        (
            "NoLinear",
            "attach_fast(): cannot attach the lora fast layer: ValueError: the model has no nn.Linear layer to use "
            "as the head; override Task.attach_fast to name the fast tensors",
        ),
    ],
)
def test_bad_inputs_stop_simulate_before_a_node_starts_with_one_line(
    task: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert simulate(tmp_path, task) == 2
    err = capsys.readouterr().err
    assert f"error: task test_checks:{task} {problem}" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / LOG_FILENAME).exists()  # no run started


def test_a_client_without_examples_is_left_out_with_a_log_row_and_the_run_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert simulate(tmp_path, "EmptyClient", "--rounds", "2") == 0, capsys.readouterr()
    db = sqlite3.connect(tmp_path / "run" / LOG_FILENAME)
    identities = db.execute(
        "SELECT client, status, reason FROM messages WHERE round = 0 AND direction = 'up' ORDER BY client"
    ).fetchall()
    assert identities == [
        ("partition-0", "ok", None),
        ("partition-1", "rejected", "no training examples: node partition-1 takes no part in the run"),
        ("partition-2", "ok", None),
    ]
    trained = db.execute(
        "SELECT round, client, status FROM messages WHERE message_type = 'train' AND direction = 'up' "
        "ORDER BY round, client"
    ).fetchall()
    assert trained == [(r, f"partition-{c}", "ok") for r in (1, 2) for c in (0, 2)]  # never asked again


@pytest.fixture
def run_config(tmp_path: Path) -> RunConfig:
    return RunConfig(
        task="test_checks:NanFeature",
        num_clients=3,
        rounds=2,
        fraction=1.0,
        fast=FastSpec("lora"),
        codec="none",
        downstream_codec="none",
        out=str(tmp_path / "run"),
    )


def test_a_node_with_bad_data_refuses_with_its_code_and_nothing_trains_on_it(
    run_config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a deployed node: the server logs its refusal with code and reason, and the rounds go on without it."""
    import fedslim.client.app as client_app
    from fedslim.server.loop import run_federation
    from fedslim.simulation.inline import InlineGrid

    trained_on: list[bool] = []
    local_training = client_app.train_epochs

    def spy(module: nn.Module, data: ArrayDataset, *args: object) -> float:
        trained_on.append(bool(np.isfinite(data.x).all()))
        return local_training(module, data, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(client_app, "train_epochs", spy)
    grid = InlineGrid(client_app.app, run_config.num_clients)
    result = run_federation(grid, run_config, node_states=grid)  # type: ignore[arg-type]
    assert trained_on == [True] * 4  # clients 0 and 2, twice; never client 1
    db = sqlite3.connect(result.log_path)
    replies = db.execute(
        "SELECT round, client, status, reason FROM messages WHERE message_type = 'train' AND direction = 'up' "
        "ORDER BY round, client"
    ).fetchall()
    refusal = (
        f"client error {int(RefusalCode.BAD_DATA)}: partition-1: its training data fails a check: "
        "NaN or inf in the features of 1 example (first: example 5)"
    )
    assert replies == [
        (r, f"partition-{c}", *(("error", refusal) if c == 1 else ("ok", None))) for r in (1, 2) for c in range(3)
    ]
    assert [totals.accepted for totals in result.rounds] == [0, 2, 2]


def test_the_server_app_stops_on_bad_test_data_before_it_messages_a_node(
    run_config: RunConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Under `flwr run`: the ServerApp logs the one-line problem and stops before a node is sent anything."""
    from dataclasses import replace

    from flwr.app import Context, RecordDict

    import fedslim.client.app as client_app
    from fedslim.server.app import make_server_app
    from fedslim.simulation.inline import InlineGrid

    grid = InlineGrid(client_app.app, run_config.num_clients)
    grid.touched.clear()
    server_app = make_server_app(replace(run_config, task="test_checks:NanTest"))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    problem = "task test_checks:NanTest test_data(): NaN or inf in the features of 2 examples (first: example 30)"
    with pytest.raises(ConfigError, match=re.escape(problem)):
        server_app(grid, context)  # type: ignore[arg-type]
    assert [record.getMessage() for record in caplog.records if record.levelname == "ERROR"] == [
        f"fedslim: the run stops: {problem}"
    ]
    assert grid.touched == set()  # no node was sent anything
    assert not (run_config.run_dir / LOG_FILENAME).exists()


def test_a_node_whose_examples_are_gone_refuses_with_no_data() -> None:
    from fedslim.client.app import split_verdict

    task, module = Gauss(), Gauss().build_base()
    data = gaussian_mixture(1, EXAMPLES)
    assert split_verdict(task, (data, data.subset(np.arange(3))), module) is None
    assert split_verdict(task, (data.subset(np.arange(0)), None), module) == (
        RefusalCode.NO_DATA,
        "no training examples",
    )
    code, problem = split_verdict(task, (data, ArrayDataset(data.x[:3], data.y[:3] + 10)), module)  # type: ignore[misc]
    assert code == RefusalCode.BAD_DATA
    first = int(data.y[0]) + 10
    assert (
        problem
        == f"its held-out data fails a check: 3 labels outside the model's 5 outputs (first: {first} at index 0)"
    )


def test_a_task_with_its_own_loss_is_checked_for_finite_targets_only() -> None:
    task, module = Regression(), Regression().build_base()
    config = RunConfig(num_clients=3)
    check_data(task, task.client_data(config, 0), module)  # float targets: the task's own loss reads them
    data = task.client_data(config, 0)
    with pytest.raises(DataError, match=r"^NaN or inf among the labels \(first: index 2\)$"):
        check_data(task, ArrayDataset(data.x, np.where(np.arange(EXAMPLES) == 2, np.nan, data.y)), module)
    with pytest.raises(NoExamplesError, match="^no examples$"):
        check_data(task, data.subset(np.arange(0)), module)


def test_the_checks_read_data_through_the_tasks_batch_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A data type of the task's own, read by its batch(); a problem past the first chunk is found and counted."""
    import fedslim.data.checks as checks

    class Rows(Gauss):
        def batch(
            self, data: list[tuple[list[float], int]], indices: np.ndarray | slice
        ) -> tuple[object, torch.Tensor]:
            rows = data[indices]  # type: ignore[index]
            return {"x": torch.tensor([x for x, _ in rows])}, torch.tensor([y for _, y in rows])

        def logits(self, module: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
            return module(inputs["x"])

    monkeypatch.setattr(checks, "CHUNK_EXAMPLES", 8)
    task, module = Rows(), Rows().build_base()
    data = gaussian_mixture(3, EXAMPLES)
    rows = [(list(map(float, x)), int(y)) for x, y in zip(data.x, data.y)]
    check_data(task, rows, module)
    rows[9] = (rows[9][0], 5)
    rows[17] = (rows[17][0], 6)
    with pytest.raises(DataError, match=r"^2 labels outside the model's 5 outputs \(first: 5 at index 9\)$"):
        check_data(task, rows, module)


def test_deployed_nodes_own_files_an_empty_one_is_left_out_and_a_bad_one_refuses(
    run_config: RunConfig, tmp_path: Path
) -> None:
    """Nodes with their own .npz (node config data-path): an empty file declares no examples at the start, a file
    with NaN features or labels outside the model's outputs refuses each instruction with BAD_DATA, and the run
    goes on with the fourth node."""
    from dataclasses import replace

    import fedslim.client.app as client_app
    from fedslim.data.datasets import save_array_file
    from fedslim.server.loop import run_federation
    from fedslim.simulation.inline import InlineGrid

    data = gaussian_mixture(5, EXAMPLES)
    save_array_file(tmp_path / "empty.npz", data.subset(np.arange(0)))
    save_array_file(tmp_path / "nan.npz", ArrayDataset(*nan_feature(data.x.copy(), data.y)))
    save_array_file(tmp_path / "outside.npz", ArrayDataset(*labels_outside(data.x, data.y.copy())))
    config = replace(run_config, task="test_checks:Gauss", num_clients=4)
    grid = InlineGrid(client_app.app, config.num_clients)
    for (_, context), name in zip(sorted(grid.contexts.items())[1:], ("empty", "nan", "outside")):
        context.node_config = {"node-name": f"edge-{name}", "data-path": str(tmp_path / f"{name}.npz")}
        context.node_config["tasks"] = config.task
    result = run_federation(grid, config, node_states=grid)  # type: ignore[arg-type]
    db = sqlite3.connect(result.log_path)
    rows = db.execute(
        "SELECT round, client, status, reason FROM messages WHERE direction = 'up' ORDER BY round, client"
    ).fetchall()
    refusals = {
        "edge-nan": f"client error {int(RefusalCode.BAD_DATA)}: node data {tmp_path / 'nan.npz'}: "
        "features 'x' hold NaN or Inf",
        "edge-outside": f"client error {int(RefusalCode.BAD_DATA)}: edge-outside: its training data fails a check: "
        "3 labels outside the model's 5 outputs (first: 7 at index 12)",
    }
    assert rows == [
        (0, "edge-empty", "rejected", "no training examples: node edge-empty takes no part in the run"),
        (0, "edge-nan", "ok", None),
        (0, "edge-outside", "ok", None),
        (0, "partition-0", "ok", None),
        *[
            (r, client, "error", refusals[client]) if client in refusals else (r, client, "ok", None)
            for r in (1, 2)
            for client in ("edge-nan", "edge-outside", "partition-0")
        ],
    ]
