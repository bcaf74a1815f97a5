"""Where a run's base comes from: a changed pretraining rebuilds it, every run names its origin, the cache is listed
and cleared; a task named by its file, with settings of its own."""

from __future__ import annotations

import argparse
import json
import pickle
import sqlite3
import sys
from pathlib import Path

import pytest

import fedslim
from fedslim import base
from fedslim.base import BaseOrigin, cached_bases, ensure_base
from fedslim.cli import main
from fedslim.commlog import LOG_FILENAME
from fedslim.config import ConfigError, RunConfig, add_run_config_arguments, parse_task_setting
from fedslim.server.checkpoint import load_checkpoint
from fedslim.task import _referenced_task, load_task, task_for, task_module_name

TASK_SOURCE = """
import numpy as np
import torch
from torch import nn

from fedslim.data.datasets import ArrayDataset
from fedslim.task import Task


def blobs(seed: int, count: int) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, count)
    return ArrayDataset((rng.normal(size=(count, 8)) + y[:, None]).astype(np.float32), y.astype(np.int64))


class BlobTask(Task):
    name = "blob-task"
    VERSION

    def build_base(self) -> nn.Module:
        hidden = self.setting("hidden", 16)
        return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def pretrain(self, config):
        torch.manual_seed(config.seed)  # PRETRAIN
        return self.build_base()

    def client_data(self, config, partition_id: int) -> ArrayDataset:
        if partition_id >= config.num_clients:
            raise IndexError(partition_id)
        return blobs(100 + partition_id, 40)

    def test_data(self, config) -> ArrayDataset:
        return blobs(7, 100)
"""


def write_task(path: Path, pretrain: str = "torch.manual_seed(config.seed)", version: str = "") -> str:
    """The task file at ``path`` (its pretrain's first line and its base_version line as given), loaded as a new
    process would load it; returns its reference."""
    source = TASK_SOURCE.replace("torch.manual_seed(config.seed)  # PRETRAIN", pretrain).replace("VERSION", version)
    path.write_text(source, encoding="utf-8")
    sys.modules.pop(task_module_name(path.resolve()), None)
    base._PRETRAINED_HERE.clear()
    _referenced_task.cache_clear()
    load_task.cache_clear()
    return f"{path}:BlobTask"


def simulate(reference: str, out: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    args = ["simulate", "--task", reference, "--clients", "2", "--rounds", "1", "--fraction", "1", "--codec", "none"]
    args += ["--downstream-codec", "none", "--backend", "inline", "--out", str(out), "--overwrite", *flags]
    code = main(args)
    printed = capsys.readouterr().out
    assert code == 0, printed
    return " ".join(printed.split())  # rich wraps long lines


def logged_bases(out: Path) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(out / LOG_FILENAME) as db:
        return db.execute("SELECT holder, origin, path FROM bases ORDER BY holder").fetchall()


def test_a_changed_pretrain_rebuilds_the_base_and_the_header_and_log_name_its_origin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = write_task(tmp_path / "blob_task.py")
    first = task_for(RunConfig(task=reference)).base_path(RunConfig(task=reference))
    printed = simulate(reference, tmp_path / "run", capsys)
    assert f"base: pretrained now, cached at {first} (fingerprint " in printed
    assert logged_bases(tmp_path / "run") == [
        ("partition-0", "node-file", None),
        ("partition-1", "node-file", None),
        ("server", "pretrained", str(first.resolve())),
    ]

    # The next run finds it in the cache.
    printed = simulate(reference, tmp_path / "run", capsys)
    assert f"base: loaded from the cache at {first} (fingerprint " in printed
    assert ("server", "cache", str(first.resolve())) in logged_bases(tmp_path / "run")

    # Pretraining changed: another checkpoint, pretrained anew, on other weights.
    write_task(tmp_path / "blob_task.py", pretrain="torch.manual_seed(config.seed + 1)")
    second = task_for(RunConfig(task=reference)).base_path(RunConfig(task=reference))
    assert second != first and second.name.startswith("blob-task-")
    printed = simulate(reference, tmp_path / "run", capsys)
    assert f"base: pretrained now, cached at {second} (fingerprint " in printed
    fingerprints = {base.path: base.fingerprint for base in cached_bases()}
    assert fingerprints[first] != fingerprints[second]

    # So did the architecture: build_base's source is in the key too.
    write_task(tmp_path / "blob_task.py")
    source = (tmp_path / "blob_task.py").read_text().replace("nn.ReLU()", "nn.Tanh()")
    (tmp_path / "blob_task.py").write_text(source)
    sys.modules.pop(type(load_task(reference)).__module__)
    load_task.cache_clear()
    _referenced_task.cache_clear()
    third = task_for(RunConfig(task=reference)).base_path(RunConfig(task=reference))
    assert third not in (first, second)


def test_base_version_pins_the_cache_key_until_it_changes(tmp_path: Path) -> None:
    file, config = tmp_path / "blob_task.py", RunConfig(task=f"{tmp_path / 'blob_task.py'}:BlobTask")
    write_task(file, version='base_version = "1"')
    pinned = task_for(config).base_path(config)
    assert task_for(config).base_identity(config)["version"] == "1"
    write_task(file, pretrain="torch.manual_seed(config.seed)  # a comment", version='base_version = "1"')
    assert task_for(config).base_path(config) == pinned  # a cosmetic edit keeps the cached base
    write_task(file, pretrain="torch.manual_seed(config.seed)  # a comment", version='base_version = "2"')
    assert task_for(config).base_path(config) != pinned


def test_the_built_in_tasks_keep_their_cache_keys() -> None:
    """Their identity is declared (recipe, data constants), not the default's source digest: published results
    name those identities, and a pretraining change shows as a base fingerprint the results check sees."""
    names = {task: task_for(RunConfig(task=task)).base_path(RunConfig(task=task)).name for task in ("synthetic",)}
    assert names == {"synthetic": "synthetic-4568bcdda8be.pt"}
    identity = task_for(RunConfig(task="text")).base_identity(RunConfig(task="text"))
    assert identity == {"task": "text", "seed": 0, "model": "all-MiniLM-L6-v2", "classes": 8}


def test_bases_list_and_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDSLIM_CACHE", str(folder))
        assert main(["bases", "list"]) == 0
        assert capsys.readouterr().out == f"no cached base in {folder / 'bases'}\n"
        reference = write_task(tmp_path / "blob_task.py")
        for hidden in (16, 32):
            config = RunConfig(task=reference, task_settings={"hidden": hidden})
            ensure_base(task_for(config), config)
        synthetic = RunConfig(task="synthetic")
        path = ensure_base(task_for(synthetic), synthetic)
        (folder / "bases" / "notes.txt").write_text("not fedslim's")
        merged = path.with_name(f"{path.stem}.merged-{'a' * 16}.pt")
        merged.write_bytes(b"0" * 10)

        assert main(["bases", "list"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith(f"3 cached base(s) in {folder / 'bases'}, ")
        assert lines[1].split() == ["file", "task", "size", "modified", "(UTC)", "fingerprint"]
        rows = {line.split()[0]: line.split() for line in lines[2:]}
        assert sorted(row[1] for row in rows.values()) == ["blob-task", "blob-task", "synthetic"]
        assert rows[path.name][-1] == "-"  # no sidecar yet: not known without loading it

        assert main(["bases", "clear", "no-such-task"]) == 2
        assert "no cached base named no-such-task (cached: blob-task, synthetic)" in capsys.readouterr().err
        assert main(["bases", "clear", "synthetic"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"removed {path.name} (synthetic, ") and out[0].endswith(", 2 file(s))")
        assert out[-1].startswith("removed 1 cached base(s)")
        assert not path.exists() and not merged.exists() and (folder / "bases" / "notes.txt").exists()
        assert main(["bases", "clear"]) == 0
        assert capsys.readouterr().out.splitlines()[-1].startswith("removed 2 cached base(s)")
        assert [p.name for p in (folder / "bases").iterdir()] == ["notes.txt"]


def test_a_task_file_loads_under_one_module_name_in_every_process(tmp_path: Path) -> None:
    reference = write_task(tmp_path / "blob_task.py")
    task = load_task(reference)
    assert type(task).__name__ == "BlobTask" and task.name == "blob-task"
    assert type(task).__module__ == task_module_name((tmp_path / "blob_task.py").resolve())
    assert load_task(reference) is task
    assert type(pickle.loads(pickle.dumps(task))) is type(task)  # what one process pickles another loads
    with pytest.raises(ConfigError, match=r"cannot be loaded: FileNotFoundError: no task file .*missing\.py"):
        load_task(f"{tmp_path / 'missing.py'}:BlobTask")


def test_a_relative_task_file_is_made_absolute_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_task(tmp_path / "blob_task.py")
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_run_config_arguments(parser)
    config = RunConfig.from_args(parser.parse_args(["--task", "blob_task.py:BlobTask"]))
    assert config.task == f"{tmp_path.resolve() / 'blob_task.py'}:BlobTask"


def test_task_settings_reach_the_task_in_simulation_and_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = write_task(tmp_path / "blob_task.py")
    simulate(reference, tmp_path / "run", capsys, "--task-setting", "hidden=32")
    with sqlite3.connect(tmp_path / "run" / LOG_FILENAME) as db:
        config, base_parameters = db.execute("SELECT config, base_parameters FROM runs").fetchone()
    assert json.loads(config)["task_settings"] == {"hidden": 32}
    assert base_parameters == 8 * 32 + 32 + 32 * 3 + 3  # build_base read the setting
    assert load_checkpoint(tmp_path / "run").config.task_settings == {"hidden": 32}
    trained = fedslim.load_model(tmp_path / "run")  # the run's architecture, from the run's settings
    assert (32, 8) in {tuple(tensor.shape) for tensor in trained.state_dict().values()}
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--resume", str(tmp_path / "run"), "--task-setting", "hidden=8"])
    assert exit_info.value.code == 2
    assert "drop --task-setting" in capsys.readouterr().err


def test_task_settings_travel_as_task_keys_and_other_unknown_keys_are_refused() -> None:
    config = RunConfig.from_flat({"task": "synthetic", "task.hidden": 32, "task.mode": "fast", "task.scale": 0.5})
    assert config.task_settings == {"hidden": 32, "mode": "fast", "scale": 0.5}
    sent = config.client_task()
    assert {k: v for k, v in sent.items() if k.startswith("task.")} == {"task.hidden": 32, "task.mode": "fast",
                                                                        "task.scale": 0.5}  # fmt: skip
    assert RunConfig.from_flat(sent) == config and hash(RunConfig.from_flat(sent)) == hash(config)
    assert task_for(config).settings == {"hidden": 32, "mode": "fast", "scale": 0.5}
    assert task_for(config) is not task_for(RunConfig(task="synthetic"))  # the built-in instance keeps none
    assert task_for(RunConfig(task="synthetic")).settings == {}
    with pytest.raises(ConfigError, match="unknown config key 'hidden'"):
        RunConfig.from_flat({"hidden": 32})
    with pytest.raises(ConfigError, match="unknown config key 'tasks.hidden'"):
        RunConfig.from_flat({"tasks.hidden": 32})
    with pytest.raises(ConfigError, match="task setting 'a b': a name is letters"):
        RunConfig(task_settings={"a b": 1})
    with pytest.raises(ConfigError, match="task setting x: list values are not settings"):
        RunConfig(task_settings={"x": [1]})  # type: ignore[dict-item]


def test_a_task_reads_a_setting_with_its_default_and_type() -> None:
    task = task_for(RunConfig(task="synthetic", task_settings={"hidden": 32, "rate": 1, "name": "x"}))
    assert task.setting("hidden", 16) == 32 and task.setting("missing", 16) == 16
    assert task.setting("rate", 0.5) == 1.0 and isinstance(task.setting("rate", 0.5), float)
    with pytest.raises(ConfigError, match="task setting name must be of type int .*got 'x'"):
        task.setting("name", 3)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("hidden=32", ("hidden", 32)), ("rate=0.5", ("rate", 0.5)), ("on=true", ("on", True)),
     ("mode=fast", ("mode", "fast")), ('label="a b"', ("label", "a b")), ("list=[1]", ("list", "[1]"))],
)  # fmt: skip
def test_a_task_setting_flag_is_parsed_as_toml(text: str, parsed: tuple[str, object]) -> None:
    assert parse_task_setting(text) == parsed


def test_a_task_setting_flag_without_a_value_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--task-setting", "hidden"])
    assert exit_info.value.code == 2
    assert "--task-setting 'hidden': give NAME=VALUE" in capsys.readouterr().err


def test_the_origin_names_where_a_base_came_from() -> None:
    from fedslim.base import BaseProvenance

    fingerprint = "ab" * 32
    assert BaseProvenance(BaseOrigin.PROVISIONED, None, fingerprint).describe() == (
        "provisioned by the server (fingerprint abababababababab)"
    )
    assert BaseProvenance(BaseOrigin.NODE_FILE, Path("/b.pt"), fingerprint).describe() == (
        "the node's own file /b.pt (fingerprint abababababababab)"
    )
