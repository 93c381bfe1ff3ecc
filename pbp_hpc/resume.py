"""Where a run stops and how it continues: the checkpoint a training run writes and resumes.

The format is pbp_hpc.checkpoint's; this module decides what goes in (parameters, the
strategy's and optimizer's state, the epochs recorded so far), where it goes (checkpoint.path,
or one per Slurm job), and what a resumed run must share with the run that wrote it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

from pbp_hpc import checkpoint
from pbp_hpc.checkpoint import CheckpointError
from pbp_hpc.config import Config
from pbp_hpc.engine import backend
from pbp_hpc.parallel import runtime

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
    if cfg.parallel.strategy != "allreduce":  # (absent for allreduce: checkpoints from before strategies still resume)
        p = d["parallel"]
        key["strategy"] = {k: p[k] for k in ("strategy", "local_steps", "staleness_bound", "meet_every_steps")}
    return key


def check_target(cfg: Config) -> None:
    """Before training, not hours later: a checkpoint can be written where the config says."""
    if cfg.checkpoint.path or cfg.checkpoint.every_epochs:
        checkpoint.check_target(checkpoint_path(cfg))


def save(st: Any, epoch: int, step: int, records: list[dict[str, Any]], extra: Optional[dict[str, Any]] = None) -> Path:
    """Rank 0 writes where the next step would begin; every rank returns once it is written.

    extra: more JSON-able state of the loop (the evaluation curve, training time so far),
    returned by try_resume as it was given."""
    path = checkpoint_path(st.cfg)
    if st.comm.rank == 0:
        meta = {"resume_key": resume_key(st.cfg), "ranks": st.comm.size, "records": records, "extra": extra or {}}
        state = {name: backend.to_host(buf) for name, buf in st.strategy.state().items()}
        checkpoint.save(path, backend.to_host(st.theta), epoch, step, meta, state)
    st.comm.Barrier()
    return path


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
    if meta["resume_key"] != resume_key(cfg):
        differ = sorted(k for k, v in resume_key(cfg).items() if meta["resume_key"].get(k) != v)
        raise CheckpointError(f"checkpoint {path} was written by a run with other model/data/training settings "
                              f"(they differ in {', '.join(differ) or 'their keys'}); refusing to resume it")
    if not isinstance(meta["ranks"], int) or isinstance(meta["ranks"], bool) or meta["ranks"] < 1:
        raise bad("ranks", f"expected a positive integer, found {str(meta['ranks'])[:40]!r}")
    if meta["ranks"] != ranks:
        raise CheckpointError(
            f"checkpoint {path} was written by a {meta['ranks']}-rank run and this run has {ranks}; "
            "resume with the same rank count (a different count sums gradients in another order, so the result "
            "would not be bit-for-bit that of an uninterrupted run)"
        )
    records = meta["records"]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise bad("records", "expected a list of epoch records (objects)")
    for i, r in enumerate(records):
        if not isinstance(r.get("epoch"), int) or isinstance(r.get("epoch"), bool) or r["epoch"] < 0:
            raise bad(f"records[{i}].epoch", f"expected a non-negative integer, found {str(r.get('epoch'))[:40]!r}")
        for k in ("loss", "time_s", "compute_s", "allreduce_s", "gflops"):
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
    state = {name: (tuple(buf.shape), str(buf.dtype)) for name, buf in st.strategy.state().items()}
    steps = -(-len(st.data.train) // cfg.train.batch_size)
    return checkpoint.Expect(st.n_params, cfg.model.dtype, state, cfg.train.epochs, steps)


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
    ck = runtime.together(st.comm, lambda: _read(path, cfg, expect, st.comm.size) if st.comm.rank == 0 else None,
                          name_ranks=False)
    ck = st.comm.bcast(ck, root=0)
    if ck is None:
        log(f"no checkpoint at {path}: starting from scratch")
        return 0, 0, [], {}
    state = st.strategy.state()
    st.theta[...] = st.xp.asarray(ck["theta"])
    for name, buf in state.items():
        buf[...] = st.xp.asarray(ck["state"][name])
    log(f"resumed from {path} at epoch {ck['epoch']} step {ck['step']}")
    return ck["epoch"], ck["step"], ck["meta"]["records"], ck["meta"].get("extra") or {}
