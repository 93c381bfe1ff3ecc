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

from pbp_hpc.engine import backend
from pbp_hpc.engine import ops
from pbp_hpc.config import Config
from pbp_hpc.errors import DataError

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
    if isinstance(source, DeviceSource):
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


def _load_idx(cfg: Config, directory: Path) -> Data:
    from pbp_hpc.data.mnist import load_mnist

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


# ---- device-resident data (backend: cupy; written against any array namespace) --------------
#
# The GPU path keeps the rank's data on the device for the whole run: uploaded once (uint8
# pixels, 4x smaller than float32) or, for synthetic data, generated there from the same hash
# as on the host. Batches are gathered on the device from device-side indices, so a training
# step copies nothing across the bus. The code is namespace-generic, which is how the CPU
# tests run exactly this path under numpy and array_api_strict.


def _take_rows(xp: ModuleType, table: Any, idx: Any, out: Any) -> None:
    """out <- table[idx] (rows), into an existing buffer."""
    if xp is np:
        np.take(table, idx, axis=0, out=out, mode="clip")  # "raise" would buffer the copy
    elif ops.has_out(xp):
        xp.take(table, idx, axis=0, out=out)
    else:
        out[...] = xp.take(table, idx, axis=0)


def _astype(xp: ModuleType, a: Any, dtype: Any) -> Any:
    """xp.astype where the namespace has it (the Array API; not every CuPy release), else the method."""
    return xp.astype(a, dtype) if hasattr(xp, "astype") else a.astype(dtype)


class _U64:
    """uint64 constants as 0-d arrays of the namespace: Python ints above 2**63 are not
    promoted alike by every namespace, uint64 with uint64 is."""

    def __init__(self, xp: ModuleType):
        self.xp = xp
        self._cache: dict[int, Any] = {}

    def __call__(self, v: int) -> Any:
        if v not in self._cache:
            self._cache[v] = self.xp.asarray(v, dtype=self.xp.uint64)
        return self._cache[v]


def _splitmix64_xp(u: _U64, x: Any) -> Any:
    """_splitmix64 on any namespace; x is uint64 and multiplication wraps, as on the host."""
    x = x + u(0x9E3779B97F4A7C15)
    x = (x ^ (x >> u(30))) * u(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> u(27))) * u(0x94D049BB133111EB)
    return x ^ (x >> u(31))


def device_epoch_order(xp: ModuleType, seed: int, epoch: int, n: int, shuffle: bool) -> Any:
    """An epoch's data order drawn on the device: the same on every rank, a function of (seed, epoch).

    The indices are sorted by a hash of (index, epoch key). splitmix64 is a bijection of
    uint64, so there are no ties and the order is identical on every rank, every GPU model
    and every namespace (unlike an RNG stream, whose algorithm differs between numpy and
    cuRAND). It is not the numpy backend's order: CPU and GPU runs see different shuffles.
    """
    if not shuffle:
        return xp.arange(n, dtype=xp.int64)
    key = int(np.random.default_rng([seed, epoch, 0x444556]).integers(0, 2**63))  # one host scalar per epoch
    u = _U64(xp)
    return xp.argsort(_splitmix64_xp(u, xp.arange(n, dtype=xp.uint64) ^ u(key)))


class DeviceSource:
    """A source whose examples live on the device; indices and labels are device arrays too."""

    def __init__(self, xp: ModuleType, n: int, n_classes: int):
        self.xp, self.n, self.n_classes = xp, n, n_classes
        self._eye: dict[Any, Any] = {}  # identity per dtype: one-hot targets by a gather, not a scatter

    def __len__(self) -> int:
        return self.n

    def labels_of(self, idx: Any) -> Any:
        raise NotImplementedError

    def features_and_labels(self, idx: Any, out: Any) -> Any:
        """Features of idx into out; returns their labels (int64, on the device)."""
        raise NotImplementedError

    def fill(self, idx: Any, x: Any, y: Any) -> None:
        n = idx.shape[0]
        labels = self.features_and_labels(idx, x[:n, ...])
        if y.dtype not in self._eye:
            self._eye[y.dtype] = self.xp.eye(self.n_classes, y.shape[1], dtype=y.dtype)
        _take_rows(self.xp, self._eye[y.dtype], labels, y[:n, ...])

    def _buffer(self, name: str, n: int, width: int, dtype: Any) -> Any:
        """A gather buffer of at least n rows, allocated on first use and when a batch outgrows it."""
        buf = getattr(self, name, None)
        if buf is None or buf.shape[0] < n or buf.dtype != dtype:
            buf = self.xp.empty((max(n, 1), width), dtype=dtype)
            setattr(self, name, buf)
        return buf[:n, ...]


class DeviceArraySource(DeviceSource):
    """Pixels (uint8, scaled by 1/255 on the fly, as ArraySource) and labels, uploaded once."""

    def __init__(self, xp: ModuleType, pixels: np.ndarray, labels: np.ndarray, n_classes: int):
        super().__init__(xp, labels.shape[0], n_classes)
        self.pixels = xp.asarray(np.ascontiguousarray(pixels))
        self.labels = xp.asarray(labels.astype(np.int64))
        scale = _BYTE_SCALE if pixels.dtype == np.uint8 else np.float32(1.0)
        self.scale = xp.asarray(np.array([scale], dtype=np.float32))  # shape (1,): float32 arithmetic, as on the host

    def labels_of(self, idx: Any) -> Any:
        return self.xp.take(self.labels, idx, axis=0)

    def features_and_labels(self, idx: Any, out: Any) -> Any:
        xp = self.xp
        pix = self._buffer("_pix", idx.shape[0], self.pixels.shape[1], self.pixels.dtype)
        _take_rows(xp, self.pixels, idx, pix)
        if ops.has_out(xp):
            xp.multiply(pix, self.scale, out=out)  # float32 product, cast into out's dtype
        else:
            out[...] = _astype(xp, _astype(xp, pix, xp.float32) * self.scale, out.dtype)
        return self.labels_of(idx)


class DeviceSyntheticSource(DeviceSource):
    """SyntheticSource generated on the device: only its small tables are uploaded."""

    def __init__(self, xp: ModuleType, src: SyntheticSource):
        super().__init__(xp, len(src), src.n_classes)
        self.n_features, self.offset, self.seed_key = src.n_features, src.offset, int(src.seed_key)
        self.protos, self.noise = xp.asarray(src.protos), xp.asarray(src.noise)  # float32, as on the host
        self._tables: dict[Any, tuple[Any, Any]] = {}
        self._u = _U64(xp)

    def _hash(self, idx: Any) -> Any:
        u = self._u
        return _splitmix64_xp(u, (_astype(self.xp, idx, self.xp.uint64) + u(self.offset)) ^ u(self.seed_key))

    def _index(self, h: Any, shift: int, modulus: int) -> Any:
        u = self._u
        return _astype(self.xp, (h >> u(shift)) % u(modulus) if shift else h % u(modulus), self.xp.int64)

    def labels_of(self, idx: Any) -> Any:
        return self._index(self._hash(idx), 0, self.n_classes)

    def features_and_labels(self, idx: Any, out: Any) -> Any:
        xp = self.xp
        if out.dtype not in self._tables:  # cast on the device: the same values as the host's astype
            self._tables[out.dtype] = (_astype(xp, self.protos, out.dtype), _astype(xp, self.noise, out.dtype))
        protos, noise = self._tables[out.dtype]
        h = self._hash(idx)
        tmp = self._buffer("_tmp", idx.shape[0], self.n_features, out.dtype)
        labels = self._index(h, 0, self.n_classes)
        _take_rows(xp, protos, labels, out)
        _take_rows(xp, noise, self._index(h, 16, _NOISE_ROWS), tmp)
        out += tmp
        _take_rows(xp, noise, self._index(h, 40, _NOISE_ROWS), tmp)
        out += tmp
        return labels


def device_source(source: Source, xp: ModuleType, n_features: int) -> DeviceSource:
    """A device copy of a host source (uploads happen here, once)."""
    if isinstance(source, SyntheticSource):
        return DeviceSyntheticSource(xp, source)
    if isinstance(source, ArraySource):
        return DeviceArraySource(xp, source.images, source.labels, source.n_classes)
    if isinstance(source, _Subset) and isinstance(source.base, ArraySource):
        return DeviceArraySource(xp, source.base.images[source.index], source.base.labels[source.index], source.n_classes)
    # Any other source: materialise its features once, in float32, on the host.
    n = len(source)
    feats = np.empty((n, n_features), dtype=np.float32)
    source.features_into(np.arange(n), feats)
    return DeviceArraySource(xp, feats, source.labels_of(np.arange(n)), source.n_classes)


def to_device(data: Data, xp: ModuleType) -> Data:
    """The same data set, held on the device of namespace xp."""
    train, val, test = (device_source(s, xp, data.n_features) for s in (data.train, data.val, data.test))
    return Data(train, val, test, data.n_features, data.n_classes, data.origin)


def index_range(source: Source, start: int, stop: int) -> Any:
    """Indices start..stop-1 where the source wants them: on the device for a DeviceSource."""
    if isinstance(source, DeviceSource):
        return source.xp.arange(start, stop, dtype=source.xp.int64)
    return np.arange(start, stop)


def count_correct(source: Source, pred: Any, idx: Any) -> Any:
    """How many predictions match the labels: an int, or a device 0-d array for a DeviceSource
    (summed there, so evaluation synchronises once, not once per chunk)."""
    if isinstance(source, DeviceSource):
        xp = source.xp
        return xp.sum(_astype(xp, pred == source.labels_of(idx), xp.int64))
    return int(np.count_nonzero(backend.to_host(pred) == source.labels_of(idx)))
