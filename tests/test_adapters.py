"""The fast/slow split: what is fast for each kind, and that the base never changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedslim.adapters import FastSlowModel, attach_fast_layer, fingerprint
from fedslim.config import ConfigError, FastSpec
from fedslim.data.datasets import ArrayDataset
from fedslim.models import FashionCNN, SyntheticMLP
from fedslim.task import load_task
from fedslim.training import train_epochs


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FashionCNN()


def _train_a_bit(model: FastSlowModel) -> None:
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.normal(size=(32, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 32))
    optimizer = torch.optim.SGD(model.fast_parameters(), lr=0.5)
    train_epochs(model.module, data, load_task("fmnist"), optimizer, epochs=1, batch_size=8, seed=0)


@pytest.mark.parametrize(
    ("kind", "expected_suffixes"),
    [
        ("lora", {"lora_A", "lora_B", "head.weight", "head.bias"}),
        ("ffa-lora", {"lora_B", "head.weight", "head.bias"}),
        ("head", {"head.weight", "head.bias"}),
        ("sparse", {"delta.values"}),
    ],
)
def test_fast_names_per_kind(kind: str, expected_suffixes: set[str]) -> None:
    model = attach_fast_layer(_cnn(), FastSpec(kind, rank=2, density=0.05))
    suffixes = {n.rsplit(".", 1)[-1] if "lora" in n else ".".join(n.split(".")[-2:]) for n in model.fast_names}
    assert suffixes == expected_suffixes


def test_fast_biases_add_every_bias_vector() -> None:
    plain = attach_fast_layer(_cnn(), FastSpec("lora", rank=2))
    with_biases = attach_fast_layer(_cnn(), FastSpec("lora", rank=2, biases=True))
    added = set(with_biases.fast_names) - set(plain.fast_names)
    assert added == {"conv1.base.bias", "conv2.base.bias", "fc1.base.bias"}
    assert with_biases.num_fast_parameters() == plain.num_fast_parameters() + 16 + 32 + 256


def test_small_layers_can_be_fast_as_a_whole_instead_of_lora() -> None:
    model = attach_fast_layer(_cnn(), FastSpec("lora", rank=2, lora_min_params=20_000))
    # conv1 (400 entries) and conv2 (12,800) are fast whole; fc1 (401,408) gets LoRA factors.
    assert [n for n in model.fast_names if not n.startswith("head")] == [
        "conv1.weight",
        "conv2.weight",
        "fc1.delta.lora_A",
        "fc1.delta.lora_B",
    ]
    _train_a_bit(model)
    assert model.module.conv1.weight.grad is not None


@pytest.mark.parametrize("kind", ["lora", "ffa-lora", "head", "sparse"])
def test_training_changes_fast_tensors_only(kind: str) -> None:
    model = attach_fast_layer(_cnn(), FastSpec(kind, rank=2, density=0.05))
    base_before = {k: v.clone() for k, v in model.base_state().items()}
    fast_before = model.fast_state()
    _train_a_bit(model)
    for name, tensor in model.base_state().items():
        assert torch.equal(tensor, base_before[name]), f"base tensor {name} changed"
    changed = [n for n, v in model.fast_state().items() if not np.array_equal(v, fast_before[n])]
    assert changed, "no fast tensor was trained"


@pytest.mark.parametrize("kind", ["lora", "ffa-lora", "sparse"])
def test_adapted_model_equals_base_at_initialisation(kind: str) -> None:
    x = torch.randn(4, 1, 28, 28)
    reference = _cnn()(x)
    model = attach_fast_layer(_cnn(), FastSpec(kind, rank=2, density=0.05))
    torch.testing.assert_close(model.module(x), reference)


def test_ffa_lora_frozen_factors_come_from_the_shared_seed() -> None:
    def frozen_a(seed: int) -> torch.Tensor:
        model = attach_fast_layer(_cnn(), FastSpec("ffa-lora", rank=2, seed=seed))
        return model.module.get_submodule("fc1.delta").lora_A.detach()

    assert torch.equal(frozen_a(3), frozen_a(3))
    assert not torch.equal(frozen_a(3), frozen_a(4))


def test_sparse_delta_touches_only_masked_entries() -> None:
    model = attach_fast_layer(_cnn(), FastSpec("sparse", density=0.01))
    layer = model.module.get_submodule("fc1")
    with torch.no_grad():
        layer.delta.values.fill_(1.0)
    delta = layer.delta().flatten()
    assert int((delta != 0).sum()) == layer.delta.values.numel() == round(0.01 * delta.numel())


def test_fingerprint_identifies_the_base_not_the_fast_layer() -> None:
    reference = fingerprint(_cnn().state_dict())
    assert fingerprint(_cnn().state_dict()) == reference
    assert attach_fast_layer(_cnn(), FastSpec("lora")).base_fingerprint == reference
    assert fingerprint(_cnn(seed=1).state_dict()) != reference
    tampered = _cnn().state_dict()
    tampered["conv1.weight"][0, 0, 0, 0] += 1e-6
    assert fingerprint(tampered) != reference


def test_load_fast_state_rejects_bad_input() -> None:
    model = attach_fast_layer(SyntheticMLP(), FastSpec("head"))
    state = model.fast_state()
    with pytest.raises(ValueError, match="shape"):
        model.load_fast_state({**state, "head.bias": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="missing"):
        model.load_fast_state({"head.bias": state["head.bias"]})
    with pytest.raises(ValueError, match="NaN"):
        model.load_fast_state({**state, "head.bias": np.full(10, np.nan, np.float32)})


def test_user_model_with_named_fast_tensors() -> None:
    module = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    model = FastSlowModel(module, ["2.weight", "2.bias"])
    assert not module[0].weight.requires_grad and module[2].weight.requires_grad
    assert set(model.base_state()) == {"0.weight", "0.bias"}
    with pytest.raises(ValueError, match="not found"):
        FastSlowModel(module, ["3.weight"])


def test_peft_model_trainable_tensors_are_fast() -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(SyntheticMLP(), LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    model = FastSlowModel.from_peft(peft_model)
    assert model.fast_names and all("lora_" in n for n in model.fast_names)
    assert not any("lora_" in n for n in model.base_state())


def test_bad_fast_spec_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown fast layer"):
        FastSpec("dense")
    with pytest.raises(ConfigError, match="rank"):
        FastSpec("lora", rank=0)
