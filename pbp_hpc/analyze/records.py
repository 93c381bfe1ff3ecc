"""Run records: reading them from files, and the quantities one run record yields on its own.

A record is the dict `train --json` prints, plus the sweep's keys (sweep, point, repetition,
implementation, network, ...) when it comes from an HDF5 results file. Plain `train --json`
output lacks the sweep's labels, so they are derived from the record's config here, in one
place, for everything downstream.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Optional

from pbp_hpc.errors import ResultsError

Record = dict[str, Any]

# The report's order of implementations: tables and figures list them this way.
IMPLEMENTATIONS = ("naive-serial", "example-parallel", "blas-serial", "blas-threaded", "hybrid", "gpu", "framework")
NETWORK_NAMES = {(784, 1024, 10): "net1h", (784, 1024, 1024, 10): "net2h"}
DTYPE_BYTES = {"float32": 4, "float64": 8}


# ---------------------------------------------------------------------------------------------
# Reading records


def _read_json_records(path: Path) -> list[Record]:
    text_ = path.read_text()
    try:
        data = json.loads(text_)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        # JSON lines, e.g. several `train --json` outputs appended to one file.
        return [json.loads(line) for line in text_.splitlines() if line.strip().startswith("{")]


def _checked(rec: Any, path: str, i: int) -> Record:
    """A JSON record whose numbers the tables and figures can use (results.checks)."""
    from pbp_hpc.results.checks import check_record
    from pbp_hpc.results.schema import FLOAT_FIELDS

    if not isinstance(rec, dict):
        raise ResultsError(f"{path}: record {i} is a {type(rec).__name__}, not an object")
    try:
        check_record(rec, FLOAT_FIELDS)
    except ResultsError as exc:
        raise ResultsError(f"{path}: record {i}: {exc}") from None
    return rec


def read_records(paths: list[str]) -> list[Record]:
    """Records from HDF5 results files (pbp_hpc.results) and from JSON / JSON-lines files."""
    records: list[Record] = []
    h5 = [p for p in paths if not p.endswith((".json", ".jsonl"))]
    for p in paths:
        if p.endswith((".json", ".jsonl")):
            try:
                found = _read_json_records(Path(p))
            except (OSError, ValueError, RecursionError) as exc:
                raise ResultsError(f"cannot read run records from {p}: {exc}") from None
            records += [_checked(rec, p, i) for i, rec in enumerate(found)]
    if h5:
        # Imported only when needed: JSON input must work without h5py.
        try:
            from pbp_hpc.results import read_runs
        except ImportError as exc:
            raise ResultsError(f"reading HDF5 results needs pbp_hpc.results ({exc})") from None
        records += read_runs(h5)
    return records


# ---------------------------------------------------------------------------------------------
# What one record says about its run


def _cfg(rec: Record, *path: str) -> Any:
    node: Any = rec.get("config") or {}
    for p in path:
        node = node.get(p) if isinstance(node, dict) else None
    return node


def network_of(rec: Record) -> str:
    """The record's network label; derived from the layer sizes for records without one."""
    if rec.get("network"):
        return str(rec["network"])
    layers = _cfg(rec, "model", "layers")
    return NETWORK_NAMES.get(tuple(layers), str(layers)) if layers else "?"


def dtype_of(rec: Record) -> str:
    """The model's precision; float32, the config's default, when the record does not say."""
    return _cfg(rec, "model", "dtype") or "float32"


def batch_of(rec: Record) -> Optional[int]:
    b = rec.get("batch_size") or _cfg(rec, "train", "batch_size")
    return int(b) if b else None


def implementation_of(rec: Record) -> str:
    """The record's implementation; inferred from its config for plain `train --json` output."""
    if rec.get("implementation"):
        return str(rec["implementation"])
    if "framework" in (rec.get("provenance") or {}):
        return "framework"
    if _cfg(rec, "backend") == "cupy":
        return "gpu"
    ranks, threads = rec.get("ranks") or 1, rec.get("threads_per_rank") or 1
    if _cfg(rec, "algorithm") == "per_example":
        return "naive-serial" if ranks == 1 else "example-parallel"
    if ranks > 1:
        return "hybrid"
    return "blas-serial" if threads == 1 else "blas-threaded"


def timed_epochs(rec: Record) -> list[dict[str, Any]]:
    """The epochs that count for timing: after the first warmup_epochs, not partial, with a time."""
    skip = rec.get("warmup_epochs") or 0
    return [e for e in (rec.get("epochs") or [])[skip:] if not e.get("partial") and e.get("time_s") is not None]


def run_tpe(rec: Record) -> Optional[float]:
    """Time per epoch of one run: median of its timed epochs' (slowest-rank) times."""
    times = [e["time_s"] for e in timed_epochs(rec)]
    return float(statistics.median(times)) if times else None


def _median_of(rec: Record, fn: Callable[[dict[str, Any]], Optional[float]]) -> Optional[float]:
    values = [v for v in (fn(e) for e in timed_epochs(rec)) if v is not None and math.isfinite(v)]
    return float(statistics.median(values)) if values else None


def run_comm_fraction(rec: Record) -> Optional[float]:
    """Median over timed epochs of comm_s / time_s (the transfers; waits for other ranks are wait_s)."""
    return _median_of(rec, lambda e: e["comm_s"] / e["time_s"] if e.get("comm_s") is not None and e["time_s"] > 0 else None)


def run_fraction(rec: Record, part: str) -> Optional[float]:
    """Median over timed epochs of part / time_s (part: compute_s, comm_s, wait_s, other_s); None
    where the epochs do not give it (wait_s in files of results schema <= 2)."""
    return _median_of(rec, lambda e: e[part] / e["time_s"] if e.get(part) is not None and e["time_s"] > 0 else None)


def run_examples(rec: Record) -> Optional[float]:
    return _median_of(rec, lambda e: e.get("examples") if (e.get("examples") or 0) > 0 else None)


def steps_per_epoch(examples: float, batch: int) -> int:
    return math.ceil(examples / batch)


def run_compute_per_example(rec: Record) -> Optional[float]:
    """Seconds of compute per example (compute_s / examples), median over timed epochs."""
    return _median_of(rec, lambda e: e["compute_s"] / e["examples"] if e.get("compute_s") is not None and (e.get("examples") or 0) > 0 else None)


def run_allreduce_per_step(rec: Record) -> Optional[float]:
    """Seconds in Allreduce per step; None for 1-rank runs and for the overlapping reducer
    (whose comm_s is only the wait left after overlap, not the Allreduce's length)."""
    batch = batch_of(rec)
    if (rec.get("ranks") or 1) < 2 or batch is None or (_cfg(rec, "parallel", "reducer") or "blocking") != "blocking":
        return None
    return _median_of(rec, lambda e: e["comm_s"] / steps_per_epoch(e["examples"], batch)
                      if e.get("comm_s") is not None and (e.get("examples") or 0) > 0 else None)


def run_node_share(rec: Record) -> Optional[tuple[int, int]]:
    """(ranks on rank 0's node, cores they could use together), from the binding the run
    recorded; for older records, the cores rank 0 saw with every rank taken to share them.
    None where the record says neither."""
    prov = rec.get("provenance") or {}
    cpus = (prov.get("binding") or {}).get("cpus")
    if cpus:
        return len(cpus), len(set().union(*map(set, cpus)))
    if prov.get("cores"):
        return int(rec.get("ranks") or 1), int(prov["cores"])
    return None


def run_oversubscribed(rec: Record) -> Optional[bool]:
    """Whether the run had more threads than cores on its (rank 0's) node: ranks x threads >
    cores. Such a run measures time-sharing of cores, not scaling."""
    share = run_node_share(rec)
    if share is None:
        return None
    on_node, cores = share
    return on_node * int(rec.get("threads_per_rank") or 1) > cores


def gradient_bytes(rec: Record) -> Optional[int]:
    """Bytes one Allreduce moves: the gradient (its two extra scalars are negligible)."""
    n, dtype = rec.get("n_params"), dtype_of(rec)
    return int(n) * DTYPE_BYTES.get(dtype, 4) if n else None


def grid_of(rec: Record) -> tuple[int, int, int]:
    """(data, tensor, pipeline) of the run's process grid: recorded, else from its config
    (parallel.tensor, parallel.pipeline; data = ranks / (tensor x pipeline))."""
    g = rec.get("grid")
    if isinstance(g, dict) and g.get("data"):
        return int(g["data"]), int(g.get("tensor") or 1), int(g.get("pipeline") or 1)
    T, S = int(_cfg(rec, "parallel", "tensor") or 1), int(_cfg(rec, "parallel", "pipeline") or 1)
    return max(1, int(rec.get("ranks") or 1) // (T * S)), T, S


def model_split(rec: Record) -> bool:
    """Whether the run splits the model itself (tensor or pipeline): such runs are compared in
    analyze.model_parallel, not taken for a data-parallel point of the same ranks."""
    _, T, S = grid_of(rec)
    return T > 1 or S > 1
