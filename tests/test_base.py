"""The pretrained base of a built-in benchmark: the same checkpoint whoever pretrains it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedslim.config import RunConfig
from fedslim.task import prepared_base, task_for
from fedslim.tasks import benchmarks

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_pretrained_base_does_not_depend_on_the_callers_thread_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(benchmarks.PRETRAIN_RECIPES, "fmnist", benchmarks.PretrainRecipe(epochs=1))
    config = RunConfig(task="fmnist", num_clients=10, out=str(tmp_path / "run"))
    fingerprints = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 4):
            monkeypatch.setenv("FEDSLIM_CACHE", str(tmp_path / f"cache-{count}"))
            torch.set_num_threads(count)
            fingerprints.append(prepared_base(config).fingerprint)
            assert torch.get_num_threads() == count  # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    assert fingerprints[0] == fingerprints[1]


def test_a_changed_pretraining_recipe_is_not_served_from_the_cache(
    small_config: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = task_for(small_config)
    before = task.base_path(small_config)
    monkeypatch.setitem(benchmarks.PRETRAIN_RECIPES, "synthetic", benchmarks.PretrainRecipe(epochs=3))
    assert task.base_path(small_config) != before
    assert task.base_identity(small_config)["recipe"]["epochs"] == 3
