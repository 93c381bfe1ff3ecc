"""Finding and loading an MNIST-format data set, and refusing inconsistent ones."""

from __future__ import annotations

import gzip
import shutil
import socket

import numpy as np
import pytest

from pbp_hpc.errors import DataError
from pbp_hpc.data.idx import write_idx
from pbp_hpc.data.mnist import IDX_NAMES, find_files, load_mnist, resolve_data_dir


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """No test may see the user's PBP_HPC_DATA or fill their real download cache."""
    monkeypatch.delenv("PBP_HPC_DATA", raising=False)
    monkeypatch.setenv("PBP_HPC_CACHE", str(tmp_path / "cache"))


def make_dataset(directory, n_train=12, n_test=5, size=(4, 3), suffix=".gz", dotted=False, **override):
    """A tiny valid data set written with write_idx; `override` replaces one array by key."""
    rng = np.random.default_rng(1)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    arrays.update(override)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, array in arrays.items():
        name = IDX_NAMES[key].replace("-idx", ".idx") if dotted else IDX_NAMES[key]
        paths[key] = directory / (name + suffix)
        write_idx(paths[key], array)
    return paths


def test_real_mnist_loads_flattened_with_the_published_class_counts(mnist_dir):
    data = load_mnist(mnist_dir)
    assert data.image_shape == (28, 28)
    assert data.train_images.shape == (60000, 784) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (10000, 784) and data.test_images.dtype == np.uint8
    assert data.train_labels.shape == (60000,) and data.test_labels.shape == (10000,)
    assert np.bincount(data.train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(data.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_uncompressed_copies_load_the_same_as_the_gzip_files(mnist_dir, tmp_path):
    for gz in mnist_dir.glob("*.gz"):
        with gzip.open(gz) as src, open(tmp_path / gz.name.removesuffix(".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    plain, packed = load_mnist(tmp_path), load_mnist(mnist_dir)
    assert find_files(tmp_path)["train_images"].name == "train-images-idx3-ubyte"
    np.testing.assert_array_equal(plain.train_images, packed.train_images)
    np.testing.assert_array_equal(plain.test_labels, packed.test_labels)


def test_the_dotted_names_some_distributions_use_are_accepted(tmp_path):
    make_dataset(tmp_path, suffix="", dotted=True)
    data = load_mnist(tmp_path)
    assert data.train_images.shape == (12, 12) and data.image_shape == (4, 3)
    assert find_files(tmp_path)["test_labels"].name == "t10k-labels.idx1-ubyte"


def test_find_files_is_none_when_any_file_is_missing(tmp_path):
    paths = make_dataset(tmp_path)
    assert find_files(tmp_path) == paths
    paths["test_labels"].unlink()
    assert find_files(tmp_path) is None


def test_a_missing_file_is_named(tmp_path):
    make_dataset(tmp_path)["train_labels"].unlink()
    with pytest.raises(DataError, match="lacks train-labels-idx1-ubyte.gz or train-labels-idx1-ubyte") as info:
        load_mnist(tmp_path)
    assert "train-images-idx3-ubyte.gz or" not in str(info.value)  # only the missing file is listed


def test_more_images_than_labels_names_both_files(tmp_path):
    paths = make_dataset(tmp_path, train_labels=np.zeros(11, dtype=np.uint8))
    with pytest.raises(DataError, match="holds 12 images but .* holds 11 labels") as info:
        load_mnist(tmp_path)
    assert str(paths["train_images"]) in str(info.value) and str(paths["train_labels"]) in str(info.value)


def test_a_label_outside_0_to_9_is_reported_with_its_index_and_value(tmp_path):
    labels = np.array([0, 1, 2, 10, 4], dtype=np.uint8)
    paths = make_dataset(tmp_path, test_labels=labels)
    with pytest.raises(DataError, match="label 10 at index 3 is outside 0..9") as info:
        load_mnist(tmp_path)
    assert str(paths["test_labels"]) in str(info.value)


def test_train_and_test_images_must_have_the_same_size(tmp_path):
    make_dataset(tmp_path, test_images=np.zeros((5, 3, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"image sizes differ.*\(4, 3\).*\(3, 3\)"):
        load_mnist(tmp_path)


def test_swapped_files_are_reported_with_what_was_found(tmp_path):
    paths = make_dataset(tmp_path, train_images=np.zeros(12, dtype=np.uint8))
    with pytest.raises(DataError, match="expected images \\(3-D ubyte\\), found a 1-D uint8") as info:
        load_mnist(tmp_path)
    assert str(paths["train_images"]) in str(info.value)


def test_float_images_are_refused(tmp_path):
    make_dataset(tmp_path, test_images=np.zeros((5, 4, 3), dtype=np.float32))
    with pytest.raises(DataError, match="t10k-images.*found a 3-D float32"):
        load_mnist(tmp_path)


def test_an_explicit_directory_comes_before_the_environment_and_the_cache(tmp_path, monkeypatch):
    for name in ("explicit", "env", "cache"):
        make_dataset(tmp_path / name)
    monkeypatch.setenv("PBP_HPC_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(str(tmp_path / "explicit"), download=False) == tmp_path / "explicit"


def test_pbp_hpc_data_comes_before_the_cache(tmp_path, monkeypatch):
    make_dataset(tmp_path / "env")
    make_dataset(tmp_path / "cache")
    monkeypatch.setenv("PBP_HPC_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None, download=False) == tmp_path / "env"


def test_the_cache_is_used_when_nothing_else_is_given(tmp_path):
    make_dataset(tmp_path / "cache")
    assert resolve_data_dir(None, download=False) == tmp_path / "cache"


def test_an_explicit_directory_without_the_files_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    (tmp_path / "explicit").mkdir()
    make_dataset(tmp_path / "env")
    monkeypatch.setenv("PBP_HPC_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError, match="from --data-dir.*explicit lacks train-images-idx3-ubyte.gz"):
        resolve_data_dir(str(tmp_path / "explicit"))


def test_a_pbp_hpc_data_directory_without_the_files_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    make_dataset(tmp_path / "cache")
    monkeypatch.setenv("PBP_HPC_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="from PBP_HPC_DATA.*nowhere does not exist"):
        resolve_data_dir(None)


def test_nothing_found_says_the_fix_first_in_a_few_lines(tmp_path):
    with pytest.raises(DataError) as info:
        resolve_data_dir(None, download=False)
    message = str(info.value)
    assert message.startswith("no data set found. Fix: pass --data-dir DIR (or set PBP_HPC_DATA=DIR)")
    assert str(tmp_path / "cache") in message and len(message.splitlines()) <= 3 and len(message) < 500
    assert all(base in message for base in IDX_NAMES.values())


def test_a_failed_download_into_the_cache_says_where_it_looked_and_which_mirrors_failed(tmp_path):
    with socket.socket() as s:  # bind then close: a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mirror = f"http://127.0.0.1:{port}/mnist/"
    with pytest.raises(DataError) as info:
        resolve_data_dir(None, mirrors=[mirror])
    message = str(info.value)
    assert str(tmp_path / "cache") in message and mirror in message and "--data-dir DIR" in message
    assert len(message.splitlines()) <= 3
