"""Results files: crash-safe appends, reading runs, statuses and identities, merging.

Why copy-on-write: the h5py wheel is a serial HDF5 build and HDF5 does not survive a writer
killed mid-update (its metadata cache leaves a torn file). So an append copies the file to a
temporary file in the same directory, adds the run there, fsyncs it and renames it over the
original: a kill at any moment leaves the old file or the new one, both complete. The copy
is O(file size); a run takes ~10 KB, so a few hundred runs cost milliseconds per append
(docs/results-schema.md has the measurement). An advisory lock serialises writers that
share a file by mistake, so none loses another's run. What goes into a run's group is
pbp_hpc.results.schema.

Files of an older schema version (READABLE_VERSIONS) read as current records. Appending to one
converts it: the file is rewritten in the current version, each old run read as a record and
written anew (and any attribute or dataset the new group would lack copied as it was), so the
file never mixes versions; `merge` writes its output in the current version the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import h5py
import numpy as np

from pbp_hpc.errors import ResultsError
from pbp_hpc.results.schema import (READABLE_VERSIONS, SCHEMA, SCHEMA_VERSION, _attr_str, _check_record, _init_file,
                                    _now, _read_identity, _read_run, _write_run, record_key)


def _open_checked(path: Path) -> h5py.File:
    """Open a results file read-only, or raise ResultsError saying what it is instead."""
    if not path.exists():
        raise ResultsError(f"results file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ResultsError(f"{path} is not a readable HDF5 file ({exc})") from None
    try:
        schema = f.attrs.get("schema")
        if schema is None or _attr_str(schema) != SCHEMA:
            raise ResultsError(f"{path} is an HDF5 file but not a pbp_hpc results file (root attribute schema={schema!r})")
        version = _version(f)
        if version not in READABLE_VERSIONS:
            older = ", ".join(str(v) for v in READABLE_VERSIONS if v != SCHEMA_VERSION)
            raise ResultsError(f"{path} is results schema version {version}; this pbp_hpc reads version {SCHEMA_VERSION} "
                               f"(and the older {older}, converted on append): use the pbp_hpc version that wrote it")
        if "runs" not in f:
            raise ResultsError(f"{path} has no /runs group: truncated or not written by pbp_hpc")
    except BaseException:
        f.close()
        raise
    return f


def _version(f: h5py.File) -> int:
    raw = f.attrs.get("schema_version", -1)
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw[()]
    if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer)):
        raise ResultsError(f"{f.filename}: root attribute schema_version is {str(raw)[:40]!r}, not an integer: "
                           "damaged or not written by pbp_hpc")
    return int(raw)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock for path (released by the kernel if we are killed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without flock (some Lustre mounts): one writer per file is the rule anyway
        yield


def _remove_stale_temps(path: Path) -> None:
    """Temp files left by a writer killed mid-append; safe to remove while we hold the lock."""
    for stale in path.parent.glob(_tmp_prefix(path) + "*.tmp"):
        stale.unlink(missing_ok=True)


def _mode_for(path: Path) -> int:
    if path.exists():
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _replacing(path: Path, seed: Optional[Path]) -> Iterator[h5py.File]:
    """Yield a writable copy of `seed` (or a new empty results file); on success it replaces path atomically."""
    fd, name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _mode_for(path))  # mkstemp makes 0600; keep the file as readable as before
        if seed is not None:
            shutil.copyfile(seed, tmp)
            f = h5py.File(tmp, "a")
        else:
            f = h5py.File(tmp, "w")
            _init_file(f)
        try:
            yield f
        finally:
            f.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_run(path: str | Path, record: dict[str, Any], replace: bool = False) -> None:
    """Add one run record to the results file at path (created if missing), crash-safely.

    A run whose key (sweep, point, repetition) is already in the file is refused with
    ResultsError, unless replace=True (the sweep's --retry-failed), which swaps it.
    """
    path = Path(path)
    _check_record(record)
    key = record_key(record)
    try:
        _append(path, key, record, replace)
    except OSError as exc:  # disk full, quota, permissions: the file is as it was (written aside, then renamed)
        raise ResultsError(f"cannot record run {key} in {path}: {exc.strerror or exc} (the file is unchanged)") from None


def _append(path: Path, key: str, record: dict[str, Any], replace: bool) -> None:
    with _locked(path):
        _remove_stale_temps(path)
        exists = path.exists()
        if exists:
            with _open_checked(path) as f:
                if key in f["runs"] and not replace:
                    raise ResultsError(f"{path} already holds run {key} (status {_attr_str(f['runs'][key].attrs['status'])}); "
                                       "refusing to record it twice")
                present, old_version = key in f["runs"], _version(f)
        if exists and (present or old_version != SCHEMA_VERSION):
            _rewrite_without(path, key, record)  # replaces the run, and converts an older file
            return
        with _replacing(path, path if exists else None) as f:
            _write_run(f["runs"], key, record)


def _rewrite_without(path: Path, key: str, record: dict[str, Any]) -> None:
    """Replace a run, or convert an older file: copy every other group to a fresh file of the
    current version (HDF5 never reclaims deleted space), then write this run."""
    with _open_checked(path) as src, _replacing(path, None) as dst:
        version = _version(src)
        for name, value in src.attrs.items():
            if name != "schema_version":
                dst.attrs[name] = value  # created_at, and any other root attribute, as they were
        if version != SCHEMA_VERSION:
            dst.attrs["converted_from_version"] = version
            dst.attrs["converted_at"] = _now()
        for other in src["runs"]:
            if other != key:
                _copy_run(path, src, other, dst["runs"])
        _write_run(dst["runs"], key, record)


def _copy_run(path: Path, src: h5py.File, key: str, runs: h5py.Group) -> None:
    """Copy runs/<key> of src into runs: byte for byte from a file of the current version; from an
    older one, read as a record and written anew, with whatever else the old group held copied too."""
    old = src["runs"][key]
    version = _version(src)
    if version == SCHEMA_VERSION:
        src.copy(old, runs, name=key)
        return
    try:
        _write_run(runs, key, _read_run(key, old, version))
    except (KeyError, ValueError, OSError, TypeError, IndexError, AttributeError, ResultsError) as exc:
        raise ResultsError(f"{path}: run {key} does not follow schema version {version} ({exc})") from None
    new = runs[key]
    for name, value in old.attrs.items():
        if name not in new.attrs:
            new.attrs[name] = value
    for name in old:
        if name not in new:
            src.copy(old[name], new, name=name)


def _iter_runs(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with _open_checked(path) as f:
        version = _version(f)
        for key in f["runs"]:
            try:
                yield key, _read_run(key, f["runs"][key], version)
            except (KeyError, ValueError, OSError, TypeError, IndexError, AttributeError, ResultsError) as exc:
                raise ResultsError(f"{path}: run {key} does not follow schema version {version} ({exc})") from None


def statuses(path: str | Path) -> dict[str, str]:
    """key -> status of every run in a results file ({} if it does not exist yet); cheap: no epochs read."""
    path = Path(path)
    if not path.exists():
        return {}
    with _open_checked(path) as f:
        return {key: _attr_str(g.attrs["status"]) for key, g in f["runs"].items()}


def identities(path: str | Path) -> dict[str, dict[str, Any]]:
    """key -> what each run of a results file was ({} if the file does not exist yet).

    Each value holds the attributes IDENTITY_INT_ATTRS and IDENTITY_STR_ATTRS (None where absent,
    as read_runs gives them) and `config` (the run configuration, a dict; {} if none was recorded).
    Cheap like `statuses`: attributes only, no per-epoch dataset is read.
    """
    path = Path(path)
    if not path.exists():
        return {}
    out: dict[str, dict[str, Any]] = {}
    with _open_checked(path) as f:
        for key, g in f["runs"].items():
            try:
                ident = _read_identity(g)
            except (KeyError, ValueError, OSError, TypeError, AttributeError) as exc:
                raise ResultsError(f"{path}: run {key} does not follow schema version {_version(f)} ({exc})") from None
            out[key] = ident
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def read_runs(paths: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every run of one or more results files, as records sorted by key.

    A record is what `train --json` printed plus the sweep keys, plus `key`, `recorded_at` and
    the provenance fields (host, mpi_library, blas, package_version, git_revision) at top
    level; per-epoch values are `record["epochs"]`, a list of dicts (empty for a run that
    failed before its first epoch), the evaluation curve `record["evaluations"]` (empty for a
    run of a version-1 file that did not print one), `record["target"]` a dict or None; None
    stands for "not measured". A run present in several files must be identical in all of them
    (ResultsError otherwise).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    seen: dict[str, tuple[dict[str, Any], Path]] = {}
    for p in map(Path, paths):
        for key, rec in _iter_runs(p):
            if key in seen and not _same(seen[key][0], rec):
                raise ResultsError(f"run {key} differs between {seen[key][1]} and {p}")
            seen.setdefault(key, (rec, p))
    return [seen[k][0] for k in sorted(seen)]


def merge(paths: Sequence[str | Path], out: str | Path, overwrite: bool = False) -> int:
    """Combine results files (e.g. one per Slurm array task) into out; return its number of runs.

    A key present in several inputs must hold identical runs, else ResultsError names the key
    and the files, and nothing is written. If out exists (and overwrite is False), its runs are
    kept too, except where an input holds the same key: the inputs are the source and out is
    derived from them, so a point rerun after a failure (--retry-failed) replaces its old run
    when merging again. out is replaced atomically, in the current schema version (runs of
    older-version files are converted, as append_run converts them).
    """
    out = Path(out)
    inputs = list(dict.fromkeys(Path(p) for p in paths))
    if not inputs:
        raise ResultsError("merge needs at least one input file")
    with _locked(out):
        _remove_stale_temps(out)
        chosen: dict[str, tuple[dict[str, Any], Path]] = {}
        for p in inputs:
            for key, rec in _iter_runs(p):
                if key in chosen and not _same(chosen[key][0], rec):
                    raise ResultsError(f"run {key} is in {chosen[key][1]} and in {p} with different contents; "
                                       "remove one of them (e.g. the failed attempt) and merge again")
                chosen.setdefault(key, (rec, p))
        if out.exists() and not overwrite and out not in inputs:
            for key in statuses(out):
                chosen.setdefault(key, ({}, out))
        opened = {p: _open_checked(p) for p in {p for _, p in chosen.values()}}
        try:
            with _replacing(out, None) as dst:
                for key in sorted(chosen):
                    src_path = chosen[key][1]
                    _copy_run(src_path, opened[src_path], key, dst["runs"])  # byte-exact unless converted
        finally:
            for f in opened.values():
                f.close()
    return len(chosen)
