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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import h5py
import numpy as np

from pbp_hpc import targets
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
        why = "No space left on device" if "No space left on device" in str(exc) else (exc.strerror or str(exc))
        raise CheckpointError(f"cannot write checkpoint {path}: {why}") from None


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


@dataclass(frozen=True)
class Expect:
    """What the run opening a checkpoint needs it to hold; load() checks every field against it.

    state: each state buffer's name -> (shape, dtype) as the run allocates it; max_epoch: the
    run's train.epochs; steps: its steps per epoch."""

    n_params: int
    dtype: str
    state: dict[str, tuple[tuple[int, ...], str]]
    max_epoch: int
    steps: int


def _bad(path: Path, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: field {field}: {problem}; refusing it (the file is left as it is)")


def _int_attr(f: h5py.File, path: Path, name: str) -> int:
    if name not in f.attrs:
        raise _bad(path, name, "missing")
    value = f.attrs[name]
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _bad(path, name, f"expected a non-negative integer, found {type(value).__name__} {str(value)[:40]!r}")
    if value < 0:
        raise _bad(path, name, f"expected a non-negative integer, found {int(value)}")
    return int(value)


def _array(path: Path, field: str, ds: Any, shape: Optional[tuple[int, ...]], dtype: Optional[str]) -> np.ndarray:
    """A dataset read only once its shape and dtype are known to be the expected ones, and checked finite."""
    if not isinstance(ds, h5py.Dataset):
        raise _bad(path, field, f"expected an array, found a {type(ds).__name__}")
    if ds.dtype.kind != "f":
        raise _bad(path, field, f"expected floating-point numbers, found dtype {ds.dtype}")
    if dtype is not None and ds.dtype != np.dtype(dtype):
        raise _bad(path, field, f"dtype is {ds.dtype}, this run's model.dtype is {dtype}")
    if shape is not None and tuple(ds.shape) != tuple(shape):
        raise _bad(path, field, f"shape is {tuple(ds.shape)}, this run needs {tuple(shape)}")
    if ds.ndim != 1 and shape is None:
        raise _bad(path, field, f"expected a flat array, found shape {tuple(ds.shape)}")
    if ds.size * ds.dtype.itemsize > 1032 * ds.id.get_storage_size() + 4096:  # deflate's best ratio
        raise _bad(path, field, f"declares {ds.size} values but the file holds {ds.id.get_storage_size()} bytes of them")
    value = ds[...]
    if not np.all(np.isfinite(value)):
        raise _bad(path, field, f"holds {int(np.size(value) - np.count_nonzero(np.isfinite(value)))} NaN or infinite value(s)")
    return value


def load(path: str | Path, expect: Optional[Expect] = None,
         check_meta: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Read a checkpoint written by save(); raise CheckpointError naming the file and the field.

    Every field is checked when opened: the format and version, epoch and step (non-negative
    integers; with `expect`, within the run), meta (a JSON object), theta and every state
    buffer (flat floating-point arrays, finite; with `expect`, of the run's shape and dtype).
    check_meta(meta): the reader's own checks of meta, run before the arrays are read."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            return _load(f, path, expect, check_meta)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except (OSError, KeyError, ValueError, TypeError, AttributeError, RuntimeError) as exc:  # not HDF5, damaged
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None


def _load(f: h5py.File, path: Path, expect: Optional[Expect],
          check_meta: Optional[Callable[[dict[str, Any]], None]]) -> dict[str, Any]:
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode("utf-8", "replace")
    if fmt != FORMAT:
        raise CheckpointError(f"{path} is an HDF5 file but not a pbp_hpc checkpoint")
    version = f.attrs.get("version")
    if not isinstance(version, (int, np.integer)) or isinstance(version, (bool, np.bool_)) or int(version) != VERSION:
        raise CheckpointError(f"{path} is checkpoint version {version}, this pbp_hpc reads version {VERSION}")
    epoch, step = _int_attr(f, path, "epoch"), _int_attr(f, path, "step")
    raw = f.attrs.get("meta")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if not isinstance(raw, str):
        raise _bad(path, "meta", f"expected a JSON text, found {type(raw).__name__}")
    try:
        meta = json.loads(raw, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not a number JSON allows")))
    except (ValueError, RecursionError) as exc:
        raise _bad(path, "meta", f"not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(meta, dict):
        raise _bad(path, "meta", f"expected a JSON object, found {type(meta).__name__}")
    if "theta" not in f:
        raise CheckpointError(f"cannot read checkpoint {path}: field theta: missing")
    if check_meta is not None:
        check_meta(meta)
    theta = _array(path, "theta", f["theta"], (expect.n_params,) if expect else None, expect.dtype if expect else None)
    group = f["state"] if "state" in f else None
    if group is not None and not isinstance(group, h5py.Group):
        raise _bad(path, "state", "expected a group of arrays")
    state = {}
    for name in (group or {}):
        # a buffer this run does not name: shaped like theta (a declared size bounded by the layout)
        shape, dtype = expect.state.get(name, (theta.shape, expect.dtype)) if expect else (theta.shape, str(theta.dtype))
        state[name] = _array(path, f"state/{name}", group[name], shape, dtype)
    if expect is not None:
        missing = sorted(set(expect.state) - set(state))
        if missing:
            raise _bad(path, "state", f"lacks {', '.join(missing)}, which this run's optimizer and strategy keep")
        if epoch > expect.max_epoch:
            raise _bad(path, "epoch", f"{epoch} is beyond this run's train.epochs ({expect.max_epoch})")
        if step >= expect.steps or (epoch == expect.max_epoch and step != 0):
            raise _bad(path, "step", f"{step} is not a step of epoch {epoch} of this run ({expect.steps} steps per epoch)")
    return {"theta": theta, "epoch": epoch, "step": step, "meta": meta, "state": state}


def meta_field(path: str | Path, name: str) -> Any:
    """meta[name] of the checkpoint at path, or None where there is none or it cannot be read
    (a reader that must refuse a bad file reads it with load())."""
    try:
        with h5py.File(path, "r") as f:
            meta = json.loads(f.attrs["meta"])
        return meta.get(name) if isinstance(meta, dict) else None
    except Exception:  # noqa: BLE001 - anything unreadable has no such field
        return None


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
        targets.prove_writable(path)
    except OSError as exc:
        raise CheckpointError(f"cannot write a checkpoint at {path}: {exc.strerror or exc}") from None
