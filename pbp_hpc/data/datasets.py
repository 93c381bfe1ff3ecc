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

from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import numpy as np

from pbp_hpc.config import Config
from pbp_hpc.errors import ConfigError, DataError

_NOISE_ROWS = 1031  # prime, so the two hashed rows rarely repeat as a pair
_TEST_STREAM = 1 << 40  # synthetic test indices live far from train/validation indices


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash (splitmix64's finaliser): decorrelated uint64s from consecutive ints."""
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_BYTE_SCALE = np.float32(1.0 / 255.0)
assert np.float32(255) * _BYTE_SCALE == 1.0  # float32 rounding: the ones column of active_features_into


class ArraySource:
    """Examples held in memory as uint8 pixels (4x smaller than float32), scaled on the fly."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, n_classes: int):
        self.images, self.labels, self.n_classes = images, labels.astype(np.int64), n_classes
        self._u8: Optional[np.ndarray] = None
        self._u8c: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def labels_of(self, idx: np.ndarray) -> np.ndarray:
        return self.labels[idx]

    CHUNK = 1024  # rows gathered per pass: the uint8 buffer stays small (and in cache) at any batch size

    def features_into(self, idx: np.ndarray, out: np.ndarray) -> None:
        n = idx.shape[0]
        rows = min(max(n, 1), self.CHUNK)
        if self._u8 is None or self._u8.shape[0] < rows:
            self._u8 = np.empty((rows, self.images.shape[1]), dtype=np.uint8)
        for lo in range(0, n, self.CHUNK):
            hi = min(n, lo + self.CHUNK)
            u8 = self._u8[: hi - lo]
            np.take(self.images, idx[lo:hi], axis=0, out=u8, mode="clip")  # "raise" would buffer the copy
            np.multiply(u8, _BYTE_SCALE, out=out[lo:hi], casting="unsafe")

    def active_features_into(self, idx: np.ndarray, flat: np.ndarray, active: Any,
                             spare: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """The batch with only its active columns (active_inputs.ActiveInputs chooses them).

        Returns the active columns, with the n x (k + 1) batch in flat[:n * (k + 1)], its last
        column ones (active_inputs folds the bias into the product); or None, with the full
        n x d batch there. The whole batch's bytes are gathered first, so that the columns
        are known before any float is written. `spare`: bytes free until the batch is built
        (the caller's activation buffer, say), used for the compacted bytes if large enough.
        """
        n, d = idx.shape[0], self.images.shape[1]
        if self._u8 is None or self._u8.shape[0] < n:
            self._u8 = np.empty((max(n, self.CHUNK), d), dtype=np.uint8)
        u8 = self._u8[:n]
        np.take(self.images, idx, axis=0, out=u8, mode="clip")
        cols = active.choose(u8)
        if cols is None:
            np.multiply(u8, _BYTE_SCALE, out=flat[: n * d].reshape(n, d), casting="unsafe")
            return None
        k = cols.shape[0]
        size = n * (k + 1)
        if spare is None or spare.shape[0] < size:
            if self._u8c is None or self._u8c.shape[0] < size:
                self._u8c = np.empty(n * (d + 1), dtype=np.uint8)
            spare = self._u8c
        u8c = spare[:size].reshape(n, k + 1)
        if n == 1:  # one image (batch 1, the report's stochastic GD): one take beats a slice per run
            np.take(u8[0], cols, out=u8c[0, :k])
        else:
            # Column by column is slow (np.take: ~0.5 ms at 1024 x 610); the active columns of
            # image data come in runs (a row of pixels each), and slices copy 2x faster.
            for src, dst, width in active.runs():
                u8c[:, dst : dst + width] = u8[:, src : src + width]
        u8c[:, k] = 255  # scaled below to exactly 1.0 (checked at import): the bias's column, in the same pass
        np.multiply(u8c, _BYTE_SCALE, out=flat[:size].reshape(n, k + 1), casting="unsafe")
        return cols


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
    # frees what the data lives in where that needs a collective (node_copy's shared window)
    release: Callable[[], None] = field(default=lambda: None, repr=False)

    def close(self) -> None:
        """Release the data (collective over the node where it is shared); the sources are dead after."""
        release, self.release = self.release, lambda: None
        release()

    def fingerprint(self) -> int:
        """A cheap checksum of what this rank loaded, to check all ranks agree."""
        probe = np.arange(0, len(self.train), max(1, len(self.train) // 997))
        return int(np.sum(self.train.labels_of(probe) * (np.arange(probe.size) % 89 + 1))) + 1000003 * len(self.train)


def fill_batch(source: Source, idx: np.ndarray, x: Any, y: Any, xp: ModuleType, rows: np.ndarray) -> None:
    """Features of examples idx into x[:n], one-hot targets into y[:n]; buffers preallocated.

    `rows` is a preallocated arange for the one-hot scatter. On a namespace other than numpy
    the batch is built on the host and copied in. A DeviceSource (the GPU backend's data, see
    to_device) gathers the batch on the device from device-side indices instead.
    """
    if hasattr(source, "fill"):  # a device source (data.device) gathers the batch on the device
        source.fill(idx, x, y)
        return
    n = idx.shape[0]
    if xp is np:
        source.features_into(idx, x[:n])
        fill_targets(source, idx, y, rows)
        return
    hx = np.empty((n, x.shape[1]), dtype=np.float32)
    source.features_into(idx, hx)
    hy = np.zeros((n, y.shape[1]), dtype=np.float32)
    hy[np.arange(n), source.labels_of(idx)] = 1
    x[:n, ...] = xp.asarray(hx, dtype=x.dtype)
    y[:n, ...] = xp.asarray(hy, dtype=y.dtype)


def fill_targets(source: Source, idx: np.ndarray, y: np.ndarray, rows: np.ndarray) -> None:
    """One-hot targets of examples idx into the host buffer y[:n]."""
    n = idx.shape[0]
    y[:n] = 0
    y[rows[:n], source.labels_of(idx)] = 1


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

    def active_features_into(self, idx: np.ndarray, flat: np.ndarray, active: Any,
                             spare: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        return self.base.active_features_into(self.index[idx], flat, active, spare)


def has_active_features(source: Source) -> bool:
    """Whether the source can gather a batch's active columns alone (uint8 data: ArraySource)."""
    return isinstance(source.base if isinstance(source, _Subset) else source, ArraySource)


def _load_idx(cfg: Config, directory: Path, comm: Any = None) -> Data:
    from pbp_hpc.data.mnist import load_mnist

    # MNIST and Fashion-MNIST have 10 classes; another IDX set as many as data.n_classes says,
    # else as its labels show (largest + 1). Either way, the output layer must have one unit per class.
    stated = 10 if cfg.data.name in ("mnist", "fashion-mnist") else cfg.data.n_classes
    release: Callable[[], None] = lambda: None
    if comm is not None and cfg.data.one_copy_per_node:  # true or auto
        from pbp_hpc.data.node_copy import AUTO_MIN_RANKS, once_per_node

        at_least = AUTO_MIN_RANKS if cfg.data.one_copy_per_node == "auto" else 2
        arrays, release = once_per_node(comm, lambda: load_mnist(directory, stated), at_least)
    else:
        arrays = load_mnist(directory, stated)
    try:
        return _idx_data(cfg, directory, arrays, release)
    except DataError:
        release()  # every rank of the node raises it alike (the same arrays, the same config)
        raise


def _idx_data(cfg: Config, directory: Path, arrays: Any, release: Callable[[], None]) -> Data:
    if arrays.n_classes != cfg.model.layers[-1]:
        raise DataError(f"{directory} holds {arrays.n_classes} classes ({arrays.n_classes_from}) but model.layers[-1] "
                        f"(the output layer) is {cfg.model.layers[-1]}; make them equal (data.n_classes states the count "
                        "when the labels do not show it)")
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
    return Data(_Subset(base, tr), _Subset(base, va), test, n_features, n_classes, str(directory), release)


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


def load(cfg: Config, world_size: int, directory: Optional[Path] = None, comm: Any = None) -> Data:
    """Build the data set the config names; `directory` is the resolved IDX folder, if any.

    With comm (collective), IDX data is loaded once per node and shared by the node's ranks
    (data.one_copy_per_node, pbp_hpc/data/node_copy.py): close() the Data when done with it."""
    if cfg.data.name == "synthetic":
        return _synthetic(cfg, world_size)
    if directory is None:
        raise DataError("no data directory resolved for an IDX data set")
    data = _load_idx(cfg, directory, comm)
    if len(data.train) < 1:
        data.close()
        raise DataError(f"data.val_fraction={cfg.data.val_fraction} leaves no training examples")
    return data


def resolve_data(cfg: Config, comm: Any) -> Optional[Path]:
    """Rank 0 finds (and if need be downloads) the IDX folder; the others wait for its answer."""
    if cfg.data.name == "synthetic":
        return None
    answer: Any = None
    if comm.rank == 0:
        try:
            from pbp_hpc.data.mnist import resolve_data_dir

            answer = str(resolve_data_dir(cfg.data.dir, download=cfg.data.download))
        except DataError as exc:
            answer = exc
    answer = comm.bcast(answer, root=0)
    if isinstance(answer, DataError):
        raise ConfigError(str(answer))  # every rank raises it: collective, printed once
    return Path(answer)
