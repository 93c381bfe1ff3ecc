"""Choosing the array namespace: numpy on the CPU, CuPy on a GPU."""

from __future__ import annotations

from types import ModuleType

import numpy as np

from pbp_hpc.errors import ConfigError


def namespace(name: str) -> ModuleType:
    if name == "numpy":
        return np
    if name == "cupy":
        try:
            import cupy  # noqa: F401  (optional extra: pip install .[gpu])
        except ImportError as exc:
            raise ConfigError(
                f"backend: cupy needs CuPy, which is not importable here ({exc}). "
                "Install it with `pip install .[gpu]` (CUDA 12) or `pip install cupy-cuda13x` (CUDA 13)."
            ) from None
        return cupy
    raise ConfigError(f"unknown backend {name!r}: choose numpy or cupy")


def to_host(a) -> np.ndarray:
    """A numpy copy of an array from any namespace (for checkpoints and checks, not the hot path)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):  # CuPy
        return a.get()
    return np.asarray(a)
