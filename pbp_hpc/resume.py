"""Where a run stops and how it continues: the checkpoint a training run writes and resumes.

The format is pbp_hpc.checkpoint's; this module decides what goes in (parameters, the
strategy's and optimizer's state, the epochs recorded so far), where it goes (checkpoint.path,
or one per Slurm job), and what a resumed run must share with the run that wrote it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

from pbp_hpc import checkpoint
from pbp_hpc.checkpoint import CheckpointError
from pbp_hpc.config import Config
from pbp_hpc.engine import backend
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import runtime

Log = Callable[[str], None]


def checkpoint_path(cfg: Config) -> Path:
    if cfg.checkpoint.path:
        return Path(cfg.checkpoint.path)
    return Path(f"pbp_hpc-checkpoint-{os.environ.get('SLURM_JOB_ID', 'local')}.h5")


def resume_key(cfg: Config) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it."""
    d = cfg.to_dict()
    return {"model": d["model"], "data": d["data"], "algorithm": d["algorithm"], "optimizer": d["optimizer"],
            "schedule": d["schedule"],
            "train": {k: d["train"][k] for k in ("batch_size", "learning_rate", "seed", "shuffle")}}


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


def _read(path: Path) -> Optional[dict[str, Any]]:
    """The checkpoint at path, checked to be ours and complete; None if there is none."""
    if not path.exists():
        return None
    ck = checkpoint.load(path)
    meta = ck["meta"]
    if not isinstance(meta, dict) or not {"resume_key", "ranks", "records"} <= meta.keys():
        raise CheckpointError(f"{path} is a pbp_hpc checkpoint without the resume information (resume_key, ranks, records)")
    return ck


def try_resume(st: Any, log: Log) -> tuple[int, int, list[dict[str, Any]], dict[str, Any]]:
    """(epoch, step, records, extra) to continue from: the checkpoint's, or (0, 0, [], {}) without one."""
    cfg = st.cfg
    if not cfg.checkpoint.resume:
        return 0, 0, [], {}
    path = checkpoint_path(cfg)
    # Rank 0 alone reads and sends what it found: every rank resumes from the same bytes, and a
    # rank on a node that sees another (or no) file cannot make the ranks disagree.
    ck = runtime.together(st.comm, lambda: _read(path) if st.comm.rank == 0 else None, name_ranks=False)
    ck = st.comm.bcast(ck, root=0)
    if ck is None:
        log(f"no checkpoint at {path}: starting from scratch")
        return 0, 0, [], {}
    if ck["meta"]["resume_key"] != resume_key(cfg):
        raise ConfigError(f"checkpoint {path} was written by a run with other model/data/training settings; refusing to resume it")
    if ck["meta"]["ranks"] != st.comm.size:
        raise ConfigError(
            f"checkpoint {path} was written by a {ck['meta']['ranks']}-rank run and this run has {st.comm.size}; "
            "resume with the same rank count (a different count sums gradients in another order, so the result "
            "would not be bit-for-bit that of an uninterrupted run)"
        )
    if ck["theta"].shape != (st.n_params,):
        raise ConfigError(f"checkpoint {path} holds parameters of shape {ck['theta'].shape}, the model has {st.n_params}")
    state = st.strategy.state()
    missing = sorted(set(state) - set(ck["state"]))
    if missing:
        raise ConfigError(f"checkpoint {path} lacks the state {', '.join(missing)} that this run's optimizer and strategy keep")
    st.theta[...] = st.xp.asarray(ck["theta"])
    for name, buf in state.items():
        buf[...] = st.xp.asarray(ck["state"][name])
    log(f"resumed from {path} at epoch {ck['epoch']} step {ck['step']}")
    return ck["epoch"], ck["step"], ck["meta"]["records"], ck["meta"].get("extra") or {}
