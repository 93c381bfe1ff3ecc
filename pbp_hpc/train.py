"""Parallel minibatch gradient descent over MPI: `mpiexec -n P python -m pbp_hpc.train`.

The loop and its command line. What a step does is the strategy's (pbp_hpc/parallel/
strategies/; Algorithm 5 of the report by default: every rank takes its share of each global
minibatch, one Allreduce adds the ranks' gradient sums, every rank applies the same update),
built from three independent choices: the local step (pbp_hpc/engine/step.py), the reducer
(pbp_hpc/parallel/reducers/) and the optimizer (pbp_hpc/engine/optimizers/). Every rank draws
the same permutation per epoch, so the data seen does not depend on the number of ranks.

Rank 0 alone prints; other ranks speak only when they fail.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import signal
import sys
import time
from types import ModuleType
from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from pbp_hpc import blas_kernels, evaluation, faults, model_file, periodic, protocols, resume, trace
from pbp_hpc.config import Config
from pbp_hpc.epoch import Loop, epoch_order, run_epoch  # noqa: F401  (epoch_order: train's API, for bench and tests)
from pbp_hpc.data import datasets, device as device_data
from pbp_hpc.engine import backend, model, optimizers, step as local_steps
from pbp_hpc.engine import schedules
from pbp_hpc.errors import DataError, DivergenceError, InjectedFault, Stopped
from pbp_hpc.parallel import accounting, grid_auto, gpu, noise_scale, provenance, reducers, runtime, shards, strategies
from pbp_hpc.parallel.grid import make_grid
from pbp_hpc.parallel.reducers import LOSS_SLOT
from pbp_hpc.parallel.stall import StallWatch
from pbp_hpc.results.finite import finite_json

Log = Callable[[str], None]


class State:
    """Everything a training run allocates once: the reducer (and with it the gradient buffer
    and the parameters), the optimizer, the local step and the strategy that runs them.

    A context manager: closing it frees what the reducer holds (shared windows, communicators).
    """

    def __init__(self, cfg: Config, comm: MPI.Comm, xp: ModuleType, data: datasets.Data):
        self.cfg, self.comm, self.xp, self.data = cfg, comm, xp, data
        self.fault_fired = False  # debug.fail_*: injected once
        self.grid = make_grid(comm, cfg)  # the communicators each piece works on (data group, node, ...)
        self.watch = StallWatch(comm)  # the stall check of every blocking wait in the run
        self.trace: Optional[trace.Trace] = None  # train.trace: the run's timeline (instrumented in _train)
        self.noise: Optional[noise_scale.NoiseScale] = None  # the gradient noise scale, where estimated
        self.noise_why = "not estimated with the model in parts (parallel.tensor, parallel.pipeline)"
        self.layout = model.Layout(cfg.model.layers)  # what this rank holds (all of it, unless T or S > 1)
        self.n_params = self.layout.n_params  # the whole model's
        self.grid_header: Optional[str] = None
        if self.grid.T > 1 or self.grid.S > 1:  # the model in parts: parallel/tensor.py, parallel/pipeline.py
            grid_auto.build_parts(self)  # this rank's layout, strategy, reducer, optimizer, local step
            return
        self.strategy: protocols.Strategy = strategies.make(cfg, self.grid, xp)  # first: it decides where the parameters live
        self.reducer: protocols.Reducer = reducers.make(cfg, self.grid, self.layout, xp, self.watch)
        try:
            self.grad = self.reducer.grad
            init = functools.partial(model.init_params, self.layout, cfg.train.seed, cfg.model.dtype, init=cfg.model.init)
            self.theta = self.strategy.parameters(self.reducer, lambda out: init(out=out))
            self.optimizer = optimizers.make(cfg, self.theta, self.strategy.state_buffer(self.reducer), xp)
            max_local = -(-cfg.train.batch_size // self.grid.data.size)
            self.local = local_steps.make_local_step(cfg, self.layout, self.theta, self.reducer, data.train, xp, max_local,
                                                     self.strategy.fusable and self.optimizer.fusable)
            self.strategy.attach(self.local, self.reducer, self.optimizer)
            self.noise, self.noise_why = noise_scale.make(cfg, self.grid.data, self.strategy, self.reducer)
            self.strategy.noise = self.noise
        except BaseException:
            self.strategy.reducer = self.reducer
            self.strategy.close()
            self.grid.close()
            raise

    def whole(self, buf: Any, root: Optional[int] = None) -> Optional[np.ndarray]:
        """The whole model's host vector from this rank's part of a parameter-shaped buffer (the
        parameters, an optimizer's state), gathered over the grid's model group (collective
        there; with root, only that rank of it gets it). Every rank holds all of it today: its own."""
        return shards.gather_whole(self.layout, backend.to_host(buf), self.grid.model, root)

    def close(self) -> None:
        self.strategy.close()
        self.data.close()  # the node's shared copy of the data (collective), if it has one
        self.watch.close()
        self.grid.close()

    def __enter__(self) -> "State":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        # After a failure on some ranks, freeing is collective (shared windows) and the others may
        # never join it: the process is ending (or aborting the world), which frees it anyway.
        if exc_type is None or self.comm.size == 1:
            self.close()


def _inject_fault(st: State, global_step: int) -> None:
    """debug.fail_*: the failure paths proven on purpose (tests)."""
    dbg = st.cfg.debug
    # the first step at or after fail_step that this rank computes: under async_ps and ssp a
    # rank takes shares of the steps it claims, not of every step
    if global_step < dbg.fail_step or dbg.fail_rank not in (None, st.comm.rank) or st.fault_fired:
        return
    st.fault_fired = True
    if dbg.fail_kind == "stall":  # a rank that stops answering for a while (SIGSTOP, a swapping node)
        time.sleep(dbg.stall_s)
        return
    if dbg.fail_kind == "nan":  # what an overflow does: this step's gradient and loss become NaN
        st.grad[0] = float("nan")
        st.reducer.extras[LOSS_SLOT] = float("nan")  # the loss slot after this rank's part of the gradient
        return
    if dbg.fail_kind == "kill":  # a rank that dies without a word (OOM killer, a node lost): no cleanup, no abort
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if dbg.fail_kind == "oserror":  # a failure that is not one of ours, as a dying disk would raise
        raise OSError(errno.EIO, f"injected I/O error on rank {st.comm.rank} at step {global_step} (debug.fail_kind=oserror)")
    raise InjectedFault(f"injected fault on rank {st.comm.rank} at step {global_step} (debug.fail_step)")


def run(cfg: Config, comm: MPI.Comm = MPI.COMM_WORLD, log: Optional[Log] = None, quiet: bool = False,
        return_params: bool = False, xp: Optional[ModuleType] = None) -> dict[str, Any]:
    """Train as the config says; return the result record (the same on every rank).

    With return_params, the record also holds the final parameters as a flat numpy array
    under "params" (for tests and scripts; the JSON output never carries them). `xp`
    overrides the array namespace that `backend` names: any namespace but numpy takes the
    device path (data, order and reducer as for CuPy), so tests run it on the CPU under
    array_api_strict.
    """
    log = log if (log is not None and comm.rank == 0 and not quiet) else (lambda s: None)
    runtime.check_world(cfg, comm)
    threads, why_threads = runtime.together(comm, lambda: runtime.choose_threads(cfg, comm))  # nodes may differ in cores
    binding = runtime.bind_to_cores(cfg, comm, threads)
    runtime.together(comm, lambda: runtime.check_memory(cfg, comm.size))  # ... and in memory
    runtime.together(comm, lambda: resume.check_target(cfg) if comm.rank == 0 else None, name_ranks=False)
    if cfg.train.save_model:
        runtime.together(comm, lambda: model_file.check_target(cfg.train.save_model) if comm.rank == 0 else None,
                         name_ranks=False)
    if cfg.train.trace:  # every rank writes its part of the timeline beside it
        runtime.together(comm, lambda: trace.check_target(cfg.train.trace))
    xp = backend.namespace(cfg.backend) if xp is None else xp
    devices = gpu.select_device(comm, xp)  # CuPy: this rank's GPU, chosen before any allocation
    directory = datasets.resolve_data(cfg, comm)
    with threadpool_limits(limits=threads, user_api="blas"):
        data = runtime.together(comm, lambda: datasets.load(cfg, comm.size, directory, comm))
        prints = comm.allgather(data.fingerprint())
        if len(set(prints)) != 1:
            exc = DataError(f"ranks loaded different data (fingerprints {prints}); check that every node sees the same files")
            exc.on_all_ranks = True  # type: ignore[attr-defined]  # every rank compared the same list
            raise exc
        if xp is not np:
            host, data = data, device_data.to_device(data, xp)  # uploaded once; batches are gathered on the device
            host.close()  # the node's shared copy (collective): no rank reads it again
        faults.inject(cfg, comm.rank, "setup", DataError)  # debug.fail_phase (tests)
        cfg, why_grid = grid_auto.choose(cfg, comm, len(data.train))  # parallel.grid auto: data x tensor x pipeline (collective)
        with State(cfg, comm, xp, data) as st:
            info = provenance.collect() if comm.rank == 0 else {}
            if devices is not None and comm.rank == 0:
                info["gpus"] = devices  # every rank's device: id, name, PCI bus id
            if "gpu_reducer" in st.reducer.choice:
                log(f"device reducer: {st.reducer.choice['gpu_reducer']} ({st.reducer.choice['cuda_aware_reason']})")
            log(f"pbp_hpc: {comm.size} rank(s) x {threads} thread(s) ({why_threads}), {binding['how']}, "
                f"reducer {st.reducer.name} ({st.reducer.choice.get('reducer_reason', 'parallel.gpu_reducer')}), "
                f"strategy {st.strategy.name}")
            if blas_kernels.reason is not None:
                log(f"BLAS kernels: OPENBLAS_CORETYPE={os.environ.get(blas_kernels.VAR)}, {blas_kernels.reason}")
            for line in (why_grid, st.grid_header):  # the grid: how it was chosen, how the model is split
                if line is not None:
                    log(line)
            info["binding"] = binding  # rank 0's node
            log(f"communication: {accounting.communication(st.strategy.name, st.reducer.name, (st.grid.D, st.grid.T, st.grid.S))}")
            log(f"gradient noise scale: {st.noise_why}")
            result = _train(st, threads, info, log, quiet)
            result.update(st.reducer.choice)
            result.update(st.strategy.describe())
            # every run says its grid and what a rank sends a step (tensor and pipeline runs said it above)
            result.setdefault("grid", {"data": st.grid.D, "tensor": st.grid.T, "pipeline": st.grid.S})
            result.setdefault("bytes_per_step", {"activations": 0, "gradients": st.reducer.choice.get("wire_bytes_per_step")})
            result["communication"] = accounting.communication(st.strategy.name, st.reducer.name, (st.grid.D, st.grid.T, st.grid.S))
            if return_params:
                result["params"] = np.array(st.whole(st.theta))  # a copy
                if hasattr(st.strategy, "gathered_log"):  # async_ps, ssp: (worker, clock, version read, written)
                    result["update_log"] = st.strategy.gathered_log()
            return result


def _train(st: State, threads: int, info: dict[str, Any], log: Log, quiet: bool) -> dict[str, Any]:
    cfg = st.cfg
    n_train, B = len(st.data.train), cfg.train.batch_size
    steps = -(-n_train // B)
    full_batch = schedules.check_batch(cfg, n_train)
    if cfg.debug.fail_step is not None:
        st.strategy.after_local = functools.partial(_inject_fault, st)
    start_epoch, start_step, records, extra = resume.try_resume(st, log)
    loop = Loop(st, steps, records, extra)
    if os.environ.get("PBP_HPC_ELASTIC"):  # python -m pbp_hpc.elastic: which process each rank is, and where it starts
        from pbp_hpc.elastic import ranks

        ranks.report(st.comm, start_epoch, start_step)
    if cfg.train.trace:  # off: nothing is wrapped, the loop runs as without it
        st.trace = trace.instrument(st, cfg.train.trace, cfg.train.trace_steps)
        st.trace.wrap(loop.tracker, "evaluate", "evaluation", "evaluation", always=True)
    ended: Optional[str] = None  # why the run ended before its last epoch (target, early stopping)
    with runtime.training_loop():  # a stop signal: checkpoint-and-stop; outside it, runtime.Stopped at once
        # logged here, inside: from this line on, a stop signal checkpoints (scripts and tests wait for it)
        log(f"pbp_hpc: layers {cfg.model.layers}, {cfg.model.dtype}, "
            f"{cfg.algorithm}, {cfg.optimizer.name}, batch {B}{full_batch}, {schedules.describe(cfg)}, "
            f"{n_train} training examples from {st.data.origin}")
        few_steps = schedules.few_steps_warning(cfg, n_train)
        if few_steps and start_epoch == 0 and start_step == 0:
            log(few_steps)
        for epoch in range(start_epoch, cfg.train.epochs):
            first = start_step if epoch == start_epoch else 0
            rec, stopped, ended = run_epoch(st, loop, epoch, first, quiet)
            due = rec.pop("checkpoint_due")  # every_steps / every_seconds came due at the epoch's last block
            if stopped is not None and stopped[1] < steps and ended is None:  # mid-epoch: the part-epoch is not recorded
                return _stop(st, threads, info, loop, stopped, log)
            last = epoch == cfg.train.epochs - 1
            if ended is None and ((cfg.train.eval_every and (epoch + 1) % cfg.train.eval_every == 0) or last):
                if not loop.tracker.curve or loop.tracker.curve[-1]["step"] != (epoch + 1) * steps:
                    ended = loop.tracker.evaluate(epoch, (epoch + 1) * steps, loop.train_s, loop.wall())
            point = loop.tracker.curve[-1] if loop.tracker.curve else None
            rec["val_accuracy"] = point["val_accuracy"] if point and point["step"] == epoch * steps + rec["steps_done"] else None
            loop.records.append(rec)
            if st.trace is not None:
                st.trace.flush()  # what `python -m pbp_hpc.trace merge` reads if the job dies
            va = "   n/a" if rec["val_accuracy"] is None else f"{100 * rec['val_accuracy']:6.2f}%"
            noise = f"  B_noise ≈ {st.noise.value:.0f}" if st.noise is not None and st.noise.value is not None else ""
            log(f"epoch {epoch:3d}  loss {rec['loss']:.5f}  val_acc {va}  {accounting.parts_line(rec)}  "
                f"{rec['gflops']:.1f} GFLOP/s{noise}")
            finite = bool(st.xp.all(st.xp.isfinite(st.theta)))  # this rank's part: the model group decides together
            if not (finite if st.grid.model.size == 1 else st.grid.model.allreduce(finite, op=MPI.LAND)):
                raise DivergenceError(f"training diverged in epoch {epoch}: parameters are no longer finite", epoch, steps - 1)
            if ended is not None:
                log(f"stopping after epoch {epoch}: {ended}")
                break
            if stopped is not None and not last:  # asked at an epoch's last step: it is recorded
                return _stop(st, threads, info, loop, (epoch + 1, 0, stopped[2]), log)
            if (due or (cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0)) and not last:
                with trace.span_of(st.trace, "checkpoint", "checkpoint"):
                    rec["checkpoint_s"] += periodic.write(st, loop, epoch + 1, 0)
                rec["checkpoints"] += 1
    with trace.span_of(st.trace, "test evaluation", "evaluation"), st.strategy.evaluated():  # the weight average (ema)
        test_acc = evaluation.accuracy(st, st.data.test)
    total = loop.wall()
    shown = "n/a (no test examples)" if test_acc is None else f"{100 * test_acc:.2f}%"
    log(f"test accuracy {shown}  ({len(st.data.test)} examples), total {total:.2f}s, training {loop.train_s:.2f}s")
    if cfg.checkpoint.path or resume.periodic(cfg):
        with trace.span_of(st.trace, "checkpoint", "checkpoint"):
            resume.save(st, cfg.train.epochs, 0, loop.records, loop.extra(), loop.arrays())
    saved = loop.tracker.save_best()
    if saved:
        log(f"model of the best validation pass written to {saved}" if loop.tracker.best_at is not None else
            f"model written to {saved}: the last parameters (no validation pass, or a checkpoint without the best's)")
    traced = st.trace.finish() if st.trace is not None else None
    if traced:
        log(f"timeline written to {traced} (open it in https://ui.perfetto.dev or chrome://tracing)")
    return _result(st, threads, info, loop, total, test_accuracy=test_acc, ended_early=ended, model_path=saved,
                   trace_path=st.comm.bcast(traced, root=0) if st.trace is not None else None)


def _stop(st: State, threads: int, info: dict[str, Any], loop: Loop, at: tuple[int, int, int], log: Log) -> dict[str, Any]:
    """Every rank was asked to stop at the same step: checkpoint where the next step would begin."""
    path = resume.save(st, at[0], at[1], loop.records, loop.extra(), loop.arrays())
    log(f"stop requested by a signal (SIGUSR1/SIGTERM) on {at[2]} of {st.comm.size} rank(s): checkpoint written "
        f"to {path} at epoch {at[0]} step {at[1]}; run again with --resume to continue")
    return _result(st, threads, info, loop, loop.wall(), status="checkpointed", checkpoint=str(path),
                   stopped_at={"epoch": at[0], "step": at[1]})


def _result(st: State, threads: int, info: dict[str, Any], loop: Loop, total: float, **extra: Any) -> dict[str, Any]:
    cfg, records = st.cfg, loop.records
    timed = [r["time_s"] for r in records[cfg.train.warmup_epochs :] if not r["partial"]]
    skip = getattr(st.local, "skip", None)
    out = {
        "status": "ok",
        "config": cfg.to_dict(),
        "ranks": st.comm.size,
        "threads_per_rank": threads,
        "test_accuracy": None,
        "total_time_s": total,
        "train_time_s": loop.train_s,
        "n_train": len(st.data.train),
        "n_params": st.n_params,
        "flops_per_example": model.flops_per_example(cfg.model.layers),
        "warmup_epochs": cfg.train.warmup_epochs,
        "median_epoch_time_s": float(np.median(timed)) if timed else None,
        "epochs": records,
        "provenance": info,
        # rank 0's count: ranks see different batches, and so compact differently
        "active_inputs": skip.summary() if skip is not None else None,
        **loop.tracker.summary(),
        # the gradient noise scale at the end, and what estimating it cost (rank 0's seconds)
        "b_noise": st.noise.value if st.noise is not None else None,
        "noise_scale_cost_s": st.noise.seconds if st.noise is not None else None,
    }
    out.update(extra)
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.train", description=__doc__.split("\n\n")[0])
    runtime.add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON result object to stdout (logs go to stderr)")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint.path if it exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-epoch lines")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    comm = MPI.COMM_WORLD
    args = parse_args(argv)
    out = sys.stderr if args.json else sys.stdout
    runtime.install_signal_handlers(stop_outside_loop=True)
    try:
        cfg = runtime.together(comm, lambda: runtime.load_config(args))  # an MPMD launch may give ranks other arguments
        result = run(cfg, comm, log=lambda s: print(s, file=out, flush=True), quiet=args.quiet)
    except DivergenceError as exc:
        if args.json and comm.rank == 0:
            print(json.dumps({"status": "diverged", "error": str(exc), "epoch": exc.epoch, "step": exc.step,
                              "ranks": comm.size}), flush=True)
        return runtime.report_failure(exc, comm)
    except KeyboardInterrupt:
        return runtime.report_interrupt(comm)
    except Stopped as exc:  # SIGTERM/SIGUSR1 outside the training loop
        return runtime.report_stopped(exc, comm)
    except Exception as exc:  # noqa: BLE001 - every failure must end the world, not hang it
        return runtime.report_failure(exc, comm)
    if args.json and comm.rank == 0:
        print(json.dumps(finite_json(result), allow_nan=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
