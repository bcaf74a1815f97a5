"""Shared fixtures: a private cache for pretrained bases, small configs, a tiny base."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedslim.config import FastSpec, RunConfig


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bases are pretrained into a per-session folder, never into the user's cache."""
    path = tmp_path_factory.mktemp("fedslim-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDSLIM_CACHE", str(path))
        patch.setenv("FLWR_TELEMETRY_ENABLED", "0")
        yield path


@pytest.fixture
def small_config(tmp_path: Path) -> RunConfig:
    return RunConfig(
        task="synthetic",
        num_clients=4,
        rounds=2,
        fraction=0.5,
        fast=FastSpec("lora", rank=2),
        codec="none",
        downstream_codec="none",
        out=str(tmp_path / "run"),
    )


@pytest.fixture(autouse=True)
def flower_task_identity() -> None:
    """Messages are created inside a Flower run; unit tests stand in for one (run id 1)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 1
