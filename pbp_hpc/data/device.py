"""Device-resident data (backend: cupy; written against any array namespace).

The GPU path keeps the rank's data on the device for the whole run: uploaded once (uint8 pixels, 4x smaller than float32) or, for synthetic data, generated there from the same hash as on the host. Batches are gathered on the device from device-side indices, so a training step copies nothing across the bus. The code is namespace-generic, which is how the CPU tests run exactly this path under numpy and array_api_strict.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from pbp_hpc.data.datasets import _BYTE_SCALE, _NOISE_ROWS, ArraySource, Data, Source, SyntheticSource, _Subset
from pbp_hpc.engine import backend, ops


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
