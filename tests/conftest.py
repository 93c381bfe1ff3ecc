"""Shared fixtures. Other test modules' authors add theirs here too: add, don't remove."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_MNIST_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _has_mnist(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _MNIST_NAMES)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST files: shared/data/mnist beside the repository, else $PBP_HPC_TEST_DATA."""
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"]
    if os.environ.get("PBP_HPC_TEST_DATA"):
        candidates.append(Path(os.environ["PBP_HPC_TEST_DATA"]))
    for directory in candidates:
        if _has_mnist(directory):
            return directory
    pytest.skip(f"real MNIST not found in {' or '.join(map(str, candidates))}; set PBP_HPC_TEST_DATA")
