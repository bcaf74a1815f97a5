"""Datasets of the built-in benchmarks, split into a public slice, clients and a test set.

The *public slice* is data the server may use centrally: it pretrains the
resident base once. The client partitions never leave their simulated node.
"""

from __future__ import annotations

import gzip
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from fedslim.config import RunConfig

FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FMNIST_PUBLIC_FRACTION = 0.05
SYNTHETIC_PUBLIC_DEVICES = 10
SYNTHETIC_TEST_FRACTION = 0.2
TRANSFER_SHIFT = 0.5
TRANSFER_PUBLIC_EXAMPLES = 2000
TRANSFER_EXAMPLES_PER_CLIENT = 200
TRANSFER_TEST_EXAMPLES = 2000


class DatasetMissingError(FileNotFoundError):
    """A dataset's files are not on this machine."""


@dataclass(frozen=True)
class ArrayDataset:
    """Features and integer labels held in memory."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.x[indices], self.y[indices])


@dataclass(frozen=True)
class FederatedData:
    """The public slice (for the base), one training set per client, and a test set."""

    public: ArrayDataset
    clients: list[ArrayDataset]
    test: ArrayDataset


def load_array_file(path: Path) -> ArrayDataset:
    """A deployed node's own data: an ``.npz`` holding ``x`` (features) and ``y`` (integer labels).

    Raises DatasetMissingError if the file is absent and ValueError naming
    what is wrong with it otherwise (a file without examples is no error: its
    node declares none and is left out of the run).
    """
    if not Path(path).is_file():
        raise DatasetMissingError(f"node data {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
    except KeyError as exc:
        raise ValueError(f"node data {path} must hold arrays 'x' and 'y' ({exc} is missing)") from exc
    except (OSError, ValueError) as exc:
        raise ValueError(f"node data {path} is not a readable .npz file: {exc}") from exc
    if len(x) != len(y):
        raise ValueError(f"node data {path}: {len(x)} examples in 'x' but {len(y)} labels in 'y'")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise ValueError(f"node data {path}: labels 'y' must be non-negative integers, got {y.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"node data {path}: features 'x' hold NaN or Inf")
    return ArrayDataset(x.astype(np.float32), y.astype(np.int64))


def save_array_file(path: Path, data: ArrayDataset) -> None:
    """Write ``data`` in the format :func:`load_array_file` reads (e.g. to put a partition on a device)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=data.x, y=data.y)


# ----------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {data.size} values for shape {shape}")
    return data.reshape(shape)


@lru_cache(maxsize=1)
def fashion_mnist_arrays(data_dir: Path) -> dict[str, np.ndarray]:
    """The four IDX files' arrays as stored (images as uint8), read once per process: partitions are slices."""
    missing = [name for name in FMNIST_FILES.values() if not (data_dir / name).is_file()]
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST not found in {data_dir} (missing {', '.join(missing)}). "
            "Install it with `sudo apt-get install dataset-fashion-mnist` "
            "(files land in /usr/share/datasets/fashion-mnist), or pass --data-dir "
            "pointing to a folder with the four IDX .gz files."
        )
    return {key: _read_idx(data_dir / name) for key, name in FMNIST_FILES.items()}


def fashion_mnist_examples(images: np.ndarray, labels: np.ndarray, selections: int = 0) -> ArrayDataset:
    """Fashion-MNIST images as the models take them: scaled to [0, 1], standardised, one channel.

    The channel axis's strides are those the arrays always had (torch reads a
    one-channel image whose channel stride is 1 element as channels-last, and
    picks its convolution kernels, and so the last bits, by that): a new axis
    for the test set, then a copy per selection the parts were once made by
    (the public slice 1, a client's partition 2: the training set's private
    part, then the client's share of it).
    """
    x = ((images.astype(np.float32) / 255.0 - 0.2860) / 0.3530)[:, None, :, :]
    for _ in range(selections):
        x = x[np.arange(len(x))]
    return ArrayDataset(x, labels.astype(np.int64))


def load_fashion_mnist(data_dir: Path) -> tuple[ArrayDataset, ArrayDataset]:
    """Train and test sets from the four IDX ``.gz`` files, images scaled to [0, 1]."""
    arrays = fashion_mnist_arrays(data_dir)
    return (
        fashion_mnist_examples(arrays["train_images"], arrays["train_labels"]),
        fashion_mnist_examples(arrays["test_images"], arrays["test_labels"]),
    )


DIRICHLET_SEED_TRIES = 10


def dirichlet_partition(labels: np.ndarray, num_partitions: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Indices of each partition under a Dirichlet(alpha) label split (flwr-datasets).

    flwr-datasets redraws until every partition has 10 examples and gives up
    after 10 draws, which a small alpha over many clients can exhaust (Dir(0.1)
    over 100 clients does for seed 2); the split is then drawn again from
    seed + 1000, seed + 2000, ..., deterministically.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    for attempt in range(DIRICHLET_SEED_TRIES):
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=10,
            seed=seed + 1000 * attempt,
        )
        partitioner.dataset = Dataset.from_dict({"label": labels, "index": np.arange(len(labels))})
        try:
            return [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64) for i in range(num_partitions)]
        except ValueError:
            continue
    raise ValueError(
        f"no Dirichlet({alpha}) split of {len(labels)} examples over {num_partitions} clients gives each "
        f"at least 10 examples ({DIRICHLET_SEED_TRIES} seeds tried); raise alpha or use fewer clients"
    )


# ----------------------------------------------------------------- Synthetic(alpha, beta)

PACKED_STATE_WORDS = 6
UINT64_MASK = 2**64 - 1


def packed_state(rng: np.random.Generator) -> list[int]:
    """A PCG64 generator's state as six 64-bit words (state and increment split in halves)."""
    state = rng.bit_generator.state
    value, increment = state["state"]["state"], state["state"]["inc"]
    return [
        value >> 64, value & UINT64_MASK, increment >> 64, increment & UINT64_MASK,
        state["has_uint32"], state["uinteger"],
    ]  # fmt: skip


def generator_at(words: np.ndarray) -> np.random.Generator:
    """A PCG64 generator in the state :func:`packed_state` packed."""
    high, low, increment_high, increment_low, has_uint32, uinteger = (int(word) for word in words)
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": high << 64 | low, "inc": increment_high << 64 | increment_low},
        "has_uint32": has_uint32,
        "uinteger": uinteger,
    }
    return rng


def synthetic_train_examples(count: int) -> int:
    """How many of a Synthetic device's examples its client trains on (the rest join the test set)."""
    return int(round(count * (1 - SYNTHETIC_TEST_FRACTION)))


@dataclass(frozen=True, eq=False)
class SyntheticStream:
    """The devices of one Synthetic(alpha, beta) stream, indexed by where each one's draws start.

    The devices are drawn one after another from one generator, and a normal
    draw takes a varying number of the generator's words, so device k's draws
    start where device k - 1's ended: one pass over the stream
    (:meth:`scan`) records the generator's state before each device, and
    :meth:`device` then makes any one device alone, bit for bit as the pass
    made it, without holding the others.
    """

    counts: np.ndarray
    model_means: np.ndarray
    feature_shifts: np.ndarray
    starts: np.ndarray
    """The generator's state before each device's draws (:func:`packed_state`), one row per device."""
    train_label_counts: np.ndarray
    """Per device, the examples of each class among its first :func:`synthetic_train_examples`."""
    dimension: int
    num_classes: int

    @classmethod
    def scan(
        cls, num_devices: int, alpha: float, beta: float, seed: int | list[int], dimension: int = 60,
        num_classes: int = 10, on_device: Callable[[ArrayDataset], None] | None = None,
    ) -> SyntheticStream:  # fmt: skip
        """Synthetic(alpha, beta) as defined in the FedProx paper (Li et al., 2020), indexed in one pass.

        Device k draws u_k ~ N(0, alpha^2), B_k ~ N(0, beta^2) (alpha, beta are
        standard deviations, as in the LEAF generator); W_k ~ N(u_k, 1),
        b_k ~ N(u_k, 1); v_k ~ N(B_k, 1) per feature; x ~ N(v_k, Sigma) with
        Sigma_jj = j^-1.2; y = argmax(softmax(W_k x + b_k)). Sample counts follow
        a log-normal(4, 2) law plus 50, as in the paper's generator.

        ``on_device`` is given each device as the pass draws it (e.g. to keep a part of it).
        """
        rng = np.random.default_rng(seed)
        counts = rng.lognormal(4, 2, num_devices).astype(np.int64) + 50
        model_means = rng.normal(0, alpha, num_devices)
        feature_shifts = rng.normal(0, beta, num_devices)
        starts = np.zeros((num_devices, PACKED_STATE_WORDS), dtype=np.uint64)
        label_counts = np.zeros((num_devices, num_classes), dtype=np.int64)
        stream = cls(counts, model_means, feature_shifts, starts, label_counts, dimension, num_classes)
        for k in range(num_devices):
            starts[k] = packed_state(rng)
            device = stream.draw(rng, k)
            label_counts[k] = np.bincount(device.y[: synthetic_train_examples(len(device))], minlength=num_classes)
            if on_device is not None:
                on_device(device)
        return stream

    def __len__(self) -> int:
        return len(self.counts)

    def draw(self, rng: np.random.Generator, k: int) -> ArrayDataset:
        """Device ``k``, drawn from ``rng`` where its draws start."""
        weights = rng.normal(self.model_means[k], 1, (self.dimension, self.num_classes))
        bias = rng.normal(self.model_means[k], 1, self.num_classes)
        feature_mean = rng.normal(self.feature_shifts[k], 1, self.dimension)
        feature_std = np.power(np.arange(1, self.dimension + 1, dtype=np.float64), -1.2 / 2)
        x = rng.normal(feature_mean, feature_std, (self.counts[k], self.dimension))
        y = np.argmax(x @ weights + bias, axis=1)
        return ArrayDataset(x.astype(np.float32), y.astype(np.int64))

    def device(self, k: int) -> ArrayDataset:
        """Device ``k`` alone."""
        return self.draw(generator_at(self.starts[k]), k)


def synthetic_devices(
    num_devices: int, alpha: float, beta: float, seed: int | list[int], dimension: int = 60, num_classes: int = 10
) -> list[ArrayDataset]:
    """Every device of a Synthetic(alpha, beta) stream (:meth:`SyntheticStream.scan`)."""
    devices: list[ArrayDataset] = []
    SyntheticStream.scan(num_devices, alpha, beta, seed, dimension, num_classes, on_device=devices.append)
    return devices


# ----------------------------------------------------------------- federations, part by part


class FederationSource(ABC):
    """A built-in federation whose parts are made when asked for: the server takes the test set and the clients'
    label counts, a client's process the partitions it serves; no process holds every client's data."""

    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec

    @abstractmethod
    def public(self) -> ArrayDataset:
        """The public slice (the base pretrains on it)."""

    @abstractmethod
    def test(self) -> ArrayDataset:
        """The server's test set (kept once made)."""

    @abstractmethod
    def client(self, partition_id: int) -> ArrayDataset:
        """Client ``partition_id``'s training data (IndexError when there is no such client)."""

    @abstractmethod
    def label_counts(self) -> np.ndarray:
        """The examples of each class in each client's training data (clients x classes)."""

    def checked(self, partition_id: int) -> int:
        """``partition_id`` if the federation has that client, else an IndexError naming it."""
        if not 0 <= partition_id < self.spec.num_clients:
            raise IndexError(f"partition-id {partition_id} out of range for {self.spec.num_clients} clients")
        return partition_id


class FashionMnistSource(FederationSource):
    """Fashion-MNIST: 5% of the training images public, the rest split Dirichlet(alpha) over labels. The split is
    indices, made from the labels alone; a client's images are sliced from the arrays read once per process."""

    def arrays(self) -> dict[str, np.ndarray]:
        return fashion_mnist_arrays(self.spec.data_dir)

    @cached_property
    def split(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """The public slice's indices into the training set, and each client's."""
        labels = self.arrays()["train_labels"]
        order = np.random.default_rng(self.spec.seed).permutation(len(labels))
        num_public = int(FMNIST_PUBLIC_FRACTION * len(labels))
        public, private = np.sort(order[:num_public]), np.sort(order[num_public:])
        parts = dirichlet_partition(
            labels[private].astype(np.int64), self.spec.num_clients, self.spec.dirichlet_alpha, self.spec.seed
        )
        return public, [private[part] for part in parts]

    def examples(self, indices: np.ndarray, selections: int) -> ArrayDataset:
        arrays = self.arrays()
        return fashion_mnist_examples(arrays["train_images"][indices], arrays["train_labels"][indices], selections)

    def public(self) -> ArrayDataset:
        return self.examples(self.split[0], selections=1)

    @cached_property
    def _test(self) -> ArrayDataset:
        arrays = self.arrays()
        return fashion_mnist_examples(arrays["test_images"], arrays["test_labels"])

    def test(self) -> ArrayDataset:
        return self._test

    def client(self, partition_id: int) -> ArrayDataset:
        return self.examples(self.split[1][self.checked(partition_id)], selections=2)

    def label_counts(self) -> np.ndarray:
        return self._label_counts

    @cached_property
    def _label_counts(self) -> np.ndarray:
        labels = self.arrays()["train_labels"].astype(np.int64)
        return np.stack([np.bincount(labels[part], minlength=10) for part in self.split[1]])


class SyntheticSource(FederationSource):
    """Synthetic(alpha, beta): each client one device of a stream, its last 20% in the test set; the public slice
    is 10 devices of a stream of its own, so that it (and the base) does not depend on the number of clients."""

    @cached_property
    def stream(self) -> SyntheticStream:
        return self.scan()

    def scan(self, on_device: Callable[[ArrayDataset], None] | None = None) -> SyntheticStream:
        spec = self.spec
        return SyntheticStream.scan(
            spec.num_clients, spec.synthetic_alpha, spec.synthetic_beta, [spec.seed, 1], on_device=on_device
        )

    def public(self) -> ArrayDataset:
        spec = self.spec
        devices = synthetic_devices(SYNTHETIC_PUBLIC_DEVICES, spec.synthetic_alpha, spec.synthetic_beta, [spec.seed, 0])
        return ArrayDataset(np.concatenate([d.x for d in devices]), np.concatenate([d.y for d in devices]))

    @cached_property
    def _test(self) -> ArrayDataset:
        tests: list[ArrayDataset] = []

        def keep_test(device: ArrayDataset) -> None:
            tests.append(device.subset(np.arange(synthetic_train_examples(len(device)), len(device))))

        if "stream" in self.__dict__:  # indexed already: each device drawn again
            for k in range(len(self.stream)):
                keep_test(self.stream.device(k))
        else:  # one pass indexes the stream and collects the test set
            self.__dict__["stream"] = self.scan(keep_test)
        return ArrayDataset(np.concatenate([d.x for d in tests]), np.concatenate([d.y for d in tests]))

    def test(self) -> ArrayDataset:
        return self._test

    def client(self, partition_id: int) -> ArrayDataset:
        device = self.stream.device(self.checked(partition_id))
        return device.subset(np.arange(synthetic_train_examples(len(device))))

    def label_counts(self) -> np.ndarray:
        return self.stream.train_label_counts


# ----------------------------------------------------------------- Synthetic transfer


class SyntheticTransferSource(FederationSource):
    """A public task and a related federated one, so that a base pretrained on the first transfers to the second.

    Features are those of the FedProx paper's Synthetic IID, x ~ N(0, Sigma)
    with Sigma_jj = j^-1.2. The public slice (2,000 examples) is labelled by a
    linear model y = argmax(W_0^T x + b_0), (W_0, b_0) ~ N(0, 1); the clients'
    data by (W_0 + s D, b_0 + s d) with (D, d) ~ N(0, 1) and s =
    ``TRANSFER_SHIFT``: a related task (correlation 1/sqrt(1 + s^2) per entry),
    not the same one, so the base starts well above chance and the fast layer
    has something to learn. The clients' 200 examples each are split
    Dirichlet(``dirichlet_alpha``) over labels; the test set is 2,000 examples
    of the clients' task. Public slice, clients' pool and test set are drawn
    from separate streams, so neither the base nor the test set depends on the
    number of clients. The pool is drawn in one piece, once per process that
    asks for a client's data.
    """

    dimension = 60
    num_classes = 10

    @cached_property
    def models(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The public task's weights and bias, and the clients' task's."""
        models = np.random.default_rng([self.spec.seed, 2])
        public_weights = models.normal(0, 1, (self.dimension, self.num_classes))
        public_bias = models.normal(0, 1, self.num_classes)
        client_weights = public_weights + TRANSFER_SHIFT * models.normal(0, 1, (self.dimension, self.num_classes))
        client_bias = public_bias + TRANSFER_SHIFT * models.normal(0, 1, self.num_classes)
        return public_weights, public_bias, client_weights, client_bias

    def labelled(self, count: int, weights: np.ndarray, bias: np.ndarray, stream: int) -> ArrayDataset:
        feature_std = np.power(np.arange(1, self.dimension + 1, dtype=np.float64), -1.2 / 2)
        x = np.random.default_rng([self.spec.seed, stream]).normal(0, feature_std, (count, self.dimension))
        return ArrayDataset(x.astype(np.float32), np.argmax(x @ weights + bias, axis=1).astype(np.int64))

    def public(self) -> ArrayDataset:
        public_weights, public_bias, _, _ = self.models
        return self.labelled(TRANSFER_PUBLIC_EXAMPLES, public_weights, public_bias, stream=0)

    @cached_property
    def _test(self) -> ArrayDataset:
        _, _, client_weights, client_bias = self.models
        return self.labelled(TRANSFER_TEST_EXAMPLES, client_weights, client_bias, stream=3)

    def test(self) -> ArrayDataset:
        return self._test

    @cached_property
    def pool(self) -> ArrayDataset:
        _, _, client_weights, client_bias = self.models
        return self.labelled(TRANSFER_EXAMPLES_PER_CLIENT * self.spec.num_clients, client_weights, client_bias, 1)

    @cached_property
    def parts(self) -> list[np.ndarray]:
        return dirichlet_partition(self.pool.y, self.spec.num_clients, self.spec.dirichlet_alpha, self.spec.seed)

    def client(self, partition_id: int) -> ArrayDataset:
        return self.pool.subset(self.parts[self.checked(partition_id)])

    def label_counts(self) -> np.ndarray:
        return self._label_counts

    @cached_property
    def _label_counts(self) -> np.ndarray:
        return np.stack([np.bincount(self.pool.y[part], minlength=self.num_classes) for part in self.parts])


SOURCES: dict[str, type[FederationSource]] = {
    "fmnist": FashionMnistSource,
    "synthetic": SyntheticSource,
    "synthetic-transfer": SyntheticTransferSource,
}


def federation_source(config: RunConfig) -> FederationSource:
    """The built-in federation of ``config``, its parts made on demand; one per process (Ray actors reuse it)."""
    return _federation_source(DataSpec.of(config))


@lru_cache(maxsize=2)
def _federation_source(spec: DataSpec) -> FederationSource:
    if spec.dataset not in SOURCES:
        raise ValueError(f"no built-in federation for task {spec.dataset!r}")
    return SOURCES[spec.dataset](spec)


def load_federation(config: RunConfig) -> FederatedData:
    """The federation for ``config``, every part of it made and held (for scripts and tests: a run asks
    :func:`federation_source` for the parts it needs)."""
    source = federation_source(config)
    clients = [source.client(k) for k in range(config.num_clients)]
    return FederatedData(source.public(), clients, source.test())


@dataclass(frozen=True)
class DataSpec:
    """The fields of a RunConfig that determine the data, and nothing else (a cache key)."""

    dataset: str
    num_clients: int
    seed: int
    dirichlet_alpha: float
    synthetic_alpha: float
    synthetic_beta: float
    data_dir: Path

    @classmethod
    def of(cls, config: RunConfig) -> DataSpec:
        return cls(
            config.task,
            config.num_clients,
            config.seed,
            config.dirichlet_alpha,
            config.synthetic_alpha,
            config.synthetic_beta,
            config.resolved_data_dir(),
        )
