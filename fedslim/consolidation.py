"""Slow consolidation: every K rounds the shared fast layer is merged into the base and starts again.

The two timescales of fedslim: the fast layer moves every round; the base
moves every ``consolidate_every`` rounds, when the replica's fast state (what
every client can hold, not the server's exact state) is merged into it:

- a LoRA-adapted weight takes its low-rank delta, ``W <- W + (alpha / r) B A``;
- a sparse-adapted weight takes its values at their positions;
- every other shared fast tensor (the head, small layers, biases) is written
  into the base as it stands.

The fresh fast layer is then attached to the merged base as at the start of
a run, with adapters drawn from ``(seed, generation)``: a new A, B = 0, so the
model is unchanged by the merge up to float rounding. The merged base is named
by a chain of fingerprints, ``new = H(old, round, digest of the merged state)``:
a client that holds the resident checkpoint and the merges rebuilds the same
base, bit for bit, and checks each link as it goes. No base tensor crosses
the network. A merge travels as the merged fast state (exact float32), or,
when they cost less (a compressing downstream codec), as the replica's steps
that led to it from the fast layer the parent base starts with: the steps
clients applied as the replica moved, which any client rebuilds the merged
state from.

The arithmetic is elementwise float32 in a fixed order (one rank-one term at
a time), never a BLAS product whose blocking may differ between machines, so
every machine computes the same merged base. :class:`Merge` is one link;
:class:`BaseChain` is the server's chain; :func:`advance` applies a link,
:func:`replayed_base` a node's whole chain, and :func:`keep_merged` keeps its
result on the node's disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from google.protobuf.message import DecodeError

from fedslim.adapters import DeltaAdapted, FastSlowModel, LoRADelta, SparseDelta, fingerprint
from fedslim.base import ResidentBase
from fedslim.codecs.pipeline import DELTA, STATE, Pipeline, apply_step, decode_update, encode_update
from fedslim.config import FastSpec
from fedslim.protos.fedslim.v1 import update_pb2 as pb


def merged_fingerprint(parent: str, server_round: int, state: Mapping[str, np.ndarray]) -> str:
    """The fingerprint of the base ``parent`` with ``state`` merged into it after ``server_round``."""
    digest = hashlib.sha256(b"fedslim.merge\0")
    digest.update(f"{parent}\0{server_round}\0".encode())
    for name in sorted(state):
        tensor = np.ascontiguousarray(state[name], dtype=np.float32)
        digest.update(f"{name}\0{tensor.shape}\0".encode())
        digest.update(tensor.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Merge:
    """One link of the chain: the shared fast ``state`` merged into base ``parent`` after ``round``; the fresh fast
    layer starts as replica ``version``."""

    parent: str
    round: int
    version: int
    state: dict[str, np.ndarray]

    @property
    def fingerprint(self) -> str:
        """The merged base's fingerprint."""
        return merged_fingerprint(self.parent, self.round, self.state)

    def encode(self, lossless: Pipeline, steps: Sequence[bytes] | None = None, origin: int = 0) -> bytes:
        """The link as it travels and is kept: the state as exact float32 tensors under ``lossless``'s lossless
        stage; or, when ``steps`` are given and cost less, the replica's steps that lead to the state from
        version ``origin``, the fast layer the base ``parent`` starts with (the receiver builds it itself)."""
        state = encode_update(
            self.state,
            Pipeline(lossless=lossless.lossless),
            kind=STATE,
            base_fingerprint=self.parent,
            state_version=self.version,
        )
        header = {"parent": self.parent, "round": self.round, "version": self.version, "merged": self.fingerprint}
        full = pb.Merge(**header, state=state.blob).SerializeToString()
        if steps is None:
            return full
        compact = pb.Merge(**header, origin=origin, steps=list(steps)).SerializeToString()
        return compact if len(compact) < len(full) else full

    @classmethod
    def decode(
        cls, blob: bytes, shapes: Mapping[str, tuple[int, ...]], start: Mapping[str, np.ndarray] | None = None
    ) -> Merge:
        """A link from its bytes, checked against the shared fast tensors' shapes and its merged fingerprint
        (ValueError naming the problem). A link sent as steps needs ``start``: the fast layer as the base
        ``parent`` starts it."""
        message = header(blob)
        if message.state:
            update = decode_update(message.state, shapes)
            if update.kind != STATE or (update.base_fingerprint, update.state_version) != (
                message.parent,
                message.version,
            ):
                raise ValueError("corrupt merge: its fast state does not belong to it")
            state = update.tensors
        elif not message.merged:
            raise ValueError("corrupt merge: sent as replica steps without the base they make")
        elif start is None:
            raise ValueError("a merge sent as replica steps needs the fast layer they start from")
        else:
            state = {name: np.asarray(value, dtype=np.float32) for name, value in start.items()}
            version = int(message.origin)
            for step in message.steps:  # as the replica moved: step v turns version v into v + 1
                update = decode_update(step, shapes)
                if update.kind != DELTA or (update.base_fingerprint, update.state_version) != (message.parent, version):
                    raise ValueError(f"corrupt merge: its step from version {version} does not belong to it")
                state, version = apply_step(state, update.tensors), version + 1
            if version + 1 != message.version:
                raise ValueError(f"corrupt merge: its steps end at version {version}, not {message.version - 1}")
        merge = cls(message.parent, int(message.round), int(message.version), state)
        if message.merged and merge.fingerprint != message.merged:  # unnamed: a merge kept before links named it
            raise ValueError(f"corrupt merge: its state does not make the base {message.merged[:16]}... it names")
        return merge


def header(blob: bytes) -> pb.Merge:
    """A merge's proto (ValueError if it does not parse): its links are checked from ``parent`` and ``merged``
    before any state is rebuilt."""
    message = pb.Merge()
    try:
        message.ParseFromString(blob)
    except DecodeError as exc:
        raise ValueError(f"corrupt merge: {exc}") from exc
    return message


def merge_into_base(model: FastSlowModel) -> dict[str, torch.Tensor]:
    """The base state with ``model``'s fast layer merged into it (``model`` is consumed: its adapters are removed).

    Raises ValueError if the model's fast layer was not attached by
    :func:`~fedslim.adapters.attach_fast_layer` (nothing to merge into).
    """
    module = model.module.cpu()
    adapted = [(name, m) for name, m in module.named_modules() if isinstance(m, DeltaAdapted)]
    if not adapted:
        raise ValueError("the fast layer has no LoRA or sparse adapters to merge into the base")
    with torch.no_grad():
        for name, layer in adapted:
            weight = layer.base.weight
            merged = merged_weight(weight.detach().float().numpy(), layer.delta)
            weight.copy_(torch.from_numpy(merged))  # a half-precision base rounds the float32 sum once
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, layer.base)
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def merged_weight(weight: np.ndarray, delta: torch.nn.Module) -> np.ndarray:
    """``weight + delta``, in float32, one elementwise operation at a time (the same bits on every machine)."""
    base = np.asarray(weight, dtype=np.float32)
    if isinstance(delta, LoRADelta):
        scaled_b = np.float32(delta.scaling) * delta.lora_B.detach().numpy().astype(np.float32)
        factor_a = delta.lora_A.detach().numpy().astype(np.float32)
        product = np.zeros((scaled_b.shape[0], factor_a.shape[1]), dtype=np.float32)
        for k in range(factor_a.shape[0]):  # rank-one terms in order: no BLAS blocking, no fused multiply-add
            product = np.add(product, np.multiply(scaled_b[:, k : k + 1], factor_a[k : k + 1, :]), dtype=np.float32)
        return np.add(base, product.reshape(base.shape), dtype=np.float32)
    if isinstance(delta, SparseDelta):
        flat = base.reshape(-1).copy()
        indices = delta.get_buffer("indices").numpy()
        flat[indices] = np.add(flat[indices], delta.values.detach().numpy(), dtype=np.float32)
        return flat.reshape(base.shape)
    raise ValueError(f"cannot merge a {type(delta).__name__} into the base")


def check_parent(link: pb.Merge, fingerprint: str) -> None:
    """ValueError unless the merge ``link`` was made on the base of ``fingerprint``."""
    if link.parent != fingerprint:
        raise ValueError(
            f"the merge of round {link.round} was made on base {link.parent[:16]}..., not on {fingerprint[:16]}..."
        )


@lru_cache(maxsize=4)
def advance(base: ResidentBase, spec: FastSpec, blob: bytes) -> ResidentBase:
    """The base after the merge ``blob`` (a :class:`Merge`), checked link by link: ValueError if the merge is
    corrupt or was not made on ``base``. Cached: the nodes of a process share each merged base."""
    return _link(base, spec, blob)[1]


def _link(base: ResidentBase, spec: FastSpec, blob: bytes) -> tuple[Merge, ResidentBase]:
    """The merge ``blob`` decoded on ``base``, and the base it makes (see :func:`advance`)."""
    check_parent(header(blob), base.fingerprint)
    model = base.build(spec)
    merge = Merge.decode(blob, model.fast_shapes(), model.fast_state())
    model.load_fast_state(merge.state)
    state = merge_into_base(model)
    if set(state) != set(base.state):
        raise ValueError("the merged model does not have the base's tensors: its task attaches more than adapters")
    merged = ResidentBase(
        base.task, state, merge.fingerprint, base.path, generation=base.generation + 1, root=base.root_fingerprint
    )
    return merge, merged


@lru_cache(maxsize=2)
def replayed_base(root: ResidentBase, spec: FastSpec, blobs: tuple[bytes, ...]) -> ResidentBase:
    """The base the merges ``blobs`` (oldest first) make of the resident checkpoint ``root``, checked link by
    link: ValueError naming the first that is corrupt or does not fit.

    A deployed ClientApp starts a process for each message, so a node keeps the
    bases its chain led to on disk (:func:`keep_merged`), and one of them is
    loaded instead of replaying the chain when the links lead to it again.
    """
    head = root.fingerprint
    for blob in blobs:
        link = header(blob)
        check_parent(link, head)
        # A merge kept before links named their base is decoded for its fingerprint.
        head = link.merged or Merge.decode(blob, root.build(spec).fast_shapes()).fingerprint
    if not blobs:
        return root
    kept = _load_merged(root, head, len(blobs))
    if kept is not None:
        return kept
    base = root
    for blob in blobs:
        base = advance(base, spec, blob)
    return base


def merged_base_path(root: ResidentBase, fingerprint: str) -> Path:
    """Where a node keeps the base of ``fingerprint`` that consolidations made of its checkpoint ``root``."""
    return root.path.with_name(f"{root.path.stem}.merged-{fingerprint[:16]}{root.path.suffix}")


KEPT_MERGED_BASES = 2  # per checkpoint: nodes of one machine a merge apart do not evict each other's each message


def keep_merged(root: ResidentBase, base: ResidentBase) -> None:
    """Keep ``base``, which consolidations made of ``root`` and the server named, next to ``root``'s checkpoint
    with a digest of its tensors; the oldest beyond :data:`KEPT_MERGED_BASES` go. Best effort: a node whose base
    directory cannot be written replays its chain in each process."""
    path = merged_base_path(root, base.fingerprint)
    if base is root or path.is_file():
        return
    meta = {"fingerprint": base.fingerprint, "generation": base.generation, "content": fingerprint(base.state)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"state_dict": base.state, "meta": json.dumps(meta)}, tmp)
        os.replace(tmp, path)
        kept = sorted(path.parent.glob(f"{root.path.stem}.merged-*{root.path.suffix}"), key=os.path.getmtime)
        for old in kept[:-KEPT_MERGED_BASES]:
            old.unlink(missing_ok=True)
    except (OSError, RuntimeError):  # torch.save reports an unwritable file as RuntimeError
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _load_merged(root: ResidentBase, head: str, generation: int) -> ResidentBase | None:
    """The kept base of fingerprint ``head``, if there is one whose tensors are intact (None otherwise: a damaged
    file is removed, so that :func:`keep_merged` writes it again)."""
    path = merged_base_path(root, head)
    if not path.is_file():
        return None
    try:
        kept = torch.load(path, map_location="cpu", weights_only=True)
        meta, state = json.loads(kept["meta"]), kept["state_dict"]
        intact = set(state) == set(root.state) and fingerprint(state) == meta.get("content")
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, AttributeError, EOFError, pickle.UnpicklingError):
        intact = False
    if not intact or meta.get("fingerprint") != head or meta.get("generation") != generation:
        path.unlink(missing_ok=True)
        return None
    return ResidentBase(root.task, state, head, root.path, generation=generation, root=root.root_fingerprint)


@dataclass
class BaseChain:
    """The server's base: the resident checkpoint and each merge made on it since, oldest first.

    Parameters
    ----------
    root : ResidentBase
        The checkpoint every client holds (and is provisioned with).
    spec : FastSpec
        The run's fast layer.
    """

    root: ResidentBase
    spec: FastSpec
    merges: list[Merge] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)
    head: ResidentBase | None = None

    @property
    def base(self) -> ResidentBase:
        """The base the run trains on now."""
        return self.head or self.root

    def consolidate(
        self,
        server_round: int,
        state: Mapping[str, np.ndarray],
        version: int,
        lossless: Pipeline,
        steps: Sequence[bytes] | None = None,
        origin: int = 0,
    ) -> ResidentBase:
        """Merge the shared fast ``state`` into the base after ``server_round``; the fresh layer is replica
        ``version``. ``steps`` (if known) are the replica's steps from version ``origin`` to ``state``: the merge
        travels as them when they cost less than the state. Returns the merged base."""
        merge = Merge(self.base.fingerprint, server_round, version, {k: np.asarray(v) for k, v in state.items()})
        blob = merge.encode(lossless, steps, origin)
        self.head = advance(self.base, self.spec, blob)  # a merge sent as steps is rebuilt here as clients will
        self.merges.append(merge)
        self.blobs.append(blob)
        return self.head

    def missing(self, client_version: int | None) -> list[bytes]:
        """The merges a client holding replica ``client_version`` lacks (None: unknown, every merge)."""
        merges = zip(self.merges, self.blobs)
        return [blob for merge, blob in merges if client_version is None or merge.version > client_version]

    @classmethod
    def replayed(cls, root: ResidentBase, spec: FastSpec, blobs: list[bytes]) -> BaseChain:
        """The chain a checkpoint kept, rebuilt from its merges."""
        chain = cls(root, spec)
        for blob in blobs:
            merge, chain.head = _link(chain.base, spec, blob)
            chain.merges.append(merge)
            chain.blobs.append(blob)
        return chain
