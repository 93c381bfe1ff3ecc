"""IDX files: what read_idx accepts, what it returns, and how it refuses damaged files."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pbp_hpc.errors import DataError
from pbp_hpc.data.idx import read_idx, write_idx

DTYPES = ["uint8", "int8", "int16", "int32", "float32", "float64"]
SHAPES = [(7,), (3, 5), (4, 2, 3), (2, 3, 1, 2)]


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """A valid IDX file built by hand, independently of write_idx."""
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


LABELS = np.arange(10, dtype=np.uint8)
VALID = idx_bytes(LABELS, 0x08)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_then_read_gives_back_the_same_array(tmp_path, dtype, shape, gz):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable


def test_written_files_are_big_endian_as_the_format_says(tmp_path):
    write_idx(tmp_path / "a.idx", np.array([1, 258], dtype=np.int16))
    assert (tmp_path / "a.idx").read_bytes() == bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0, 1, 1, 2])


def test_gzip_is_recognised_by_content_not_only_by_name(tmp_path):
    (tmp_path / "labels.idx").write_bytes(gzip.compress(VALID))
    (tmp_path / "labels.idx.gz").write_bytes(VALID)  # e.g. a browser decompressed it on download
    np.testing.assert_array_equal(read_idx(tmp_path / "labels.idx"), LABELS)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels.idx.gz"), LABELS)


def test_writing_an_array_idx_cannot_hold_is_refused(tmp_path):
    with pytest.raises(DataError, match="no type for int64"):
        write_idx(tmp_path / "a.idx", np.arange(3, dtype=np.int64))
    with pytest.raises(DataError, match="does not fit IDX"):
        write_idx(tmp_path / "a.idx", np.zeros((1,) * 5, dtype=np.uint8))


def test_real_mnist_has_the_published_shapes_and_class_counts(mnist_dir):
    train_images = read_idx(mnist_dir / "train-images-idx3-ubyte.gz")
    train_labels = read_idx(mnist_dir / "train-labels-idx1-ubyte.gz")
    test_images = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    test_labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert train_images.shape == (60000, 28, 28) and train_images.dtype == np.uint8
    assert test_images.shape == (10000, 28, 28) and test_images.dtype == np.uint8
    assert train_labels.shape == (60000,) and test_labels.shape == (10000,)
    assert np.bincount(train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


DAMAGED = {
    "truncated": (VALID[:-3], "truncated"),
    "header cut short": (VALID[:6], "truncated"),
    "empty": (b"", "not an IDX file"),
    "wrong magic": (b"\x01\x02" + VALID[2:], "not an IDX file"),
    "bad type code": (VALID[:2] + b"\x07" + VALID[3:], "unknown IDX type code 0x07"),
    "zero dimensions": (VALID[:3] + b"\x00" + VALID[4:], "0 dimensions"),
    "too many dimensions": (VALID[:3] + b"\x09" + VALID[4:], "9 dimensions"),
    "trailing bytes": (VALID + b"junk", "trailing bytes"),
    "huge sizes in header": (bytes([0, 0, 8, 4]) + b"\xff" * 16, "truncated"),
    "corrupt gzip": (gzip.compress(VALID)[:-5], "corrupt gzip"),
    "gzip with bad crc": (gzip.compress(VALID)[:-8] + b"\0\0\0\0" + gzip.compress(VALID)[-4:], "corrupt gzip"),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_a_damaged_file_raises_data_error_naming_file_and_problem(tmp_path, name):
    content, problem = DAMAGED[name]
    path = tmp_path / "damaged-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=problem) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_a_missing_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read IDX file .*nope"):
        read_idx(tmp_path / "nope")


def _mutate(data: bytes, position: int, value: int, cut: int, extra: bytes) -> bytes:
    data = bytearray(data)
    data[position % len(data)] = value
    return bytes(data[: max(0, len(data) - cut)]) + extra


arbitrary = st.binary(max_size=300)
valid_files = st.sampled_from([idx_bytes(np.arange(12, dtype=t).reshape(3, 4), c) for t, c in [("u1", 8), ("i2", 0x0B), ("f8", 0x0E)]])
mutated = st.builds(_mutate, valid_files, st.integers(0, 200), st.integers(0, 255), st.integers(0, 8), st.binary(max_size=4))
maybe_gzipped = st.one_of(arbitrary, mutated).flatmap(lambda b: st.sampled_from([b, gzip.compress(b)]))
gzip_then_damaged = st.builds(_mutate, valid_files.map(gzip.compress), st.integers(0, 200), st.integers(0, 255), st.integers(0, 8), st.binary(max_size=4))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.one_of(maybe_gzipped, gzip_then_damaged), name=st.sampled_from(["f-idx3-ubyte", "f-idx3-ubyte.gz"]))
def test_any_bytes_give_an_array_or_a_data_error_and_nothing_else(tmp_path_factory, content, name):
    path = tmp_path_factory.getbasetemp() / name
    path.write_bytes(content)
    try:
        array = read_idx(path)
    except DataError as e:
        assert str(path) in str(e)
        kind = str(e).replace(str(path), "").lstrip(": ")
        event(re.split(r"[:(\d]", kind)[0].strip())  # see --hypothesis-show-statistics
    else:
        event("read an array")
        assert isinstance(array, np.ndarray) and 1 <= array.ndim <= 4 and array.dtype.isnative
