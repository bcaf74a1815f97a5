"""Run configuration: one dataclass shared by the CLI, `flwr run` and the tests."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedslim.codecs.pipeline import CodecSpecError, Pipeline, parse_codec
from fedslim.data.participation import ParticipationError, check_participation_spec

DATASETS = ("synthetic", "fmnist")
FAST_KINDS = ("lora", "ffa-lora", "head", "sparse", "full")


class ConfigError(ValueError):
    """A run configuration value is missing or out of range."""


class StrategyConfigError(ConfigError):
    """A strategy cannot run with the arguments or the federation it was given."""


@dataclass(frozen=True)
class FastSpec:
    """Which tensors of the model are fast (trained and exchanged).

    Parameters
    ----------
    kind : str
        ``lora``: LoRA factors on every Linear/Conv2d layer, plus the classifier
        head. ``ffa-lora``: as ``lora`` but the A factors are frozen random
        matrices drawn from ``seed`` (only B and the head travel). ``head``: the
        last Linear layer only. ``sparse``: an additive delta on a fixed random
        subset of base entries (indices drawn from ``seed``, never sent).
        ``full``: every parameter, i.e. classic full-model FedAvg.
    rank : int
        LoRA rank.
    lora_alpha : float
        LoRA scaling numerator; the update is ``(lora_alpha / rank) * B @ A``.
    density : float
        Fraction of each weight's entries that are fast in ``sparse`` mode.
    seed : int
        Shared seed for everything that must agree between server and clients
        without being sent (FFA-LoRA's A, the sparse mask, initial factors).
    biases : bool
        Also make every bias vector fast (BitFit alongside the ``lora``,
        ``ffa-lora`` or ``sparse`` layer): a few hundred numbers that let each
        layer shift its activations.
    lora_min_params : int
        In ``lora``/``ffa-lora`` mode, a layer whose weight has fewer entries
        than this is fast as a whole instead of getting LoRA factors (LoRA
        saves little on small layers and costs them expressiveness).
    """

    kind: str = "lora"
    rank: int = 4
    lora_alpha: float = 8.0
    density: float = 0.01
    seed: int = 0
    biases: bool = False
    lora_min_params: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAST_KINDS:
            raise ConfigError(f"unknown fast layer {self.kind!r}; choose one of {', '.join(FAST_KINDS)}")
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a fedslim run needs.

    Parameters
    ----------
    dataset : str
        ``synthetic`` (Synthetic(alpha, beta) from the FedProx paper, generated)
        or ``fmnist`` (Fashion-MNIST from local IDX files).
    num_clients : int
        Number of clients (SuperNodes) in the federation.
    rounds : int
        Number of federated rounds.
    fraction : float
        Fraction of clients sampled each round (at least one is sampled).
    fast : FastSpec
        The fast layer.
    seed : int
        Seed for data generation, partitioning, sampling and initialisation.
    local_epochs : int
        Local epochs per round on each sampled client.
    lr : float
        Client SGD learning rate.
    batch_size : int
        Client minibatch size.
    server_lr : float
        Server step size applied to the aggregated fast delta.
    dirichlet_alpha : float
        Concentration of the Dirichlet label split (Fashion-MNIST only).
    synthetic_alpha, synthetic_beta : float
        Model and data heterogeneity of Synthetic(alpha, beta).
    data_dir : str
        Folder holding the four Fashion-MNIST IDX ``.gz`` files.
    out : str
        Run directory: the communication log and results go there.
    round_timeout : float
        Seconds the server waits for replies in one round.
    codec : str
        Uplink codec pipeline, e.g. ``topk:0.05+q8+lzma`` (see
        :func:`fedslim.codecs.parse_codec`); ``none`` sends float32.
    downstream_codec : str
        Codec for the server's broadcast steps (the replica difference).
    error_feedback : bool
        Clients keep what a biased uplink codec dropped and send it later.
    error_feedback_decay : float
        Per missed round, the residual of an absent client is scaled by this
        factor before it is used (1 keeps it whole).
    screen_factor : float
        The server rejects an update whose size (L2 norm per local step) is
        more than this many times the median size of recent updates: the
        mark of a diverged local run, which one round's average, or a
        strategy's memory of it, would carry into the global model. 0 turns
        the screen off (see :class:`fedslim.server.wire.SizeScreen`).
    local_steps : int
        If > 0, each client takes exactly this many minibatch steps per round
        instead of ``local_epochs`` epochs (FedAU's and FedAMD's setting).
    strategy : str
        Aggregation rule: a registered name (``fedavg``, ``fedau``,
        ``fedvarp``, ``mifa``, ``fedstale``, ``fedamd``) or ``module:Class``.
    strategy_args : str
        The strategy's arguments, ``key=value`` separated by commas or spaces.
    participation : str
        Simulated availability: ``all``, ``bernoulli``, ``label``, ``markov``,
        ``cyclic`` or ``trace:FILE`` (see :mod:`fedslim.data.participation`).
        The server contacts only available clients; ``fraction`` of them are sampled.
    participation_mean : float
        Mean participation probability of the participation model.
    p_known : bool
        Give strategies the participation model's true p_i (otherwise they
        never see them and must estimate).
    eval_every : int
        Evaluate the global model every this many rounds (and after the last).
    final_sync : bool
        After the last round, send every node the exact final fast state (one
        full-state sync each) and have it confirm the state's digest, so every
        device ends the run holding the model the server evaluated.
    provision_chunk_bytes : int
        Chunk size when the server sends its base to a node that has none
        (one message per chunk; 4 MiB stays under Flower's 5 MiB array chunks).
    """

    dataset: str = "synthetic"
    num_clients: int = 30
    rounds: int = 10
    fraction: float = 0.2
    fast: FastSpec = FastSpec()
    seed: int = 0
    local_epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    server_lr: float = 1.0
    dirichlet_alpha: float = 0.3
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    data_dir: str = ""
    out: str = "runs/latest"
    round_timeout: float = 600.0
    codec: str = "none"
    downstream_codec: str = "none"
    error_feedback: bool = True
    error_feedback_decay: float = 0.9
    screen_factor: float = 10.0
    local_steps: int = 0
    strategy: str = "fedavg"
    strategy_args: str = ""
    participation: str = "all"
    participation_mean: float = 0.1
    p_known: bool = False
    eval_every: int = 1
    final_sync: bool = False
    provision_chunk_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.local_epochs < 1 or self.batch_size < 1:
            raise ConfigError("local_epochs and batch_size must be >= 1")
        if self.lr <= 0 or self.dirichlet_alpha <= 0:
            raise ConfigError("lr and dirichlet_alpha must be > 0")
        if not 0.0 <= self.error_feedback_decay <= 1.0:
            raise ConfigError(f"error_feedback_decay must be in [0, 1], got {self.error_feedback_decay}")
        if self.screen_factor != 0 and self.screen_factor <= 1:
            raise ConfigError(f"screen_factor must be > 1, or 0 to turn the screen off; got {self.screen_factor}")
        if self.local_steps < 0 or self.eval_every < 1:
            raise ConfigError("local_steps must be >= 0 and eval_every >= 1")
        if self.provision_chunk_bytes < 1024:
            raise ConfigError(f"provision_chunk_bytes must be >= 1024, got {self.provision_chunk_bytes}")
        if not 0.0 < self.participation_mean <= 1.0:
            raise ConfigError(f"participation_mean must be in (0, 1], got {self.participation_mean}")
        try:
            check_participation_spec(self.participation)
        except ParticipationError as exc:
            raise ConfigError(str(exc)) from exc
        for name in ("codec", "downstream_codec"):
            try:
                parse_codec(getattr(self, name))
            except CodecSpecError as exc:
                raise ConfigError(f"{name}: {exc}") from exc

    @property
    def uplink(self) -> Pipeline:
        return parse_codec(self.codec)

    @property
    def downlink(self) -> Pipeline:
        return parse_codec(self.downstream_codec)

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def local_step_count(self, num_examples: int) -> int:
        """K, the minibatch steps of a client with ``num_examples`` examples: ``local_steps`` or its epochs' batches."""
        return self.local_steps or self.local_epochs * -(-num_examples // self.batch_size)

    def resolved_data_dir(self) -> Path:
        """The Fashion-MNIST folder: the explicit one, else $FEDSLIM_DATA_DIR, else Debian's."""
        return Path(self.data_dir or os.environ.get("FEDSLIM_DATA_DIR", "/usr/share/datasets/fashion-mnist"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def client_task(self) -> dict[str, Any]:
        """The flat (kebab-case) subset of this config that a client needs to train."""
        task: dict[str, Any] = {
            "dataset": self.dataset,
            "num-clients": self.num_clients,
            "seed": self.seed,
            "local-epochs": self.local_epochs,
            "local-steps": self.local_steps,
            "lr": self.lr,
            "batch-size": self.batch_size,
            "dirichlet-alpha": self.dirichlet_alpha,
            "synthetic-alpha": self.synthetic_alpha,
            "synthetic-beta": self.synthetic_beta,
            "fast": self.fast.kind,
            "rank": self.fast.rank,
            "lora-alpha": self.fast.lora_alpha,
            "density": self.fast.density,
            "biases": self.fast.biases,
            "lora-min-params": self.fast.lora_min_params,
            "codec": self.codec,
            "error-feedback": self.error_feedback,
            "error-feedback-decay": self.error_feedback_decay,
        }
        if self.data_dir:
            task["data-dir"] = self.data_dir
        return task

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from a flat mapping with kebab-case keys (Flower's run_config)."""
        field_names = {f.name for f in dataclasses.fields(cls)} - {"fast"}
        fast_names = {f.name for f in dataclasses.fields(FastSpec)} - {"kind", "seed"}
        kwargs: dict[str, Any] = {}
        fast_kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name == "fast":
                fast_kwargs["kind"] = value
            elif name in fast_names:
                fast_kwargs[name] = value
            elif name in field_names:
                kwargs[name] = value
            else:
                raise ConfigError(f"unknown config key {key!r}")
        fast_kwargs["seed"] = int(kwargs.get("seed", 0))
        return cls(fast=FastSpec(**fast_kwargs), **kwargs)
