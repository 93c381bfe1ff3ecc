"""The results schema: its version, the fields of a run record, and one record <-> one HDF5 group.

File layout (docs/results-schema.md has every field with its unit): root attributes `schema`,
`schema_version`, `created_at`; one group `/runs/<key>` per run, key =
`<sweep>.p<point:04d>.r<repetition>`, holding the run's scalars as attributes (RUN_FIELDS, plus
`extra`: a JSON object of every record key the table does not name) and its per-epoch values as
1-D datasets of one length (EPOCH_FIELDS), and its evaluation curve as the subgroup
`/runs/<key>/evaluations` of 1-D datasets of another length, one element per validation pass
(EVAL_FIELDS; version 2). This module only encodes and decodes groups (and reads version-1 groups as
version-2 records); opening, appending, converting and merging files is pbp_hpc.results.store.

How to add a field
------------------
* An optional run value (absent for some runs): append `Field(name, kind, old_files=None)` to
  RUN_FIELDS, kind "int" | "float" | "bool" | "ostr" | "json" (absent is stored as -1, NaN, -1, ""
  or null and read back as None; kind "str", the v1 strings, reads "" back as ""). A value inside a
  record's sub-object (e.g. record["target"]["time_s"]) is `Field("target_time_s", ..., path=("target",
  "time_s"))`: its own attribute, read back into the sub-object, which reads as None when every one
  of its fields does. That one line is the whole change in code: append_run stores it as an
  attribute, read_runs returns it, and a group written before the field existed reads as
  `old_files` (or as the value older code kept in `extra`, where every unnamed key went).
  A per-epoch value is the same with `Column(name, dtype, absent, old_files=None)` in EPOCH_FIELDS
  (per-epoch keys that the table does not name are not stored), and a value of each evaluation pass
  the same in EVAL_FIELDS. Add its row to
  docs/results-schema.md and a test. No version bump: older files still mean what they meant.
* Bump SCHEMA_VERSION (and the docs) when a file of the old version cannot be read as the new code
  means it: a field changes meaning, unit or encoding, is renamed or removed, or a new field is
  required (`required=True`: no value can stand in for it in old files). With the bump, keep the
  old version readable: add it to READABLE_VERSIONS and give _read_run a branch (or a
  _read_run_v<N>) that turns its groups into current records; append_run and merge must then
  refuse or convert old-version files rather than mix versions in one file (they convert: a group
  of an older version is read as a record and written anew, store._copy_run).
  Version 2 (the evaluation curve, a structure every group now has; and keys that version-1 code
  kept in `extra` became attributes) is the example: _read_run's `version` argument.
* Readers refuse a file of a version they do not know (a newer one) with ResultsError naming both
  versions (store._open_checked); they never guess.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Any, Callable, NamedTuple, Optional

import h5py
import numpy as np

from pbp_hpc.errors import ResultsError
from pbp_hpc.results import checks

SCHEMA = "pbp_hpc-results"
SCHEMA_VERSION = 3
# 1: no evaluation curve (_read_run reads it as a current record); 2: the epoch's communication
# time was `allreduce_s` and held the waits for other ranks too (read as comm_s, wait_s None)
READABLE_VERSIONS = (1, 2, SCHEMA_VERSION)
RENAMED_BEFORE_3 = {"comm_s": "allreduce_s"}  # epoch columns: version-3 name -> the dataset's name before
CURVE_GROUP = "evaluations"  # the subgroup of /runs/<key> holding the evaluation curve (version 2)
STATUSES = ("ok", "failed", "diverged", "timeout")
IMPLEMENTATIONS = ("naive-serial", "example-parallel", "blas-serial", "blas-threaded", "hybrid", "gpu", "framework")

ORIGINAL = object()  # old_files of a field every file of this version has: a group without it is malformed
# old_files of an optional column: written only where some row gives it, and a group without it
# reads back without the key (so a record round-trips exactly, whether or not it gave the value)
OMIT = object()


class Field(NamedTuple):
    """A scalar attribute of /runs/<key>."""
    name: str
    kind: str  # int (-1 when absent), float (NaN), bool (int8 -1), ostr (""), json (null): None when absent; str ("" stays "")
    required: bool = False  # append_run refuses a record without it
    from_provenance: bool = False  # absent from the record: taken from record["provenance"][name]
    old_files: Any = ORIGINAL  # what a group written before the field existed reads as
    write: Optional[Callable[[dict, dict], Any]] = None  # (record, provenance) -> attribute value, if not by kind
    path: tuple[str, ...] = ()  # where the value sits in the record, if not record[name]: e.g. ("target", "time_s")


class Column(NamedTuple):
    """A per-epoch dataset of /runs/<key> (one element per epoch), or one of its evaluation curve."""
    name: str
    dtype: str  # i8 (`absent` read back as None), f8 (NaN read back as None), u1 (read back as bool)
    absent: Any  # stored where an epoch does not give the value
    old_files: Any = ORIGINAL  # what each epoch of a group written before the column existed reads as


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# The record's fields, in the order they are written. The v1 JSON ones keep their own encodings.
RUN_FIELDS: tuple[Field, ...] = (
    Field("point", "int", required=True),
    Field("repetition", "int", required=True),
    Field("batch_size", "int"),
    Field("ranks", "int"),
    Field("threads_per_rank", "int"),
    Field("warmup_epochs", "int"),
    Field("flops_per_example", "int"),
    Field("n_train", "int"),
    Field("n_params", "int"),
    Field("test_accuracy", "float"),
    Field("total_time_s", "float"),
    Field("median_epoch_time_s", "float"),
    Field("sweep", "str", required=True),
    Field("implementation", "str", required=True),
    Field("network", "str"),
    Field("status", "str", required=True),
    Field("error", "str"),
    Field("host", "str", from_provenance=True),
    Field("mpi_library", "str", from_provenance=True),
    Field("package_version", "str", from_provenance=True),
    Field("git_revision", "str", from_provenance=True),
    Field("recorded_at", "str"),  # "" -> the time of recording (_write_run)
    Field("config", "json", write=lambda r, p: json.dumps(r.get("config") or {}, sort_keys=True)),
    Field("blas", "json", from_provenance=True, write=lambda r, p: json.dumps(r.get("blas", p.get("blas", [])))),
    Field("provenance", "json", write=lambda r, p: json.dumps(p, sort_keys=True)),
    # Training time and the target accuracy (train.target_accuracy); version-1 code kept these in `extra`.
    Field("train_time_s", "float", old_files=None),
    Field("eval_time_s", "float", old_files=None),
    Field("best_val_accuracy", "float", old_files=None),
    Field("ended_early", "ostr", old_files=None),
    Field("model_path", "ostr", old_files=None),
    Field("target_accuracy", "float", old_files=None, path=("target", "accuracy")),
    Field("target_reached", "bool", old_files=None, path=("target", "reached")),
    Field("target_val_accuracy", "float", old_files=None, path=("target", "val_accuracy")),
    Field("target_time_s", "float", old_files=None, path=("target", "time_s")),
    Field("target_eval_time_s", "float", old_files=None, path=("target", "eval_time_s")),
    Field("target_wall_s", "float", old_files=None, path=("target", "wall_s")),
    Field("target_epochs", "float", old_files=None, path=("target", "epochs")),
    Field("target_steps", "int", old_files=None, path=("target", "steps")),
    # Strategies beyond lockstep (parallel.strategy; absent before they existed: allreduce)
    Field("strategy", "ostr", old_files=None),  # absent (older files, a run that failed early): see the config
    Field("updates", "int", old_files=None),  # async_ps, ssp, hogwild: updates applied
    Field("staleness_mean", "float", old_files=None),  # async_ps, ssp: updates between a read and its write
    Field("staleness_max", "int", old_files=None),
    Field("staleness_histogram", "json", old_files=None),  # [updates with staleness 0, 1, ...]
    # Elastic runs (python -m pbp_hpc.elastic): restarts after a lost rank or node, seconds lost to them
    Field("restarts", "int", old_files=None),
    Field("lost_s", "float", old_files=None),
    # Where the time goes (version 3): what comm_s/wait_s time, in words; the network as the sweep measured it
    Field("communication", "ostr", old_files=None),
    Field("interconnect", "json", old_files=None),  # pbp_hpc.sweep.network's measurements (sweep runs)
    Field("trace_path", "ostr", old_files=None),  # train.trace: the run's timeline (Chrome trace-event JSON)
    Field("b_noise", "float", old_files=None),  # the gradient noise scale at the end of training (examples)
    Field("noise_scale_cost_s", "float", old_files=None),  # seconds spent estimating it (rank 0)
    # The process grid (parallel.tensor, parallel.pipeline; data = ranks / (tensor x pipeline)) and the
    # bytes a rank sends a step, by kind (counted activations of tensor/pipeline steps; the data
    # group's gradient reduction at best); version-3 code before them kept both in `extra`
    Field("grid_data", "int", old_files=None, path=("grid", "data")),
    Field("grid_tensor", "int", old_files=None, path=("grid", "tensor")),
    Field("grid_pipeline", "int", old_files=None, path=("grid", "pipeline")),
    Field("bytes_activations", "float", old_files=None, path=("bytes_per_step", "activations")),
    Field("bytes_gradients", "float", old_files=None, path=("bytes_per_step", "gradients")),
)
EPOCH_FIELDS: tuple[Column, ...] = (
    Column("epoch", "i8", -1),
    Column("time_s", "f8", math.nan),
    Column("compute_s", "f8", math.nan),
    # version 3: comm_s + wait_s + other_s + compute_s = time_s (the slowest rank's parts; pbp_hpc.parallel.accounting).
    # Files of version <= 2 store comm_s as `allreduce_s`, which held the waits too: read as comm_s, without wait_s.
    Column("comm_s", "f8", math.nan),
    Column("wait_s", "f8", math.nan, old_files=OMIT),
    Column("other_s", "f8", math.nan, old_files=OMIT),
    Column("compute_s_min", "f8", math.nan, old_files=OMIT),  # over ranks
    Column("compute_s_max", "f8", math.nan, old_files=OMIT),
    Column("wait_s_min", "f8", math.nan, old_files=OMIT),
    Column("wait_s_max", "f8", math.nan, old_files=OMIT),
    Column("loss", "f8", math.nan),
    Column("val_accuracy", "f8", math.nan),  # NaN: not evaluated that epoch
    Column("gflops", "f8", math.nan),
    Column("examples", "i8", -1),
    Column("partial", "u1", 0),  # 1: the epoch started mid-way (a resumed run); excluded from timings
    Column("steps_done", "i8", -1, old_files=None),  # steps of the epoch that ran (fewer if it ended early)
    Column("checkpoint_s", "f8", math.nan, old_files=OMIT),  # seconds writing periodic checkpoints in it (not in time_s)
    Column("checkpoints", "i8", -1, old_files=OMIT),  # how many
)
# The evaluation curve (record["evaluations"]): one element per validation pass, in /runs/<key>/evaluations.
EVAL_FIELDS: tuple[Column, ...] = (
    Column("epoch", "i8", -1),
    Column("step", "i8", -1),  # global steps done before the pass
    Column("epochs", "f8", math.nan),  # step / steps per epoch
    Column("time_s", "f8", math.nan),  # training time so far, evaluation passes excluded
    Column("wall_s", "f8", math.nan),  # since the training loop started, evaluation passes included
    Column("val_accuracy", "f8", math.nan),
    Column("loss", "f8", math.nan),  # mean training loss since the previous pass
    Column("stalled_s", "f8", math.nan, old_files=OMIT),  # the pass's wait past parallel.stall_warning_s (slowest rank)
    Column("b_noise", "f8", math.nan, old_files=OMIT),  # the gradient noise scale B_simple (smoothed), examples
)
INT_ATTRS = tuple(f.name for f in RUN_FIELDS if f.kind == "int")
FLOAT_ATTRS = tuple(f.name for f in RUN_FIELDS if f.kind == "float")
FLOAT_FIELDS = tuple(f.name for f in RUN_FIELDS if f.kind == "float" and not f.path)  # top-level record keys
STR_ATTRS = tuple(f.name for f in RUN_FIELDS if f.kind in ("str", "ostr"))
BOOL_ATTRS = tuple(f.name for f in RUN_FIELDS if f.kind == "bool")
JSON_ATTRS = tuple(f.name for f in RUN_FIELDS if f.kind == "json")
PROVENANCE_ATTRS = tuple(f.name for f in RUN_FIELDS if f.from_provenance)
KEY_FIELDS = ("sweep", "point", "repetition")
# What a run was, as opposed to how it went: the attributes `identities` reads.
IDENTITY_INT_ATTRS = ("point", "repetition", "batch_size", "ranks", "threads_per_rank", "warmup_epochs")
IDENTITY_STR_ATTRS = ("sweep", "implementation", "network", "status")
_NAME_OK = re.compile(r"^[A-Za-z0-9_.+-]+$")


def run_key(sweep: str, point: int, repetition: int) -> str:
    """The group name of a run: unique per (sweep, point, repetition), sorts in point order."""
    if not sweep or not _NAME_OK.match(sweep):
        raise ResultsError(f"sweep name {sweep!r} must be letters, digits and _ . + - only (it names HDF5 groups)")
    return f"{sweep}.p{int(point):04d}.r{int(repetition)}"


def record_key(record: dict[str, Any]) -> str:
    missing = [k for k in KEY_FIELDS if record.get(k) is None]
    if missing:
        raise ResultsError(f"a run record needs sweep, point and repetition; this one lacks {', '.join(missing)}")
    return run_key(record["sweep"], record["point"], record["repetition"])


def _check_record(record: dict[str, Any]) -> None:
    if record.get("status") not in STATUSES:
        raise ResultsError(f"run status must be one of {', '.join(STATUSES)}, got {record.get('status')!r}")
    if record.get("implementation") not in IMPLEMENTATIONS:
        raise ResultsError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {record.get('implementation')!r}")
    # required fields beyond the key (record_key names those) and the two checked above
    missing = [f.name for f in RUN_FIELDS if f.required and f.name not in KEY_FIELDS and record.get(f.name) is None]
    if missing:
        raise ResultsError(f"a run record needs {', '.join(missing)}; this one lacks them")


def _attr_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _value(field: Field, record: dict[str, Any], prov: dict[str, Any]) -> Any:
    """The field's value in a record (None where the record does not give it)."""
    if field.path:
        node: Any = record
        for part in field.path:
            node = node.get(part) if isinstance(node, dict) else None
        return node
    return record.get(field.name, prov.get(field.name) if field.from_provenance else None)


def _encode(field: Field, record: dict[str, Any], prov: dict[str, Any]) -> Any:
    if field.write is not None:
        return field.write(record, prov)
    value = _value(field, record, prov)
    if field.kind == "int":
        return np.int64(-1 if value is None else int(value))
    if field.kind == "float":
        return np.float64(math.nan if value is None else float(value))
    if field.kind == "bool":
        return np.int8(-1 if value is None else bool(value))
    if field.kind in ("str", "ostr"):
        return "" if value is None else str(value)
    return json.dumps(value, sort_keys=True, default=str)


def _decode(field: Field, raw: Any) -> Any:
    if field.kind in ("int", "bool"):
        v = int(raw)
        return None if v == -1 else (bool(v) if field.kind == "bool" else v)
    if field.kind == "float":
        v = float(raw)
        return None if math.isnan(v) else v
    if field.kind == "str":
        return _attr_str(raw)
    if field.kind == "ostr":
        return _attr_str(raw) or None
    return json.loads(_attr_str(raw))


def _stored_keys() -> set[str]:
    """Record keys the schema stores itself (not in `extra`): fields, sub-objects, epochs, curve, `key`."""
    return {f.path[0] if f.path else f.name for f in RUN_FIELDS} | {"epochs", CURVE_GROUP, "key"}


def _write_columns(g: h5py.Group, columns: tuple[Column, ...], rows: list[dict[str, Any]]) -> None:
    for col in columns:
        if col.old_files is OMIT and not any(col.name in row for row in rows):
            continue
        values = [col.absent if row.get(col.name) is None else row[col.name] for row in rows]
        g.create_dataset(col.name, data=np.asarray(values, dtype=col.dtype), shape=(len(values),), dtype=col.dtype)


def _write_run(runs: h5py.Group, key: str, record: dict[str, Any]) -> None:
    """Encode one record as the group runs/<key> (the schema in one place)."""
    g = runs.create_group(key)
    prov = record.get("provenance") or {}
    for field in RUN_FIELDS:
        g.attrs[field.name] = _encode(field, record, prov)
        if field.name == "recorded_at":  # set twice, as v1 always did: the same bytes on disk
            g.attrs["recorded_at"] = record.get("recorded_at") or _now()
    known = _stored_keys()
    extra = {k: v for k, v in record.items() if k not in known}
    g.attrs["extra"] = json.dumps(extra, sort_keys=True, default=str)
    _write_columns(g, EPOCH_FIELDS, record.get("epochs") or [])
    _write_columns(g.create_group(CURVE_GROUP), EVAL_FIELDS, record.get(CURVE_GROUP) or [])


def _read_columns(g: h5py.Group, columns: tuple[Column, ...], length_of: str,
                  renamed: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
    """The rows of a table of 1-D datasets (KeyError where an original column is missing);
    renamed: column -> the name its dataset has in this group's version."""
    renamed = renamed or {}
    checks.check_columns(g, [renamed.get(c.name, c.name) for c in columns],
                         g.name.rsplit("/", 1)[-1] if length_of == "step" else "epochs")
    data = {col.name: g[renamed.get(col.name, col.name)][...] for col in columns
            if col.old_files is ORIGINAL or renamed.get(col.name, col.name) in g}
    rows = []
    for i in range(data[length_of].shape[0]):
        row: dict[str, Any] = {}
        for col in columns:
            if col.name not in data:
                if col.old_files is not OMIT:
                    row[col.name] = col.old_files
                continue
            v = data[col.name][i].item()
            if col.dtype == "f8":
                v = None if math.isnan(v) else v
            elif col.dtype == "i8" and v == col.absent:
                v = None  # written for a value the record did not give
            elif col.dtype == "u1":
                v = bool(v)
            row[col.name] = v
        rows.append(row)
    return rows


def _read_run(key: str, g: h5py.Group, version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """Decode runs/<key> back into the record that was appended (None where it had none).

    A group of a file of schema version 1 reads as a version-2 record: its fields added since read
    as the values version-1 code kept in `extra` (where train's output went before the table named
    it: train_time_s, target, evaluations, ...), else as None; the curve as [] if `extra` has none.
    KeyError/ValueError where the group does not follow the schema (a field of its version missing,
    a value that does not decode); the store turns them into ResultsError.
    """
    a = g.attrs
    rec: dict[str, Any] = json.loads(_attr_str(a.get("extra", "{}")))
    rec["key"] = key
    subs: dict[str, dict[str, Any]] = {}
    for field in RUN_FIELDS:
        if field.old_files is not ORIGINAL and field.name not in a:
            if not field.path:
                rec.setdefault(field.name, field.old_files)  # written before the field existed
            continue
        try:
            value = _decode(field, a[field.name])
        except (ValueError, TypeError, OverflowError) as exc:
            raise ValueError(f"field {field.name}: {str(exc)[:80]}") from None
        if field.path:
            subs.setdefault(field.path[0], {})[field.path[1]] = value
        else:
            rec[field.name] = value
    for name, sub in subs.items():  # a sub-object whose every field is absent was absent: None
        for f in RUN_FIELDS:  # a field of it added after this group was written
            if f.path[:1] == (name,) and f.path[1] not in sub:
                sub[f.path[1]] = f.old_files
        rec[name] = sub if any(v is not None for v in sub.values()) else None
    for name in {f.path[0] for f in RUN_FIELDS if f.path}:
        rec.setdefault(name, None)  # a group written before the sub-object existed, without it in `extra`
    rec["epochs"] = _read_columns(g, EPOCH_FIELDS, "epoch", RENAMED_BEFORE_3 if version < 3 else None)
    if version >= 2:
        rec[CURVE_GROUP] = _read_columns(g[CURVE_GROUP], EVAL_FIELDS, "step")
    else:
        curve = rec.get(CURVE_GROUP)  # version 1: no curve group; the curve in `extra` if the run printed one
        rec[CURVE_GROUP] = [{c.name: pt.get(c.name) for c in EVAL_FIELDS if c.old_files is not OMIT or c.name in pt}
                            for pt in curve if isinstance(pt, dict)] \
            if isinstance(curve, list) else []
    checks.check_record(rec, FLOAT_FIELDS, tuple(c.name for c in EPOCH_FIELDS), tuple(c.name for c in EVAL_FIELDS))
    return rec


def _read_identity(g: h5py.Group) -> dict[str, Any]:
    """What the run of group g was (IDENTITY_*_ATTRS and `config`), from attributes only."""
    a = g.attrs
    ident: dict[str, Any] = {}
    for name in IDENTITY_INT_ATTRS:
        v = int(a[name])
        ident[name] = None if v == -1 else v
    for name in IDENTITY_STR_ATTRS:
        ident[name] = _attr_str(a[name])
    config = json.loads(_attr_str(a["config"]))
    ident["config"] = config if isinstance(config, dict) else {}
    return ident


def _init_file(f: h5py.File) -> None:
    """The root of a new results file: what it is and which version."""
    f.attrs["schema"] = SCHEMA
    f.attrs["schema_version"] = np.int64(SCHEMA_VERSION)
    f.attrs["created_at"] = _now()
    f.create_group("runs")
