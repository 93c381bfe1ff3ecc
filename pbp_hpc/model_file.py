"""A trained model on disk: the flat parameters and the config that made them (HDF5, no pickle).

`train.save_model: PATH` writes the parameters of the best validation pass here;
`python -m pbp_hpc.evaluate PATH` reads them back. Written atomically (temporary file, fsync,
rename), so a kill never leaves a torn model where an older one was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pbp_hpc.errors import ConfigError

FORMAT = "pbp_hpc-model"
VERSION = 1


class ModelFileError(ConfigError):
    """A model file cannot be read or written (a setup error: exit 2, on every rank)."""


def save(path: str | Path, theta: np.ndarray, config: dict[str, Any], meta: dict[str, Any]) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["format"], f.attrs["version"] = FORMAT, VERSION
                f.attrs["config"], f.attrs["meta"] = json.dumps(config), json.dumps(meta)
                f.create_dataset("theta", data=theta)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ModelFileError(f"cannot write model {path}: {exc.strerror or exc}") from None


def load(path: str | Path) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """(parameters, config dict, meta) of a model file; ModelFileError naming what is wrong."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise ModelFileError(f"{path} is not a pbp_hpc model file (no format attribute {FORMAT!r})")
            version = int(f.attrs["version"])
            if version != VERSION:
                raise ModelFileError(f"{path} is model format version {version}; this pbp_hpc reads version {VERSION}")
            theta = f["theta"][...]
            config, meta = json.loads(f.attrs["config"]), json.loads(f.attrs["meta"])
    except ModelFileError:
        raise
    except FileNotFoundError:
        raise ModelFileError(f"no model file at {path}") from None
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ModelFileError(f"cannot read model {path}: {exc}") from None
    if theta.ndim != 1 or not np.all(np.isfinite(theta)):
        raise ModelFileError(f"{path}: theta must be a finite 1-D array, got shape {theta.shape}")
    return theta, config, meta


def check_target(path: str | Path) -> None:
    """Before training: the model can be written there (a directory, or another kind of file, is refused)."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"train.save_model {path} is a directory; give a file name such as {path / 'model.h5'}")
    blocker = next((q for q in path.parents if q.exists() and not q.is_dir()), None)
    if blocker is not None:  # mkdir at the end would say only "File exists"
        raise ModelFileError(f"train.save_model {path}: {blocker} is a file, not a directory")
    if path.exists():
        try:
            with h5py.File(path, "r") as f:
                ours = f.attrs.get("format") == FORMAT
        except OSError:
            ours = False
        if not ours:
            raise ModelFileError(f"train.save_model {path} exists and is not a pbp_hpc model file; refusing to overwrite it")
    try:  # the directory can be made and written: proven now, not after the training
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise ModelFileError(f"train.save_model {path} cannot be written: {exc.strerror or exc}") from None
