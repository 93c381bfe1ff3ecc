"""Data sets as index-addressable sources: MNIST-format IDX files, or synthetic data.

Every rank draws the same permutation per epoch from the seed and reads only its own slice of
each minibatch, so no data moves between ranks. A source fills preallocated batch buffers
from a list of example indices; it never allocates a batch of its own.

Synthetic examples are a pure function of (seed, index): class prototype plus two rows of a
fixed noise table chosen by hashing the index. Any size, identical whatever the rank count,
and a rank generates only the examples it is given, so a weak-scaling study can grow the data
set with the ranks without any rank holding all of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import numpy as np

from .config import Config
from .errors import DataError

_NOISE_ROWS = 1031  # prime, so the two hashed rows rarely repeat as a pair
_TEST_STREAM = 1 << 40  # synthetic test indices live far from train/validation indices


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash (splitmix64's finaliser): decorrelated uint64s from consecutive ints."""
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class ArraySource:
    """Examples held in memory as uint8 pixels (4x smaller than float32), scaled on the fly."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, n_classes: int):
        self.images, self.labels, self.n_classes = images, labels.astype(np.int64), n_classes
        self._u8: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def labels_of(self, idx: np.ndarray) -> np.ndarray:
        return self.labels[idx]

    def features_into(self, idx: np.ndarray, out: np.ndarray) -> None:
        n = idx.shape[0]
        if self._u8 is None or self._u8.shape[0] < n:
            self._u8 = np.empty((max(n, 1), self.images.shape[1]), dtype=np.uint8)
        u8 = self._u8[:n]
        np.take(self.images, idx, axis=0, out=u8, mode="clip")  # "raise" would buffer the copy
        np.multiply(u8, np.float32(1.0 / 255.0), out=out, casting="unsafe")


class SyntheticSource:
    """n examples of n_features in [0, 1]-ish, n_classes classes, a function of (seed, index)."""

    def __init__(self, n: int, n_features: int, n_classes: int, seed: int, noise: float, offset: int = 0):
        self.n, self.n_features, self.n_classes, self.offset = n, n_features, n_classes, offset
        rng = np.random.default_rng([seed, 0x53594E])
        self.seed_key = np.uint64(rng.integers(1, 2**63))
        self.protos = (rng.random((n_classes, n_features)) < 0.25).astype(np.float32) * 0.8 + 0.1
        self.noise = (rng.standard_normal((_NOISE_ROWS, n_features)) * (noise / np.sqrt(2))).astype(np.float32)
        self._tmp: Optional[np.ndarray] = None
        self._cast: dict[Any, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.n

    def _tables(self, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
        """Prototype and noise tables in the buffer's dtype, so np.take can write straight into it."""
        if dtype not in self._cast:
            self._cast[dtype] = (self.protos.astype(dtype), self.noise.astype(dtype))
        return self._cast[dtype]

    def _hash(self, idx: np.ndarray) -> np.ndarray:
        return _splitmix64((idx.astype(np.uint64) + np.uint64(self.offset)) ^ self.seed_key)

    def labels_of(self, idx: np.ndarray) -> np.ndarray:
        return (self._hash(idx) % np.uint64(self.n_classes)).astype(np.int64)

    def features_into(self, idx: np.ndarray, out: np.ndarray) -> None:
        h = self._hash(idx)
        n = idx.shape[0]
        protos, noise = self._tables(out.dtype)
        if self._tmp is None or self._tmp.shape[0] < n or self._tmp.dtype != out.dtype:
            self._tmp = np.empty((max(n, 1), self.n_features), dtype=out.dtype)
        tmp = self._tmp[:n]
        np.take(protos, (h % np.uint64(self.n_classes)).astype(np.intp), axis=0, out=out, mode="clip")
        np.take(noise, ((h >> np.uint64(16)) % np.uint64(_NOISE_ROWS)).astype(np.intp), axis=0, out=tmp, mode="clip")
        out += tmp
        np.take(noise, ((h >> np.uint64(40)) % np.uint64(_NOISE_ROWS)).astype(np.intp), axis=0, out=tmp, mode="clip")
        out += tmp


Source = Any  # ArraySource | SyntheticSource: labels_of(idx), features_into(idx, out), len()


@dataclass
class Data:
    train: Source
    val: Source
    test: Source
    n_features: int
    n_classes: int
    origin: str  # where it came from, for the record

    def fingerprint(self) -> int:
        """A cheap checksum of what this rank loaded, to check all ranks agree."""
        probe = np.arange(0, len(self.train), max(1, len(self.train) // 997))
        return int(np.sum(self.train.labels_of(probe) * (np.arange(probe.size) % 89 + 1))) + 1000003 * len(self.train)


def fill_batch(source: Source, idx: np.ndarray, x: Any, y: Any, xp: ModuleType, rows: np.ndarray) -> None:
    """Features of examples idx into x[:n], one-hot targets into y[:n]; buffers preallocated.

    `rows` is a preallocated arange for the one-hot scatter. On a namespace other than numpy
    the batch is built on the host and copied in (the GPU backend keeps its own device copy).
    """
    n = idx.shape[0]
    if xp is np:
        source.features_into(idx, x[:n])
        y[:n] = 0
        y[rows[:n], source.labels_of(idx)] = 1
        return
    hx = np.empty((n, x.shape[1]), dtype=np.float32)
    source.features_into(idx, hx)
    hy = np.zeros((n, y.shape[1]), dtype=np.float32)
    hy[np.arange(n), source.labels_of(idx)] = 1
    x[:n, ...] = xp.asarray(hx, dtype=x.dtype)
    y[:n, ...] = xp.asarray(hy, dtype=y.dtype)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The report's train/validation split (5:1 by default), drawn once from the seed."""
    perm = np.random.default_rng([seed, 0x53504C]).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class _Subset:
    """A view of a source through an index map (the train or validation part of a split)."""

    def __init__(self, base: Source, index: np.ndarray):
        self.base, self.index, self.n_classes = base, index, base.n_classes

    def __len__(self) -> int:
        return self.index.shape[0]

    def labels_of(self, idx: np.ndarray) -> np.ndarray:
        return self.base.labels_of(self.index[idx])

    def features_into(self, idx: np.ndarray, out: np.ndarray) -> None:
        self.base.features_into(self.index[idx], out)


def _load_idx(cfg: Config, directory: Path) -> Data:
    from .mnist import load_mnist

    arrays = load_mnist(directory)
    n_train = arrays.train_labels.shape[0]
    if cfg.data.n_train is not None:
        if cfg.data.n_train > n_train:
            raise DataError(f"data.n_train={cfg.data.n_train} but {directory} holds only {n_train} training examples")
        n_train = cfg.data.n_train
    n_features = arrays.train_images.shape[1]
    if n_features != cfg.model.layers[0]:
        raise DataError(f"{directory} has {n_features} features per example but model.layers[0] is {cfg.model.layers[0]}")
    n_classes = cfg.model.layers[-1]
    base = ArraySource(arrays.train_images[:n_train], arrays.train_labels[:n_train], n_classes)
    tr, va = split_indices(n_train, cfg.data.val_fraction, cfg.train.seed)
    n_test = arrays.test_labels.shape[0] if cfg.data.n_test is None else min(cfg.data.n_test, arrays.test_labels.shape[0])
    test = ArraySource(arrays.test_images[:n_test], arrays.test_labels[:n_test], n_classes)
    return Data(_Subset(base, tr), _Subset(base, va), test, n_features, n_classes, str(directory))


def _synthetic(cfg: Config, world_size: int) -> Data:
    n_features, n_classes = cfg.model.layers[0], cfg.model.layers[-1]
    n = cfg.data.n_train if cfg.data.n_train is not None else 12000
    if cfg.data.scale_with_ranks:
        n *= world_size
    n_val = int(round(n * cfg.data.val_fraction))
    n_test = cfg.data.n_test if cfg.data.n_test is not None else max(1, n // 6)

    def src(count: int, offset: int) -> SyntheticSource:
        return SyntheticSource(count, n_features, n_classes, cfg.train.seed, cfg.data.noise, offset)

    return Data(src(n - n_val, 0), src(n_val, n - n_val), src(n_test, _TEST_STREAM), n_features, n_classes, "synthetic")


def load(cfg: Config, world_size: int, directory: Optional[Path] = None) -> Data:
    """Build the data set the config names; `directory` is the resolved IDX folder, if any."""
    if cfg.data.name == "synthetic":
        return _synthetic(cfg, world_size)
    if directory is None:
        raise DataError("no data directory resolved for an IDX data set")
    data = _load_idx(cfg, directory)
    if len(data.train) < 1:
        raise DataError(f"data.val_fraction={cfg.data.val_fraction} leaves no training examples")
    return data
