"""The pretrained base of a built-in benchmark: the same checkpoint whoever pretrains it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedslim.base import float_arithmetic
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


def test_the_fingerprint_sidecar_is_read_only_while_the_checkpoint_is_unchanged(tmp_path: Path) -> None:
    import json
    import os

    from fedslim.adapters import fingerprint
    from fedslim.base import _load_base, load_base, sidecar_path

    config = RunConfig(task="synthetic")
    task = task_for(config)
    path = tmp_path / "base.pt"
    path.write_bytes(prepared_base(config).path.read_bytes())
    true = fingerprint(task.load_base_state(path))

    assert load_base(path, task).fingerprint == true
    sidecar = sidecar_path(path)
    recorded = json.loads(sidecar.read_text())
    assert recorded["fingerprint"] == true and recorded["size"] == path.stat().st_size

    # A later process (the cache cleared) reads the recorded value instead of hashing: shown by a planted one.
    sidecar.write_text(json.dumps({**recorded, "fingerprint": "0" * 64}))
    _load_base.cache_clear()
    assert load_base(path, task).fingerprint == "0" * 64
    # The checkpoint rewritten (its time changes): the fingerprint is computed again, and recorded.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert load_base(path, task).fingerprint == true
    assert json.loads(sidecar.read_text())["fingerprint"] == true
    # A corrupt sidecar, or one that cannot be read or written (here a folder in its place), costs only the hash.
    sidecar.write_text("{not json")
    _load_base.cache_clear()
    assert load_base(path, task).fingerprint == true
    sidecar.unlink()
    sidecar.mkdir()
    _load_base.cache_clear()
    assert load_base(path, task).fingerprint == true
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.pt", sidecar.name]  # no temporary file left


def test_float_arithmetic_tells_apart_machines_whose_kernels_round_otherwise() -> None:
    """The same digest in a fresh process; another with torch's portable kernels (as on a CPU without AVX)."""
    script = "from fedslim.base import float_arithmetic; print(float_arithmetic())"

    def digest(**env: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    here = float_arithmetic()
    assert len(here) == 16 and digest() == here
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("torch runs its portable kernels here already")
    assert digest(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41") != here
