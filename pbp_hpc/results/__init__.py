"""The HDF5 results store: one group per run, written crash-safely, merged across Slurm array tasks.

Schema (documented in docs/results-schema.md; bump SCHEMA_VERSION on any incompatible change):
root attrs `schema`, `schema_version`, `created_at`; one group `/runs/<key>` per run, where
key = `<sweep>.p<point:04d>.r<repetition>`, holding the run's scalars as attributes and its
per-epoch values as 1-D datasets.

Why copy-on-write: the h5py wheel is a serial HDF5 build and HDF5 does not survive a writer
killed mid-update (its metadata cache leaves a torn file). So an append copies the file to a
temporary file in the same directory, adds the run there, fsyncs it and renames it over the
original: a kill at any moment leaves the old file or the new one, both complete. The copy
is O(file size); a run takes ~10 KB, so a few hundred runs cost milliseconds per append
(docs/results-schema.md has the measurement). An advisory lock serialises writers that
share a file by mistake, so none loses another's run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import h5py
import numpy as np

from pbp_hpc.errors import ResultsError

SCHEMA = "pbp_hpc-results"
SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "diverged", "timeout")
IMPLEMENTATIONS = ("naive-serial", "example-parallel", "blas-serial", "blas-threaded", "hybrid", "gpu", "framework")

# Per-epoch datasets: name -> (dtype, value stored when the run did not give one).
EPOCH_FIELDS: dict[str, tuple[str, Any]] = {
    "epoch": ("i8", -1),
    "time_s": ("f8", math.nan),
    "compute_s": ("f8", math.nan),
    "allreduce_s": ("f8", math.nan),
    "loss": ("f8", math.nan),
    "val_accuracy": ("f8", math.nan),  # NaN: not evaluated that epoch
    "gflops": ("f8", math.nan),
    "examples": ("i8", -1),
    "partial": ("u1", 0),  # 1: the epoch started mid-way (a resumed run); excluded from timings
}
# Scalar attributes: name -> kind. int: -1 when absent; float: NaN when absent; str: "" when absent.
INT_ATTRS = ("point", "repetition", "batch_size", "ranks", "threads_per_rank", "warmup_epochs",
             "flops_per_example", "n_train", "n_params")
FLOAT_ATTRS = ("test_accuracy", "total_time_s", "median_epoch_time_s")
STR_ATTRS = ("sweep", "implementation", "network", "status", "error", "host", "mpi_library",
             "package_version", "git_revision", "recorded_at")
JSON_ATTRS = ("config", "blas", "provenance")
PROVENANCE_ATTRS = ("host", "mpi_library", "blas", "package_version", "git_revision")
# Record keys the schema stores elsewhere, or derives: not repeated in the `extra` attribute.
_KNOWN = set(INT_ATTRS) | set(FLOAT_ATTRS) | set(STR_ATTRS) | set(JSON_ATTRS) | {"epochs", "key"}
_NAME_OK = re.compile(r"^[A-Za-z0-9_.+-]+$")


# ---------------------------------------------------------------------------------------------
# Keys and records


def run_key(sweep: str, point: int, repetition: int) -> str:
    """The group name of a run: unique per (sweep, point, repetition), sorts in point order."""
    if not sweep or not _NAME_OK.match(sweep):
        raise ResultsError(f"sweep name {sweep!r} must be letters, digits and _ . + - only (it names HDF5 groups)")
    return f"{sweep}.p{int(point):04d}.r{int(repetition)}"


def record_key(record: dict[str, Any]) -> str:
    missing = [k for k in ("sweep", "point", "repetition") if record.get(k) is None]
    if missing:
        raise ResultsError(f"a run record needs sweep, point and repetition; this one lacks {', '.join(missing)}")
    return run_key(record["sweep"], record["point"], record["repetition"])


def _check_record(record: dict[str, Any]) -> None:
    if record.get("status") not in STATUSES:
        raise ResultsError(f"run status must be one of {', '.join(STATUSES)}, got {record.get('status')!r}")
    if record.get("implementation") not in IMPLEMENTATIONS:
        raise ResultsError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {record.get('implementation')!r}")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _int(v: Any) -> int:
    return -1 if v is None else int(v)


def _float(v: Any) -> float:
    return math.nan if v is None else float(v)


def _write_run(runs: h5py.Group, key: str, record: dict[str, Any]) -> None:
    """Encode one record as the group runs/<key> (the schema in one place)."""
    g = runs.create_group(key)
    prov = record.get("provenance") or {}
    for name in INT_ATTRS:
        g.attrs[name] = np.int64(_int(record.get(name)))
    for name in FLOAT_ATTRS:
        g.attrs[name] = np.float64(_float(record.get(name)))
    for name in STR_ATTRS:
        value = record.get(name, prov.get(name) if name in PROVENANCE_ATTRS else None)
        g.attrs[name] = "" if value is None else str(value)
    g.attrs["recorded_at"] = record.get("recorded_at") or _now()
    g.attrs["config"] = json.dumps(record.get("config") or {}, sort_keys=True)
    g.attrs["blas"] = json.dumps(record.get("blas", prov.get("blas", [])))
    g.attrs["provenance"] = json.dumps(prov, sort_keys=True)
    extra = {k: v for k, v in record.items() if k not in _KNOWN}
    g.attrs["extra"] = json.dumps(extra, sort_keys=True, default=str)
    epochs = record.get("epochs") or []
    for name, (dtype, absent) in EPOCH_FIELDS.items():
        values = [absent if e.get(name) is None else e[name] for e in epochs]
        g.create_dataset(name, data=np.asarray(values, dtype=dtype), shape=(len(values),), dtype=dtype)


def _attr_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _read_run(key: str, g: h5py.Group) -> dict[str, Any]:
    """Decode runs/<key> back into the record that was appended (None where it had none)."""
    a = g.attrs
    rec: dict[str, Any] = json.loads(_attr_str(a.get("extra", "{}")))
    rec["key"] = key
    for name in INT_ATTRS:
        v = int(a[name])
        rec[name] = None if v == -1 else v
    for name in FLOAT_ATTRS:
        v = float(a[name])
        rec[name] = None if math.isnan(v) else v
    for name in STR_ATTRS:
        rec[name] = _attr_str(a[name])
    for name in JSON_ATTRS:
        rec[name] = json.loads(_attr_str(a[name]))
    columns = {name: g[name][...] for name in EPOCH_FIELDS}
    epochs = []
    for i in range(columns["epoch"].shape[0]):
        e: dict[str, Any] = {}
        for name, (dtype, _) in EPOCH_FIELDS.items():
            v = columns[name][i].item()
            if dtype == "f8":
                v = None if math.isnan(v) else v
            elif dtype == "u1":
                v = bool(v)
            e[name] = v
        epochs.append(e)
    rec["epochs"] = epochs
    return rec


# ---------------------------------------------------------------------------------------------
# Files


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
        version = int(f.attrs.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            raise ResultsError(f"{path} is results schema version {version}; this pbp_hpc reads version {SCHEMA_VERSION} "
                               "(use the pbp_hpc version that wrote it, or convert it)")
        if "runs" not in f:
            raise ResultsError(f"{path} has no /runs group: truncated or not written by pbp_hpc")
    except BaseException:
        f.close()
        raise
    return f


def _init_file(f: h5py.File) -> None:
    f.attrs["schema"] = SCHEMA
    f.attrs["schema_version"] = np.int64(SCHEMA_VERSION)
    f.attrs["created_at"] = _now()
    f.create_group("runs")


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
    with _locked(path):
        _remove_stale_temps(path)
        exists = path.exists()
        if exists:
            with _open_checked(path) as f:
                if key in f["runs"] and not replace:
                    raise ResultsError(f"{path} already holds run {key} (status {_attr_str(f['runs'][key].attrs['status'])}); "
                                       "refusing to record it twice")
                present = key in f["runs"]
        if exists and present:
            _rewrite_without(path, key, record)
            return
        with _replacing(path, path if exists else None) as f:
            _write_run(f["runs"], key, record)


def _rewrite_without(path: Path, key: str, record: dict[str, Any]) -> None:
    """Replace a run: copy every other group to a fresh file (HDF5 never reclaims deleted space)."""
    with _open_checked(path) as src, _replacing(path, None) as dst:
        for name, value in src.attrs.items():
            dst.attrs[name] = value
        for other in src["runs"]:
            if other != key:
                src.copy(src["runs"][other], dst["runs"], name=other)
        _write_run(dst["runs"], key, record)


def _iter_runs(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with _open_checked(path) as f:
        for key in f["runs"]:
            try:
                yield key, _read_run(key, f["runs"][key])
            except (KeyError, ValueError, OSError) as exc:
                raise ResultsError(f"{path}: run {key} does not follow schema version {SCHEMA_VERSION} ({exc})") from None


def statuses(path: str | Path) -> dict[str, str]:
    """key -> status of every run in a results file ({} if it does not exist yet); cheap: no epochs read."""
    path = Path(path)
    if not path.exists():
        return {}
    with _open_checked(path) as f:
        return {key: _attr_str(g.attrs["status"]) for key, g in f["runs"].items()}


# What a run was, as opposed to how it went: the attributes `identities` reads.
IDENTITY_INT_ATTRS = ("point", "repetition", "batch_size", "ranks", "threads_per_rank", "warmup_epochs")
IDENTITY_STR_ATTRS = ("sweep", "implementation", "network", "status")


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
            a = g.attrs
            try:
                ident: dict[str, Any] = {}
                for name in IDENTITY_INT_ATTRS:
                    v = int(a[name])
                    ident[name] = None if v == -1 else v
                for name in IDENTITY_STR_ATTRS:
                    ident[name] = _attr_str(a[name])
                config = json.loads(_attr_str(a["config"]))
                ident["config"] = config if isinstance(config, dict) else {}
            except (KeyError, ValueError, OSError) as exc:
                raise ResultsError(f"{path}: run {key} does not follow schema version {SCHEMA_VERSION} ({exc})") from None
            out[key] = ident
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def read_runs(paths: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every run of one or more results files, as records sorted by key.

    A record is what `train --json` printed plus the sweep keys, plus `key`, `recorded_at` and
    the provenance fields (host, mpi_library, blas, package_version, git_revision) at top
    level; per-epoch values are `record["epochs"]`, a list of dicts (empty for a run that
    failed before its first epoch); None stands for "not measured". A run present in several
    files must be identical in all of them (ResultsError otherwise).
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
    when merging again. out is replaced atomically.
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
                    src = opened[chosen[key][1]]
                    src.copy(src["runs"][key], dst["runs"], name=key)  # byte-exact: no re-encoding
        finally:
            for f in opened.values():
                f.close()
    return len(chosen)


# ---------------------------------------------------------------------------------------------
# Command line


def tpe(record: dict[str, Any]) -> Optional[float]:
    """Time per epoch: median of the epochs after the warm-up ones, partial epochs excluded."""
    skip = record.get("warmup_epochs") or 0
    times = [e["time_s"] for e in record.get("epochs", [])[skip:] if not e.get("partial") and e.get("time_s") is not None]
    return float(np.median(times)) if times else None


def headline(error: str) -> str:
    """The telling line of a run's error text: the last one that says error (not a launcher's echo), else the last."""
    lines = [l.strip() for l in (error or "").strip().splitlines() if l.strip()]
    telling = [l for l in lines if "error" in l.lower() and not l.startswith(("srun:", "mpiexec:", "#"))]
    return (telling or lines or [""])[-1]


def show_lines(records: Iterable[dict[str, Any]]) -> list[str]:
    """A table, one line per run: key, status, what ran, how fast, how well, and why it failed."""
    rows = [["key", "status", "implementation", "network", "batch", "PxT", "epochs", "TPE_s", "test_acc", "error"]]
    for r in records:
        t, acc = tpe(r), r.get("test_accuracy")
        rows.append([r["key"], r["status"], r["implementation"], r["network"], str(r.get("batch_size") or "-"),
                     f"{r.get('ranks')}x{r.get('threads_per_rank')}", str(len(r["epochs"])),
                     "-" if t is None else f"{t:.4f}", "-" if acc is None else f"{acc:.4f}", headline(r.get("error") or "")[:120]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1]).rstrip() for row in rows]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.results", description="Inspect and merge pbp_hpc results files.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="combine results files (one per Slurm array task) into one")
    m.add_argument("inputs", nargs="+", type=Path)
    m.add_argument("-o", "--output", required=True, type=Path, help="merged file; if it exists, its runs that no input holds are kept")
    m.add_argument("--overwrite", action="store_true", help="do not merge an existing output file: replace it")
    s = sub.add_parser("show", help="one line per run")
    s.add_argument("files", nargs="+", type=Path)
    args = p.parse_args(argv)
    try:
        if args.cmd == "merge":
            n = merge(args.inputs, args.output, overwrite=args.overwrite)
            print(f"{args.output}: {n} runs from {len(args.inputs)} file(s)")
        else:
            print("\n".join(show_lines(read_runs(args.files))))
    except ResultsError as exc:
        print(f"pbp_hpc.results: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head` stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
