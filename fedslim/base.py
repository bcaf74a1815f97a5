"""The resident slow base: a checkpoint on local disk, identified by its fingerprint.

For the built-in benchmarks the base is pretrained centrally on the public
slice of the dataset, once, and cached as a checkpoint; clients and server
then load the same file. A deployed client points to its own checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedslim.adapters import FastSlowModel, attach_fast_layer, fingerprint
from fedslim.config import FastSpec, RunConfig
from fedslim.data.datasets import DataSpec, load_federation
from fedslim.models import build_architecture
from fedslim.training import evaluate, train_epochs


@dataclass(frozen=True)
class PretrainRecipe:
    """How a built-in benchmark's base is pretrained on the public slice (SGD with momentum, one thread)."""

    epochs: int
    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.9


PRETRAIN_RECIPES = {"synthetic": PretrainRecipe(epochs=2), "fmnist": PretrainRecipe(epochs=10)}


@dataclass(frozen=True, eq=False)
class ResidentBase:
    """A loaded base checkpoint and its fingerprint (hashable by identity: loads are cached)."""

    dataset: str
    state: dict[str, torch.Tensor]
    fingerprint: str
    path: Path

    def build(self, spec: FastSpec) -> FastSlowModel:
        """A fresh model with this base's weights and the fast layer ``spec`` attached."""
        module = build_architecture(self.dataset)
        module.load_state_dict(self.state)
        return attach_fast_layer(module, spec, self.fingerprint)

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state.values())


def cache_dir() -> Path:
    return Path(os.environ.get("FEDSLIM_CACHE", Path.home() / ".cache" / "fedslim"))


def base_identity(config: RunConfig) -> dict[str, Any]:
    """What determines the pretrained base of a built-in benchmark: its public data and its recipe.

    The cache is keyed by this, so a changed recipe pretrains a new base
    instead of reusing one cached before the change. A change to the code
    that pretrains is not in the key: the results check (tests/test_results.py)
    sees it as a base fingerprint that published numbers no longer match.
    """
    spec = DataSpec.of(config)
    identity: dict[str, Any] = {"dataset": spec.dataset, "seed": spec.seed}
    if spec.dataset == "synthetic":
        identity |= {"synthetic_alpha": spec.synthetic_alpha, "synthetic_beta": spec.synthetic_beta}
    return identity | {"recipe": asdict(PRETRAIN_RECIPES[spec.dataset])}


def default_base_path(config: RunConfig) -> Path:
    """Where the pretrained base of a built-in benchmark is cached (keyed by :func:`base_identity`)."""
    key = hashlib.sha256(json.dumps(base_identity(config), sort_keys=True).encode())
    return cache_dir() / "bases" / f"{config.dataset}-{key.hexdigest()[:12]}.pt"


def ensure_pretrained_base(config: RunConfig) -> Path:
    """Pretrain the benchmark base on the public slice if it is not cached yet."""
    path = default_base_path(config)
    if path.is_file():
        return path
    data = load_federation(config)
    recipe = PRETRAIN_RECIPES[config.dataset]
    # One thread: parallel reductions would make the checkpoint depend on the caller's thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(config.seed)
        module = build_architecture(config.dataset)
        train_epochs(
            module,
            list(module.parameters()),
            data.public,
            epochs=recipe.epochs,
            lr=recipe.lr,
            batch_size=recipe.batch_size,
            seed=config.seed,
            momentum=recipe.momentum,
        )
    finally:
        torch.set_num_threads(threads)
    result = evaluate(module, data.test)
    meta = {"identity": base_identity(config), "public_examples": len(data.public), "test_accuracy": result.accuracy}
    save_base(module, path, meta)
    return path


def save_base(module: nn.Module, path: Path, meta: dict[str, object]) -> None:
    """Write a base checkpoint atomically (a crash never leaves a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"state_dict": module.state_dict(), "meta": json.dumps(meta)}, tmp)
    os.replace(tmp, path)


def load_base(path: Path, dataset: str) -> ResidentBase:
    """Load a base checkpoint; cached per process and invalidated when the file changes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base checkpoint {path} does not exist")
    stat = path.stat()
    return _load_base(path.resolve(), dataset, stat.st_mtime_ns, stat.st_size)


def checkpoint_fingerprint(path: Path) -> str:
    """The fingerprint of the base checkpoint at ``path`` (ValueError if it is not one)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return fingerprint(checkpoint["state_dict"])
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path} is not a base checkpoint: {exc}") from exc


@lru_cache(maxsize=4)
def _load_base(path: Path, dataset: str, _mtime_ns: int, _size: int) -> ResidentBase:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    return ResidentBase(dataset, state, fingerprint(state), path)
