"""The fast/slow split: which tensors of a model train and travel.

A :class:`FastSlowModel` wraps any ``torch.nn.Module`` and a set of parameter
names that are *fast*. Everything else is the *slow base*: resident on the
client, frozen, identified by :func:`fingerprint` and never serialised into a
message. Fast layers are built by :func:`attach_fast_layer` (LoRA, FFA-LoRA,
head, sparse, full) or taken from a ``peft`` model with
:meth:`FastSlowModel.from_peft`.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedslim.config import FastSpec


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(numpy_bits(tensor).tobytes())
    return digest.hexdigest()


def numpy_bits(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array holding its bits: itself where numpy has its dtype, else (bfloat16, float8)
    its bytes reinterpreted as integers of the same width."""
    if tensor.dtype.is_floating_point and tensor.dtype not in NUMPY_FLOATS:
        return tensor.view(SAME_WIDTH_INTEGER[tensor.element_size()]).numpy()
    return tensor.numpy()


NUMPY_FLOATS = frozenset({torch.float16, torch.float32, torch.float64})
SAME_WIDTH_INTEGER = {1: torch.uint8, 2: torch.int16}


def _seeded_generator(seed: int, name: str) -> torch.Generator:
    # crc32 is stable across processes, unlike hash(): server and clients agree.
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


class LoRADelta(nn.Module):
    """Low-rank weight delta ``(alpha / r) * B @ A`` for a Linear or Conv2d weight.

    For a Conv2d weight of shape (out, in, kh, kw), A has shape (r, in*kh*kw)
    and the product is reshaped, which is LoRA on the unfolded convolution.
    B starts at zero so the adapted model equals the base at initialisation.
    """

    def __init__(self, weight_shape: torch.Size, rank: int, lora_alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        out_features = weight_shape[0]
        in_features = math.prod(weight_shape[1:])
        self.weight_shape = weight_shape
        self.scaling = lora_alpha / rank
        bound = 1.0 / math.sqrt(in_features)
        self.lora_A = nn.Parameter((torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self) -> torch.Tensor:
        return (self.scaling * self.lora_B @ self.lora_A).view(self.weight_shape)


class SparseDelta(nn.Module):
    """Additive delta on a fixed set of weight entries; indices come from a seed."""

    def __init__(self, weight_shape: torch.Size, density: float, generator: torch.Generator) -> None:
        super().__init__()
        numel = math.prod(weight_shape)
        count = max(1, round(density * numel))
        indices = torch.randperm(numel, generator=generator)[:count].sort().values
        self.weight_shape = weight_shape
        self.register_buffer("indices", indices, persistent=False)
        self.values = nn.Parameter(torch.zeros(count))

    def forward(self) -> torch.Tensor:
        flat = torch.zeros(math.prod(self.weight_shape), dtype=self.values.dtype, device=self.values.device)
        return flat.index_put((self.get_buffer("indices"),), self.values).view(self.weight_shape)


class DeltaAdapted(nn.Module):
    """A frozen Linear/Conv2d whose effective weight is ``base.weight + delta()``."""

    def __init__(self, base: nn.Linear | nn.Conv2d, delta: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.delta = delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight
        if weight.dtype != torch.float32:
            # A half-precision base: the float32 delta as a layer of its own in the base's dtype, so that the
            # delta is not rounded away against the larger base weight it would be added to.
            return self._layer(x, weight, self.base.bias) + self._layer(x, self.delta().to(weight.dtype), None)
        return self._layer(x, weight + self.delta(), self.base.bias)

    def _layer(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.base, nn.Linear):
            return F.linear(x, weight, bias)
        return self.base._conv_forward(x, weight, bias)


class FastSlowModel:
    """A model split into a slow base and the fast tensors that train: shared ones that travel, personal ones that
    stay on the client.

    Parameters
    ----------
    module : nn.Module
        The whole model (base plus any adapter modules already attached).
    fast_names : Iterable[str]
        Names (as in ``module.named_parameters()``) of the shared fast
        parameters: they train on the client and travel. Every parameter that
        is neither fast nor personal is frozen.
    base_fingerprint : str
        Fingerprint of the resident base. Defaults to the fingerprint of every
        state entry that does not train.
    personal_names : Iterable[str]
        Fast parameters that train on the client and never leave it (a
        client's own head, say): no message carries them and the server never
        sees them.
    """

    def __init__(
        self,
        module: nn.Module,
        fast_names: Iterable[str],
        base_fingerprint: str | None = None,
        personal_names: Iterable[str] = (),
    ) -> None:
        self.module = module
        params = dict(module.named_parameters())
        self.personal_names: list[str] = sorted(personal_names)
        self.fast_names: list[str] = sorted(set(fast_names) - set(self.personal_names))
        unknown = [n for n in self.fast_names + self.personal_names if n not in params]
        if unknown:
            raise ValueError(f"fast tensors not found among the model's parameters: {unknown}")
        if not self.fast_names:
            raise ValueError("the fast layer is empty: no parameter was selected as fast and shared")
        trained = set(self.fast_names) | set(self.personal_names)
        for name, param in params.items():
            param.requires_grad_(name in trained)
        self.base_fingerprint = base_fingerprint or fingerprint(self.base_state())

    @classmethod
    def from_peft(cls, peft_model: nn.Module) -> FastSlowModel:
        """Split a ``peft`` model: its trainable parameters are the fast layer."""
        trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        return cls(peft_model, trainable)

    def fast_parameters(self) -> list[nn.Parameter]:
        """Every parameter that trains on the client: the shared fast ones, then the personal ones."""
        params = dict(self.module.named_parameters())
        return [params[n] for n in self.fast_names + self.personal_names]

    def shared_parameters(self) -> list[nn.Parameter]:
        """The fast parameters that travel, in the order of :meth:`fast_state`."""
        params = dict(self.module.named_parameters())
        return [params[n] for n in self.fast_names]

    def base_state(self) -> dict[str, torch.Tensor]:
        """Every state entry (parameters and persistent buffers) that does not train."""
        trained = set(self.fast_names) | set(self.personal_names)
        return {k: v for k, v in self.module.state_dict().items() if k not in trained}

    def fast_state(self) -> dict[str, np.ndarray]:
        """Copies of the shared fast tensors (what travels) as float32 numpy arrays, in name order."""
        return self._state(self.fast_names)

    def load_fast_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Overwrite the shared fast tensors; names and shapes must match exactly."""
        check_fast_state(state, self.fast_shapes())
        self._load(state, self.fast_names)

    def fast_shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes(self.fast_names)

    def personal_state(self) -> dict[str, np.ndarray]:
        """Copies of the personal tensors as float32 numpy arrays, in name order (empty without any)."""
        return self._state(self.personal_names)

    def load_personal_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Overwrite the personal tensors; names and shapes must match exactly."""
        check_fast_state(state, self.personal_shapes())
        self._load(state, self.personal_names)

    def personal_shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes(self.personal_names)

    def num_fast_parameters(self) -> int:
        """How many numbers the shared fast layer holds (personal tensors not counted: they do not travel)."""
        return sum(math.prod(s) for s in self.fast_shapes().values())

    def _state(self, names: list[str]) -> dict[str, np.ndarray]:
        params = dict(self.module.named_parameters())
        return {n: params[n].detach().cpu().float().numpy().astype(np.float32, copy=True) for n in names}

    def _load(self, state: Mapping[str, np.ndarray], names: list[str]) -> None:
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name in names:
                params[name].copy_(torch.from_numpy(np.asarray(state[name])))

    def _shapes(self, names: list[str]) -> dict[str, tuple[int, ...]]:
        params = dict(self.module.named_parameters())
        return {n: tuple(params[n].shape) for n in names}


def check_fast_state(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ValueError naming the problem if ``state`` is not a valid fast state."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"fast tensors do not match: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        array = np.asarray(state[name])
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"fast tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"fast tensor {name!r} contains NaN or Inf")


def state_digest(state: Mapping[str, np.ndarray], length: int = 32) -> str:
    """SHA-256 of a fast state over names and float32 bytes, in name order: its first ``length`` hex characters
    (64: all of it)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(state[name], dtype=np.float32).tobytes())
    return digest.hexdigest()[:length]


def _last_linear_name(module: nn.Module) -> str:
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("the model has no nn.Linear layer to use as the head")
    return names[-1]


def _replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _adaptable_layers(module: nn.Module, exclude: str) -> list[tuple[str, nn.Linear | nn.Conv2d]]:
    return [
        (n, m)
        for n, m in module.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and n != exclude and getattr(m, "groups", 1) == 1
    ]


def attach_fast_layer(
    base: nn.Module,
    spec: FastSpec,
    base_fingerprint: str | None = None,
    targets: tuple[str, ...] | None = None,
) -> FastSlowModel:
    """Attach the fast layer described by ``spec`` to ``base`` (modified in place).

    The fingerprint is taken from the base before anything is attached, so it
    identifies the resident checkpoint alone. ``targets``: in ``lora`` and
    ``ffa-lora`` mode, only the layers whose names end with one of these get
    LoRA factors (default: every Linear and Conv2d layer but the head).
    """
    base_fingerprint = base_fingerprint or fingerprint(base.state_dict())
    head = _last_linear_name(base)
    head_names = [n for n, _ in base.named_parameters() if n.startswith(head + ".")]
    if spec.kind == "full":
        fast_names = [n for n, _ in base.named_parameters()]
    elif spec.kind == "head":
        fast_names = head_names
    elif spec.kind in ("lora", "ffa-lora"):
        small = []
        for name, layer in _adaptable_layers(base, exclude=head):
            if targets is not None and not name.endswith(targets):
                continue
            if layer.weight.numel() < spec.lora_min_params:
                small.append(f"{name}.weight")
                continue
            lora = LoRADelta(layer.weight.shape, spec.rank, spec.lora_alpha, _seeded_generator(spec.seed, name))
            _replace_submodule(base, name, DeltaAdapted(layer, lora))
        trained_factors = ("lora_B",) if spec.kind == "ffa-lora" else ("lora_A", "lora_B")
        factors = [n for n, _ in base.named_parameters() if n.rsplit(".", 1)[-1] in trained_factors]
        fast_names = small + factors + head_names
    else:  # sparse
        for name, layer in _adaptable_layers(base, exclude=""):
            sparse = SparseDelta(layer.weight.shape, spec.density, _seeded_generator(spec.seed, name))
            _replace_submodule(base, name, DeltaAdapted(layer, sparse))
        fast_names = [n for n, _ in base.named_parameters() if n.endswith(".delta.values")]
    if spec.biases and spec.kind not in ("full", "head"):
        fast_names += [n for n, _ in base.named_parameters() if n.endswith(".bias") and n not in fast_names]
    personal_names = head_names if spec.personal == "head" else []
    return FastSlowModel(base, fast_names + personal_names, base_fingerprint, personal_names)
