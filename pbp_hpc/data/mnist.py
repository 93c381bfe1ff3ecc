"""Locating and loading an MNIST-format data set: four IDX files with the standard names.

Works for MNIST, Fashion-MNIST (same names, format and sizes; Debian ships it as the package
dataset-fashion-mnist, `dpkg -L dataset-fashion-mnist` shows where: pass that directory as
--data-dir) and any other set laid out the same way. Each file may be gzip-compressed (.gz) or
not, and may use the `train-images.idx3-ubyte` spelling that some distributions use.

Where the files are looked for, first match wins: --data-dir / data.dir, then $PBP_HPC_DATA, then
the download cache (see fetch.default_cache_dir), which is filled from the mirrors when empty.
A directory the user named that lacks files is an error: quietly downloading MNIST elsewhere would
train on a data set other than the one asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pbp_hpc.errors import DataError
from pbp_hpc.data.fetch import DEFAULT_MIRRORS, default_cache_dir, fetch_mnist
from pbp_hpc.data.idx import read_idx

IDX_NAMES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
N_CLASSES = 10  # MNIST's and Fashion-MNIST's; another IDX set has as many as its labels say


@dataclass(frozen=True)
class MnistArrays:
    """A loaded data set; images are flattened to (N, rows*cols) uint8, labels are (N,) uint8."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    image_shape: tuple[int, int]
    n_classes: int = N_CLASSES  # stated (load_mnist's n_classes), else the largest label + 1
    n_classes_from: str = ""  # where n_classes comes from, in words, for messages


def candidate_names(base: str) -> list[str]:
    """The file names accepted for one IDX_NAMES entry, in order of preference."""
    dotted = base.replace("-idx", ".idx")
    return [base + ".gz", base, dotted + ".gz", dotted]


def find_files(directory: Path) -> dict[str, Path] | None:
    """Map each IDX_NAMES key to its file in `directory`, or None when any is missing."""
    found = {}
    for key, base in IDX_NAMES.items():
        path = next((directory / n for n in candidate_names(base) if (directory / n).is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def _missing_message(directory: Path) -> str:
    """Say exactly which names were looked for and not found, so the user can rename or fetch."""
    directory = Path(directory)
    missing = [
        " or ".join(candidate_names(base))
        for base in IDX_NAMES.values()
        if not any((directory / n).is_file() for n in candidate_names(base))
    ]
    state = "lacks" if directory.is_dir() else "does not exist or is not a directory, so it lacks"
    return f"{directory} {state} " + "; ".join(missing)


_HOW_TO_PROVIDE = (
    "Put the four files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte, each with or without .gz) in one directory and pass --data-dir DIR "
    "(or data.dir in the config, or set PBP_HPC_DATA=DIR)."
)


_FIX = ("Fix: pass --data-dir DIR (or set PBP_HPC_DATA=DIR), DIR holding train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (.gz or not).")


def resolve_data_dir(explicit: str | None, download: bool = True, mirrors: Sequence[str] = DEFAULT_MIRRORS) -> Path:
    """The directory holding the data set: `explicit`, else $PBP_HPC_DATA, else the (filled) cache."""
    for value, where in ((explicit, "--data-dir / data.dir"), (os.environ.get("PBP_HPC_DATA"), "PBP_HPC_DATA")):
        if value:  # an empty value (e.g. `PBP_HPC_DATA=`) means unset, as for most tools
            directory = Path(value).expanduser()
            if find_files(directory) is None:
                raise DataError(f"data directory from {where}: {_missing_message(directory)}. {_HOW_TO_PROVIDE}")
            return directory
    cache = default_cache_dir()
    if find_files(cache) is not None:
        return cache
    # The fix first and a few lines in all: the names tried in each folder are in
    # docs/troubleshooting.md ("No data set found"), not in the message.
    looked = f"  looked in: --data-dir and PBP_HPC_DATA (both unset), the download cache {cache} (no MNIST files)"
    if not download:
        raise DataError(f"no data set found. {_FIX}\n{looked}; data.download is false")
    try:
        fetch_mnist(cache, mirrors)
    except DataError as e:
        failures = [line.strip() for line in str(e).splitlines() if line.startswith("  ")]
        why = failures[-1] if failures else str(e).splitlines()[0]
        raise DataError(f"no data set found. {_FIX}\n{looked}\n  the download into it failed "
                        f"({len(failures) or 1} mirror(s); the last: {why[:240]})") from e
    return cache


def _read(path: Path, ndim: int, what: str) -> np.ndarray:
    array = read_idx(path)
    if array.ndim != ndim or array.dtype != np.uint8:
        # The usual cause is swapped names (images saved as labels), so say what was found.
        raise DataError(f"{path}: expected {what} ({ndim}-D ubyte), found a {array.ndim}-D {array.dtype} array of shape {array.shape}")
    if len(array) == 0:
        raise DataError(f"{path} holds no {what}")
    return array


def _split(files: dict[str, Path], part: str, n_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = files[f"{part}_images"], files[f"{part}_labels"]
    images = _read(images_path, 3, "images")
    labels = _read(labels_path, 1, "labels")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if n_classes is not None:
        bad = np.flatnonzero(labels >= n_classes)
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{labels_path}: label {int(labels[i])} at index {i} is outside 0..{n_classes - 1} "
                            f"({bad.size} such labels)")
    return images, labels


def load_mnist(directory: Path, n_classes: int | None = N_CLASSES) -> MnistArrays:
    """Load and check the four files in `directory`; raise DataError naming the file on any problem.

    n_classes: the number of classes the set has (every label must be below it); None: as
    many as the labels show (the largest label in either file + 1)."""
    directory = Path(directory)
    files = find_files(directory)
    if files is None:
        raise DataError(f"cannot load the data set: {_missing_message(directory)}. {_HOW_TO_PROVIDE}")
    train_images, train_labels = _split(files, "train", n_classes)
    test_images, test_labels = _split(files, "test", n_classes)
    if n_classes is None:
        top = max(int(train_labels.max()), int(test_labels.max()))
        n_classes, why = top + 1, f"the largest label in {files['train_labels']} and {files['test_labels']} is {top}"
    else:
        why = f"{n_classes} classes stated"
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"image sizes differ: {files['train_images']} holds {train_images.shape[1:]} images, "
            f"{files['test_images']} holds {test_images.shape[1:]}"
        )
    rows, cols = train_images.shape[1:]
    return MnistArrays(
        train_images=train_images.reshape(len(train_images), rows * cols),
        train_labels=train_labels,
        test_images=test_images.reshape(len(test_images), rows * cols),
        test_labels=test_labels,
        image_shape=(rows, cols),
        n_classes=n_classes,
        n_classes_from=why,
    )
