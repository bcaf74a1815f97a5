"""The resident slow base: a checkpoint on local disk, identified by its fingerprint.

A task (:mod:`fedslim.task`) says where its base checkpoint lives and how it
is made when a machine has none: the built-in benchmarks pretrain theirs
centrally on the public slice of their dataset, once, and cache it; clients
and server then load the same file. A deployed client points to its own
checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import nn

from fedslim.adapters import FastSlowModel, fingerprint
from fedslim.config import FastSpec, RunConfig

if TYPE_CHECKING:
    from fedslim.task import Task


def generation_seed(seed: int, generation: int) -> int:
    """The seed of the fast layer attached after ``generation`` consolidations (0: the run's own seed)."""
    if generation == 0:
        return seed
    return int(np.random.SeedSequence([seed, generation]).generate_state(1)[0])


@dataclass(frozen=True, eq=False)
class ResidentBase:
    """A loaded base checkpoint of a task and its fingerprint (hashable by identity: loads are cached).

    After ``generation`` consolidations (:mod:`fedslim.consolidation`) the
    state is the checkpoint's with the merged fast layers added, its
    fingerprint the chain's, and ``root`` the checkpoint's own fingerprint.
    """

    task: Task
    state: dict[str, torch.Tensor]
    fingerprint: str
    path: Path
    generation: int = 0
    root: str = ""

    @property
    def root_fingerprint(self) -> str:
        """The fingerprint of the checkpoint on disk this base was made from."""
        return self.root or self.fingerprint

    def build(self, spec: FastSpec) -> FastSlowModel:
        """A fresh model with this base's weights and the fast layer ``spec`` attached (its adapters drawn anew
        for each generation)."""
        if self.generation:
            spec = replace(spec, seed=generation_seed(spec.seed, self.generation))
        module = self.task.build_base()
        try:
            module.load_state_dict(self.state)
        except RuntimeError as exc:
            raise ValueError(
                f"the base checkpoint {self.path} does not fit the task's architecture; delete it to make it anew "
                f"({str(exc).splitlines()[0]})"
            ) from exc
        model = self.task.attach_fast(module, spec, self.fingerprint)
        if spec.personal != "none" and not model.personal_names:
            raise ValueError(
                f"--personal {spec.personal}: task {self.task.name!r} declared no personal tensors "
                "(its attach_fast must pass personal_names to FastSlowModel)"
            )
        return model

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state.values())


UNLIKE_UNNAMED = frozenset({"5b73e0cf631f27e1"})
"""Float arithmetics (:func:`float_arithmetic`) known to differ from that of the machine that measured the
results and behaviour records made before they named theirs: such a machine pretrains every base to other bits.
Found 2026-11-27 on an AMD EPYC with AVX-512: fmnist seed 0 pretrains there to dc237f4c095b21e7 (recorded:
402c4f166d30fda0), synthetic seed 0 to 653997a9fa67e667 (recorded: c82ef7f6744d115d)."""


@lru_cache(maxsize=1)
def float_arithmetic() -> str:
    """A digest of how this machine's torch computes float32 training steps, on one thread: a few SGD steps of a
    small convolutional network on fixed numbers (16 hex digits).

    Pretraining is deterministic on a machine, but CPUs differ in the kernels
    torch runs (AVX2 or AVX-512, MKL's paths for each vendor) and so in the
    last bits of products and sums. Machines with different digests pretrain
    the convolutional and MLP bases to other bits; the same digest is the
    evidence that they compute those kernels alike (not a proof for kernels it
    does not run, nor for another thread count).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        network = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 14 * 14, 64))
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        inputs = torch.randn(32, 3, 16, 16, generator=generator)
        labels = torch.randint(0, 64, (32,), generator=generator)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(network(inputs), labels).backward()
            optimizer.step()
        return fingerprint(network.state_dict())[:16]
    finally:
        torch.set_num_threads(threads)


def cache_dir() -> Path:
    return Path(os.environ.get("FEDSLIM_CACHE", Path.home() / ".cache" / "fedslim"))


class BaseOrigin(StrEnum):
    """Where the base a run trains on came from (the ``origin`` of the communication log's ``bases`` rows)."""

    PRETRAINED = "pretrained"  # made by the task's pretrain() in this process, then cached
    CACHE = "cache"  # loaded from the cache, made by an earlier process
    PROVISIONED = "provisioned"  # a deployed node that lacked it was given it by the server
    NODE_FILE = "node-file"  # a deployed node's own checkpoint (its base-path, or its cache)


_PRETRAINED_HERE: set[Path] = set()
"""The checkpoints :func:`ensure_base` pretrained in this process that no run has started on yet (resolved
paths)."""


def ensure_base(task: Task, config: RunConfig) -> Path:
    """The task's base checkpoint on this machine, made by :meth:`Task.pretrain` (once) if there is none yet."""
    path = task.base_path(config)
    if path.is_file():
        return path
    module = task.pretrain(config)
    save_base(module, path, {"identity": task.base_identity(config)})
    _PRETRAINED_HERE.add(path.resolve())
    return path


@dataclass(frozen=True)
class BaseProvenance:
    """Where a base came from, where it is, and its fingerprint: what a run prints and logs of its base."""

    origin: BaseOrigin
    path: Path | None
    """The checkpoint on the machine that holds it (None where that machine did not say)."""
    fingerprint: str

    def describe(self) -> str:
        """One line: ``pretrained now, cached at PATH (fingerprint 0123abcd...)``, and so on."""
        where = {
            BaseOrigin.PRETRAINED: f"pretrained now, cached at {self.path}",
            BaseOrigin.CACHE: f"loaded from the cache at {self.path}",
            BaseOrigin.PROVISIONED: "provisioned by the server",
            BaseOrigin.NODE_FILE: f"the node's own file {self.path}" if self.path else "the node's own file",
        }[self.origin]
        return f"{where} (fingerprint {self.fingerprint[:16]})"


def provenance_of(base: ResidentBase, run_starts: bool = False) -> BaseProvenance:
    """Where ``base``, made by :func:`ensure_base` and loaded by :func:`load_base`, came from: pretrained by this
    process for the run about to start, or cached before. ``run_starts``: the run starts on it now, so later runs
    of this process (a sweep, a notebook) find it in the cache."""
    path = base.path.resolve()
    origin = BaseOrigin.PRETRAINED if path in _PRETRAINED_HERE else BaseOrigin.CACHE
    if run_starts:
        _PRETRAINED_HERE.discard(path)
    return BaseProvenance(origin, base.path, base.root_fingerprint)


def save_base(module: nn.Module, path: Path, meta: dict[str, object]) -> None:
    """Write a base checkpoint atomically (a crash never leaves a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"state_dict": module.state_dict(), "meta": json.dumps(meta)}, tmp)
    os.replace(tmp, path)


def read_checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint :func:`save_base` wrote (ValueError if ``path`` holds none)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path} is not a base checkpoint: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a base checkpoint: its state_dict is a {type(state).__name__}")
    return state


def load_base(path: Path, task: Task) -> ResidentBase:
    """Load a base checkpoint of ``task``; cached per process and invalidated when the file changes.

    FileNotFoundError if there is no file, ValueError if it is not a checkpoint of the task.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base checkpoint {path} does not exist")
    stat = path.stat()
    return _load_base(path.resolve(), task, FileIdentity(stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino))


def checkpoint_fingerprint(path: Path, task: Task) -> str:
    """The fingerprint of the task's base checkpoint at ``path`` (ValueError if it is not one)."""
    return fingerprint(task.load_base_state(path))


@lru_cache(maxsize=4)
def _load_base(path: Path, task: Task, identity: FileIdentity) -> ResidentBase:
    state = task.load_base_state(path)
    return ResidentBase(task, state, recorded_fingerprint(path, task, state, identity), path)


class FileIdentity(NamedTuple):
    """What changes when a file is rewritten, replaced or copied over: the key of cached loads and fingerprints."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


SIDECAR_SUFFIX = ".fingerprint"


def sidecar_path(path: Path) -> Path:
    """Where the fingerprint of the checkpoint at ``path`` is recorded."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def recorded_fingerprint(path: Path, task: Task, state: dict[str, torch.Tensor], identity: FileIdentity) -> str:
    """The fingerprint of ``state``, the checkpoint at ``path``: read from its sidecar file while the checkpoint's
    size, modification and change times and inode are the ones recorded there, else computed and recorded.

    A deployed ClientApp runs in a new process for every message; hashing a
    large base (91 MB for MiniLM) each time would cost more than loading it.
    A checkpoint rewritten or replaced changes its size or time, and so its
    fingerprint is computed anew. A sidecar that cannot be written (a
    read-only folder) only costs the hash.
    """
    sidecar = sidecar_path(path)
    # The change time and inode catch a copy that kept the modification time.
    key = {**identity._asdict(), "task": f"{type(task).__module__}.{type(task).__qualname__}"}
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8"))
        if isinstance(recorded, dict) and {k: recorded.get(k) for k in key} == key:
            held = recorded.get("fingerprint")
            if isinstance(held, str) and len(held) == 64:
                return held
    except (OSError, ValueError):
        pass  # absent or unreadable: computed below
    computed = fingerprint(state)
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({**key, "fingerprint": computed}), encoding="utf-8")
        os.replace(tmp, sidecar)
    except OSError:
        tmp.unlink(missing_ok=True)
    return computed


BASE_FILE = re.compile(r"(?P<task>.+)-[0-9a-f]{12}\.pt")
"""The name :meth:`Task.base_path` gives a cached checkpoint: the task's name and its identity's key."""
_COMPANION_SUFFIX = re.compile(r"\.(?:fingerprint|part|part\.json)$")  # a sidecar, a download under way
_MERGED_SUFFIX = re.compile(r"\.merged-[0-9a-f]{16}\.pt$")  # a base consolidation made (fedslim.consolidation)


def _base_file_of(name: str) -> str | None:
    """The cached checkpoint's file name that the file ``name`` belongs to (None: no cached base's)."""
    root = _MERGED_SUFFIX.sub(".pt", _COMPANION_SUFFIX.sub("", name))
    return root if BASE_FILE.fullmatch(root) else None


@dataclass(frozen=True)
class CachedBase:
    """A base checkpoint in the cache (``fedslim bases list``), with the files that belong to it."""

    path: Path
    task: str
    """The task's name, from the file's name."""
    files: tuple[Path, ...]
    """The checkpoint (when complete) and its companions: fingerprint sidecars, bases consolidation made of it, a
    download under way."""
    size: int
    """Bytes of all of ``files``."""
    modified: float
    """The newest modification time among ``files`` (Unix seconds)."""
    fingerprint: str | None
    """The checkpoint's fingerprint where its sidecar records it for the file as it is (None: not known without
    loading it)."""

    @property
    def complete(self) -> bool:
        return self.path in self.files


def cached_bases(folder: Path | None = None) -> list[CachedBase]:
    """Every base in the cache folder (``$FEDSLIM_CACHE/bases`` by default), by file name; files of other names
    are not fedslim's and are left out."""
    folder = folder or cache_dir() / "bases"
    groups: dict[str, list[Path]] = {}
    for file in sorted(folder.iterdir()) if folder.is_dir() else ():
        root = _base_file_of(file.name)
        if root is not None and not file.name.startswith(".") and file.is_file():
            groups.setdefault(root, []).append(file)
    found = []
    for root, files in groups.items():
        path = folder / root
        stats = [file.stat() for file in files]
        found.append(
            CachedBase(
                path=path,
                task=BASE_FILE.fullmatch(root)["task"],  # type: ignore[index]
                files=tuple(files),
                size=sum(stat.st_size for stat in stats),
                modified=max(stat.st_mtime for stat in stats),
                fingerprint=sidecar_fingerprint(path) if path.is_file() else None,
            )
        )
    return found


def sidecar_fingerprint(path: Path) -> str | None:
    """The fingerprint the sidecar of the checkpoint at ``path`` records, if it was recorded for the file as it is."""
    try:
        recorded = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
        stat = path.stat()
    except (OSError, ValueError):
        return None
    identity = FileIdentity(stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)._asdict()
    if not isinstance(recorded, dict) or any(recorded.get(key) != value for key, value in identity.items()):
        return None
    held = recorded.get("fingerprint")
    return held if isinstance(held, str) and len(held) == 64 else None


def clear_cached_bases(names: list[str], folder: Path | None = None) -> list[CachedBase]:
    """Remove the cached bases ``names`` names (a task's name or a checkpoint's file name; all of them when
    ``names`` is empty) with their files; returns what was removed. ValueError naming a name that matches none."""
    cached = cached_bases(folder)
    unmatched = [name for name in names if not any(name in (base.task, base.path.name) for base in cached)]
    if unmatched:
        held = ", ".join(sorted({base.task for base in cached})) or "none"
        raise ValueError(f"no cached base named {', '.join(unmatched)} (cached: {held})")
    chosen = [base for base in cached if not names or base.task in names or base.path.name in names]
    for base in chosen:
        for file in base.files:
            file.unlink(missing_ok=True)
    return chosen
