"""The trained model out of a run: ``RUN_DIR/model/``, :func:`load_model`, and the formats ``fedslim export`` writes.

After every checkpoint and at the end of a run the server writes
``RUN_DIR/model/``: the fast layer it holds (its exact state, the one the
round's central evaluation measured) as ``fast.safetensors``, the
consolidations its base took (``merge-NNN.pb``, oldest first) and
``manifest.json`` (the task, its run config, the base's fingerprint and
where it was, the fast layer's settings, the round, the state's digest as the
log records it). The folder is written aside and renamed into place, so it
always holds one whole model.

:func:`load_model` rebuilds the module from it: the task's base from this
machine's checkpoint (checked against the manifest's fingerprint), the
consolidations replayed, the fast layer attached as the run attached it and
loaded. :func:`export_model` writes the folder anywhere and, with ``merged``,
the base with the fast layer folded in (``model.safetensors``, the names of
the task's own ``build_base()`` module) and, for LoRA, a ``peft`` adapter
folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedslim import __version__
from fedslim.adapters import DeltaAdapted, FastSlowModel, LoRADelta, state_digest
from fedslim.base import ResidentBase, load_base
from fedslim.config import ConfigError, FastSpec, RunConfig

MODEL_DIRNAME = "model"
MANIFEST_FILENAME = "manifest.json"
FAST_FILENAME = "fast.safetensors"
PERSONAL_FILENAME = "personal.safetensors"
MERGED_FILENAME = "model.safetensors"
CONSOLIDATED_BASE_FILENAME = "base.safetensors"
PEFT_DIRNAME = "peft"
MODEL_FORMAT = 1


@dataclass(frozen=True)
class ModelManifest:
    """What ``manifest.json`` says: everything but the tensors that rebuilding the run's model needs."""

    format: int
    fedslim_version: str
    run_id: str
    task: str
    config: dict[str, Any]
    """The run config (:meth:`RunConfig.to_dict`): the task reads its settings (seed, data) from it."""
    fast: dict[str, Any]
    """The fast layer's settings (:class:`FastSpec`)."""
    round: int
    finished: bool
    state_digest: str
    """SHA-256 of the fast state (hex), as the log records the final one."""
    base_fingerprint: str
    """The resident base checkpoint's fingerprint."""
    base_path: str
    base_identity: dict[str, Any]
    merges: list[str] = field(default_factory=list)
    """The consolidation files, oldest first: the model's base is the checkpoint with each merged into it."""
    merged_base_fingerprint: str = ""
    """The base after the consolidations (the checkpoint's own fingerprint without any)."""
    personal: str = "none"
    node: str = ""
    """The node whose own personal tensors (``personal.safetensors``) the folder holds; empty: the server's model,
    with the base's head."""

    def run_config(self) -> RunConfig:
        values = dict(self.config)
        return RunConfig(**{**values, "fast": FastSpec(**values["fast"])})

    def spec(self) -> FastSpec:
        return FastSpec(**self.fast)


def run_manifest(
    config: RunConfig,
    run_id: str,
    root: ResidentBase,
    head_fingerprint: str,
    completed_round: int,
    finished: bool,
    fast_state: Mapping[str, np.ndarray],
    num_merges: int,
    node: str = "",
) -> ModelManifest:
    """The manifest of the model a run holds after ``completed_round`` (``node``: a node's own, with its personal
    tensors)."""
    return ModelManifest(
        format=MODEL_FORMAT,
        fedslim_version=__version__,
        run_id=run_id,
        task=config.task,
        config=config.to_dict(),
        fast=asdict(config.fast),
        round=completed_round,
        finished=finished,
        state_digest=state_digest(fast_state, length=64),
        base_fingerprint=root.fingerprint,
        base_path=str(root.path),
        base_identity=root.task.base_identity(config),
        merges=[merge_filename(i) for i in range(num_merges)],
        merged_base_fingerprint=head_fingerprint,
        personal=config.fast.personal,
        node=node,
    )


def merge_filename(index: int) -> str:
    return f"merge-{index + 1:03d}.pb"


def write_model(
    folder: Path,
    manifest: ModelManifest,
    fast_state: Mapping[str, np.ndarray],
    merges: list[bytes],
    personal: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write the model folder ``folder`` whole: aside in its parent, then renamed into place (the old one goes).
    ``personal``: a node's own personal tensors (its manifest names the node)."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    retired = folder.with_name(f".{folder.name}-old-{os.getpid()}")
    for leftover in (*folder.parent.glob(f".{folder.name}-new-*"), *folder.parent.glob(f".{folder.name}-old-*")):
        if not folder.exists() and leftover.name.startswith(f".{folder.name}-old-"):
            os.rename(leftover, folder)  # a write killed between its two renames: the old model comes back
        else:
            shutil.rmtree(leftover, ignore_errors=True)  # of a write that was killed
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-new-", dir=folder.parent))
    try:
        tensors = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in fast_state.items()}
        save_file(tensors, staging / FAST_FILENAME, metadata={"state_digest": manifest.state_digest})
        if personal is not None:
            save_file(
                {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in personal.items()},
                staging / PERSONAL_FILENAME,
            )
        for name, blob in zip(manifest.merges, merges, strict=True):
            (staging / name).write_bytes(blob)
        (staging / MANIFEST_FILENAME).write_text(json.dumps(asdict(manifest), indent=1, default=str) + "\n")
        share_like_parent(staging, folder.parent)
        for path in staging.iterdir():
            with path.open("rb") as file:
                os.fsync(file.fileno())
        if folder.exists():
            os.rename(folder, retired)
            os.rename(staging, folder)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, folder)
    except BaseException:
        if retired.exists() and not folder.exists():
            os.rename(retired, folder)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    parent = os.open(folder.parent, os.O_RDONLY)
    try:
        os.fsync(parent)  # the renames themselves survive a power cut
    finally:
        os.close(parent)


def share_like_parent(folder: Path, parent: Path) -> None:
    """Give ``folder`` and what it holds the permissions of ``parent`` (mkdtemp and safetensors write private
    files): a model folder is as readable as the run directory it is in."""
    mode = parent.stat().st_mode & 0o777
    folder.chmod(mode)
    for path in folder.rglob("*"):
        path.chmod(mode if path.is_dir() else mode & 0o666)


def model_folder(path: Path) -> Path:
    """The model folder of a run directory, or ``path`` itself if it is one (ConfigError saying why neither)."""
    path = Path(path)
    if (path / MANIFEST_FILENAME).is_file():
        return path
    if (path / MODEL_DIRNAME / MANIFEST_FILENAME).is_file():
        return path / MODEL_DIRNAME
    if not path.is_dir():
        raise ConfigError(f"{path} is not a run directory ({'a file' if path.exists() else 'no such folder'})")
    from fedslim.commlog import LOG_FILENAME

    if (path / LOG_FILENAME).is_file():
        raise ConfigError(
            f"no model yet in {path}: it has no {MODEL_DIRNAME}/ folder (the run was killed before round 0 ended, "
            "or a fedslim without export ran it)"
        )
    raise ConfigError(f"{path} is not a run directory or a model folder (no {MODEL_DIRNAME}/{MANIFEST_FILENAME})")


def read_manifest(folder: Path) -> ModelManifest:
    """The manifest of a model folder (ConfigError if it cannot be read or another fedslim wrote it)."""
    path = folder / MANIFEST_FILENAME
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(ModelManifest)}
        manifest = ModelManifest(**{k: v for k, v in values.items() if k in known})
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if manifest.format != MODEL_FORMAT:
        raise ConfigError(f"{path} has model format {manifest.format}; this fedslim reads format {MODEL_FORMAT}")
    return manifest


@dataclass(frozen=True)
class RunModel:
    """A run's model rebuilt on this machine: its manifest, the base it stands on and the model with its fast state."""

    manifest: ModelManifest
    base: ResidentBase
    model: FastSlowModel


def open_model(path: Path, base_path: Path | None = None, personal: Mapping[str, np.ndarray] | None = None) -> RunModel:
    """Rebuild the model of a run directory or model folder (ConfigError, one line, naming what is wrong).

    The base is ``base_path``, else the task's checkpoint on this machine,
    else the file the run used; its fingerprint must be the manifest's.
    ``personal``: a node's personal tensors (its own head) to load as well.
    """
    from safetensors.torch import load_file

    from fedslim.consolidation import BaseChain
    from fedslim.task import task_for

    folder = model_folder(path)
    manifest = read_manifest(folder)
    try:
        config, spec = manifest.run_config(), manifest.spec()
    except TypeError as exc:
        raise ConfigError(f"{folder / MANIFEST_FILENAME}: its run config does not fit this fedslim: {exc}") from exc
    task = task_for(config)  # with the run's task settings, which may shape its build_base()
    root = _run_base(manifest, task, config, base_path)
    try:
        blobs = tuple((folder / name).read_bytes() for name in manifest.merges)
        chain = BaseChain.replayed(root, spec, list(blobs))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the consolidations in {folder} cannot be replayed: {exc}") from exc
    if manifest.merged_base_fingerprint and chain.base.fingerprint != manifest.merged_base_fingerprint:
        raise ConfigError(f"the consolidations in {folder} do not make the run's base")
    model = chain.base.build(spec)
    try:
        tensors = load_file(folder / FAST_FILENAME)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {folder / FAST_FILENAME}: {exc}") from exc
    state = {name: tensor.numpy() for name, tensor in tensors.items()}
    if state_digest(state, length=64) != manifest.state_digest:
        raise ConfigError(f"{folder / FAST_FILENAME} is not the fast state its manifest names (digest differs)")
    if personal is None and manifest.node:
        try:
            personal = {name: tensor.numpy() for name, tensor in load_file(folder / PERSONAL_FILENAME).items()}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read node {manifest.node}'s {folder / PERSONAL_FILENAME}: {exc}") from exc
    try:
        model.load_fast_state(state)
        if personal is not None:
            model.load_personal_state(personal)
    except ValueError as exc:
        raise ConfigError(f"the model in {folder} does not fit task {manifest.task!r}: {exc}") from exc
    model.module.eval()
    return RunModel(manifest, chain.base, model)


def _run_base(manifest: ModelManifest, task: Any, config: RunConfig, base_path: Path | None) -> ResidentBase:
    """The first candidate checkpoint whose fingerprint is the run's base's (ConfigError: none is, or none is here)."""
    candidates = [Path(base_path)] if base_path is not None else [task.base_path(config), Path(manifest.base_path)]
    differing = []
    for path in dict.fromkeys(candidates):
        if not path.is_file():
            continue
        try:
            base = load_base(path, task)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"the base checkpoint {path} cannot be loaded: {exc}") from exc
        if base.fingerprint == manifest.base_fingerprint:
            return base
        differing.append(f"{path} is {base.fingerprint[:16]}...")
    expected = f"the run's base (fingerprint {manifest.base_fingerprint[:16]}...)"
    if differing:
        raise ConfigError(f"{expected} differs from this machine's: {'; '.join(differing)}")
    looked = " or ".join(str(path) for path in dict.fromkeys(candidates))
    raise ConfigError(
        f"{expected} is missing on this machine: no checkpoint at {looked}; copy it there or name it "
        "(export --base, load_model(base_path=...))"
    )


def load_model(
    run_dir: str | Path,
    base_path: str | Path | None = None,
    personal: Mapping[str, np.ndarray] | None = None,
    device: str = "cpu",
) -> nn.Module:
    """The model a run trained, ready for inference (eval mode): the task's module with its fast layer attached.

    ``run_dir`` is a run directory or a model folder ``fedslim export``
    wrote. Its central accuracy on the task's test data is the one the run
    logged for the round the folder holds (the last, once the run finished).
    ``base_path``: the base checkpoint, where the task's own cache does not
    hold it. ``personal``: a node's personal tensors (with ``--personal
    head``; the server's model keeps the base's head). ``device``: where the
    module goes; the accuracy is exactly the run's on the device the run
    evaluated on (other kernels round otherwise).
    """
    opened = open_model(Path(run_dir), Path(base_path) if base_path is not None else None, personal)
    return opened.model.module.to(device)


# ----------------------------------------------------------------------------- formats without fedslim


def merged_state(model: FastSlowModel) -> dict[str, torch.Tensor]:
    """The base's state with the fast layer folded in, under the task's own ``build_base()`` names (``model`` is
    consumed). LoRA: ``W + (alpha / r) B A``; sparse: ``W + delta``; head, full and other fast tensors: their
    values."""
    from fedslim.consolidation import merge_into_base

    module = model.module
    if _is_peft(module):
        merged = module.merge_and_unload().state_dict()  # type: ignore[operator]
    elif any(isinstance(m, DeltaAdapted) for m in module.modules()):
        merged = merge_into_base(model)
    else:
        merged = module.state_dict()
    return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in merged.items()}


def _is_peft(module: nn.Module) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(module, peft.PeftModel)


def collapsed_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state without fedslim's adapters: each adapted layer's own tensors under its own name, its
    delta left out (the trained head, biases and small layers are in it)."""
    adapted = [name for name, m in module.named_modules() if isinstance(m, DeltaAdapted)]
    state = {}
    for name, tensor in module.state_dict().items():
        owner = next((a for a in adapted if name.startswith(a + ".")), None)
        if owner is None:
            state[name] = tensor
        elif name.startswith(owner + ".base."):
            state[owner + "." + name[len(owner) + len(".base.") :]] = tensor
    return state


def write_peft_adapter(model: FastSlowModel, base_state: Mapping[str, torch.Tensor], task: Any, out: Path) -> None:
    """A ``peft`` LoRA adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) for ``model``, which
    ``PeftModel.from_pretrained`` loads onto the task's ``build_base()`` holding ``base_state``.

    A task whose fast layer is a peft model saves it as it is. fedslim's own
    LoRA becomes the same LoRA in peft's terms: the adapted layers as
    ``target_modules`` with ``lora_alpha`` and ``r``, the other fast layers
    (the head, small layers) as ``modules_to_save``, the adapted layers' fast
    biases as ``bias="lora_only"``. ValueError for what peft cannot express.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    module = model.module
    if _is_peft(module):
        module.save_pretrained(out)  # type: ignore[operator]
        return
    adapted = {name: m for name, m in module.named_modules() if isinstance(m, DeltaAdapted)}
    if not adapted or not all(isinstance(m.delta, LoRADelta) for m in adapted.values()):
        raise ValueError("a peft adapter is written for LoRA fast layers only (use --merged for this one)")
    if any(isinstance(m.base, nn.Conv2d) and m.base.dilation != (1, 1) for m in adapted.values()):
        raise ValueError("peft's LoRA on a dilated convolution differs from fedslim's: no peft adapter (use --merged)")
    ranks = {m.delta.lora_A.shape[0] for m in adapted.values()}
    scalings = {m.delta.scaling for m in adapted.values()}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ValueError("the LoRA layers differ in rank or scaling: peft's config holds one of each")
    (rank,) = ranks
    (scaling,) = scalings
    fast = [_collapsed_name(name, adapted) for name in model.fast_names + model.personal_names]
    lora_biases = [name for name in fast if name.rpartition(".")[0] in adapted and name.endswith(".bias")]
    saved = sorted(
        {
            name.rpartition(".")[0]
            for name in fast
            if name.rpartition(".")[0] not in adapted and name.rsplit(".", 1)[-1] not in ("lora_A", "lora_B")
        }
    )
    if any(name.rpartition(".")[0] == "" for name in fast if name.rpartition(".")[0] not in adapted):
        raise ValueError("a fast tensor of the model's root module cannot be a peft modules_to_save entry")
    base = task.build_base()
    base.load_state_dict({**base_state, **collapsed_state(module)})
    config = LoraConfig(
        r=rank,
        lora_alpha=scaling * rank,
        target_modules=sorted(adapted),
        modules_to_save=saved or None,
        bias="lora_only" if lora_biases else "none",
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(base, config)
    inner = peft_model.base_model.model
    reached = {name for name, m in inner.named_modules() if isinstance(m, LoraLayer)}
    wrapped = {name for name, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    if reached != set(adapted) or wrapped != set(saved):  # peft matches names by suffix
        raise ValueError("peft's name matching reaches other layers than the fast ones (use --merged)")
    with torch.no_grad():
        for name, layer in adapted.items():
            lora = peft_model.base_model.model.get_submodule(name)
            factor_a, factor_b = layer.delta.lora_A, layer.delta.lora_B
            lora.lora_A["default"].weight.copy_(factor_a.reshape(lora.lora_A["default"].weight.shape))
            lora.lora_B["default"].weight.copy_(factor_b.reshape(lora.lora_B["default"].weight.shape))
    peft_model.save_pretrained(out)


def _collapsed_name(name: str, adapted: Mapping[str, nn.Module]) -> str:
    owner = next((a for a in adapted if name.startswith(a + ".")), None)
    if owner is None:
        return name
    rest = name[len(owner) + 1 :]
    if rest.startswith("base."):
        return owner + "." + rest[len("base.") :]
    return owner + "." + rest.rsplit(".", 1)[-1]  # delta.lora_A -> lora_A


# ----------------------------------------------------------------------------- fedslim export


@dataclass(frozen=True)
class Exported:
    """What :func:`export_model` wrote."""

    folder: Path
    files: list[str]
    notes: list[str]


def export_model(
    run_dir: Path,
    out: Path,
    merged: bool = False,
    base_path: Path | None = None,
    personal: Mapping[str, np.ndarray] | None = None,
    node: str = "",
) -> Exported:
    """Write the model of ``run_dir`` to ``out``: the model folder, and with ``merged`` the formats that need no
    fedslim: ``model.safetensors`` (the base with the fast layer folded in), ``base.safetensors`` (the base the
    run's consolidations made, which the peft adapter applies to) and ``peft/`` (LoRA only). ``personal``: the
    personal tensors of node ``node``, kept in the folder and folded into the merged model and the adapter."""
    from safetensors.torch import save_file

    folder = model_folder(run_dir)
    manifest = read_manifest(folder)
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise ConfigError(f"--out {out} is the model folder itself")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} is not an empty folder; choose a new one")
    opened = open_model(folder, base_path, personal)  # checks the base and the tensors before anything is written
    if personal is not None:
        manifest = replace(manifest, node=node)
    blobs = [(folder / name).read_bytes() for name in manifest.merges]
    own = opened.model.personal_state() if manifest.node else None
    write_model(out, manifest, opened.model.fast_state(), blobs, own)
    files = sorted(path.name for path in out.iterdir())
    notes: list[str] = []
    if not merged:
        return Exported(out, files, notes)
    base_state = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in opened.base.state.items()}
    if manifest.merges:
        save_file(base_state, out / CONSOLIDATED_BASE_FILENAME, metadata={"fingerprint": opened.base.fingerprint})
        files.append(CONSOLIDATED_BASE_FILENAME)
    if manifest.fast["kind"] in ("lora", "ffa-lora") or _is_peft(opened.model.module):
        try:
            write_peft_adapter(opened.model, base_state, opened.base.task, out / PEFT_DIRNAME)
            files.append(PEFT_DIRNAME + "/")
        except ImportError:
            notes.append("no peft adapter: peft is not installed (pip install peft)")
        except ValueError as exc:
            notes.append(f"no peft adapter: {exc}")
    state = merged_state(opened.model)
    expected = set(opened.base.task.build_base().state_dict())
    if set(state) != expected:
        raise ConfigError(
            "the merged model does not have the names of the task's build_base() module: its attach_fast adds "
            f"tensors that cannot be folded in ({sorted(set(state) ^ expected)[:3]})"
        )
    save_file(state, out / MERGED_FILENAME, metadata={"state_digest": manifest.state_digest})
    files.append(MERGED_FILENAME)
    share_like_parent(out, out.parent)
    return Exported(out, files, notes)
