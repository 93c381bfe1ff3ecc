"""Parallel minibatch gradient descent over MPI: `mpiexec -n P python -m pbp_hpc.train`.

Algorithm 5 of the report. Every rank draws the same permutation per epoch and takes its
share of each global minibatch of B examples; it sums its examples' gradients with batched
GEMMs (or per example, for the naive implementation); one Allreduce of the flat gradient
buffer adds the ranks' sums; every rank divides by B and applies the same update. The
parameters therefore stay identical on every rank without ever being broadcast.

Rank 0 alone prints; other ranks speak only when they fail.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from . import backend, checkpoint, comm as reducers, config as configmod, datasets, model, naive, provenance
from .config import Config
from .errors import ConfigError, DataError, DivergenceError, InjectedFault, PbpError, WorldSizeError

Log = Callable[[str], None]

# Errors every rank raises together (same config, same reduced values): they end the job
# cleanly with this exit code. Anything else is one rank's failure and aborts the world.
COLLECTIVE_EXIT = {ConfigError: 2, WorldSizeError: 2, DivergenceError: 3}

_stop_signal: list[int] = []  # signals received; a list so the handler need not rebind a global


def _on_signal(signum: int, frame: Any) -> None:
    _stop_signal.append(signum)


def install_signal_handlers() -> None:
    """SIGUSR1 (Slurm's warning before the time limit) and SIGTERM ask for a checkpoint-and-stop."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def local_ranks(comm: MPI.Comm) -> int:
    """How many ranks share this node: they share its cores."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.size
    finally:
        node.Free()


def choose_threads(cfg: Config, comm: MPI.Comm) -> int:
    cores = provenance.cores_available()
    on_node = local_ranks(comm)
    wanted = cfg.parallel.threads_per_rank
    if wanted is None:
        return max(1, cores // on_node)
    if wanted > 1 and on_node * wanted > cores and not cfg.parallel.oversubscribe:
        raise ConfigError(
            f"parallel.threads_per_rank={wanted} with {on_node} ranks on this node needs {on_node * wanted} cores, "
            f"but only {cores} are available; lower it, or set parallel.oversubscribe=true to run anyway"
        )
    return wanted


def check_world(cfg: Config, comm: MPI.Comm) -> None:
    """Fail before any work if the launcher gave a different world, or ranks disagree."""
    if cfg.parallel.ranks is not None and comm.size != cfg.parallel.ranks:
        raise WorldSizeError(
            f"asked for {cfg.parallel.ranks} ranks (parallel.ranks) but MPI_COMM_WORLD has {comm.size}; "
            "under Slurm this usually means a wrong `srun --mpi=` plugin started separate 1-rank jobs"
        )
    digests = comm.allgather(cfg.digest())
    if len(set(digests)) != 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise ConfigError(f"ranks {bad} loaded a different configuration from rank 0; every rank must read the same config")


def resolve_data(cfg: Config, comm: MPI.Comm) -> Optional[Path]:
    """Rank 0 finds (and if need be downloads) the IDX folder; the others wait for its answer."""
    if cfg.data.name == "synthetic":
        return None
    answer: Any = None
    if comm.rank == 0:
        try:
            from .mnist import resolve_data_dir

            answer = str(resolve_data_dir(cfg.data.dir, download=cfg.data.download))
        except DataError as exc:
            answer = exc
    answer = comm.bcast(answer, root=0)
    if isinstance(answer, DataError):
        raise ConfigError(str(answer))  # every rank raises it: collective, printed once
    return Path(answer)


class State:
    """Everything a training run allocates once: parameters, gradients, buffers, reducer."""

    def __init__(self, cfg: Config, comm: MPI.Comm, xp: ModuleType, data: datasets.Data):
        self.cfg, self.comm, self.xp, self.data = cfg, comm, xp, data
        self.layout = model.Layout(cfg.model.layers)
        dtype = getattr(xp, cfg.model.dtype)
        self.theta = xp.asarray(model.glorot_uniform(self.layout, cfg.train.seed, cfg.model.dtype))
        self.grad = xp.zeros((reducers.buffer_size(self.layout),), dtype=dtype)
        self.n_params = self.layout.n_params
        self.ws, self.bs = model.views(self.theta, self.layout, xp)
        self.gws, self.gbs = model.views(self.grad, self.layout, xp)
        self.params_grad = self.grad[: self.n_params]
        self.loss_slot = self.grad[self.n_params + reducers.LOSS_SLOT : self.n_params + reducers.LOSS_SLOT + 1]
        self.max_local = -(-cfg.train.batch_size // comm.size)
        self.work = model.Workspace(self.layout, self.max_local, xp, dtype)
        self.rows = np.arange(self.work.max_batch)
        self.reducer = reducers.make_reducer(cfg.parallel.reducer, comm, self.grad, self.layout)


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool) -> np.ndarray:
    """The global data order of an epoch: the same on every rank, a function of (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 0x45504F]).permutation(n)


def my_share(batch: int, size: int, rank: int) -> tuple[int, int]:
    """This rank's contiguous part of a global minibatch; sizes differ by at most one."""
    return batch * rank // size, batch * (rank + 1) // size


def local_step(st: State, idx: np.ndarray) -> None:
    """This rank's summed gradient and loss for examples idx, into st.grad (not yet reduced)."""
    n = idx.shape[0]
    xp = st.xp
    if n == 0:  # more ranks than examples in this batch: contribute zeros
        st.grad[...] = 0
        for l in reversed(range(st.layout.n_layers)):
            st.reducer.layer_done(l)
        return
    datasets.fill_batch(st.data.train, idx, st.work.x, st.work.y, xp, st.rows)
    if st.cfg.algorithm == "per_example":
        st.grad[...] = 0
        x, y = st.work.x[:n], st.work.y[:n]
        st.loss_slot[0] = naive.example_grad_sum(st.theta, st.layout, x, y, st.params_grad)
        for l in reversed(range(st.layout.n_layers)):
            st.reducer.layer_done(l)
        return
    model.forward(xp, st.ws, st.bs, st.work.x, st.work, n)
    model.backward_sum(xp, st.ws, st.gws, st.gbs, st.work.x, st.work.y, st.work, n, st.loss_slot, st.reducer.layer_done)


def evaluate(st: State, source: datasets.Source) -> float:
    """Accuracy on a whole source, the work split across ranks; every rank gets the answer."""
    n_total = len(source)
    if n_total == 0:
        return float("nan")
    lo, hi = my_share(n_total, st.comm.size, st.comm.rank)
    correct = 0
    chunk = st.work.max_batch
    for start in range(lo, hi, chunk):
        idx = np.arange(start, min(hi, start + chunk))
        datasets.fill_batch(source, idx, st.work.x, st.work.y, st.xp, st.rows)
        pred = backend.to_host(model.predict_into(st.xp, st.ws, st.bs, st.work.x, st.work, idx.shape[0]))
        correct += int(np.count_nonzero(pred == source.labels_of(idx)))
    return st.comm.allreduce(correct, op=MPI.SUM) / n_total


def _inject_fault(st: State, global_step: int) -> None:
    dbg = st.cfg.debug
    if dbg.fail_step is None or global_step != dbg.fail_step:
        return
    if dbg.fail_rank is not None and st.comm.rank != dbg.fail_rank:
        return
    if dbg.fail_kind == "nan":
        st.params_grad[0] = float("nan")
        return
    raise InjectedFault(f"injected fault on rank {st.comm.rank} at step {global_step} (debug.fail_step)")


def _slowest(comm: MPI.Comm, values: list[float]) -> np.ndarray:
    """Element-wise max over ranks: an epoch lasts as long as its slowest rank."""
    out = np.array(values, dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, out, op=MPI.MAX)
    return out


def _progress(cfg: Config, comm: MPI.Comm, total: int, epoch: int, quiet: bool) -> Any:
    if comm.rank != 0 or quiet or not cfg.train.progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", unit="step", leave=False, file=sys.stderr)


def _checkpoint_path(cfg: Config) -> Path:
    if cfg.checkpoint.path:
        return Path(cfg.checkpoint.path)
    return Path(f"pbp_hpc-checkpoint-{os.environ.get('SLURM_JOB_ID', 'local')}.h5")


def _resume_key(cfg: Config) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it."""
    d = cfg.to_dict()
    return {"model": d["model"], "data": d["data"], "algorithm": d["algorithm"],
            "train": {k: d["train"][k] for k in ("batch_size", "learning_rate", "seed", "shuffle")}}


def _save_checkpoint(st: State, epoch: int, step: int, records: list[dict[str, Any]]) -> Path:
    path = _checkpoint_path(st.cfg)
    if st.comm.rank == 0:
        meta = {"resume_key": _resume_key(st.cfg), "ranks": st.comm.size, "records": records}
        checkpoint.save(path, backend.to_host(st.theta), epoch, step, meta)
    st.comm.Barrier()
    return path


def _try_resume(st: State, log: Log) -> tuple[int, int, list[dict[str, Any]]]:
    cfg = st.cfg
    if not cfg.checkpoint.resume:
        return 0, 0, []
    path = _checkpoint_path(cfg)
    if not path.exists():
        log(f"no checkpoint at {path}: starting from scratch")
        return 0, 0, []
    ck = checkpoint.load(path)
    if ck["meta"]["resume_key"] != _resume_key(cfg):
        raise ConfigError(f"checkpoint {path} was written by a run with other model/data/training settings; refusing to resume it")
    if ck["meta"]["ranks"] != st.comm.size:
        raise ConfigError(
            f"checkpoint {path} was written by a {ck['meta']['ranks']}-rank run and this run has {st.comm.size}; "
            "resume with the same rank count (a different count sums gradients in another order, so the result "
            "would not be bit-for-bit that of an uninterrupted run)"
        )
    if ck["theta"].shape[0] != st.n_params:
        raise ConfigError(f"checkpoint {path} holds {ck['theta'].shape[0]} parameters, the model has {st.n_params}")
    st.theta[...] = st.xp.asarray(ck["theta"])
    log(f"resumed from {path} at epoch {ck['epoch']} step {ck['step']}")
    return ck["epoch"], ck["step"], ck["meta"]["records"]


def run(cfg: Config, comm: MPI.Comm = MPI.COMM_WORLD, log: Optional[Log] = None, quiet: bool = False,
        return_params: bool = False) -> dict[str, Any]:
    """Train as the config says; return the result record (the same on every rank).

    With return_params, the record also holds the final parameters as a flat numpy array
    under "params" (for tests and scripts; the JSON output never carries them).
    """
    log = log if (log is not None and comm.rank == 0 and not quiet) else (lambda s: None)
    check_world(cfg, comm)
    threads = choose_threads(cfg, comm)
    xp = backend.namespace(cfg.backend)
    directory = resolve_data(cfg, comm)
    with threadpool_limits(limits=threads, user_api="blas"):
        data = datasets.load(cfg, comm.size, directory)
        prints = comm.allgather(data.fingerprint())
        if len(set(prints)) != 1:
            raise DataError(f"ranks loaded different data (fingerprints {prints}); check that every node sees the same files")
        st = State(cfg, comm, xp, data)
        info = provenance.collect() if comm.rank == 0 else {}
        result = _train(st, threads, info, log, quiet)
        if return_params:
            result["params"] = backend.to_host(st.theta).copy()
        return result


def _train(st: State, threads: int, info: dict[str, Any], log: Log, quiet: bool) -> dict[str, Any]:
    cfg, comm, xp = st.cfg, st.comm, st.xp
    n_train, B = len(st.data.train), cfg.train.batch_size
    steps = -(-n_train // B)
    flops_ex = model.flops_per_example(cfg.model.layers)
    start_epoch, start_step, records = _try_resume(st, log)
    log(f"pbp_hpc: {comm.size} rank(s) x {threads} thread(s), layers {cfg.model.layers}, {cfg.model.dtype}, "
        f"{cfg.algorithm}, batch {B}, lr {cfg.train.learning_rate}, {n_train} training examples from {st.data.origin}")
    t_run = time.perf_counter()
    stopped_at: Optional[tuple[int, int]] = None
    for epoch in range(start_epoch, cfg.train.epochs):
        order = epoch_order(cfg.train.seed, epoch, n_train, cfg.train.shuffle)
        first = start_step if epoch == start_epoch else 0
        comm.Barrier()  # epochs start together, so the slowest rank's time is the epoch's time
        t0 = time.perf_counter()
        compute = data_s = 0.0
        comm_before = st.reducer.seconds
        loss_sum, seen = 0.0, 0
        bar = _progress(cfg, comm, steps - first, epoch, quiet)
        for step in range(first, steps):
            gidx = order[step * B : (step + 1) * B]
            Bk = gidx.shape[0]
            lo, hi = my_share(Bk, comm.size, comm.rank)
            tc = time.perf_counter()
            st.grad[st.n_params + reducers.STOP_SLOT] = 1.0 if _stop_signal else 0.0
            local_step(st, gidx[lo:hi])
            _inject_fault(st, epoch * steps + step)
            t_reduce = time.perf_counter()
            st.reducer.finish()
            tu = time.perf_counter()
            step_loss = float(st.grad[st.n_params + reducers.LOSS_SLOT])  # the one host sync per step
            if not math.isfinite(step_loss):
                raise DivergenceError(
                    f"training diverged at epoch {epoch} step {step}: loss is {step_loss} "
                    f"(learning rate {cfg.train.learning_rate} is likely too high)", epoch, step)
            st.params_grad *= -cfg.train.learning_rate / Bk
            st.theta += st.params_grad
            compute += (t_reduce - tc) + (time.perf_counter() - tu)
            loss_sum += step_loss
            seen += Bk
            if bar is not None:
                bar.update(1)
            if float(st.grad[st.n_params + reducers.STOP_SLOT]) > 0:
                stopped_at = (epoch, step + 1)
                break
        if bar is not None:
            bar.close()
        wall = time.perf_counter() - t0
        allreduce = st.reducer.seconds - comm_before
        slow = _slowest(comm, [wall, compute - 0.0, allreduce])
        if stopped_at is not None:
            path = _save_checkpoint(st, *stopped_at, records)
            log(f"signal {_stop_signal[0]} received: checkpoint written to {path} at epoch {stopped_at[0]} step {stopped_at[1]}; "
                "run again with --resume to continue")
            return _result(st, threads, info, records, time.perf_counter() - t_run, status="checkpointed", checkpoint=str(path))
        evaluate_now = cfg.train.eval_every and ((epoch + 1) % cfg.train.eval_every == 0)
        val_acc = evaluate(st, st.data.val) if (evaluate_now or epoch == cfg.train.epochs - 1) else None
        rec = {
            "epoch": epoch,
            "loss": loss_sum / max(seen, 1),
            "val_accuracy": val_acc,
            "time_s": float(slow[0]),
            "compute_s": float(slow[1]),
            "allreduce_s": float(slow[2]),
            "gflops": flops_ex * seen / slow[0] / 1e9 if slow[0] > 0 else 0.0,
            "examples": seen,
            "partial": first > 0,
        }
        records.append(rec)
        va = "   n/a" if val_acc is None else f"{100 * val_acc:6.2f}%"
        log(f"epoch {epoch:3d}  loss {rec['loss']:.5f}  val_acc {va}  time {rec['time_s']:.3f}s  "
            f"(compute {rec['compute_s']:.3f}s, allreduce {rec['allreduce_s']:.3f}s)  {rec['gflops']:.1f} GFLOP/s")
        if not bool(xp.all(xp.isfinite(st.theta))):
            raise DivergenceError(f"training diverged in epoch {epoch}: parameters are no longer finite", epoch, steps - 1)
        if cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0 and epoch + 1 < cfg.train.epochs:
            _save_checkpoint(st, epoch + 1, 0, records)
    test_acc = evaluate(st, st.data.test)
    total = time.perf_counter() - t_run
    log(f"test accuracy {100 * test_acc:.2f}%  ({len(st.data.test)} examples), total {total:.2f}s")
    if cfg.checkpoint.path or cfg.checkpoint.every_epochs:
        _save_checkpoint(st, cfg.train.epochs, 0, records)
    return _result(st, threads, info, records, total, test_accuracy=test_acc)


def _result(st: State, threads: int, info: dict[str, Any], records: list[dict[str, Any]], total: float, **extra: Any) -> dict[str, Any]:
    cfg = st.cfg
    timed = [r["time_s"] for r in records[cfg.train.warmup_epochs :] if not r["partial"]]
    out = {
        "status": "ok",
        "config": cfg.to_dict(),
        "ranks": st.comm.size,
        "threads_per_rank": threads,
        "test_accuracy": None,
        "total_time_s": total,
        "n_train": len(st.data.train),
        "n_params": st.n_params,
        "flops_per_example": model.flops_per_example(cfg.model.layers),
        "warmup_epochs": cfg.train.warmup_epochs,
        "median_epoch_time_s": float(np.median(timed)) if timed else None,
        "epochs": records,
        "provenance": info,
    }
    out.update(extra)
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "-c", help="YAML run configuration (defaults apply where it is silent)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.learning_rate=0.1 (repeatable)")
    p.add_argument("--data-dir", help="folder with the four MNIST-format IDX files (.gz or not); same as data.dir")
    p.add_argument("--json", action="store_true", help="print one JSON result object to stdout (logs go to stderr)")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint.path if it exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-epoch lines")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.dir={args.data_dir}")
    if args.resume:
        overrides.append("checkpoint.resume=true")
    return configmod.load(args.config, overrides)


def report_failure(exc: BaseException, comm: MPI.Comm) -> int:
    """Print a failure once and return the exit code; abort the world if only this rank failed."""
    code = next((c for t, c in COLLECTIVE_EXIT.items() if isinstance(exc, t)), None)
    if code is not None:
        if comm.rank == 0:
            print(f"pbp_hpc: error: {exc}", file=sys.stderr, flush=True)
        return code
    what = str(exc) if isinstance(exc, PbpError) else f"{type(exc).__name__}: {exc}"
    print(f"pbp_hpc: rank {comm.rank} of {comm.size} failed: {what}", file=sys.stderr, flush=True)
    if not isinstance(exc, PbpError):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    if comm.size > 1:
        comm.Abort(1)  # the other ranks are blocked in a collective: without this they hang
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    comm = MPI.COMM_WORLD
    args = parse_args(argv)
    out = sys.stderr if args.json else sys.stdout
    install_signal_handlers()
    try:
        cfg = load_config(args)
        result = run(cfg, comm, log=lambda s: print(s, file=out, flush=True), quiet=args.quiet)
    except DivergenceError as exc:
        if args.json and comm.rank == 0:
            print(json.dumps({"status": "diverged", "error": str(exc), "epoch": exc.epoch, "step": exc.step,
                              "ranks": comm.size}), flush=True)
        return report_failure(exc, comm)
    except Exception as exc:  # noqa: BLE001 - every failure must end the world, not hang it
        return report_failure(exc, comm)
    if args.json and comm.rank == 0:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
