"""What a run record read back may hold: checked once, when it is read, so that no reader
(analyze, results show, merge) meets a value it cannot compute with.

Two layers: check_columns looks at a table's datasets before any is read (1-D, numbers, equal
lengths, a bounded row count); check_record looks at the decoded record (every number a reader
uses finite and of its type: both schema versions, whose version-1 files kept some of these
fields in free-form JSON). Failures are ResultsError naming the field; the store adds the file
and the run.
"""

from __future__ import annotations

import math
from typing import Any

from pbp_hpc.errors import ResultsError

MAX_ROWS = 10_000_000  # epochs or evaluation passes of one run: far past any real run, and cheap to hold
# fields of record["target"] and how each is typed
TARGET_NUMBERS = ("accuracy", "val_accuracy", "time_s", "eval_time_s", "wall_s", "epochs")
FRACTIONS = {"val_accuracy", "accuracy", "test_accuracy", "best_val_accuracy"}  # between 0 and 1


def check_columns(g: Any, names: list[str], where: str) -> None:
    """The present datasets of a table group: 1-D arrays of numbers, of one length, bounded."""
    import h5py

    lengths: dict[str, int] = {}
    for name in names:
        if name not in g:
            continue
        ds = g[name]
        if not isinstance(ds, h5py.Dataset):
            raise ResultsError(f"field {where}.{name}: expected a 1-D array, found a {type(ds).__name__}")
        if ds.dtype.names is not None or ds.dtype.kind not in "iufb":
            raise ResultsError(f"field {where}.{name}: expected numbers, found dtype {ds.dtype}")
        if ds.shape is None or len(ds.shape) != 1:
            raise ResultsError(f"field {where}.{name}: expected a 1-D array, found shape {ds.shape}")
        if ds.shape[0] > MAX_ROWS:
            raise ResultsError(f"field {where}.{name}: {ds.shape[0]} rows, more than the limit of {MAX_ROWS}")
        lengths[name] = ds.shape[0]
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k} {v}" for k, v in lengths.items())
        raise ResultsError(f"field {where}: its columns differ in length ({shown})")


def _number(value: Any, field: str, integer: bool = False) -> None:
    """None, or a finite number (an integer where `integer`); a fraction within [0, 1]."""
    if value is None:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ResultsError(f"field {field}: expected {'an integer' if integer else 'a number'} or null, "
                           f"found {type(value).__name__} {str(value)[:40]!r}")
    if not math.isfinite(value):
        raise ResultsError(f"field {field}: expected a finite number, found {value}")
    if field.rsplit(".", 1)[-1] in FRACTIONS and not 0.0 <= value <= 1.0:
        raise ResultsError(f"field {field}: expected a fraction between 0 and 1, found {value}")


def _rows(rows: Any, field: str, ints: tuple[str, ...], flags: tuple[str, ...] = ()) -> None:
    if not isinstance(rows, list):
        raise ResultsError(f"field {field}: expected a list, found {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ResultsError(f"field {field}[{i}]: expected an object, found {type(row).__name__}")
        for name, value in row.items():
            if name in flags:
                if value is not None and not isinstance(value, bool):
                    raise ResultsError(f"field {field}[{i}].{name}: expected true, false or null, found {str(value)[:40]!r}")
            else:
                _number(value, f"{field}[{i}].{name}", integer=name in ints)


def check_record(rec: dict[str, Any], float_fields: tuple[str, ...], epoch_names: tuple[str, ...] = (),
                 eval_names: tuple[str, ...] = ()) -> None:
    """The numbers of a decoded record: top-level floats, target, epochs and the curve. With
    epoch_names/eval_names (a record read from a results file), no other key is allowed in a row."""
    for name in float_fields:
        _number(rec.get(name), name)
    target = rec.get("target")
    if target is not None:
        if not isinstance(target, dict):
            raise ResultsError(f"field target: expected an object or null, found {type(target).__name__}")
        for name in TARGET_NUMBERS:
            _number(target.get(name), f"target.{name}")
        _number(target.get("steps"), "target.steps", integer=True)
        if target.get("reached") is not None and not isinstance(target["reached"], bool):
            raise ResultsError(f"field target.reached: expected true, false or null, found {str(target['reached'])[:40]!r}")
    epochs = rec.get("epochs") or []
    _rows(epochs, "epochs", ints=("epoch", "examples", "steps_done"), flags=("partial",))
    curve = rec.get("evaluations") or []
    _rows(curve, "evaluations", ints=("epoch", "step"))
    for i, row in enumerate(curve if eval_names else []):
        unknown = set(row) - set(eval_names)
        if unknown:
            raise ResultsError(f"field evaluations[{i}]: unknown key(s) {', '.join(sorted(map(str, unknown)))[:80]}")
    for i, row in enumerate(epochs if epoch_names else []):
        unknown = set(row) - set(epoch_names)
        if unknown:
            raise ResultsError(f"field epochs[{i}]: unknown key(s) {', '.join(sorted(map(str, unknown)))[:80]}")
