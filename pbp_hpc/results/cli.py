"""`python -m pbp_hpc.results merge|show`: combine results files and list their runs, one line each."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from pbp_hpc.errors import ResultsError
from pbp_hpc.results.store import merge, read_runs


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


def to_target(record: dict[str, Any]) -> str:
    """Training time to the target accuracy: "12.3s@0.95", "not@0.95" (not reached), "-" (no target)."""
    target = record.get("target")
    if not isinstance(target, dict) or target.get("accuracy") is None:
        return "-"
    if target.get("reached") and target.get("time_s") is not None:
        return f"{target['time_s']:.3g}s@{target['accuracy']:g}"
    return f"not@{target['accuracy']:g}"


def show_lines(records: Iterable[dict[str, Any]]) -> list[str]:
    """A table, one line per run: key, status, what ran, how fast, how well, and why it failed."""
    rows = [["key", "status", "implementation", "network", "batch", "PxT", "epochs", "TPE_s", "test_acc", "to_target",
             "error"]]
    for r in records:
        t, acc = tpe(r), r.get("test_accuracy")
        rows.append([r["key"], r["status"], r["implementation"], r["network"], str(r.get("batch_size") or "-"),
                     f"{r.get('ranks')}x{r.get('threads_per_rank')}", str(len(r["epochs"])),
                     "-" if t is None else f"{t:.4f}", "-" if acc is None else f"{acc:.4f}", to_target(r),
                     headline(r.get("error") or "")[:120]])
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
