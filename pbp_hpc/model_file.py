"""A trained model on disk: the flat parameters and the config that made them (HDF5, no pickle).

`train.save_model: PATH` writes the parameters of the best validation pass here;
`python -m pbp_hpc.evaluate PATH` reads them back. Written atomically (temporary file, fsync,
rename), so a kill never leaves a torn model where an older one was.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pbp_hpc import targets
from pbp_hpc import config as configmod
from pbp_hpc.engine.model import Layout
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


# deflate cannot do better than 1032:1: a dataset claiming more bytes than this many times its
# storage holds a declared size its file cannot back (a huge read from a small, damaged file)
MAX_RATIO = 1032


def _bad(path: Path, field: str, problem: str) -> ModelFileError:
    return ModelFileError(f"model {path}: field {field}: {problem}")


def _text_attr(f: h5py.File, path: Path, name: str) -> str:
    raw = f.attrs.get(name)
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if not isinstance(raw, str):
        raise _bad(path, name, "missing" if raw is None else f"expected a text, found {type(raw).__name__}")
    return raw


def _json_object(f: h5py.File, path: Path, name: str) -> dict[str, Any]:
    try:
        value = json.loads(_text_attr(f, path, name),
                           parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not a number JSON allows")))
    except (ValueError, RecursionError) as exc:
        raise _bad(path, name, f"not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(value, dict):
        raise _bad(path, name, f"expected a JSON object, found {type(value).__name__}")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """meta.best: null, or the validation pass the parameters are of (typed fields)."""
    best = meta.get("best")
    if best is None:
        return
    if not isinstance(best, dict):
        raise _bad(path, "meta.best", f"expected an object or null, found {type(best).__name__}")
    for key in ("epoch", "step"):
        if key in best and not (_is_int(best[key]) and best[key] >= 0):
            raise _bad(path, f"meta.best.{key}", f"expected a non-negative integer, found {str(best[key])[:40]!r}")
    for key, value in best.items():
        if key in ("epoch", "step") or value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise _bad(path, f"meta.best.{key}", f"expected a non-negative number or null, found {str(value)[:40]!r}")
    if best.get("val_accuracy") is not None and best["val_accuracy"] > 1:
        raise _bad(path, "meta.best.val_accuracy", f"expected at most 1, found {best['val_accuracy']}")


def _layout(path: Path, config: dict[str, Any]) -> tuple[int, str]:
    """(parameter count, dtype) the stored config declares; its own errors name the file."""
    try:
        cfg = configmod.from_dict(config, f"the config stored in {path}")
    except ConfigError as exc:
        raise ModelFileError(str(exc)) from None
    return Layout(cfg.model.layers).n_params, cfg.model.dtype


def _theta(f: h5py.File, path: Path, n: int, dtype: str) -> np.ndarray:
    """The parameters, read only once their dtype, shape and storage match the declared layout."""
    ds = f.get("theta")
    if not isinstance(ds, h5py.Dataset):
        raise _bad(path, "theta", "missing" if ds is None else f"expected an array, found a {type(ds).__name__}")
    if ds.dtype.kind != "f" or ds.dtype.names is not None:
        raise _bad(path, "theta", f"expected floating-point numbers, found dtype {ds.dtype}")
    if ds.dtype != np.dtype(dtype):
        raise _bad(path, "theta", f"dtype is {ds.dtype}, the stored config's model.dtype is {dtype}")
    if tuple(ds.shape or ()) != (n,):
        raise _bad(path, "theta", f"shape is {ds.shape}, but the stored config's model.layers needs ({n},): the file is "
                                  "damaged or was not written by train.save_model")
    if n * ds.dtype.itemsize > MAX_RATIO * ds.id.get_storage_size() + 4096:
        raise _bad(path, "theta", f"declares {n} values but its file holds {ds.id.get_storage_size()} bytes of them")
    theta = ds[...]
    if not np.all(np.isfinite(theta)):
        raise _bad(path, "theta", f"holds {int(theta.size - np.count_nonzero(np.isfinite(theta)))} NaN or infinite value(s)")
    return theta


def load(path: str | Path) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """(parameters, config dict, meta) of a model file; ModelFileError naming the file and the field.

    Everything small is checked before the parameters are read: the format and version, the
    config (a valid run configuration: the layers declare the parameter count), the meta's
    fields; then the parameters' dtype (the config's model.dtype), shape (the layers') and the
    bytes stored for them, and only then are they read (and checked finite)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
            if (fmt.decode("utf-8", "replace") if isinstance(fmt, bytes) else fmt) != FORMAT:
                raise ModelFileError(f"{path} is not a pbp_hpc model file (no format attribute {FORMAT!r})")
            version = f.attrs.get("version")
            if not isinstance(version, (int, np.integer)) or isinstance(version, (bool, np.bool_)):
                raise _bad(path, "version", f"expected an integer, found {str(version)[:40]!r}")
            if int(version) != VERSION:
                raise ModelFileError(f"{path} is model format version {int(version)}; this pbp_hpc reads version {VERSION}")
            config, meta = _json_object(f, path, "config"), _json_object(f, path, "meta")
            _check_meta(path, meta)
            n, dtype = _layout(path, config)
            theta = _theta(f, path, n, dtype)
    except ModelFileError:
        raise
    except FileNotFoundError:
        raise ModelFileError(f"no model file at {path}") from None
    except (OSError, KeyError, ValueError, TypeError, AttributeError, RuntimeError, OverflowError) as exc:
        raise ModelFileError(f"cannot read model {path}: {exc}") from None
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
        targets.prove_writable(path)
    except OSError as exc:
        raise ModelFileError(f"train.save_model {path} cannot be written: {exc.strerror or exc}") from None
