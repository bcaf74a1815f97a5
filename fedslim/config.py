"""Run configuration: one dataclass shared by the CLI, `flwr run` and the tests."""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
import re
import shlex
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from fedslim.codecs.pipeline import CodecSpecError, Pipeline, parse_codec

BUILTIN_TASKS = ("synthetic-transfer", "synthetic", "fmnist", "text")
RECOMMENDED_UPLINK_CODEC = "topk:0.1+q8+lzma"
RECOMMENDED_DOWNLINK_CODEC = "topk:0.05+q8+lzma"
TASK_REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
TASK_FILE_REFERENCE = re.compile(r"[^:]*\.py:[A-Za-z_][\w.]*")  # path/to/my_task.py:MyTask
TASK_SETTING_PREFIX = "task."  # run config keys task.NAME are the task's own settings
TASK_SETTING_NAME = re.compile(r"[A-Za-z_][\w-]*")
TaskSettingValue = bool | int | float | str
TASK_SETTING_HELP = "a setting of the task's own (repeatable), read by the task; run config key task.NAME"
FAST_KINDS = ("lora", "ffa-lora", "head", "sparse", "full")
PERSONAL_KINDS = ("none", "head")
MERGEABLE_KINDS = ("lora", "ffa-lora", "sparse")  # fast layers whose adapters can be merged into the base


class ConfigError(ValueError):
    """A run configuration value is missing or out of range."""


class StrategyConfigError(ConfigError):
    """A strategy cannot run with the arguments or the federation it was given."""


@dataclass(frozen=True)
class Range:
    """The values a numeric setting accepts: finite numbers from ``low`` (excluded if ``exclusive``) to ``high``."""

    low: float
    high: float = math.inf
    exclusive: bool = False

    def check(self, name: str, value: Any, integer: bool, where: str) -> None:
        """ConfigError naming ``name``, ``value`` and this range unless ``value`` is in it (``where``: its flag)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
            raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}{where}")
        above_low = value > self.low if self.exclusive else value >= self.low
        if not (above_low and value <= self.high and (integer or math.isfinite(value))):
            raise ConfigError(f"{name} must be {self.describe(integer)}, got {value}{where}")

    def describe(self, integer: bool) -> str:
        low, high = (int(x) if float(x).is_integer() else x for x in (self.low, self.high))
        if high < math.inf:
            bounds = f"in {'(' if self.exclusive else '['}{low}, {high}]"
            return f"an integer {bounds}" if integer else bounds
        bound = f"{'>' if self.exclusive else '>='} {low}"
        return f"an integer {bound}" if integer else f"a finite number {bound}"


POSITIVE = Range(0.0, exclusive=True)
NON_NEGATIVE = Range(0.0)
AT_LEAST_ONE = Range(1.0)
FRACTION = Range(0.0, 1.0, exclusive=True)
NON_NEGATIVE_FRACTION = Range(0.0, 1.0)
HOLDOUT = Range(0.0, 0.9)
SEED_RANGE = Range(0.0, 2**32 - 1)  # 32-bit seeds: the per-layer seeds derived from them fit torch's 64 bits


class HelpGroup(StrEnum):
    """The groups of ``fedslim simulate --help``, in the order it lists them."""

    TASK = "task and model"
    FAST = "fast layer"
    CODECS = "codecs"
    STRATEGY = "strategy and local training"
    PARTICIPATION = "participation"
    TRUST = "trust"
    FAULTS = "faults"
    EVALUATION = "evaluation"
    RUN = "run"


@dataclass(frozen=True)
class Setting:
    """How one config field is set from outside: its flat key, its CLI flag, and whether clients receive it.

    Declared with each field through :func:`setting`; the ``fedslim simulate`` flags, :meth:`RunConfig.from_args`,
    :meth:`RunConfig.from_flat`, :meth:`RunConfig.client_task` and :func:`flat_defaults` follow from it
    (tests/test_config.py holds ``[tool.flwr.app.config]`` in pyproject.toml to :func:`flat_defaults`).
    """

    help: str
    key: str | bool = True
    """Flat kebab-case key (Flower's run_config): True for the field's name in kebab case, False for none."""
    flag: str | bool = True
    """CLI flag: True for ``--`` and the key, False for none. A bool field's flag flips its default."""
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    repeatable: bool = False
    """The flag may be given several times; :func:`join_repeated` makes its values one string."""
    flag_default: Callable[[argparse.Namespace], Any] | None = None
    """The flag's default, computed from the other flags, where it is not given."""
    client: bool = False
    """Sent to clients in the task of every instruction."""
    omit_default: bool = False
    """Left out of the client task while it has its default value (the client fills the default in)."""
    range: Range | None = None
    """The values a numeric setting accepts; ``__post_init__`` refuses others."""
    group: HelpGroup | None = None
    """Where ``--help`` lists the flag (every setting with a flag names one)."""

    def flat_key(self, name: str) -> str | None:
        """The flat key of the field ``name`` (None if it has none)."""
        if self.key is False:
            return None
        return name.replace("_", "-") if self.key is True else self.key

    def cli_flag(self, name: str) -> str | None:
        """The CLI flag of the field ``name`` (None if it has none)."""
        key = self.flat_key(name)
        if key is None or self.flag is False:
            return None
        return f"--{key}" if self.flag is True else self.flag


SETTING = "fedslim.setting"


def setting(default: Any, help: str, **declared: Any) -> Any:
    """A dataclass field with its :class:`Setting` (``declared`` are the Setting's other attributes)."""
    return dataclasses.field(default=default, metadata={SETTING: Setting(help, **declared)})


@dataclass(frozen=True)
class FlatKey:
    """A declared setting with its flat key and flag resolved."""

    key: str
    name: str
    in_fast: bool
    """A field of :class:`FastSpec` (``RunConfig.fast``) rather than of :class:`RunConfig`."""
    default: Any
    flag: str | None
    setting: Setting


def check_ranges(config: FastSpec | RunConfig) -> None:
    """Refuse a numeric setting of ``config`` outside its declared range, naming its flag (or else its flat key)."""
    for f in dataclasses.fields(config):
        declared: Setting | None = f.metadata.get(SETTING)
        if declared is None or declared.range is None:
            continue
        flag, key = declared.cli_flag(f.name), declared.flat_key(f.name)
        where = f" ({flag})" if flag else f" (run config key {key})" if key else ""
        declared.range.check(f.name, getattr(config, f.name), isinstance(f.default, int), where)


_PLAIN = re.compile(r"[^\s,'\"]+")


def join_repeated(values: Iterable[str]) -> str:
    """A repeatable flag's values as one string (Flower's run config holds scalars only), reversed by
    :func:`split_repeated`: comma-separated, a value holding a comma, a blank or a quote single-quoted as in a shell.
    """
    return ",".join(v if _PLAIN.fullmatch(v) else "'" + v.replace("'", "'\"'\"'") + "'" for v in values)


def split_repeated(text: str) -> list[str]:
    """The values in ``text``: separated by commas or blanks, grouped by single or double quotes (nothing else is
    special: no backslash escapes, no comments)."""
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace += ","
    lexer.whitespace_split = True
    lexer.commenters = ""
    lexer.escape = ""
    try:
        return list(lexer)
    except ValueError as exc:
        raise ConfigError(f"cannot split {text!r}: {str(exc).lower()}") from exc


FAULT_KINDS = ("drop", "error", "late")
DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class FaultShares:
    """The share of the sampled clients each fault hits in a round (a fault spec, ``--faults``)."""

    drop: float = 0.0
    error: float = 0.0
    late: float = 0.0

    def __bool__(self) -> bool:
        return self.drop + self.error + self.late > 0


def parse_faults(spec: str) -> FaultShares:
    """The shares of a fault spec ``drop=S,error=S,late=S`` (any subset; empty: none); a ConfigError naming --faults."""
    shares: dict[str, float] = {}
    for entry in (part.strip() for part in spec.split(",")) if spec.strip() else ():
        kind, _, value = (text.strip() for text in entry.partition("="))
        problem = None
        if kind not in FAULT_KINDS:
            problem = f"unknown fault {kind!r}"
        elif kind in shares:
            problem = f"{kind} is given twice"
        elif not 0.0 <= _number(value) <= 1.0:
            problem = f"{kind} must be a share in [0, 1], got {value!r}"
        if problem:
            raise ConfigError(f"--faults {spec!r}: {problem}; the spec is drop=S,error=S,late=S")
        shares[kind] = float(value)
    if sum(shares.values()) > 1.0:
        raise ConfigError(f"--faults {spec!r}: the shares add up to {sum(shares.values()):g}, more than 1")
    return FaultShares(**shares)


def _number(text: str) -> float:
    """``text`` as a float; NaN if it is none."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _fraction_flag_default(args: argparse.Namespace) -> float:
    """Where availability is simulated, few clients are available in a round: sample them all."""
    return RunConfig.fraction if args.participation == "all" else 1.0


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
    personal : str
        Fast tensors that train on each client and never leave it: ``none``,
        or ``head`` (every client keeps a head of its own, in its Flower
        context; the rest of the fast layer is shared and averaged). The
        server's model keeps the base's head, so its central accuracy is not
        the clients': evaluate on the clients (``client_holdout``).
    """

    kind: str = setting(
        "lora", "which tensors train and travel", key="fast", choices=FAST_KINDS, client=True, group=HelpGroup.FAST
    )
    rank: int = setting(4, "LoRA rank", client=True, range=AT_LEAST_ONE, group=HelpGroup.FAST)
    lora_alpha: float = setting(8.0, "LoRA scaling numerator", client=True, range=POSITIVE, group=HelpGroup.FAST)
    density: float = setting(
        0.01, "fast fraction of entries (sparse)", client=True, range=FRACTION, group=HelpGroup.FAST
    )
    seed: int = setting(0, "always the run's seed", key=False, flag=False, range=SEED_RANGE)
    biases: bool = setting(
        False, "also train and send every bias vector (BitFit)", flag="--fast-biases", client=True, group=HelpGroup.FAST
    )
    lora_min_params: int = setting(
        0,
        "layers with fewer weight entries than this are fast as a whole instead of getting LoRA",
        client=True,
        range=NON_NEGATIVE,
        group=HelpGroup.FAST,
    )
    personal: str = setting(
        "none",
        "fast tensors that train on each client and never leave it",
        choices=PERSONAL_KINDS,
        client=True,
        omit_default=True,
        group=HelpGroup.FAST,
    )

    def __post_init__(self) -> None:
        if self.kind not in FAST_KINDS:
            raise ConfigError(f"unknown fast layer {self.kind!r}; choose one of {', '.join(FAST_KINDS)}")
        if self.personal not in PERSONAL_KINDS:
            raise ConfigError(f"unknown personal tensors {self.personal!r}; choose one of {', '.join(PERSONAL_KINDS)}")
        if self.personal == "head" and self.kind == "head":
            raise ConfigError(
                "--personal head with --fast head leaves nothing to share: choose a lora, ffa-lora, "
                "sparse or full fast layer"
            )
        check_ranges(self)


@dataclass(frozen=True)
class RunConfig:
    """Everything a fedslim run needs.

    Parameters
    ----------
    task : str
        The model and data (see :mod:`fedslim.task`): ``synthetic-transfer``
        (an MLP pretrained on a public synthetic task and federated on a
        related one, generated), ``synthetic`` (an MLP on
        Synthetic(alpha, beta) from the FedProx paper, generated), ``fmnist``
        (a CNN on Fashion-MNIST from local IDX files), ``text``
        (all-MiniLM-L6-v2 on eight categories of Debian's fortunes, see
        :mod:`fedslim.tasks.text`), or ``module:object``, a task of your own.
    num_clients : int
        Number of clients (SuperNodes) in the federation.
    rounds : int
        Number of federated rounds.
    fraction : float
        Fraction of clients sampled each round (at least one is sampled).
    fast : FastSpec
        The fast layer.
    consolidate_every : int
        Every N rounds the server merges the shared fast layer (as clients
        hold it) into the base and starts it again: fresh adapters, the base
        fingerprint advanced along a chain that clients replay (see
        :mod:`fedslim.consolidation`). 0: the base never changes.
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
        Concentration of the Dirichlet label split (fmnist, synthetic-transfer).
    synthetic_alpha, synthetic_beta : float
        Model and data heterogeneity of Synthetic(alpha, beta).
    data_dir : str
        The task's data folder; for ``fmnist``, the folder holding the four
        Fashion-MNIST IDX ``.gz`` files.
    device : str
        Where local training and the server's evaluation run: ``cpu``,
        ``cuda``, or ``auto`` (``cuda`` where there is one). Clients in
        simulation use it too; the numbers of a seed are the same on CPU
        runs only.
    out : str
        Run directory: the communication log and results go there.
    ray_address : str
        Address of a running Ray cluster (``HOST:PORT`` of its head, or
        ``auto``) for ``--backend flower`` to run its virtual nodes on; empty:
        a Ray of the run's own on this machine (docs/operations.md).
    round_timeout : float
        Seconds the server waits for replies in one round.
    codec : str
        Uplink codec pipeline, e.g. ``topk:0.05+q8+lzma`` (see
        :func:`fedslim.codecs.parse_codec`); ``none`` sends float32. The
        default keeps the largest 10% of entries, 8-bit, then LZMA: with error
        feedback it stays within a point of dense on the built-in benchmarks
        (docs/results.md).
    downstream_codec : str
        Codec for the server's broadcast steps (the replica difference); by
        default the largest 5%, 8-bit, LZMA.
    error_feedback : bool
        Clients keep what a biased uplink codec dropped and send it later.
    error_feedback_decay : float
        Per missed round, the residual of an absent client is scaled by this
        factor before it is used (1 keeps it whole).
    screen_factor : float
        The server rejects an update whose size (L2 norm over the square
        root of its local steps) is more than this many times the median
        size of recent updates and the round's (from the first round): the
        mark of a diverged local run, which one round's average, or a
        strategy's memory of it, would carry into the global model. 0 turns
        the screen off (see :class:`fedslim.channel.uplink.SizeScreen`).
    local_steps : int
        If > 0, each client takes exactly this many minibatch steps per round
        instead of ``local_epochs`` epochs (FedAU's and FedAMD's setting).
    strategy : str
        Aggregation rule: a registered name (``fedavg``, ``fedau``,
        ``fedvarp``, ``mifa``, ``fedstale``, ``fedamd``) or ``module:Class``.
    strategy_args : str
        The strategy's arguments, ``key=value`` separated by commas or spaces; a
        value holding either is quoted, ``name='a, b'`` (see :func:`split_repeated`).
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
    client_holdout : float
        Share of each client's examples it keeps out of training, to evaluate
        the round's model on its own data (0: no client-side evaluation).
    fraction_evaluate : float
        Share of the available clients asked to evaluate at each evaluation,
        with ``client_holdout`` (0: none, the examples are still held out).
    robust : str
        Robust aggregation applied to the round's updates before the strategy
        sees them (see :mod:`fedslim.strategies.robust`).
    attack : str
        Simulated attackers: a share of the clients whose replies are altered
        (see :mod:`fedslim.simulation.attacks`); simulation only.
    faults : str
        Simulated faults, ``drop=S,error=S,late=S``: each round, each sampled
        client's instruction is lost, its reply replaced by the error of a
        ClientApp that raised, or its reply delivered after the round timeout,
        with these probabilities (see :func:`parse_faults` and
        :mod:`fedslim.simulation.faults`); simulation only.
    final_sync : bool
        After the last round, send every node the exact final fast state (one
        full-state sync each) and have it confirm the state's digest, so every
        device ends the run holding the model the server evaluated.
    checkpoint_every : int
        Write the run's checkpoint (``checkpoint.pkl`` in the run directory,
        see :mod:`fedslim.server.checkpoint`) after every N-th round; 0 writes
        none. ``resume`` continues a killed run from it; ``overwrite`` lets a
        run replace the one its directory holds (otherwise refused).
    provision_chunk_bytes : int
        Chunk size when the server sends its base to a node that has none
        (one message per chunk; 4 MiB stays under Flower's 5 MiB array chunks).
    task_settings : dict
        The task's own settings, by name (run config keys ``task.NAME``,
        ``--task-setting NAME=VALUE``): bool, int, float or str values that
        fedslim passes on without reading (see :meth:`fedslim.task.Task.setting`).
    """

    task: str = setting(
        "synthetic-transfer",
        "the model and data: synthetic-transfer (an MLP pretrained on a public task, federated on a related one), "
        "synthetic (an MLP on Synthetic(1, 1)), fmnist (a CNN on Fashion-MNIST), "
        "text (all-MiniLM-L6-v2 on fortunes), or module:object (a task of your own, see docs/tasks.md)",
        metavar="NAME|MODULE:OBJECT",
        client=True,
        group=HelpGroup.TASK,
    )
    num_clients: int = setting(
        30,
        "number of clients (virtual SuperNodes)",
        flag="--clients",
        client=True,
        range=AT_LEAST_ONE,
        group=HelpGroup.PARTICIPATION,
    )
    rounds: int = setting(10, "number of federated rounds", range=AT_LEAST_ONE, group=HelpGroup.RUN)
    fraction: float = setting(
        0.2,
        "fraction of the available clients sampled per round (default: 0.2 with --participation all, else 1.0)",
        flag_default=_fraction_flag_default,
        range=FRACTION,
        group=HelpGroup.PARTICIPATION,
    )
    fast: FastSpec = FastSpec()
    consolidate_every: int = setting(
        0,
        "every N rounds, merge the shared fast layer into the base and start it again (0: never); "
        "clients replay each merge from its fast state",
        range=NON_NEGATIVE,
        group=HelpGroup.FAST,
    )
    seed: int = setting(
        0,
        "seed for data generation, partitioning, sampling and initialisation",
        client=True,
        range=SEED_RANGE,
        group=HelpGroup.RUN,
    )
    local_epochs: int = setting(
        1, "local epochs per round on each sampled client", client=True, range=AT_LEAST_ONE, group=HelpGroup.STRATEGY
    )
    lr: float = setting(0.05, "client SGD learning rate", client=True, range=POSITIVE, group=HelpGroup.STRATEGY)
    batch_size: int = setting(32, "client minibatch size", client=True, range=AT_LEAST_ONE, group=HelpGroup.STRATEGY)
    server_lr: float = setting(
        1.0, "server step size applied to the aggregated fast delta", range=POSITIVE, group=HelpGroup.STRATEGY
    )
    dirichlet_alpha: float = setting(
        0.3,
        "Dirichlet concentration of the label split (fmnist, synthetic-transfer)",
        flag="--alpha",
        client=True,
        range=POSITIVE,
        group=HelpGroup.TASK,
    )
    synthetic_alpha: float = setting(
        1.0, "model heterogeneity of Synthetic(alpha, beta)", flag=False, client=True, range=NON_NEGATIVE
    )
    synthetic_beta: float = setting(
        1.0, "data heterogeneity of Synthetic(alpha, beta)", flag=False, client=True, range=NON_NEGATIVE
    )
    data_dir: str = setting(
        "",
        "the task's data folder; fmnist: the four Fashion-MNIST IDX .gz files "
        "(default: $FEDSLIM_DATA_DIR or /usr/share/datasets/fashion-mnist)",
        client=True,
        omit_default=True,
        group=HelpGroup.TASK,
    )
    device: str = setting(
        "cpu",
        "where local training and the server's evaluation run: cpu, cuda, or auto (cuda where there is one)",
        choices=DEVICES,
        client=True,
        omit_default=True,
        group=HelpGroup.RUN,
    )
    out: str = setting("runs/latest", "run directory (communication log goes here)", group=HelpGroup.RUN)
    ray_address: str = setting(
        "",
        "address of a running Ray cluster for --backend flower, HOST:PORT of its head or auto "
        "(default: a Ray of the run's own on this machine)",
        metavar="ADDRESS",
        group=HelpGroup.RUN,
    )
    round_timeout: float = setting(
        600.0, "seconds the server waits for replies in one round", range=POSITIVE, group=HelpGroup.FAULTS
    )
    codec: str = setting(
        RECOMMENDED_UPLINK_CODEC,
        "uplink codec pipeline, e.g. topk:0.05+q8+lzma, randk:0.05+q4, ternary:0.1, powersgd:2, fp16, none",
        client=True,
        group=HelpGroup.CODECS,
    )
    downstream_codec: str = setting(
        RECOMMENDED_DOWNLINK_CODEC,
        "codec of the server's broadcast steps (same syntax as --codec)",
        group=HelpGroup.CODECS,
    )
    error_feedback: bool = setting(
        True,
        "send biased codecs' output without carrying what they drop into the next update",
        flag="--no-error-feedback",
        client=True,
        group=HelpGroup.CODECS,
    )
    error_feedback_decay: float = setting(
        0.9,
        "error-feedback residual kept per round a client missed (1: all of it)",
        flag="--ef-decay",
        client=True,
        range=Range(0.0, 1.0),
        group=HelpGroup.CODECS,
    )
    screen_factor: float = setting(
        10.0,
        "reject an update more than this many times the median size of recent ones (a diverged local run); 0: off",
        range=NON_NEGATIVE,
        group=HelpGroup.TRUST,
    )
    local_steps: int = setting(
        0,
        "minibatch steps per round instead of epochs (0: use --local-epochs)",
        client=True,
        range=NON_NEGATIVE,
        group=HelpGroup.STRATEGY,
    )
    strategy: str = setting(
        "fedavg",
        "aggregation rule: fedavg, fedau, fedvarp, mifa, fedstale, fedamd, or module:Class",
        group=HelpGroup.STRATEGY,
    )
    strategy_args: str = setting(
        "",
        "strategy argument (repeatable), e.g. beta=0.5, p-estimate=fedau, cutoff=50, memory=fp16",
        flag="--strategy-arg",
        metavar="KEY=VALUE",
        repeatable=True,
        group=HelpGroup.STRATEGY,
    )
    robust: str = setting(
        "none",
        "robust aggregation in front of any strategy: none, clip[:F], median, trimmed:B, or stages joined by +",
        group=HelpGroup.TRUST,
    )
    attack: str = setting(
        "",
        "simulated attackers (simulation only), e.g. scale:100@0.1,sign-flip@0.1,lie-examples@0.1",
        group=HelpGroup.TRUST,
    )
    faults: str = setting(
        "",
        "simulated faults (simulation only): shares of the sampled clients that never reply, raise, or reply "
        "after the round timeout, e.g. drop=0.2,error=0.1,late=0.1",
        group=HelpGroup.FAULTS,
    )
    participation: str = setting(
        "all",
        "who is available each round: all, bernoulli, label, markov, cyclic, or trace:FILE",
        group=HelpGroup.PARTICIPATION,
    )
    participation_mean: float = setting(
        0.1,
        "mean participation probability of the participation model",
        range=FRACTION,
        group=HelpGroup.PARTICIPATION,
    )
    p_known: bool = setting(
        False,
        "let the strategy read the true participation probabilities (p-estimate=known)",
        group=HelpGroup.PARTICIPATION,
    )
    eval_every: int = setting(1, "evaluate every N rounds", range=AT_LEAST_ONE, group=HelpGroup.EVALUATION)
    client_holdout: float = setting(
        0.0,
        "share of each client's examples held out for client-side evaluation (0: none, every example trains)",
        client=True,
        omit_default=True,
        range=HOLDOUT,
        group=HelpGroup.EVALUATION,
    )
    fraction_evaluate: float = setting(
        1.0,
        "share of the available clients that evaluate the round's model on their held-out examples, "
        "at each evaluation (with --client-holdout)",
        range=NON_NEGATIVE_FRACTION,
        group=HelpGroup.EVALUATION,
    )
    final_sync: bool = setting(
        False,
        "after the last round, send every node the exact final fast state and have it confirm the digest",
        group=HelpGroup.RUN,
    )
    checkpoint_every: int = setting(
        1,
        "write a checkpoint every N rounds, to continue a killed run with --resume (0: none)",
        range=NON_NEGATIVE,
        group=HelpGroup.RUN,
    )
    resume: bool = setting(
        False,
        "continue the interrupted run of the run directory from its checkpoint (CLI: --resume RUN_DIR)",
        flag=False,
    )
    overwrite: bool = setting(
        False, "replace a run the run directory already holds (its log and checkpoint)", group=HelpGroup.RUN
    )
    provision_chunk_bytes: int = setting(
        4 << 20, "chunk size when the server sends its base to a node that has none", flag=False, range=Range(1024)
    )
    task_settings: dict[str, TaskSettingValue] = dataclasses.field(
        default_factory=dict,
        hash=False,  # a dict: equal configs still hash alike, by their other fields
        metadata={SETTING: Setting(TASK_SETTING_HELP, key=False, flag=False)},
    )

    def __post_init__(self) -> None:
        # Imported here: the participation module's errors are ConfigErrors, so it imports this module.
        from fedslim.data.participation import check_participation_spec

        if self.task not in BUILTIN_TASKS and not (
            TASK_REFERENCE.fullmatch(self.task) or TASK_FILE_REFERENCE.fullmatch(self.task)
        ):
            raise ConfigError(
                f"unknown task {self.task!r}; use {', '.join(BUILTIN_TASKS)}, module:object or path/to/file.py:object"
            )
        check_task_settings(self.task_settings)
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        check_ranges(self)
        if 0 < self.screen_factor <= 1:
            raise ConfigError(f"screen_factor must be > 1, or 0 to turn the screen off; got {self.screen_factor}")
        check_participation_spec(self.participation, self.participation_mean)
        if self.consolidate_every and self.fast.kind not in MERGEABLE_KINDS:
            raise ConfigError(
                f"--consolidate-every with --fast {self.fast.kind}: only a lora, ffa-lora or sparse fast layer "
                "has adapters to merge into the base"
            )
        if self.fast.personal != "none" and self.strategy == "fedamd":
            raise ConfigError(
                "--personal with --strategy fedamd: FedAMD's anchors and miners work on the shared "
                "fast layer alone; use another strategy or --personal none"
            )
        parse_faults(self.faults)
        if not self.out.strip():
            raise ConfigError("--out is empty: name the run directory (it would be the current folder)")
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

    def check_run_dir(self) -> None:
        """Create the run directory and a file in it, so that an unusable ``--out`` is refused before a run starts."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"--out {self.out} is a file; the run directory must be a folder")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.run_dir):
                pass
        except OSError as exc:
            raise ConfigError(f"--out {self.out} cannot be the run directory: {exc.strerror or exc}") from exc

    def torch_device(self) -> str:
        """The device ``device`` names on this machine (``auto``: cuda where torch sees one, else cpu)."""
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda: torch sees no CUDA device on this machine; use --device auto or cpu")
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

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
        task: dict[str, Any] = {}
        for entry in CLIENT_TASK_KEYS:
            value = getattr(self.fast if entry.in_fast else self, entry.name)
            if not (entry.setting.omit_default and value == entry.default):
                task[entry.key] = value
        return task | {TASK_SETTING_PREFIX + name: value for name, value in self.task_settings.items()}

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from a flat mapping with kebab-case keys (Flower's run_config); snake_case keys work too."""
        kwargs: dict[str, Any] = {}
        fast_kwargs: dict[str, Any] = {}
        task_settings: dict[str, Any] = {}
        for key, value in values.items():
            if key.startswith(TASK_SETTING_PREFIX):
                task_settings[key.removeprefix(TASK_SETTING_PREFIX)] = value
                continue
            entry = FLAT_KEYS.get(key.replace("_", "-"))
            if entry is None:
                raise ConfigError(f"unknown config key {key!r}")
            (fast_kwargs if entry.in_fast else kwargs)[entry.name] = value
        fast_kwargs["seed"] = int(kwargs.get("seed", cls.seed))
        return cls(fast=FastSpec(**fast_kwargs), task_settings=task_settings, **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        """Build from the flags that :func:`add_run_config_arguments` added."""
        values: dict[str, Any] = {}
        for entry in FLAT_KEYS.values():
            if entry.flag is None:
                continue
            value = getattr(args, entry.name)
            if entry.setting.repeatable:
                value = join_repeated(value)
            elif value is None and entry.setting.flag_default is not None:
                value = entry.setting.flag_default(args)
            values[entry.key] = value
        for text in getattr(args, "task_settings", []):
            name, value = parse_task_setting(text)
            if TASK_SETTING_PREFIX + name in values:
                raise ConfigError(f"--task-setting {name} is given twice")
            values[TASK_SETTING_PREFIX + name] = value
        if TASK_FILE_REFERENCE.fullmatch(values["task"]):  # absolute: every process finds it, whatever its folder
            file, _, attribute = values["task"].rpartition(":")
            values["task"] = f"{Path(file).expanduser().resolve()}:{attribute}"
        return cls.from_flat(values)


def _flat_keys() -> dict[str, FlatKey]:
    """Every declared setting by flat key, in field order (``RunConfig.fast``'s own in its place)."""
    entries: dict[str, FlatKey] = {}
    for run_field in dataclasses.fields(RunConfig):
        in_fast = run_field.name == "fast"
        for f in dataclasses.fields(FastSpec) if in_fast else (run_field,):
            declared: Setting = f.metadata[SETTING]
            key = declared.flat_key(f.name)
            if key is not None:
                entries[key] = FlatKey(key, f.name, in_fast, f.default, declared.cli_flag(f.name), declared)
    return entries


FLAT_KEYS = _flat_keys()
CLIENT_TASK_KEYS = tuple(entry for entry in FLAT_KEYS.values() if entry.setting.client)


def flat_defaults() -> dict[str, Any]:
    """Every flat key with its default: what ``[tool.flwr.app.config]`` lists."""
    return {key: entry.default for key, entry in FLAT_KEYS.items()}


def add_run_config_arguments(parser: argparse.ArgumentParser) -> dict[HelpGroup, argparse._ArgumentGroup]:
    """Add a flag for every setting that has one, in its help group with its default; read them back with
    :meth:`RunConfig.from_args`. Returns the groups, for the command's own flags."""
    groups = {group: parser.add_argument_group(group.value) for group in HelpGroup}
    for entry in FLAT_KEYS.values():
        if entry.flag is None:
            continue
        declared = entry.setting
        if declared.group is None:
            raise TypeError(f"setting {entry.name} has the flag {entry.flag} but no help group")
        group = groups[declared.group]
        if isinstance(entry.default, bool):
            action = "store_false" if entry.default else "store_true"
            group.add_argument(entry.flag, dest=entry.name, action=action, help=declared.help)
        elif declared.repeatable:
            group.add_argument(
                entry.flag, dest=entry.name, action="append", default=[], metavar=declared.metavar, help=declared.help
            )
        else:
            group.add_argument(
                entry.flag,
                dest=entry.name,
                type=type(entry.default),
                default=None if declared.flag_default else entry.default,
                choices=declared.choices,
                metavar=declared.metavar,
                help=with_default(declared.help, entry.default),
            )
    groups[HelpGroup.TASK].add_argument(
        "--task-setting",
        dest="task_settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=TASK_SETTING_HELP,
    )
    return groups


def parse_task_setting(text: str) -> tuple[str, TaskSettingValue]:
    """``NAME=VALUE`` of ``--task-setting``: VALUE as in TOML (``64``, ``0.5``, ``true``, ``"text"``), else the
    text itself."""
    name, equals, value = text.partition("=")
    if not equals:
        raise ConfigError(f"--task-setting {text!r}: give NAME=VALUE")
    try:
        parsed = tomllib.loads(f"value = {value}")["value"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return name.strip(), parsed if isinstance(parsed, TaskSettingValue) else value


def check_task_settings(settings: Mapping[str, Any]) -> None:
    """Refuse a task setting that is not NAME (letters, digits, _ and -) with a bool, int, float or str value."""
    for name, value in settings.items():
        if not isinstance(name, str) or not TASK_SETTING_NAME.fullmatch(name):
            raise ConfigError(f"task setting {name!r}: a name is letters, digits, _ and -, as in task.hidden-units")
        if not isinstance(value, TaskSettingValue):
            raise ConfigError(
                f"task setting {name}: {type(value).__name__} values are not settings (bool, int, float or str)"
            )


def with_default(help: str, default: Any) -> str:
    """``help`` followed by ``(default: VALUE)``, unless it says its default itself or the default is empty."""
    if "default:" in help or default == "":
        return help
    shown = f"{default:g}" if isinstance(default, float) else str(default)
    return f"{help} (default: {shown.replace('%', '%%')})"
