"""Datasets of the built-in benchmarks, split into a public slice, clients and a test set.

The *public slice* is data the server may use centrally: it pretrains the
resident base once. The client partitions never leave their simulated node.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from functools import lru_cache
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


def load_fashion_mnist(data_dir: Path) -> tuple[ArrayDataset, ArrayDataset]:
    """Train and test sets from the four IDX ``.gz`` files, images scaled to [0, 1]."""
    missing = [name for name in FMNIST_FILES.values() if not (data_dir / name).is_file()]
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST not found in {data_dir} (missing {', '.join(missing)}). "
            "Install it with `sudo apt-get install dataset-fashion-mnist` "
            "(files land in /usr/share/datasets/fashion-mnist), or pass --data-dir "
            "pointing to a folder with the four IDX .gz files."
        )
    arrays = {key: _read_idx(data_dir / name) for key, name in FMNIST_FILES.items()}

    def as_dataset(images: np.ndarray, labels: np.ndarray) -> ArrayDataset:
        x = (images.astype(np.float32) / 255.0 - 0.2860) / 0.3530
        return ArrayDataset(x[:, None, :, :], labels.astype(np.int64))

    return (
        as_dataset(arrays["train_images"], arrays["train_labels"]),
        as_dataset(arrays["test_images"], arrays["test_labels"]),
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


def fashion_mnist_federation(config: DataSpec) -> FederatedData:
    train, test = load_fashion_mnist(config.data_dir)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(train))
    num_public = int(FMNIST_PUBLIC_FRACTION * len(train))
    public_idx, private_idx = order[:num_public], order[num_public:]
    private = train.subset(np.sort(private_idx))
    parts = dirichlet_partition(private.y, config.num_clients, config.dirichlet_alpha, config.seed)
    return FederatedData(train.subset(np.sort(public_idx)), [private.subset(p) for p in parts], test)


# ----------------------------------------------------------------- Synthetic(alpha, beta)


def synthetic_devices(
    num_devices: int, alpha: float, beta: float, seed: int | list[int], dimension: int = 60, num_classes: int = 10
) -> list[ArrayDataset]:
    """Synthetic(alpha, beta) as defined in the FedProx paper (Li et al., 2020).

    Device k draws u_k ~ N(0, alpha^2), B_k ~ N(0, beta^2) (alpha, beta are
    standard deviations, as in the LEAF generator); W_k ~ N(u_k, 1),
    b_k ~ N(u_k, 1); v_k ~ N(B_k, 1) per feature; x ~ N(v_k, Sigma) with
    Sigma_jj = j^-1.2; y = argmax(softmax(W_k x + b_k)). Sample counts follow
    a log-normal(4, 2) law plus 50, as in the paper's generator.
    """
    rng = np.random.default_rng(seed)
    counts = rng.lognormal(4, 2, num_devices).astype(np.int64) + 50
    model_means = rng.normal(0, alpha, num_devices)
    feature_shifts = rng.normal(0, beta, num_devices)
    feature_std = np.power(np.arange(1, dimension + 1, dtype=np.float64), -1.2 / 2)
    devices = []
    for k in range(num_devices):
        weights = rng.normal(model_means[k], 1, (dimension, num_classes))
        bias = rng.normal(model_means[k], 1, num_classes)
        feature_mean = rng.normal(feature_shifts[k], 1, dimension)
        x = rng.normal(feature_mean, feature_std, (counts[k], dimension))
        y = np.argmax(x @ weights + bias, axis=1)
        devices.append(ArrayDataset(x.astype(np.float32), y.astype(np.int64)))
    return devices


def synthetic_federation(config: DataSpec) -> FederatedData:
    # Separate streams: the public devices (and so the pretrained base) do not
    # depend on how many clients the federation has.
    alpha, beta = config.synthetic_alpha, config.synthetic_beta
    public_devices = synthetic_devices(SYNTHETIC_PUBLIC_DEVICES, alpha, beta, [config.seed, 0])
    client_devices = synthetic_devices(config.num_clients, alpha, beta, [config.seed, 1])
    public = ArrayDataset(np.concatenate([d.x for d in public_devices]), np.concatenate([d.y for d in public_devices]))
    clients, tests = [], []
    for device in client_devices:
        cut = int(round(len(device) * (1 - SYNTHETIC_TEST_FRACTION)))
        clients.append(device.subset(np.arange(cut)))
        tests.append(device.subset(np.arange(cut, len(device))))
    test = ArrayDataset(np.concatenate([d.x for d in tests]), np.concatenate([d.y for d in tests]))
    return FederatedData(public, clients, test)


# ----------------------------------------------------------------- Synthetic transfer


def synthetic_transfer_federation(config: DataSpec, dimension: int = 60, num_classes: int = 10) -> FederatedData:
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
    number of clients.
    """
    models = np.random.default_rng([config.seed, 2])
    public_weights = models.normal(0, 1, (dimension, num_classes))
    public_bias = models.normal(0, 1, num_classes)
    client_weights = public_weights + TRANSFER_SHIFT * models.normal(0, 1, (dimension, num_classes))
    client_bias = public_bias + TRANSFER_SHIFT * models.normal(0, 1, num_classes)
    feature_std = np.power(np.arange(1, dimension + 1, dtype=np.float64), -1.2 / 2)

    def labelled(count: int, weights: np.ndarray, bias: np.ndarray, stream: int) -> ArrayDataset:
        x = np.random.default_rng([config.seed, stream]).normal(0, feature_std, (count, dimension))
        return ArrayDataset(x.astype(np.float32), np.argmax(x @ weights + bias, axis=1).astype(np.int64))

    public = labelled(TRANSFER_PUBLIC_EXAMPLES, public_weights, public_bias, stream=0)
    pool = labelled(TRANSFER_EXAMPLES_PER_CLIENT * config.num_clients, client_weights, client_bias, stream=1)
    test = labelled(TRANSFER_TEST_EXAMPLES, client_weights, client_bias, stream=3)
    parts = dirichlet_partition(pool.y, config.num_clients, config.dirichlet_alpha, config.seed)
    return FederatedData(public, [pool.subset(p) for p in parts], test)


def load_federation(config: RunConfig) -> FederatedData:
    """The federation for ``config``; cached per process (Ray actors reuse it across rounds)."""
    return _load_federation(DataSpec.of(config))


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


@lru_cache(maxsize=2)
def _load_federation(spec: DataSpec) -> FederatedData:
    if spec.dataset == "fmnist":
        return fashion_mnist_federation(spec)
    if spec.dataset == "synthetic":
        return synthetic_federation(spec)
    if spec.dataset == "synthetic-transfer":
        return synthetic_transfer_federation(spec)
    raise ValueError(f"no built-in federation for task {spec.dataset!r}")
