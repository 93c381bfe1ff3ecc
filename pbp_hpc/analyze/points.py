"""Points: the repetitions of one measured configuration, grouped and summarised.

A point is one (case, batch size, implementation, ranks, threads) with the medians over its
repetitions. Every table and figure of performance is built from points; runs that cannot become
part of a point (failed, diverged, timed out, untimed) become problem rows, so none is dropped
silently -- except an ok run with a target accuracy that stopped before a timed epoch: the
time-to-accuracy table (pbp_hpc.analyze.accuracy) lists it.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from pbp_hpc.analyze.records import (
    IMPLEMENTATIONS,
    Record,
    batch_of,
    dtype_of,
    gradient_bytes,
    implementation_of,
    model_split,
    network_of,
    run_allreduce_per_step,
    run_comm_fraction,
    run_fraction,
    run_compute_per_example,
    run_examples,
    run_node_share,
    run_oversubscribed,
    run_tpe,
)

SPREAD_WARN = 0.10  # repetitions whose (max - min) / median TPE exceeds this are flagged


@dataclass(frozen=True, order=True)
class Case:
    """What makes TPEs comparable at all: the network, its precision, the training set size."""

    network: str
    dtype: str
    n_train: int

    def label(self) -> str:
        return f"{self.network} ({self.dtype}, {self.n_train} training examples)"


@dataclass
class Point:
    case: Case
    batch_size: int
    implementation: str
    ranks: int
    threads: int
    reps: int
    tpe_s: float  # median over repetitions of the runs' TPEs
    tpe_min_s: float
    tpe_max_s: float
    gflops: Optional[float]
    comm_fraction: Optional[float]
    test_accuracy: Optional[float]
    compute_per_example_s: Optional[float]
    allreduce_per_step_s: Optional[float]
    gradient_bytes: Optional[int]
    examples: Optional[float]
    oversubscribed: Optional[bool] = None  # ranks x threads > cores on a node, in any repetition; None: not recorded
    ranks_per_node: Optional[int] = None  # ranks on rank 0's node (fewer than ranks: the run spanned nodes)
    # where the epoch's time goes (results schema 3): shares of compute, waiting, other; comm is comm_fraction
    compute_fraction: Optional[float] = None
    wait_fraction: Optional[float] = None
    other_fraction: Optional[float] = None

    @property
    def cores(self) -> int:
        return self.ranks * self.threads

    @property
    def spread(self) -> float:
        """(max - min) / median of the repetitions' TPEs; 0 for one repetition."""
        return (self.tpe_max_s - self.tpe_min_s) / self.tpe_s if self.tpe_s > 0 else 0.0

    @property
    def spread_warning(self) -> bool:
        return self.reps > 1 and self.spread > SPREAD_WARN

    @property
    def label(self) -> str:
        return f"{self.implementation} {self.ranks}x{self.threads}"


def _median(values: Iterable[Optional[float]]) -> Optional[float]:
    vs = [v for v in values if v is not None]
    return float(statistics.median(vs)) if vs else None


def case_of(rec: Record) -> Case:
    return Case(network_of(rec), dtype_of(rec), int(rec.get("n_train") or 0))


def _point_key(rec: Record) -> tuple[Any, ...]:
    # The field order of Point: make_point passes the key positionally.
    return (case_of(rec), batch_of(rec), implementation_of(rec), int(rec.get("ranks") or 1), int(rec.get("threads_per_rank") or 1))


def make_point(key: tuple[Any, ...], runs: list[Record]) -> Point:
    tpes = [run_tpe(r) for r in runs]
    examples = _median(run_examples(r) for r in runs)
    tpe = float(statistics.median(tpes))
    flops = _median(r.get("flops_per_example") for r in runs)
    return Point(*key, reps=len(runs), tpe_s=tpe, tpe_min_s=min(tpes), tpe_max_s=max(tpes),
                 gflops=flops * examples / tpe / 1e9 if flops and examples and tpe > 0 else None,
                 comm_fraction=_median(run_comm_fraction(r) for r in runs),
                 test_accuracy=_median(r.get("test_accuracy") for r in runs),
                 compute_per_example_s=_median(run_compute_per_example(r) for r in runs),
                 allreduce_per_step_s=_median(run_allreduce_per_step(r) for r in runs),
                 gradient_bytes=gradient_bytes(runs[0]), examples=examples,
                 oversubscribed=_any_known(run_oversubscribed(r) for r in runs),
                 ranks_per_node=min((s[0] for s in map(run_node_share, runs) if s), default=None),
                 **{f"{part}_fraction": _median(run_fraction(r, f"{part}_s") for r in runs)
                    for part in ("compute", "wait", "other")})


def _any_known(flags: Iterable[Optional[bool]]) -> Optional[bool]:
    known = [f for f in flags if f is not None]
    return any(known) if known else None


def problem_row(rec: Record, why: Optional[str] = None) -> dict[str, Any]:
    # The last line of the error: for a traceback, what went wrong.
    err = (why or rec.get("error") or "").strip().splitlines()
    return {"sweep": rec.get("sweep"), "point": rec.get("point"), "repetition": rec.get("repetition"),
            "network": network_of(rec), "batch_size": batch_of(rec), "implementation": implementation_of(rec),
            "ranks": rec.get("ranks"), "threads": rec.get("threads_per_rank"), "status": rec.get("status") or "?",
            "error": err[-1] if err else ""}


def aggregate(records: Iterable[Record]) -> tuple[list[Point], list[dict[str, Any]]]:
    """Group ok runs into points; every other run becomes a problem row."""
    groups: dict[tuple[Any, ...], list[Record]] = defaultdict(list)
    problems = []
    for rec in records:
        if rec.get("status", "ok") != "ok":
            problems.append(problem_row(rec))
        elif model_split(rec):
            continue  # tensor or pipeline: analyze.model_parallel compares them (a hybrid PxT here is data-parallel)
        elif batch_of(rec) is None:
            problems.append(problem_row(rec, "no batch size in the record"))
        elif run_tpe(rec) is None:
            if isinstance(rec.get("target"), dict) and rec["target"].get("accuracy") is not None:
                continue  # it stopped at its target before a timed epoch: the time-to-accuracy table has it
            problems.append(problem_row(rec, f"no timed epoch ({len(rec.get('epochs') or [])} epoch(s), "
                                             f"warmup_epochs={rec.get('warmup_epochs') or 0})"))
        else:
            groups[_point_key(rec)].append(rec)
    order = {name: i for i, name in enumerate(IMPLEMENTATIONS)}
    points = [make_point(k, v) for k, v in groups.items()]
    points.sort(key=lambda p: (p.case, p.batch_size, order.get(p.implementation, 99), p.implementation, p.ranks, p.threads))
    return points, problems


def find(points: list[Point], case: Case, batch: int, impl: str, ranks: int, threads: int) -> Optional[Point]:
    """The point of exactly this configuration, if it was measured."""
    return next((p for p in points if (p.case, p.batch_size, p.implementation, p.ranks, p.threads) == (case, batch, impl, ranks, threads)), None)
