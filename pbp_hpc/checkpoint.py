"""Checkpoints in HDF5 (no pickle): parameters, position, and what is needed to resume exactly.

The data order is a pure function of (seed, epoch), so "where we are" is just (epoch, step):
no RNG state object needs saving, and the resumed run draws the same permutations.
Written atomically: a temporary file in the same directory, fsync, then rename, so a kill
at any moment leaves either the old checkpoint or the new one, never a torn file.

The format (VERSION 1): root attributes `format`, `version`, `epoch`, `step` (the next
position to run), `meta` (JSON: what pbp_hpc.resume needs to check and continue a run);
dataset `theta` (the flat parameters); group `state` (optional): one dataset per named buffer
of the optimizer's or the strategy's state, each shaped like theta or as its owner says.
Adding a field: an optional attribute or dataset that a reader can do without (state/NAME,
a new key in meta) needs no new version; load() returns it when present and its reader
decides what its absence means. A field whose absence or old meaning would make a resumed run
compute something else needs VERSION + 1, and load() keeps reading the older versions.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np

from pbp_hpc.errors import PbpError

FORMAT = "pbp_hpc-checkpoint"
VERSION = 1


class CheckpointError(PbpError):
    """A checkpoint cannot be read, or does not belong to this run."""


def save(path: str | Path, theta: np.ndarray, epoch: int, step: int, meta: dict[str, Any],
         state: Optional[dict[str, np.ndarray]] = None) -> None:
    """Write a checkpoint: next position to run is (epoch, step); meta is JSON-able; state: named buffers."""
    path = Path(path)
    try:
        _save(path, theta, epoch, step, meta, state or {})
    except OSError as exc:  # disk full, quota, directory gone: the user's to fix, not a traceback
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None


def _save(path: Path, theta: np.ndarray, epoch: int, step: int, meta: dict[str, Any], state: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["epoch"] = epoch
            f.attrs["step"] = step
            f.attrs["meta"] = json.dumps(meta)
            f.create_dataset("theta", data=theta)
            if state:
                group = f.create_group("state")
                for name, buf in state.items():
                    group.create_dataset(name, data=buf)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by save(); raise CheckpointError naming what is wrong."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path} is an HDF5 file but not a pbp_hpc checkpoint")
            if int(f.attrs["version"]) != VERSION:
                raise CheckpointError(f"{path} is checkpoint version {f.attrs['version']}, this pbp_hpc reads version {VERSION}")
            return {
                "theta": f["theta"][...],
                "epoch": int(f.attrs["epoch"]),
                "step": int(f.attrs["step"]),
                "meta": json.loads(f.attrs["meta"]),
                "state": {name: ds[...] for name, ds in f["state"].items()} if "state" in f else {},
            }
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as exc:  # not HDF5, a field missing or mistyped
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None


def is_checkpoint(path: str | Path) -> bool:
    """Whether path is a file this module wrote (any version): one that may be overwritten."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is "not ours"
        return False


def check_target(path: str | Path) -> None:
    """Raise CheckpointError now if a checkpoint could not later be written at path.

    Refuses to overwrite a file that is not a checkpoint (a results file, a data file given
    by mistake), and proves the directory writable by creating and removing a temporary file.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a directory; give a file name such as {path / 'run.h5'}")
    blocker = next((q for q in path.parents if q.exists() and not q.is_dir()), None)
    if blocker is not None:  # mkdir would say only "File exists"
        raise CheckpointError(f"cannot write a checkpoint at {path}: {blocker} is a file, not a directory")
    if path.exists() and not is_checkpoint(path):
        raise CheckpointError(f"{path} exists and is not a pbp_hpc checkpoint; refusing to overwrite it "
                              "(choose another checkpoint.path, or move the file away)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise CheckpointError(f"cannot write a checkpoint at {path}: {exc.strerror or exc}") from None
