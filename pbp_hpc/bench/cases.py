"""What the benchmark measures: the Spec sent to the workers, the splits of the cores, and the
cases of one (network, batch) group, with the config overrides each case trains under."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from pbp_hpc.parallel import hybrid

NETWORKS = {**hybrid.NAMES, "tiny": [784, 32, 10]}  # Net-1h and Net-2h as pbp_hpc.hybrid names them
LEARNING_RATE = 0.1  # any stable rate: timings do not depend on it
SEED = 0


@dataclass
class Spec:
    """Everything the worker needs; sent to it as JSON."""

    mode: str
    nets: list[str]
    batches: list[int]
    reps: int
    warmup_steps: int
    n_train: Optional[int]  # None: the whole training split
    data_dir: Optional[str]
    synthetic: bool
    reducer: str
    compare_reducers: bool
    compare_dense: bool  # add 1 x 1 rows with train.skip_zero_inputs off
    compare_optimizers: bool  # add /nesterov rows (the momentum buffer's cost) and a /default row
    torch: bool
    pin: bool
    peak_n: int  # side of the square SGEMM that defines peak
    cores: int
    mem_steps: int = 3
    clock: str = "wall"  # or "cpu": one-thread cases timed by CPU time (see Worker.cpu_clock)
    jax: bool = True  # the JAX peer's cases (pbp_hpc.bench.jax_peer)
    typed: bool = True  # an `as typed` row per group (pbp_hpc.bench.typed), run by the parent after the job
    grids: bool = True  # add the model-parallel rows (GRIDS: tensor 2, pipeline 2) beside data 2

    def overrides(self, layers: list[int], batch: int, reducer: str, variant: str = "", grid: str = "") -> list[str]:
        """`--set` items for a config with this network, batch and reducer, a VARIANTS entry and a
        GRIDS entry (the grid is always stated: a row is data-parallel unless it names its grid)."""
        out = [f"model.layers={layers}", f"train.batch_size={batch}", f"train.learning_rate={LEARNING_RATE}",
               *VARIANTS[variant], f"train.seed={SEED}", "model.dtype=float32", f"parallel.reducer={reducer}",
               "train.progress=false", *GRIDS[grid]]
        return out + self.data_overrides()

    def data_overrides(self) -> list[str]:
        """`--set` items for the data every case trains on."""
        return data_sets(self.synthetic, self.data_dir, self.n_train)

    def typed_overrides(self, layers: list[int], batch: int) -> list[str]:
        """`--set` items of the `as typed` row: the case's network, training setup, batch and data,
        and the epochs; none of the tuning the other rows get (reducer, threads, binding, skipping)."""
        return [f"model.layers={layers}", f"train.batch_size={batch}", f"train.learning_rate={LEARNING_RATE}",
                *TRAINING, f"train.epochs={self.reps + 1}", *self.data_overrides()]


def data_sets(synthetic: bool, data_dir: Optional[str], n_train: Optional[int]) -> list[str]:
    """`--set` items for a benchmark's data: synthetic, or MNIST from data_dir; the first n_train examples."""
    out = ["data.name=synthetic", "data.n_test=10"] if synthetic else [f"data.dir={data_dir}"] if data_dir else []
    return out + ([f"data.n_train={n_train}"] if n_train is not None else [])


def make_spec(args: argparse.Namespace, cores: int) -> Spec:
    if args.smoke:
        return Spec("smoke", ["tiny"], [64], reps=1, warmup_steps=1, n_train=600, data_dir=None, synthetic=True,
                    reducer=args.reducer, compare_reducers=False, compare_dense=False, compare_optimizers=False, torch=not args.no_torch, pin=args.pin,
                    peak_n=256, cores=cores, mem_steps=2, clock=args.clock, jax=not args.no_jax, typed=args.typed, grids=args.grids)
    quick = args.quick
    return Spec("quick" if quick else "full", args.nets or ["Net-1h", "Net-2h"],
                args.batches or ([128, 1024] if quick else [128, 1024, 4096]),
                reps=args.reps or 3, warmup_steps=3, n_train=args.n_train or (10000 if quick else None),
                data_dir=args.data_dir, synthetic=False, reducer=args.reducer,
                compare_reducers=args.compare_reducers if args.compare_reducers is not None else not quick,
                compare_dense=args.compare_dense, compare_optimizers=args.compare_optimizers,
                torch=not args.no_torch, pin=args.pin, peak_n=2048, cores=cores, clock=args.clock,
                jax=not args.no_jax, typed=args.typed, grids=args.grids)


def splits_of(cores: int) -> list[tuple[int, int]]:
    """Every way to use all the cores as ranks x threads, after the 1 x 1 baseline."""
    out = [(1, 1)]
    out += [(r, cores // r) for r in range(1, cores + 1) if cores % r == 0 and (r, cores // r) != (1, 1)]
    return out


# What each row measures: the report's setup, stated (the built-in defaults are another), and
# variants of it that rows with a /VARIANT label add at batch 1024.
TRAINING = ["model.activation=sigmoid", "model.loss=mse", "model.init=glorot_uniform", "optimizer.name=sgd",
            "schedule.name=constant", "schedule.warmup_epochs=0", "schedule.scale_with_batch=none"]  # what is trained, not how fast
REPORT = [*TRAINING, "train.skip_zero_inputs=true"]
VARIANTS = {
    "": REPORT,
    "dense": [*REPORT, "train.skip_zero_inputs=false"],  # every input column in the first layer's GEMMs
    "nesterov": [*REPORT, "optimizer.name=nesterov"],  # what a momentum buffer costs per step
    "default": ["train.skip_zero_inputs=true"],  # the built-in defaults: relu, cross-entropy, Nesterov, cosine
}


# The grid of a case (pbp_hpc/parallel/grid.py): data-parallel over all its ranks unless it names
# one of these. The model-parallel rows (issue 27) run at 2 ranks x 1 thread beside data 2.
MICROBATCHES = 8  # pipeline rows: each global batch in 8 parts, 1F1B (at most S microbatches held)
GRIDS = {
    "": ["parallel.grid=manual", "parallel.tensor=1", "parallel.pipeline=1"],
    "tensor2": ["parallel.grid=manual", "parallel.tensor=2", "parallel.pipeline=1"],
    "pipeline2": ["parallel.grid=manual", "parallel.tensor=1", "parallel.pipeline=2",
                  f"parallel.microbatches={MICROBATCHES}", "parallel.pipeline_schedule=1f1b"],
}
GRID_LABELS = {"tensor2": "tensor2", "pipeline2": f"pipeline2(M{MICROBATCHES})"}


@dataclass(frozen=True)
class Case:
    kind: str  # ours | gemm | torch | jax
    ranks: int
    threads: int
    reducer: str = ""
    variant: str = ""  # a VARIANTS key
    grid: str = ""  # a GRIDS key: "" is data parallelism over every rank of the case

    @property
    def label(self) -> str:
        base = f"{self.ranks}x{self.threads}"
        if self.grid:
            return f"{base}/{GRID_LABELS[self.grid]}"
        return f"{base}/{self.reducer}" if self.reducer else f"{base}/{self.variant}" if self.variant else base


def cases_for(spec: Spec, net: str, batch: int) -> list[Case]:
    """The cases of one (network, batch) group, interleaved by split."""
    out: list[Case] = []
    for r, t in splits_of(spec.cores):
        out += [Case("ours", r, t), Case("gemm", r, t)]
        if spec.torch and r == 1:
            out.append(Case("torch", 1, t))
        if spec.jax and r == 1:
            out.append(Case("jax", 1, t))
    if spec.compare_dense and batch == 1024:  # one batch size: the full run must stay under 10 minutes
        out += [Case("ours", 1, 1, variant="dense"), Case("gemm", 1, 1, variant="dense")]
    if spec.compare_optimizers and batch == 1024:
        out += [Case("ours", 1, 1, variant="nesterov"), Case("ours", 1, 1, variant="default")]
        if spec.cores > 1:
            out.append(Case("ours", spec.cores, 1, variant="nesterov"))
    if spec.cores > 1 and spec.reducer != "shared_batch" and not (spec.compare_reducers and net == "Net-1h"):
        out.append(Case("ours", spec.cores, 1, "shared_batch"))  # what auto picks at small batches
    if spec.compare_reducers and net == "Net-1h" and spec.cores > 1:
        out += [Case("ours", spec.cores, 1, red) for red in ("blocking", "overlap", "shm", "shared_batch") if red != spec.reducer]
    if spec.grids and spec.cores >= 2:  # the model in parts, at the 2-core split, beside data 2 (the 2 x 1 rows)
        out += [Case("ours", 2, 1, "auto", grid=g) for g in ("tensor2", "pipeline2")]
    return out
