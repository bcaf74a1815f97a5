"""Models users bring: a half-precision base, a `transformers` model, and metrics of a task's own."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fakes import DOCS
from torch import nn

from fedslim.adapters import DeltaAdapted, LoRADelta, attach_fast_layer, fingerprint, numpy_bits
from fedslim.base import read_checkpoint_state
from fedslim.channel.downlink import state_digest
from fedslim.cli import main
from fedslim.commlog import LOG_FILENAME, CommLog, RoundRow, open_log, read_round_totals
from fedslim.config import FastSpec, RunConfig
from fedslim.consolidation import merge_into_base
from fedslim.data.datasets import ArrayDataset
from fedslim.logs.reader import RunLog
from fedslim.report import round_table
from fedslim.server.checkpoint import load_checkpoint
from fedslim.task import Task
from fedslim.training import evaluate

STATE = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7, "b": torch.tensor([0.5, -1.25])}


def test_a_float32_fingerprint_is_unchanged_and_half_precision_ones_are_their_own() -> None:
    # The float32 and float16 digests are those fedslim computed before bfloat16 could be hashed.
    assert fingerprint(STATE) == "7dea44d8dea602a7cf0e72db8ff25c8245c31ff719ddc00288996f775e094054"
    half = {name: tensor.to(torch.float16) for name, tensor in STATE.items()}
    assert fingerprint(half) == "b073cbd5ab87de8a4caf4f66bb3e307bed561774879097663b4fb8963a3aa342"
    brain = {name: tensor.to(torch.bfloat16) for name, tensor in STATE.items()}
    assert fingerprint(brain) == "f0609d92eb831f6e781419fea647f8664793d57d725d3e4e859e4f295d571b2d"
    assert fingerprint({name: tensor.clone() for name, tensor in brain.items()}) == fingerprint(brain)
    nudged = dict(brain, w=brain["w"].clone())
    nudged["w"].view(torch.int16)[0, 1] += 1  # one bit of one entry
    assert fingerprint(nudged) != fingerprint(brain)


def test_numpy_bits_hold_a_bfloat16_tensors_bytes() -> None:
    tensor = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    bits = numpy_bits(tensor)
    assert bits.dtype == np.int16 and bits.tobytes() == tensor.view(torch.int16).numpy().tobytes()
    assert torch.equal(torch.from_numpy(bits).view(torch.bfloat16), tensor)
    assert numpy_bits(STATE["w"]).dtype == np.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_on_a_half_base_trains_in_float32_and_keeps_a_delta_smaller_than_the_bases_precision(
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)
    model = attach_fast_layer(base, FastSpec("lora", rank=2))
    layer = base[0]
    assert isinstance(layer, DeltaAdapted) and isinstance(layer.delta, LoRADelta)
    assert layer.delta.lora_A.dtype == torch.float32 and layer.base.weight.dtype == dtype
    state = model.fast_state()
    assert all(value.dtype == np.float32 for value in state.values())
    assert state["2.weight"].tobytes() == base[2].weight.detach().float().numpy().tobytes()  # a half value is exact
    with torch.no_grad():
        layer.delta.lora_B.fill_(1e-4)  # a delta entry far below half a unit of the weight's last place
    x = torch.randn(8, 16).to(dtype)
    delta = layer.delta().to(dtype)
    expected = torch.nn.functional.linear(x, layer.base.weight, layer.base.bias) + x @ delta.T
    assert torch.equal(layer(x), expected)
    assert not torch.equal(layer(x), torch.nn.functional.linear(x, layer.base.weight, layer.base.bias))
    model.load_fast_state(state)
    assert model.fast_state()["0.delta.lora_B"].tobytes() == state["0.delta.lora_B"].tobytes()


def test_a_consolidation_merges_in_float32_and_rounds_once_to_the_bases_dtype() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(torch.bfloat16)
    weight = base[0].weight.detach().clone()
    model = attach_fast_layer(base, FastSpec("lora", rank=2))
    with torch.no_grad():
        base[0].delta.lora_B.normal_(0, 0.05)
    delta = base[0].delta().detach()
    merged = merge_into_base(model)
    assert merged["0.weight"].dtype == torch.bfloat16
    assert torch.allclose(merged["0.weight"].float(), (weight.float() + delta).bfloat16().float(), atol=0, rtol=0.01)
    assert not torch.equal(merged["0.weight"], weight)


class BFloat16Task(Task):
    """A bfloat16 MLP on 4 classes of Gaussian points (the label: which of the first 4 features is largest)."""

    name = "bf16-mlp"

    def build_base(self) -> nn.Module:
        return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).bfloat16()

    @staticmethod
    def points(seed: int, count: int) -> ArrayDataset:
        x = np.random.default_rng(seed).normal(size=(count, 12)).astype(np.float32)
        return ArrayDataset(x, x[:, :4].argmax(1).astype(np.int64))

    def client_data(self, config: Any, partition_id: int) -> ArrayDataset:
        return self.points(100 + partition_id, 64)

    def test_data(self, config: Any) -> ArrayDataset:
        return self.points(7, 200)

    def batch(self, data: ArrayDataset, indices: np.ndarray | slice) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = super().batch(data, indices)
        return inputs.bfloat16(), targets

    def optimizer(self, params: list[nn.Parameter], config: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=config.lr)


bf16_task = BFloat16Task()


def simulate_rounds(task: str, out: Path, *flags: str) -> sqlite3.Connection:
    """Run ``task`` for 2 rounds of 3 clients, all training, inline; returns its log."""
    run = ["simulate", "--task", task, "--clients", "3", "--rounds", "2", "--fraction", "1", "--batch-size", "16"]
    assert main([*run, "--backend", "inline", "--out", str(out), *flags]) == 0
    return sqlite3.connect(out / LOG_FILENAME)


@pytest.mark.parametrize(
    "fast",
    [["--fast", "lora", "--consolidate-every", "1"], ["--fast", "head"]],
    ids=["lora-consolidated", "head"],
)
def test_a_bfloat16_base_runs_two_rounds_compressed_both_ways(tmp_path: Path, fast: list[str]) -> None:
    codec = "topk:0.1+q8+lzma"
    db = simulate_rounds(
        "test_models:bf16_task", tmp_path / "run", *fast, "--lr", "0.01", "--codec", codec, "--downstream-codec", codec
    )
    uploads = db.execute("SELECT status FROM messages WHERE message_type = 'train' AND direction = 'up'").fetchall()
    assert uploads == [("ok",)] * 6
    assert [a for (a,) in db.execute("SELECT accepted FROM rounds ORDER BY round")] == [0, 3, 3]
    accuracy, loss = db.execute("SELECT accuracy, loss FROM rounds WHERE round = 2").fetchone()
    assert 0.0 <= accuracy <= 1.0 and math.isfinite(loss)
    base_parameters, full_bytes = db.execute("SELECT base_parameters, full_model_payload_bytes FROM runs").fetchone()
    assert 2 * base_parameters < full_bytes < 3 * base_parameters  # full-model FedAvg counted at 2 bytes a number
    merges = db.execute("SELECT round, generation FROM consolidations").fetchall()
    assert merges == ([(1, 1)] if "--consolidate-every" in fast else [])
    # The base checkpoint reads back in bfloat16 under the logged fingerprint; the server's checkpoint holds the
    # float32 fast state whose digest the log names.
    config = RunConfig(task="test_models:bf16_task")
    state = read_checkpoint_state(bf16_task.base_path(config))
    assert {tensor.dtype for tensor in state.values()} == {torch.bfloat16}
    base_fingerprint, digest = db.execute("SELECT base_fingerprint, final_state_digest FROM runs").fetchone()
    assert fingerprint(state) == base_fingerprint
    checkpoint = load_checkpoint(tmp_path / "run")
    assert {value.dtype for value in checkpoint.fast_state.values()} == {np.dtype(np.float32)}
    assert state_digest(checkpoint.fast_state, length=64) == digest


def transformers_example() -> str:
    """The `transformers` task of docs/tasks.md: its second Python block."""
    return (DOCS / "tasks.md").read_text(encoding="utf-8").split("```python\n")[2].split("```", 1)[0]


def test_the_docs_transformers_example_is_short() -> None:
    source = transformers_example()
    assert "LlamaForCausalLM" in source and "class TinyLM(Task)" in source
    assert len(source.splitlines()) < 60


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_transformers_language_model_runs_two_rounds_with_its_own_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    pytest.importorskip("transformers")
    source = transformers_example()
    if dtype == "bfloat16":  # the same model with a half-precision base
        source += "\n\nclass HalfLM(TinyLM):\n    name = 'tiny-lm-bf16'\n\n"
        source += "    def build_base(self):\n        return super().build_base().bfloat16()\n"
    (tmp_path / f"tiny_lm_{dtype}.py").write_text(source, encoding="utf-8")  # a module of its own for each
    monkeypatch.syspath_prepend(str(tmp_path))
    task = f"tiny_lm_{dtype}:" + ("TinyLM" if dtype == "float32" else "HalfLM")
    db = simulate_rounds(task, tmp_path / "run", "--fast", "lora", "--lr", "0.01", "--codec", "topk:0.1+q8+lzma")

    uploads = db.execute("SELECT status FROM messages WHERE message_type = 'train' AND direction = 'up'").fetchall()
    assert uploads == [("ok",)] * 6
    rounds = db.execute("SELECT round, accuracy, loss FROM rounds ORDER BY round").fetchall()
    losses = [loss for _, _, loss in rounds]
    assert losses[2] < losses[1] < losses[0] < math.log(64) + 0.1  # from about uniform over 64 tokens, down
    assert rounds[2][1] > rounds[0][1]  # next-token accuracy up
    perplexities = db.execute("SELECT round, name, value FROM round_metrics ORDER BY round").fetchall()
    assert [(r, name) for r, name, _ in perplexities] == [(0, "perplexity"), (1, "perplexity"), (2, "perplexity")]
    for (_, _, value), loss in zip(perplexities, losses):
        assert value == pytest.approx(math.exp(loss), rel=1e-12)
    with RunLog(str(tmp_path / "run")) as log:
        rounds = log.rounds()
    assert [column.header for column in round_table(rounds).columns][:4] == ["round", "acc", "loss", "perplexity"]
    if dtype == "float32":  # and on to TensorBoard
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        assert main(["logs", "tensorboard", str(tmp_path / "run"), "--logdir", str(tmp_path / "tb")]) == 0
        (folder,) = (tmp_path / "tb").iterdir()
        events = EventAccumulator(str(folder))
        events.Reload()
        logged = [(e.step, e.value) for e in events.Scalars("metrics/perplexity")]
        assert logged == [(r, pytest.approx(value)) for r, _, value in perplexities]


class PerToken:
    """An objective whose logits are one row per target of a 2-token example."""

    def batch(self, data: ArrayDataset, indices: np.ndarray | slice) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(data.x[indices]), torch.from_numpy(data.y[indices])

    def logits(self, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return module(inputs).flatten(0, 1)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return nn.functional.cross_entropy(logits, targets.flatten(), reduction=reduction)


def test_evaluation_averages_over_targets_not_examples() -> None:
    # Scores for 2 classes at each of 2 positions of 3 examples: class 0 wins everywhere.
    inputs = np.zeros((3, 2, 2), dtype=np.float32)
    inputs[..., 0] = 1.0
    data = ArrayDataset(inputs, np.array([[0, 0], [0, 1], [1, 1]]))
    scores = nn.Linear(2, 2)
    with torch.no_grad():
        scores.weight.copy_(torch.eye(2))
        scores.bias.zero_()
    result = evaluate(scores, data, PerToken(), batch_size=2)
    assert result.num_examples == 3 and result.accuracy == 3 / 6
    assert result.loss == pytest.approx(-(3 * math.log(1 / (1 + math.e**-1)) + 3 * math.log(1 / (1 + math.e))) / 6)
    assert result.metrics == {}


def test_metrics_are_logged_per_round_forgotten_with_a_killed_round_and_absent_from_older_logs(
    tmp_path: Path,
) -> None:
    log = CommLog(tmp_path / LOG_FILENAME)
    log.start_run("r", {}, "f" * 64, 10, 2, 8, 40)
    log.record_round("r", RoundRow(0, 0, 0, None, 0.5, 1.0, 0.1, None, {"perplexity": math.e, "bleu": 0.25}))
    log.record_round("r", RoundRow(1, 2, 2, None, 0.6, 0.9, 0.1, None, {"perplexity": float("inf")}))
    log.record_round("r", RoundRow(2, 2, 2, None, 0.7, 0.8, 0.1, None))
    db = open_log(tmp_path / LOG_FILENAME)
    assert [r.metrics for r in read_round_totals(db, "r")] == [
        {"bleu": 0.25, "perplexity": math.e},
        {"perplexity": None},
        {},
    ]
    table = round_table(read_round_totals(db, "r"))
    assert [column.header for column in table.columns][:5] == ["round", "acc", "loss", "bleu", "perplexity"]
    log.continue_run("r", after_round=0)
    assert [r.metrics for r in read_round_totals(db, "r")] == [{"bleu": 0.25, "perplexity": math.e}]
    writer = sqlite3.connect(tmp_path / LOG_FILENAME)
    writer.execute("DROP TABLE round_metrics")  # as a log of schema 6 is
    writer.commit()
    assert [r.metrics for r in read_round_totals(db, "r")] == [{}]
