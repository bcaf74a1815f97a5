"""The trained model out: RUN_DIR/model/, load_model, and the merged and peft files that need no fedslim."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sized
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import fedslim
import fedslim.export as export
from fedslim.adapters import DeltaAdapted, FastSlowModel, attach_fast_layer, state_digest
from fedslim.base import save_base
from fedslim.cli import main
from fedslim.commlog import RoundTotals
from fedslim.config import ConfigError, FastSpec, RunConfig
from fedslim.export import (
    CONSOLIDATED_BASE_FILENAME,
    FAST_FILENAME,
    MANIFEST_FILENAME,
    MERGED_FILENAME,
    MODEL_DIRNAME,
    PEFT_DIRNAME,
    load_model,
    merged_state,
    open_model,
    write_peft_adapter,
)
from fedslim.logs.reader import RunLog
from fedslim.models import SyntheticMLP
from fedslim.server.checkpoint import load_checkpoint, node_personal_state
from fedslim.simulation.simulate import simulate
from fedslim.task import Task, load_task, prepared_base

# float32 logits of a model with its fast layer attached against the same model folded into one set of weights
# (or run through peft): the sums are ordered otherwise, so they agree to rounding, not bit for bit.
LOGITS_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def run_config(tmp_path: Path, **changes: object) -> RunConfig:
    config = RunConfig(
        task="synthetic",
        num_clients=4,
        rounds=2,
        fraction=0.5,
        fast=FastSpec("lora", rank=2),
        out=str(tmp_path / "run"),
    )
    return replace(config, **changes)  # type: ignore[arg-type]


def final_accuracy(run_dir: Path) -> tuple[float, float]:
    with RunLog(str(run_dir)) as log:
        last = log.rounds()[-1]
    return last.accuracy, last.loss


def sample_inputs(config: RunConfig) -> torch.Tensor:
    task = load_task(config.task)
    inputs, _ = task.batch(task.test_data(config), slice(0, 64))
    return inputs


def logits(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(inputs)


def base_module(config: RunConfig, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The task's own module with the run's base weights (or ``state``), without anything of fedslim's."""
    module = load_task(config.task).build_base()
    module.load_state_dict(state if state is not None else prepared_base(config).state)
    return module


def check_export_round_trip(run_dir: Path, out: Path) -> None:
    """``load_model`` evaluates to the run's logged final accuracy exactly; the merged file loaded into the task's
    own module, and the peft adapter on the base it applies to, give the same logits (a LoRA run)."""
    config = open_model(run_dir).manifest.run_config()
    task = load_task(config.task)
    module = load_model(run_dir)
    result = task.evaluate(module, task.test_data(config))
    assert (result.accuracy, result.loss) == final_accuracy(run_dir)
    assert main(["export", str(run_dir), "--out", str(out), "--merged"]) == 0
    inputs = sample_inputs(config)
    expected = logits(module, inputs)
    merged = base_module(config, load_file(out / MERGED_FILENAME))
    assert torch.allclose(logits(merged, inputs), expected, **LOGITS_TOLERANCE)
    consolidated = out / CONSOLIDATED_BASE_FILENAME  # the base a consolidated run's adapter applies to
    peft_base = base_module(config, load_file(consolidated) if consolidated.exists() else None)
    peft_model = PeftModel.from_pretrained(peft_base, out / PEFT_DIRNAME)
    assert torch.allclose(logits(peft_model, inputs), expected, **LOGITS_TOLERANCE)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    """LoRA on fc2 with its bias fast, fc1 fast as a whole (below lora-min-params) and the head: each kind of
    fast tensor peft has a form for. Compressed both ways, so the replica is not the server's exact state."""
    fast = FastSpec("lora", rank=2, biases=True, lora_min_params=20_000)
    config = run_config(tmp_path_factory.mktemp("lora"), fast=fast, codec="topk:0.3+q8", downstream_codec="q8")
    simulate(config, backend="inline")
    return config


def test_load_model_evaluates_to_the_runs_final_accuracy_exactly(lora_run: RunConfig) -> None:
    module = fedslim.load_model(lora_run.run_dir)
    assert fedslim.load_model is load_model and not module.training
    task = load_task(lora_run.task)
    result = task.evaluate(module, task.test_data(lora_run))
    assert (result.accuracy, result.loss) == final_accuracy(lora_run.run_dir)
    manifest = json.loads((lora_run.run_dir / MODEL_DIRNAME / MANIFEST_FILENAME).read_text())
    with RunLog(str(lora_run.run_dir)) as log:
        assert manifest["state_digest"] == log.summary().final_state_digest
    assert (manifest["round"], manifest["finished"], manifest["task"], manifest["fast"]["kind"]) == (
        2,
        True,
        "synthetic",
        "lora",
    )
    assert manifest["base_fingerprint"] == prepared_base(lora_run).fingerprint and manifest["merges"] == []
    replica = load_checkpoint(lora_run.run_dir).replica.state  # what clients hold: not what was evaluated
    assert state_digest(replica, length=64) != manifest["state_digest"]


def test_the_merged_model_and_the_peft_adapter_give_the_same_logits_without_fedslim(
    lora_run: RunConfig, tmp_path: Path
) -> None:
    out = tmp_path / "exported"
    assert main(["export", str(lora_run.run_dir), "--out", str(out), "--merged"]) == 0
    inputs = sample_inputs(lora_run)
    expected = logits(load_model(lora_run.run_dir), inputs)

    merged = base_module(lora_run, load_file(out / MERGED_FILENAME))
    assert not any(isinstance(m, DeltaAdapted) for m in merged.modules())
    assert torch.allclose(logits(merged, inputs), expected, **LOGITS_TOLERANCE)
    assert not torch.allclose(logits(base_module(lora_run), inputs), expected, **LOGITS_TOLERANCE)

    adapter = json.loads((out / PEFT_DIRNAME / "adapter_config.json").read_text())
    assert (adapter["target_modules"], sorted(adapter["modules_to_save"]), adapter["bias"]) == (
        ["fc2"],
        ["fc1", "head"],
        "lora_only",
    )
    assert (adapter["r"], adapter["lora_alpha"]) == (2, 8.0)
    peft_model = PeftModel.from_pretrained(base_module(lora_run), out / PEFT_DIRNAME)
    assert torch.allclose(logits(peft_model, inputs), expected, **LOGITS_TOLERANCE)
    assert not (out / CONSOLIDATED_BASE_FILENAME).exists()  # no consolidation: the base is the checkpoint's
    assert load_model(out).state_dict().keys() == load_model(lora_run.run_dir).state_dict().keys()


def test_the_model_folder_follows_the_checkpoints(tmp_path: Path) -> None:
    config = run_config(tmp_path, rounds=3, checkpoint_every=2, codec="none", downstream_codec="none")
    folder = config.run_dir / MODEL_DIRNAME
    seen: list[int | None] = []

    def on_round(totals: RoundTotals) -> None:  # called as a round is logged, before its checkpoint
        manifest = folder / MANIFEST_FILENAME
        seen.append(json.loads(manifest.read_text())["round"] if manifest.exists() else None)

    result = simulate(config, on_round=on_round, backend="inline")
    assert seen == [None, 0, 0, 2]
    opened = open_model(config.run_dir)
    assert (opened.manifest.round, opened.manifest.finished) == (3, True)
    assert opened.manifest.state_digest == result.final_state_digest
    assert sorted(p.name for p in config.run_dir.iterdir() if p.name.startswith(".")) == []  # nothing left aside


def test_a_consolidated_model_carries_its_merges(tmp_path: Path) -> None:
    config = run_config(tmp_path, consolidate_every=1, codec="topk:0.3+q8")
    simulate(config, backend="inline")
    opened = open_model(config.run_dir)
    assert opened.manifest.merges == ["merge-001.pb"]
    assert opened.manifest.merged_base_fingerprint == opened.base.fingerprint != opened.manifest.base_fingerprint
    out = tmp_path / "exported"
    check_export_round_trip(config.run_dir, out)
    assert (out / CONSOLIDATED_BASE_FILENAME).is_file()
    (out / "merge-001.pb").write_bytes(b"\x01not a merge")
    with pytest.raises(ConfigError, match="consolidations .* cannot be replayed"):
        load_model(out)


@pytest.mark.parametrize(
    ("kind", "checkpoint_every"), [("sparse", 0), ("head", 1), ("full", 1), ("ffa-lora", 1)], ids=str
)
def test_every_fast_kind_folds_into_the_base(kind: str, checkpoint_every: int, tmp_path: Path) -> None:
    config = run_config(tmp_path, fast=FastSpec(kind, rank=2, density=0.05), checkpoint_every=checkpoint_every)
    simulate(config, backend="inline")
    module = load_model(config.run_dir)
    task = load_task(config.task)
    result = task.evaluate(module, task.test_data(config))
    assert (result.accuracy, result.loss) == final_accuracy(config.run_dir)
    out = tmp_path / "exported"
    assert main(["export", str(config.run_dir), "--out", str(out), "--merged"]) == 0
    inputs = sample_inputs(config)
    merged = base_module(config, load_file(out / MERGED_FILENAME))
    assert torch.allclose(logits(merged, inputs), logits(module, inputs), **LOGITS_TOLERANCE)
    assert (out / PEFT_DIRNAME).is_dir() == (kind == "ffa-lora")
    if kind == "ffa-lora":
        peft_model = PeftModel.from_pretrained(base_module(config), out / PEFT_DIRNAME)
        assert torch.allclose(logits(peft_model, inputs), logits(module, inputs), **LOGITS_TOLERANCE)


def test_fedslims_lora_on_a_convolution_is_peft_lora(tmp_path: Path) -> None:
    class ConvTask:
        def build_base(self) -> nn.Module:
            torch.manual_seed(0)
            return nn.Sequential(
                nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)
            )

    task = ConvTask()
    base_state = {k: v.clone() for k, v in task.build_base().state_dict().items()}
    spec = FastSpec("lora", rank=3, lora_alpha=6.0)
    model = attach_fast_layer(task.build_base(), spec)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.fast_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    inputs = torch.randn(4, 3, 8, 8, generator=generator)
    expected = logits(model.module, inputs)
    write_peft_adapter(model, base_state, task, tmp_path / "peft")
    base = task.build_base()
    base.load_state_dict(base_state)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
    assert torch.allclose(logits(peft_model, inputs), expected, **LOGITS_TOLERANCE)
    folded = task.build_base()
    folded.load_state_dict(merged_state(model))
    assert torch.allclose(logits(folded, inputs), expected, **LOGITS_TOLERANCE)

    dilated = attach_fast_layer(nn.Sequential(nn.Conv2d(3, 6, 3, dilation=2), nn.Flatten(), nn.Linear(96, 5)), spec)
    with pytest.raises(ValueError, match="dilated convolution"):
        write_peft_adapter(dilated, {}, task, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


class PeftTask(Task):
    """The synthetic task with its fast layer made by peft (tests/test_export.py:PeftTask)."""

    name = "peft-synthetic"

    def __init__(self) -> None:
        self.synthetic = load_task("synthetic")

    def build_base(self) -> nn.Module:
        return SyntheticMLP()

    def pretrain(self, config: RunConfig) -> nn.Module:
        return self.synthetic.pretrain(replace(config, task="synthetic"))

    def attach_fast(self, base: nn.Module, spec: FastSpec, base_fingerprint: str) -> FastSlowModel:
        config = LoraConfig(
            r=spec.rank, lora_alpha=spec.lora_alpha, target_modules=["fc1", "fc2"], modules_to_save=["head"]
        )
        torch.manual_seed(spec.seed)  # peft draws A at random: the server and every client must draw the same
        return FastSlowModel.from_peft(get_peft_model(base, config))

    def client_data(self, config: RunConfig, partition_id: int) -> Sized:
        return self.synthetic.client_data(replace(config, task="synthetic"), partition_id)

    def test_data(self, config: RunConfig) -> Sized:
        return self.synthetic.test_data(replace(config, task="synthetic"))


def test_a_peft_task_exports_its_own_adapter(tmp_path: Path) -> None:
    config = run_config(tmp_path, task="test_export:PeftTask", codec="none", downstream_codec="none")
    result = simulate(config, backend="inline")
    assert sum(r.accepted for r in result.rounds) == 4  # the clients trained the peft model: nothing refused
    module = load_model(config.run_dir)
    assert isinstance(module, PeftModel)
    task = load_task(config.task)
    result = task.evaluate(module, task.test_data(config))
    assert (result.accuracy, result.loss) == final_accuracy(config.run_dir)
    out = tmp_path / "exported"
    assert main(["export", str(config.run_dir), "--out", str(out), "--merged"]) == 0
    inputs = sample_inputs(config)
    expected = logits(module, inputs)
    merged = base_module(config, load_file(out / MERGED_FILENAME))
    assert torch.allclose(logits(merged, inputs), expected, **LOGITS_TOLERANCE)
    peft_model = PeftModel.from_pretrained(base_module(config), out / PEFT_DIRNAME)
    assert torch.allclose(logits(peft_model, inputs), expected, **LOGITS_TOLERANCE)


def test_a_node_exports_its_own_head(tmp_path: Path) -> None:
    config = run_config(
        tmp_path, fast=FastSpec("lora", rank=2, personal="head"), lr=0.01, codec="none", downstream_codec="none"
    )
    simulate(config, backend="inline")
    heads = {}
    for node in [f"partition-{i}" for i in range(config.num_clients)]:
        try:
            heads[node] = node_personal_state(config.run_dir, node)
        except ConfigError:
            continue  # a node that was never sampled holds no head yet
    node, head = next(iter(heads.items()))
    out = tmp_path / "exported"
    assert main(["export", str(config.run_dir), "--out", str(out), "--merged", "--node", node]) == 0
    merged = load_file(out / MERGED_FILENAME)
    assert np.array_equal(merged["head.weight"].numpy(), head["head.weight"])
    assert not np.array_equal(merged["head.weight"].numpy(), prepared_base(config).state["head.weight"].numpy())
    inputs = sample_inputs(config)
    own = load_model(config.run_dir, personal=head)
    assert torch.allclose(logits(base_module(config, merged), inputs), logits(own, inputs), **LOGITS_TOLERANCE)
    server = load_model(config.run_dir)  # the server's model keeps the base's head
    assert torch.equal(server.state_dict()["head.weight"], prepared_base(config).state["head.weight"])


def test_a_missing_or_different_base_and_a_damaged_model_are_one_line_errors(
    lora_run: RunConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="is not a run directory"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "commlog.sqlite").write_bytes(b"")
    with pytest.raises(ConfigError, match="no model yet"):
        load_model(tmp_path / "killed")
    with pytest.raises(ConfigError, match="base .* is missing on this machine"):
        load_model(lora_run.run_dir, base_path=tmp_path / "absent.pt")
    other = tmp_path / "other.pt"
    save_base(SyntheticMLP(), other, {})
    with pytest.raises(ConfigError, match="differs from this machine.s"):
        load_model(lora_run.run_dir, base_path=other)
    copy = tmp_path / "copy"
    shutil.copytree(lora_run.run_dir / MODEL_DIRNAME, copy)
    tensors = load_file(copy / FAST_FILENAME)
    from safetensors.torch import save_file

    save_file({name: tensor + 1 for name, tensor in tensors.items()}, copy / FAST_FILENAME)
    with pytest.raises(ConfigError, match="not the fast state its manifest names"):
        load_model(copy)
    assert main(["export", str(tmp_path / "killed"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no model yet" in error
    assert main(["export", str(lora_run.run_dir), "--out", str(tmp_path / "out"), "--node", "partition-0"]) == 2
    assert "holds no personal tensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_deployed_node_writes_its_own_model_at_the_final_sync(tmp_path: Path) -> None:
    from fedslim.channel.protocol import MODEL_OUT_KEY
    from fedslim.client.app import app as client_app
    from fedslim.server.loop import run_federation
    from fedslim.simulation.inline import InlineGrid

    config = run_config(
        tmp_path,
        fast=FastSpec("lora", rank=2, personal="head"),
        lr=0.01,
        consolidate_every=1,
        final_sync=True,
        checkpoint_every=0,
    )
    grid = InlineGrid(client_app, config.num_clients)
    for k, context in enumerate(grid.contexts.values()):
        context.node_config[MODEL_OUT_KEY] = str(tmp_path / f"node-{k}")
    result = run_federation(grid, config)
    opened = open_model(config.run_dir)
    trained = 0
    for k in range(config.num_clients):
        node = open_model(tmp_path / f"node-{k}")
        assert node.manifest.state_digest == result.final_state_digest == opened.manifest.state_digest
        assert node.manifest.merges == ["merge-001.pb"] and node.base.fingerprint == opened.base.fingerprint
        head = node.model.personal_state()["head.weight"]
        held = grid.contexts[grid.node_ids[k]].state.array_records.get("fedslim-personal")
        own = held["head.weight"].numpy() if held is not None else prepared_base(config).state["head.weight"].numpy()
        assert node.manifest.node == f"partition-{k}" and np.array_equal(head, own)
        trained += held is not None
    assert trained >= 2  # two nodes a round: at least two trained heads of their own
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "node-0"), "--out", str(out), "--merged"]) == 0
    node = open_model(tmp_path / "node-0")
    merged = base_module(config, load_file(out / MERGED_FILENAME))
    assert torch.allclose(
        logits(merged, sample_inputs(config)), logits(node.model.module, sample_inputs(config)), **LOGITS_TOLERANCE
    )


def test_a_model_write_stopped_between_its_renames_keeps_the_old_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = run_config(tmp_path, rounds=1, codec="none", downstream_codec="none")
    simulate(config, backend="inline")
    folder = config.run_dir / MODEL_DIRNAME
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    manifest = export.read_manifest(folder)
    fast_state = {name: tensor.numpy() for name, tensor in load_file(folder / FAST_FILENAME).items()}
    renames: list[tuple[str, str]] = []
    real_rename = export.os.rename

    def stopped_at_the_second(source: object, target: object) -> None:
        renames.append((Path(str(source)).name, Path(str(target)).name))
        if len(renames) == 2:
            raise KeyboardInterrupt  # Ctrl-C between taking the old model aside and putting the new one in place
        real_rename(source, target)

    monkeypatch.setattr(export.os, "rename", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        export.write_model(folder, replace(manifest, round=9), fast_state, [])
    monkeypatch.setattr(export.os, "rename", real_rename)
    assert renames[0][0] == MODEL_DIRNAME
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert [p.name for p in config.run_dir.iterdir() if p.name.startswith(".")] == []
