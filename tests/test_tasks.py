"""The task API: a user's own model and data, named by module:object, runs like a built-in task."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import docs_example_task, write_docs_example

from fedslim.cli import main
from fedslim.commlog import LOG_FILENAME
from fedslim.config import ConfigError, FastSpec, RunConfig
from fedslim.task import Task, load_task, prepared_base, task_for
from fedslim.tasks.benchmarks import BenchmarkTask

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")


def test_the_docs_example_is_a_complete_task_in_under_60_lines() -> None:
    source = docs_example_task()
    assert len(source.splitlines()) < 60
    assert "class MyTask(Task)" in source


@needs_fmnist
def test_the_docs_example_runs_in_simulation_by_module_and_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks, data = write_docs_example(tmp_path)
    monkeypatch.syspath_prepend(str(tasks))
    out = tmp_path / "run"
    flags = ["--task", "my_task:MyTask", "--data-dir", str(data), "--clients", "4", "--rounds", "2"]
    flags += ["--fraction", "0.5", "--fast", "lora", "--codec", "topk:0.1+q8+lzma", "--backend", "inline"]
    assert main(["simulate", *flags, "--out", str(out)]) == 0, capsys.readouterr().out

    task = load_task("my_task:MyTask")
    assert type(task).__name__ == "MyTask" and task.name == "my-task"
    config = RunConfig(task="my_task:MyTask", data_dir=str(data), num_clients=4)
    base = prepared_base(config)
    assert base.path.name.startswith("my-task-")  # its own base, cached under its name
    fast = base.build(FastSpec("lora")).num_fast_parameters()
    db = sqlite3.connect(out / LOG_FILENAME)
    logged_config, logged_fast = db.execute("SELECT config, fast_parameters FROM runs").fetchone()
    assert json.loads(logged_config)["task"] == "my_task:MyTask"
    assert logged_fast == fast  # the fast layer the task attached: only it is exchanged
    uploads = db.execute("SELECT status FROM messages WHERE message_type = 'train' AND direction = 'up'").fetchall()
    assert uploads == [("ok",)] * 4
    accuracies = [a for (a,) in db.execute("SELECT accuracy FROM rounds ORDER BY round")]
    assert len(accuracies) == 3 and all(0.0 <= a <= 1.0 for a in accuracies)


def test_a_task_object_or_a_task_class_is_loaded_and_anything_else_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "several_tasks.py").write_text(
        "from fedslim.tasks.benchmarks import BenchmarkTask\n"
        "class Synthetic(BenchmarkTask):\n"
        "    def __init__(self):\n"
        "        super().__init__('synthetic')\n"
        "instance = Synthetic()\n"
        "not_a_task = 3\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(load_task("several_tasks:Synthetic"), BenchmarkTask)
    assert load_task("several_tasks:instance") is load_task("several_tasks:instance")
    with pytest.raises(ConfigError, match="is a int, not a fedslim.task.Task"):
        load_task("several_tasks:not_a_task")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        load_task("several_tasks:missing")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        load_task("no_such_module_anywhere:Task")


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("mnist", "unknown task 'mnist'; use synthetic-transfer, synthetic, fmnist, text, module:object or path"),
        ("no_such_module_anywhere:Task", "task 'no_such_module_anywhere:Task' cannot be loaded"),
        ("json:loads", "task 'json:loads' is a function, not a fedslim.task.Task"),
    ],
)
def test_a_bad_task_is_one_line_naming_it(task: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--task", task])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_built_in_benchmarks_are_tasks() -> None:
    for name in ("synthetic", "fmnist"):
        task = task_for(RunConfig(task=name))
        assert isinstance(task, Task) and task.name == name


def test_a_task_gives_its_own_loss_and_optimizer_to_the_local_loop(small_config: RunConfig) -> None:
    """The local loop runs the task's optimizer and loss: Adam on a doubled loss is another run than SGD."""
    import torch

    from fedslim.training import train_epochs

    class AdamTask(BenchmarkTask):
        def __init__(self) -> None:
            super().__init__("synthetic")

        def optimizer(self, params: list[torch.nn.Parameter], config: RunConfig) -> torch.optim.Optimizer:
            return torch.optim.Adam(params, lr=config.lr)

        def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
            return 2.0 * torch.nn.functional.cross_entropy(logits, targets, reduction=reduction)

    base = prepared_base(small_config)
    data = base.task.client_data(small_config, 0)
    losses = {}
    for name, task in (("default", base.task), ("adam", AdamTask())):
        model = base.build(small_config.fast)
        optimizer = task.optimizer(model.fast_parameters(), small_config)
        losses[name] = train_epochs(model.module, data, task, optimizer, 1, 16, seed=0)
        assert isinstance(optimizer, torch.optim.Adam if name == "adam" else torch.optim.SGD)
    assert losses["adam"] != losses["default"] and np.isfinite(losses["adam"])


def test_the_device_is_resolved_here_and_sent_to_clients_only_when_not_cpu() -> None:
    import torch

    assert RunConfig(device="auto").torch_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert "device" not in RunConfig().client_task()
    assert RunConfig(device="auto").client_task()["device"] == "auto"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
def test_asking_for_cuda_without_one_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "device cuda: torch sees no CUDA device on this machine" in capsys.readouterr().err


def _node(**node_config: object) -> Any:
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=11, node_config=dict(node_config), state=RecordDict(), run_config={})


def test_a_deployed_node_imports_only_the_tasks_it_agreed_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedslim.channel.protocol import Refusal, RefusalCode
    from fedslim.client.app import node_task
    from fedslim.deploy.commands import NodeSettings

    (tmp_path / "agreed_task.py").write_text(
        "from fedslim.tasks.benchmarks import BenchmarkTask\nclass Mine(BenchmarkTask):\n"
        "    def __init__(self):\n        super().__init__('synthetic')\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = RunConfig(task="agreed_task:Mine")
    with pytest.raises(Refusal) as refused:
        node_task(config, _node(**{"node-name": "edge-1"}))
    assert refused.value.code == RefusalCode.BAD_REQUEST and "--task agreed_task:Mine" in str(refused.value)
    assert "agreed_task" not in sys.modules  # refused before anything was imported
    agreed = NodeSettings("edge-1", tasks=("other:Task", "agreed_task:Mine")).node_config()
    assert 'tasks="other:Task,agreed_task:Mine"' in agreed
    assert (
        type(node_task(config, _node(**{"node-name": "edge-1", "tasks": "other:Task,agreed_task:Mine"}))).__name__
        == "Mine"
    )
    assert node_task(RunConfig(task="fmnist"), _node(**{"node-name": "edge-1"})).name == "fmnist"  # built in: no list
    assert type(node_task(config, _node(**{"partition-id": 0}))).__name__ == "Mine"  # a simulated node


def test_a_task_module_that_raises_or_an_unhashable_task_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_tasks.py").write_text(
        "from dataclasses import dataclass\nfrom fedslim.task import Task\n"
        "class Abstract(Task):\n    pass\n"
        "@dataclass\nclass Unhashable(Task):\n    def build_base(self): ...\n"
        "    def client_data(self, config, partition_id): ...\n    def test_data(self, config): ...\n",
        encoding="utf-8",
    )
    (tmp_path / "raising_task.py").write_text("raise RuntimeError('no GPU driver')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="cannot be loaded: TypeError: Can't instantiate abstract class"):
        load_task("broken_tasks:Abstract")
    with pytest.raises(ConfigError, match="must be hashable"):
        load_task("broken_tasks:Unhashable")
    with pytest.raises(ConfigError, match="cannot be loaded: RuntimeError: no GPU driver"):
        load_task("raising_task:Thing")


def test_an_unknown_device_is_refused_by_the_config() -> None:
    with pytest.raises(ConfigError, match="unknown device 'gpu'; choose one of cpu, cuda, auto"):
        RunConfig(device="gpu")
