"""Where a run stops and how it continues: the checkpoint a training run writes and resumes.

The format is pbp_hpc.checkpoint's; this module decides what goes in (parameters, the
strategy's and optimizer's state, the epochs recorded so far), where it goes (checkpoint.path,
or one per Slurm job), and what a resumed run must share with the run that wrote it.

The rank count may change between the run that wrote a checkpoint and the run that resumes it
(docs/elastic.md): allreduce's training does not depend on it (every rank draws the same order,
the global batch is fixed), local_sgd checkpoints at an average, where every rank holds the same
parameters and state, and the asynchronous strategies' per-worker state is written as the
workers' average and rescaled to the new count.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

from pbp_hpc import checkpoint, faults
from pbp_hpc.checkpoint import CheckpointError
from pbp_hpc.config import Config
from pbp_hpc.engine import backend
from pbp_hpc.engine.layout import Layout
from pbp_hpc.parallel import runtime, shards, strategies

Log = Callable[[str], None]


def checkpoint_path(cfg: Config) -> Path:
    if cfg.checkpoint.path:
        return Path(cfg.checkpoint.path)
    return Path(f"pbp_hpc-checkpoint-{os.environ.get('SLURM_JOB_ID', 'local')}.h5")


NEWER_KEYS = [("model", "label_smoothing"), ("optimizer", "trust_coefficient"), ("optimizer", "betas"),
              ("optimizer", "eps"), ("optimizer", "exclude_biases")]


def resume_key(cfg: Config) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it."""
    d = cfg.to_dict()
    key = {"model": d["model"], "data": d["data"], "algorithm": d["algorithm"], "optimizer": d["optimizer"],
           "schedule": d["schedule"],
           "train": {k: d["train"][k] for k in ("batch_size", "learning_rate", "seed", "shuffle")}}
    # keys newer than the checkpoint format, left out at their defaults: older checkpoints still resume
    for section, name in NEWER_KEYS:
        if d[section][name] == Config().to_dict()[section][name]:
            key[section] = {k: v for k, v in key[section].items() if k != name}
    if cfg.train.ema_decay:
        key["train"]["ema_decay"] = cfg.train.ema_decay
    facts = strategies.facts(cfg.parallel.strategy)
    # absent for a strategy with no settings that sums gradients (allreduce): checkpoints from before strategies resume
    if facts.keys or not facts.sums_gradients:
        key["strategy"] = {"strategy": cfg.parallel.strategy, **{k: d["parallel"][k] for k in facts.keys}}
    return key


def _legacy_key(cfg: Config) -> dict[str, Any]:
    """The key checkpoints of the shipped strategies had before strategies declared their settings
    (every strategy setting, whatever the strategy): they still resume."""
    key, p = resume_key(cfg), cfg.to_dict()["parallel"]
    if "strategy" in key:
        key["strategy"] = {k: p[k] for k in ("strategy", "local_steps", "staleness_bound", "meet_every_steps")}
    return key


# Strategies whose optimizer state (momentum's velocity) is each worker's own, fed by its share
# of the updates: the workers' velocities add up to the one allreduce keeps, so each holds about
# 1/P of it. A checkpoint holds their average; a run on P' ranks starts each worker at avg * P / P'.
# They are the strategies in which each rank applies its own update per share (splits_decay).
def per_worker_state(cfg: Config) -> bool:
    return bool(strategies.facts(cfg.parallel.strategy).splits_decay)


def periodic(cfg: Config) -> bool:
    """Whether the run checkpoints on its own (every N epochs, steps or seconds), not only on a signal."""
    c = cfg.checkpoint
    return bool(c.every_epochs or c.every_steps or c.every_seconds)


def check_target(cfg: Config) -> None:
    """Before training, not hours later: a checkpoint can be written where the config says."""
    if cfg.checkpoint.path or periodic(cfg):
        checkpoint.check_target(checkpoint_path(cfg))


def save(st: Any, epoch: int, step: int, records: list[dict[str, Any]], extra: Optional[dict[str, Any]] = None,
         arrays: Optional[dict[str, Any]] = None) -> Path:
    """Rank 0 writes where the next step would begin; every rank returns once it is written.

    extra: more JSON-able state of the loop (the evaluation curve, training time so far),
    returned by try_resume as it was given. arrays: the loop's parameter-shaped buffers (the
    best pass's parameters, LOOP_ARRAYS), returned by try_resume in extra under their names.
    A failure to write (rank 0 alone) is raised on every rank: no rank waits for a write that
    never comes."""
    path = checkpoint_path(st.cfg)
    # the whole model, gathered from the ranks that hold its parts (collective; rank 0 gets it)
    theta = st.whole(st.theta, root=0)
    if per_worker_state(st.cfg) and st.comm.size > 1:  # (never model-parallel)
        state = {name: _average(st.comm, backend.to_host(buf)) for name, buf in st.strategy.state().items()}
    else:
        state = {name: _whole_state(st, buf) for name, buf in st.strategy.state().items()}

    def write() -> None:
        faults.inject(st.cfg, st.comm.rank, "writes", CheckpointError)  # debug.fail_phase (tests)
        if st.comm.rank == 0:
            grid = st.grid
            # ranks: the data-parallel count, the one that fixes the order of the gradient sums
            meta = {"resume_key": resume_key(st.cfg), "ranks": grid.D, "grid": [grid.D, grid.T, grid.S],
                    "records": records, "extra": extra or {}}
            state.update({name: buf for name, buf in (arrays or {}).items() if buf is not None})
            checkpoint.save(path, theta, epoch, step, meta, state)

    runtime.together(st.comm, write, name_ranks=False)
    return path


def _whole_state(st: Any, buf: Any) -> Any:
    """A state buffer as the checkpoint holds it: parameter-shaped ones whole (gathered), others as they are."""
    if tuple(buf.shape) == (st.layout.n_params,):
        return st.whole(buf, root=0)
    return backend.to_host(buf)


def _average(comm: Any, buf: Any) -> Any:
    import numpy as np
    from mpi4py import MPI

    out = np.array(buf, copy=True)
    comm.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
    out /= comm.size
    return out


# parameter-shaped buffers of the training loop itself, stored beside the strategy's state
LOOP_ARRAYS = ("best_theta",)  # the best validation pass's parameters (train.save_model)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_meta(path: Path, meta: dict[str, Any], cfg: Config, ranks: int) -> None:
    """The meta a training run wrote: its structure, the settings it was made for, its rank count."""
    def bad(field: str, problem: str) -> CheckpointError:
        return checkpoint._bad(path, f"meta.{field}", problem)

    if not {"resume_key", "ranks", "records"} <= meta.keys():
        raise CheckpointError(f"{path} is a pbp_hpc checkpoint without the resume information (resume_key, ranks, records)")
    if not isinstance(meta["resume_key"], dict):
        raise bad("resume_key", "expected an object")
    if meta["resume_key"] not in (resume_key(cfg), _legacy_key(cfg)):
        ours, theirs = resume_key(cfg), meta["resume_key"]
        differ = sorted(str(k) for k in ours.keys() | theirs.keys() if theirs.get(k) != ours.get(k))
        saved = theirs.get("strategy") or {}
        saved = saved.get("strategy", "?") if isinstance(saved, dict) else "?"
        saved = "allreduce" if "strategy" not in theirs else saved  # (allreduce's key has no strategy part)
        if saved != cfg.parallel.strategy:
            raise CheckpointError(f"checkpoint {path} was written by a parallel.strategy={saved} run and this run is "
                                  f"parallel.strategy={cfg.parallel.strategy}; resume it with the strategy that wrote it")
        raise CheckpointError(f"checkpoint {path} was written by a run with other model/data/training settings "
                              f"(they differ in {', '.join(differ)[:200]}); refusing to resume it")
    if not isinstance(meta["ranks"], int) or isinstance(meta["ranks"], bool) or meta["ranks"] < 1:
        raise bad("ranks", f"expected a positive integer, found {str(meta['ranks'])[:40]!r}")
    if meta["ranks"] != ranks and cfg.data.scale_with_ranks:
        raise CheckpointError(
            f"checkpoint {path} was written by a {meta['ranks']}-rank run and this run has {ranks}; with "
            "data.scale_with_ranks the training set's size depends on the rank count, so resume with the same count"
        )
    records = meta["records"]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise bad("records", "expected a list of epoch records (objects)")
    for i, r in enumerate(records):
        if not isinstance(r.get("epoch"), int) or isinstance(r.get("epoch"), bool) or r["epoch"] < 0:
            raise bad(f"records[{i}].epoch", f"expected a non-negative integer, found {str(r.get('epoch'))[:40]!r}")
        if "allreduce_s" in r and "comm_s" not in r:  # written before results schema 3: its name then
            r["comm_s"] = r.pop("allreduce_s")
        for k in ("loss", "time_s", "compute_s", "comm_s", "wait_s", "other_s", "gflops"):
            if k in r and not _is_num(r[k]):
                raise bad(f"records[{i}].{k}", f"expected a finite number, found {str(r[k])[:40]!r}")
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise bad("extra", "expected an object")
    if "train_s" in extra and not (_is_num(extra["train_s"]) and extra["train_s"] >= 0):
        raise bad("extra.train_s", f"expected a non-negative number, found {str(extra['train_s'])[:40]!r}")
    if "evaluations" in extra and not (isinstance(extra["evaluations"], list)
                                       and all(isinstance(e, dict) for e in extra["evaluations"])):
        raise bad("extra.evaluations", "expected a list of objects")


def _read(path: Path, cfg: Optional[Config] = None, expect: Optional[checkpoint.Expect] = None,
          ranks: int = 1) -> Optional[dict[str, Any]]:
    """The checkpoint at path, every field checked against this run; None if there is none."""
    if not path.exists():
        return None
    ck = checkpoint.load(path, expect, check_meta=None if cfg is None else lambda m: _check_meta(path, m, cfg, ranks))
    if cfg is None and not {"resume_key", "ranks", "records"} <= ck["meta"].keys():
        raise CheckpointError(f"{path} is a pbp_hpc checkpoint without the resume information (resume_key, ranks, records)")
    return ck


def expect_of(st: Any) -> checkpoint.Expect:
    """What this run needs a checkpoint to hold (checked when it is opened, before any training)."""
    cfg = st.cfg
    n = st.layout.n_params
    whole = Layout(st.layout.sizes).n_params  # a checkpoint holds the whole model, whatever this rank holds
    state = {name: ((whole,) if tuple(buf.shape) == (n,) else tuple(buf.shape), str(buf.dtype))
             for name, buf in st.strategy.state().items()}
    steps = -(-len(st.data.train) // cfg.train.batch_size)
    return checkpoint.Expect(whole, cfg.model.dtype, state, cfg.train.epochs, steps)


def _shape_change(meta: dict[str, Any], grid: Any) -> str:
    """The resumed-from line's words on a change of rank count or grid: "" where there is none.
    meta.ranks counts data-parallel ranks (D); meta.grid, where written, gives the world."""
    was = meta.get("grid")
    if not (isinstance(was, list) and len(was) == 3 and all(isinstance(x, int) and x >= 1 for x in was)):
        was = [meta["ranks"], 1, 1]
    now = [grid.D, grid.T, grid.S]
    if was == now:
        return ""
    grids = "" if was[1:] == now[1:] == [1, 1] else \
        f"; grid data {was[0]} x tensor {was[1]} x pipeline {was[2]} -> data {now[0]} x tensor {now[1]} x pipeline {now[2]}"
    return f" (written by {math.prod(was)} rank(s), continuing on {math.prod(now)}{grids})"


def try_resume(st: Any, log: Log) -> tuple[int, int, list[dict[str, Any]], dict[str, Any]]:
    """(epoch, step, records, extra) to continue from: the checkpoint's, or (0, 0, [], {}) without one.

    Every field is checked on rank 0 before anything is trained: a refused checkpoint ends the
    run (exit 2) and so is never overwritten by it."""
    cfg = st.cfg
    if not cfg.checkpoint.resume:
        return 0, 0, [], {}
    path = checkpoint_path(cfg)
    expect = expect_of(st)
    # Rank 0 alone reads and sends what it found: every rank resumes from the same bytes, and a
    # rank on a node that sees another (or no) file cannot make the ranks disagree.
    ck = runtime.together(st.comm, lambda: _read(path, cfg, expect, st.grid.D) if st.comm.rank == 0 else None,
                          name_ranks=False)
    ck = st.comm.bcast(ck, root=0)
    if ck is None:
        log(f"no checkpoint at {path}: starting from scratch")
        return 0, 0, [], {}
    n = st.layout.n_params
    wrote = ck["meta"]["ranks"]
    # each worker's share of the velocity, for the new count (scaled before it is written: a
    # node-shared buffer is written by each of the node's ranks)
    per_worker = per_worker_state(cfg)
    scale = wrote / st.comm.size if wrote != st.comm.size and per_worker else 1.0
    shards.scatter_whole(st.layout, ck["theta"], st.theta, st.xp)  # each rank takes its part
    for name, buf in st.strategy.state().items():
        saved = ck["state"][name] * scale if scale != 1.0 else ck["state"][name]
        if tuple(buf.shape) == (n,) and not per_worker:
            shards.scatter_whole(st.layout, saved, buf, st.xp)
        else:
            buf[...] = st.xp.asarray(saved)
    st.strategy.restored()  # collective: where the strategy reads its parameters from holds these
    log(f"resumed from {path} at epoch {ck['epoch']} step {ck['step']}"
        + _shape_change(ck["meta"], st.grid))
    extra = dict(ck["meta"].get("extra") or {})
    extra.update({name: ck["state"][name] for name in LOOP_ARRAYS if name in ck["state"]})
    return ck["epoch"], ck["step"], ck["meta"]["records"], extra
