"""Datasets and partitions: Synthetic(alpha, beta), Fashion-MNIST IDX files, Dirichlet splits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fedslim.config import RunConfig
from fedslim.data.datasets import (
    TRANSFER_EXAMPLES_PER_CLIENT,
    TRANSFER_PUBLIC_EXAMPLES,
    TRANSFER_TEST_EXAMPLES,
    ArrayDataset,
    DatasetMissingError,
    DataSpec,
    SyntheticSource,
    dirichlet_partition,
    federation_source,
    load_fashion_mnist,
    load_federation,
    synthetic_devices,
)
from fedslim.task import Task, load_task

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _write_idx(path: Path, array: np.ndarray, truncate: int = 0) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    body = array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + body[: len(body) - truncate])


def _write_fake_fmnist(folder: Path, truncate_test_labels: int = 0) -> None:
    rng = np.random.default_rng(0)
    _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 20))
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28)))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 5), truncate=truncate_test_labels)


def test_synthetic_is_deterministic_and_follows_the_generator() -> None:
    first = synthetic_devices(5, 1.0, 1.0, seed=[0, 1])
    second = synthetic_devices(5, 1.0, 1.0, seed=[0, 1])
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.x, b.x)
    assert all(len(d) >= 50 for d in first)
    assert all(d.x.shape[1] == 60 and d.y.max() < 10 for d in first)
    # Within a device, feature j has variance j^-1.2: 1 for the first, 60^-1.2 = 0.0074 for the last.
    first_var = np.mean([d.x[:, 0].var() for d in first])
    last_var = np.mean([d.x[:, -1].var() for d in first])
    assert 0.6 < first_var < 1.4 and 0.004 < last_var < 0.012


@pytest.mark.parametrize("task", ["synthetic", "synthetic-transfer"])
def test_synthetic_public_slice_does_not_depend_on_the_client_count(task: str, tmp_path: Path) -> None:
    few = load_federation(RunConfig(task=task, num_clients=3, out=str(tmp_path)))
    many = load_federation(RunConfig(task=task, num_clients=8, out=str(tmp_path)))
    np.testing.assert_array_equal(few.public.x, many.public.x)
    np.testing.assert_array_equal(few.public.y, many.public.y)
    assert len(few.clients) == 3 and len(many.clients) == 8


def test_synthetic_transfer_splits_its_pool_and_keeps_its_test_set_fixed(tmp_path: Path) -> None:
    few = load_federation(RunConfig(num_clients=3, out=str(tmp_path)))
    many = load_federation(RunConfig(num_clients=8, out=str(tmp_path)))
    np.testing.assert_array_equal(few.test.x, many.test.x)
    assert len(few.public) == TRANSFER_PUBLIC_EXAMPLES and len(few.test) == TRANSFER_TEST_EXAMPLES
    # Every pooled example is on exactly one client: 200 per client in all, no row twice.
    pooled = np.concatenate([c.x for c in many.clients])
    assert len(pooled) == 8 * TRANSFER_EXAMPLES_PER_CLIENT == len(np.unique(pooled, axis=0))
    # Dirichlet over labels: the clients' label mixes differ.
    mixes = np.array([np.bincount(c.y, minlength=10) / len(c) for c in many.clients])
    assert np.abs(mixes - mixes.mean(axis=0)).max() > 0.2


def test_synthetic_transfer_base_transfers_but_the_clients_task_is_another(tmp_path: Path) -> None:
    import torch

    from fedslim.task import load_task

    config = RunConfig(out=str(tmp_path))
    federation = load_federation(config)
    base = load_task(config.task).pretrain(config)

    def accuracy(data: ArrayDataset) -> float:
        with torch.no_grad():
            return float((base(torch.from_numpy(data.x)).argmax(1).numpy() == data.y).mean())

    on_public, on_clients = accuracy(federation.public), accuracy(federation.test)
    # Well above chance (0.1) on the clients' task, and clearly below its score on the public task it learnt.
    assert 0.35 < on_clients < on_public - 0.1, (on_public, on_clients)


def test_dirichlet_partition_covers_every_index_once() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 3000)
    parts = dirichlet_partition(labels, num_partitions=20, alpha=0.3, seed=1)
    assert len(parts) == 20
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    # alpha = 0.3 is strongly non-IID: most clients are dominated by few labels.
    top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.median(top_share) > 0.3


def test_fashion_mnist_reads_idx_files(tmp_path: Path) -> None:
    _write_fake_fmnist(tmp_path)
    train, test = load_fashion_mnist(tmp_path)
    assert train.x.shape == (20, 1, 28, 28) and train.x.dtype == np.float32
    assert test.y.shape == (5,)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_truncated_file_is_named(tmp_path: Path) -> None:
    _write_fake_fmnist(tmp_path, truncate_test_labels=2)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is truncated"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_federation(tmp_path: Path) -> None:
    data = load_federation(RunConfig(task="fmnist", num_clients=50, out=str(tmp_path)))
    assert len(data.public) == 3000 and len(data.test) == 10000
    assert sum(len(c) for c in data.clients) == 57000
    assert min(len(c) for c in data.clients) >= 10


def test_dirichlet_partition_redraws_from_derived_seeds_when_flwr_datasets_gives_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = np.repeat(np.arange(4), 100)
    expected = dirichlet_partition(labels, 4, alpha=1.0, seed=1007)  # what the first redraw (seed + 1000) gives
    original = DirichletPartitioner.load_partition
    seeds_tried: list[int] = []

    def fails_for_seed_7(self: DirichletPartitioner, partition_id: int):  # type: ignore[no-untyped-def]
        seeds_tried.append(self._seed)
        if self._seed == 7:
            raise ValueError("The max number of attempts (10) was reached.")
        return original(self, partition_id)

    monkeypatch.setattr(DirichletPartitioner, "load_partition", fails_for_seed_7)
    parts = dirichlet_partition(labels, 4, alpha=1.0, seed=7)
    assert seeds_tried[0] == 7 and set(seeds_tried[1:]) == {1007}
    assert all(np.array_equal(a, b) for a, b in zip(parts, expected))

    monkeypatch.setattr(DirichletPartitioner, "load_partition", lambda self, i: (_ for _ in ()).throw(ValueError()))
    with pytest.raises(ValueError, match="no Dirichlet"):
        dirichlet_partition(labels, 4, alpha=1.0, seed=7)


def sequential_synthetic(num_devices: int, alpha: float, beta: float, seed: list[int]) -> list[ArrayDataset]:
    """Synthetic(alpha, beta) drawn device after device from one generator, as fedslim drew it before it indexed the
    stream: what every partition made alone must equal, bit for bit."""
    rng = np.random.default_rng(seed)
    counts = rng.lognormal(4, 2, num_devices).astype(np.int64) + 50
    model_means, feature_shifts = rng.normal(0, alpha, num_devices), rng.normal(0, beta, num_devices)
    feature_std = np.power(np.arange(1, 61, dtype=np.float64), -1.2 / 2)
    devices = []
    for k in range(num_devices):
        weights, bias = rng.normal(model_means[k], 1, (60, 10)), rng.normal(model_means[k], 1, 10)
        x = rng.normal(rng.normal(feature_shifts[k], 1, 60), feature_std, (counts[k], 60))
        devices.append(ArrayDataset(x.astype(np.float32), np.argmax(x @ weights + bias, axis=1).astype(np.int64)))
    return devices


@pytest.mark.parametrize("test_set_first", [True, False])
def test_a_synthetic_partition_made_alone_is_the_one_the_whole_stream_makes(
    test_set_first: bool, tmp_path: Path
) -> None:
    config = RunConfig(task="synthetic", num_clients=12, seed=4, out=str(tmp_path))
    expected = sequential_synthetic(12, 1.0, 1.0, [4, 1])
    source = SyntheticSource(DataSpec.of(config))
    test = source.test() if test_set_first else None  # the server: one pass indexes the stream and keeps the test set
    for k in (7, 0, 11, 3):  # in any order, each alone
        cut = int(round(len(expected[k]) * 0.8))
        np.testing.assert_array_equal(source.client(k).x, expected[k].x[:cut])
        np.testing.assert_array_equal(source.client(k).y, expected[k].y[:cut])
        assert source.label_counts()[k].tolist() == np.bincount(expected[k].y[:cut], minlength=10).tolist()
    test = source.test() if test is None else test
    np.testing.assert_array_equal(test.x, np.concatenate([d.x[int(round(len(d) * 0.8)) :] for d in expected]))
    # What the source keeps: the stream's index and the test set, no client's data.
    assert set(vars(source)) == {"spec", "stream", "_test"}
    assert source.stream.starts.nbytes == 12 * 48
    with pytest.raises(IndexError, match="partition-id 12 out of range for 12 clients"):
        source.client(12)


@pytest.mark.parametrize("task", ["synthetic", "synthetic-transfer"])
def test_built_in_label_counts_are_those_of_the_clients_data(task: str, tmp_path: Path) -> None:
    config = RunConfig(task=task, num_clients=6, out=str(tmp_path))
    source = federation_source(config)
    counted = [np.bincount(source.client(k).y, minlength=10).tolist() for k in range(6)]
    assert source.label_counts().tolist() == counted
    # Task.label_counts' default counts client_data: the built-in task's own counts agree with it.
    built_in = load_task(task)
    for k in range(6):
        default = Task.label_counts(built_in, config, k)
        assert np.pad(default, (0, 10 - len(default))).tolist() == built_in.label_counts(config, k).tolist()


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_a_fashion_mnist_partition_is_sliced_from_the_images_read_once(tmp_path: Path) -> None:
    config = RunConfig(task="fmnist", num_clients=20, dirichlet_alpha=0.3, out=str(tmp_path))
    train, _ = load_fashion_mnist(FMNIST_DIR)
    # The split as fedslim made it before partitions were made alone: the whole private set, then its parts.
    order = np.random.default_rng(config.seed).permutation(len(train))
    private = train.subset(np.sort(order[int(0.05 * len(train)) :]))
    parts = dirichlet_partition(private.y, 20, 0.3, config.seed)
    source = federation_source(config)
    for k in (0, 13, 19):
        np.testing.assert_array_equal(source.client(k).x, private.subset(parts[k]).x)
        # torch reads a one-channel image with the channel stride of one element as channels-last: strides count
        assert source.client(k).x.strides == private.subset(parts[k]).x.strides == (3136, 112, 112, 4)
        np.testing.assert_array_equal(source.client(k).y, private.subset(parts[k]).y)
    assert source.label_counts().tolist() == [np.bincount(private.y[p], minlength=10).tolist() for p in parts]
