"""The MPI side: one `mpiexec -n C` job that measures every case, side by side.

Rank 0 prints one JSON line per record (header, one per group, end) for the parent. A case
with fewer ranks runs on the first ranks (a communicator of its own) while the others sleep in
a non-blocking barrier; each repetition runs one epoch of every case, in rotated order.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import sys
import time
from typing import Any, Optional

import numpy as np

from pbp_hpc.bench.memory import measure, reset_peak_rss, rss_now
from pbp_hpc.bench.cases import NETWORKS, SEED, Case, Spec, cases_for, splits_of
from pbp_hpc.bench.jax_peer import JaxClient
from pbp_hpc.bench.peers import PeerClient, TorchClient, kill_all
from pbp_hpc.bench.runs import GemmReplay, OurRun, Timing


def idle_sync(world: Any) -> None:
    """Wait for every rank without spinning: a rank that sits a case out must leave its core free."""
    req = world.Ibarrier()
    while not req.Test():
        time.sleep(0.0005)


class Pinning:
    """Pin each rank of a case to its own cores: rank i of an r x t case to cores i*t .. i*t+t-1.

    Without it Linux tends to stack two communicating ranks on one core (a rank that waits
    yields, and the scheduler wakes its peer where it slept), which on this 2-core machine made
    2 x 1 several times slower than 1 x 1. The same as `mpiexec -bind-to core:t` for one case;
    done here per case because one job runs every split. Only this rank's main thread is moved.
    """

    def __init__(self, enabled: bool, rank: int):
        self.enabled, self.rank = enabled, rank
        self.all = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

    def apply(self, ranks: int, threads: int) -> None:
        if not self.enabled or not self.all or ranks * threads > len(self.all) or self.rank >= ranks:
            return
        os.sched_setaffinity(0, set(self.all[self.rank * threads : (self.rank + 1) * threads]))

    def release(self) -> None:
        if self.enabled and self.all:
            os.sched_setaffinity(0, set(self.all))


def state_key(case: Case, reducer: str) -> Case:
    """The key of a case's State: one per rank count, grid, reducer and variant, shared by its thread counts."""
    return Case("ours", case.ranks, 0, case.reducer or reducer, case.variant, case.grid)


class Worker:
    """One mpiexec job that measures every case; rank 0 prints JSON lines for the parent."""

    def __init__(self, spec: Spec):
        from mpi4py import MPI
        from threadpoolctl import ThreadpoolController

        self.spec, self.MPI = spec, MPI
        self.world = MPI.COMM_WORLD
        self.rank = self.world.rank
        self.blas = ThreadpoolController()
        self.pin = Pinning(spec.pin, self.rank)
        # the splits' rank counts, and 2 for the model-parallel rows (cases.GRIDS)
        ranks = {r for r, _ in splits_of(spec.cores)} | ({2} if spec.grids and spec.cores >= 2 else set())
        self.comms = {r: self._first(r) for r in sorted(ranks)}
        self.torch = TorchClient() if (spec.torch and self.rank == 0) else None
        # XLA's threads are fixed when JAX starts: one child per thread count of the jax cases
        self.jax = {t: JaxClient(t) for t in sorted({t for r, t in splits_of(spec.cores) if r == 1})} \
            if (spec.jax and self.rank == 0) else {}
        for peer in self.peers():  # the children start side by side; all are up before anything is timed
            peer.info
        self.base_rss = 0  # set after the peak SGEMM, which also warms BLAS's work buffers
        self.data_cache: dict[str, Any] = {}

    def _warm_libraries(self) -> None:
        """Import what the cases use and let BLAS allocate its work buffers, so that the
        footprint taken as the baseline is the code's, and the growth above it the data's."""
        from pbp_hpc.engine import ops
        from pbp_hpc import train  # noqa: F401
        ops.has_gemm(np)  # binds numpy's BLAS for gemm and axpy
        a = np.ones((512, 512), dtype=np.float32)
        with self.blas.limit(limits=self.spec.cores, user_api="blas"):
            np.matmul(a, a)

    def _first(self, r: int) -> Any:
        """A communicator of ranks 0..r-1 (COMM_NULL elsewhere)."""
        color = 0 if self.rank < r else self.MPI.UNDEFINED
        return self.world.Split(color, key=self.rank)

    def _in(self, ranks: int) -> bool:
        """Whether this rank takes part in cases of `ranks` ranks."""
        return self.comms[ranks] != self.MPI.COMM_NULL

    def emit(self, obj: dict[str, Any]) -> None:
        if self.rank == 0:
            print(json.dumps(obj), flush=True)

    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    # -- setup

    def config(self, layers: list[int], batch: int, reducer: str, variant: str = "", grid: str = "") -> Any:
        from pbp_hpc import config
        return config.load(None, self.spec.overrides(layers, batch, reducer, variant, grid))

    def data(self, cfg: Any) -> Any:
        """The data set, loaded once per worker (every rank holds all of it, as in pbp_hpc.train)."""
        from pbp_hpc.data import datasets
        key = json.dumps([cfg.data.model_dump(mode="json"), cfg.model.layers[0], cfg.model.layers[-1]])
        if key not in self.data_cache:
            directory = None
            if cfg.data.name != "synthetic":
                from pbp_hpc.data.mnist import resolve_data_dir

                directory = resolve_data_dir(cfg.data.dir, download=True)
            self.data_cache[key] = datasets.load(cfg, 1, directory)
        return self.data_cache[key]

    def state(self, cfg: Any, comm: Any) -> Any:
        from pbp_hpc import train
        return train.State(cfg, comm, np, self.data(cfg))

    # -- peak

    def measure_peak(self) -> dict[str, float]:
        """Square SGEMM GFLOP/s for each split, ranks running at once (rank 0 alone for 1 rank)."""
        n = self.spec.peak_n
        a = np.random.default_rng(1).random((n, n), dtype=np.float32)
        c = np.empty_like(a)
        peaks: dict[str, list[float]] = {}
        for rep in range(3):
            for r, t in splits_of(self.spec.cores):
                if self._in(r):
                    self.pin.apply(r, t)
                    with self.blas.limit(limits=t, user_api="blas"):
                        np.matmul(a, a, out=c)
                        self.comms[r].Barrier()
                        t0 = time.perf_counter()
                        np.matmul(a, a, out=c)
                        mine = 2 * n**3 / (time.perf_counter() - t0) / 1e9
                    total = self.comms[r].allreduce(mine)  # ranks x each one's rate
                    if self.rank == 0 and rep > 0:
                        peaks.setdefault(f"{r}x{t}", []).append(total)
                idle_sync(self.world)
        self.pin.release()
        return {k: float(np.median(v)) for k, v in peaks.items()}

    # -- one group

    def group(self, net: str, batch: int) -> dict[str, Any]:
        """Memory, then every case of (net, batch) timed; the group's record."""
        spec = self.spec
        layers = NETWORKS[net]
        cases = cases_for(spec, net, batch)
        mem = self.memory(layers, batch)
        runs, states, n = self.build_runs(cases, layers, batch)
        for peer in self.peers():
            reply = peer.ask(cmd="setup", overrides=spec.overrides(layers, batch, spec.reducer))
            if "error" in reply:
                self.say(f"{peer.name}: {reply['error']}")
        timings = self.time_cases(cases, runs, net, batch, n)
        active = active_fractions(cases, runs, spec.reducer)
        sent = bytes_per_step(cases, runs, spec.reducer)
        for st in states:
            st.close()
        del states, runs
        gc.collect()
        return {"net": net, "layers": layers, "batch": batch, "n_train": n, "memory": mem,
                "cases": [{"kind": c.kind, "ranks": c.ranks, "threads": c.threads, "reducer": c.reducer or spec.reducer,
                           "label": c.label, "grid": c.grid, "times": timings[c].times, "comm": timings[c].comm,
                           "active": active.get(c.label) if c.kind == "ours" else None,
                           "bytes_per_step": sent.get(c.label)} for c in cases]}

    def build_runs(self, cases: list[Case], layers: list[int], batch: int) -> tuple[dict[Case, Any], list[Any], int]:
        """This rank's runs by case (an OurRun per State, a GemmReplay per gemm case), the States,
        and the number of training examples (rank 0's, sent to all)."""
        runs: dict[Case, Any] = {}
        states: list[Any] = []
        n = 0
        for case in cases:
            if case.kind in ("torch", "jax") or not self._in(case.ranks):
                continue
            key = state_key(case, self.spec.reducer)
            if key not in runs:  # one State per rank count and reducer, shared by its thread counts
                st = self.state(self.config(layers, batch, key.reducer, case.variant, case.grid), self.comms[case.ranks])
                states.append(st)
                runs[key] = OurRun(st)
                n = len(st.data.train)
            runs[case] = GemmReplay(runs[key], batch, n) if case.kind == "gemm" else runs[key]
        return runs, states, self.world.bcast(n, root=0)

    def time_cases(self, cases: list[Case], runs: dict[Case, Any], net: str, batch: int, n: int) -> dict[Case, Timing]:
        """A few warm-up steps of every case, then spec.reps epochs of each, in rotated order."""
        from pbp_hpc.train import epoch_order

        spec = self.spec
        steps_epoch = -(-n // batch)
        timings = {c: Timing() for c in cases}
        for rep in range(-1, spec.reps):  # rep -1: a few warm-up steps of every case
            steps = min(spec.warmup_steps, steps_epoch) if rep < 0 else steps_epoch
            order = epoch_order(SEED, max(rep, 0), n, True)
            shift = max(rep, 0) % len(cases)
            for case in cases[shift:] + cases[:shift]:
                res = self.run_case(case, runs, order, batch, steps, rep)
                if rep >= 0 and res is not None and self.rank == 0:
                    timings[case].times.append(res[0])
                    timings[case].comm.append(res[1])
                idle_sync(self.world)
            self.say(f"{net} batch {batch}: repetition {rep + 1} of {spec.reps} done")
        return timings

    def run_case(self, case: Case, runs: dict[Case, Any], order: np.ndarray, batch: int, steps: int,
                 rep: int) -> Optional[tuple[float, float]]:
        if case.kind in ("torch", "jax"):
            peer = self.torch if case.kind == "torch" else self.jax.get(case.threads)
            if peer is None:
                return None
            reply = peer.ask(cmd="epoch", threads=case.threads, epoch=max(rep, 0), steps=steps,
                             cpu=self.cpu_clock(case))
            return (reply["time"], 0.0) if "time" in reply else None
        if not self._in(case.ranks):
            return None
        self.pin.apply(case.ranks, case.threads)
        clock = time.thread_time if self.cpu_clock(case) else time.perf_counter
        with self.blas.limit(limits=case.threads, user_api="blas"):
            if case.kind == "gemm":
                return runs[case].epoch(steps, clock)
            return runs[case].epoch(order, batch, steps, clock)

    def peers(self) -> list[PeerClient]:
        """Rank 0's peer children (none elsewhere)."""
        return ([self.torch] if self.torch is not None else []) + list(self.jax.values())

    def cpu_clock(self, case: Case) -> bool:
        """--clock cpu: a one-thread case is timed by its threads' CPU time, which other
        processes on a shared machine do not lengthen (they do still share caches and memory)."""
        return self.spec.clock == "cpu" and case.threads == 1

    # -- memory

    def memory(self, layers: list[int], batch: int) -> dict[str, Any]:
        """Peak RSS and heap growth of a fresh State per rank count, measured before the timings."""
        out: dict[str, Any] = {"base_rss": self.base_rss}
        for r in sorted({r for r, _ in splits_of(self.spec.cores)}):
            rec = None
            if self._in(r):
                self.pin.apply(r, 1)
                cfg = self.config(layers, batch, self.spec.reducer)
                data = self.data(cfg)
                new_state = functools.partial(self.state, cfg, self.comms[r])
                rec = {"rank": self.rank, **measure(new_state, data, self.spec.mem_steps, self.blas)}
            recs = self.world.gather(rec, root=0)
            if self.rank == 0:
                out[str(r)] = [x for x in recs if x is not None]
        return out

    # -- main

    def main(self) -> None:
        from pbp_hpc.parallel import provenance
        spec = self.spec
        self.say(f"load average {os.getloadavg()[0]:.2f}; measuring SGEMM peak")
        peak = self.measure_peak()
        self._warm_libraries()
        reset_peak_rss()
        self.base_rss = rss_now()  # interpreter, libraries, MPI: before any data
        info = provenance.collect() if self.rank == 0 else {}
        self.emit({"type": "header", "peak_gflops": peak, "provenance": info, "base_rss": self.base_rss,
                   "torch": self.torch.info if self.torch else None,
                   "jax": {str(t): c.info for t, c in self.jax.items()} if self.jax else None})
        for net in spec.nets:
            for batch in spec.batches:
                self.emit({"type": "group", **self.group(net, batch)})
        for peer in self.peers():
            peer.close()
        self.emit({"type": "end", "load": os.getloadavg()})


def run_worker(spec: Spec) -> int:
    """A rank of the worker job. SIGTERM/SIGUSR1 (Hydra forwards what the parent is sent) end it
    at once in any phase, its peer children with it, with exit 128 + the signal's number."""
    from mpi4py import MPI

    from pbp_hpc.errors import Stopped
    from pbp_hpc.parallel import runtime

    runtime.install_signal_handlers(stop_in_loop=True)
    try:
        Worker(spec).main()
    except Stopped as exc:
        kill_all()
        return runtime.report_stopped(exc, MPI.COMM_WORLD, "in the benchmark's worker job")
    return 0


def active_fractions(cases: list[Case], runs: dict[Case, Any], reducer: str) -> dict[str, float]:
    """Mean fraction of the input columns the first layer used, per ours case (rank 0's State)."""
    active = {}
    for c in cases:
        st = runs[state_key(c, reducer)].st if c.kind == "ours" and c in runs else None
        skip = getattr(st.local, "skip", None) if st is not None else None
        if skip is not None:
            active[c.label] = skip.summary()["mean_active_fraction"]
    return active


def bytes_per_step(cases: list[Case], runs: dict[Case, Any], reducer: str) -> dict[str, dict[str, Any]]:
    """What rank 0 sends a step, by kind (activations, gradients), per multi-rank ours case: the
    strategy's count where the model is in parts (tensor, pipeline), else the reducer's wire bytes,
    as pbp_hpc.train's record says it (`bytes_per_step`)."""
    out: dict[str, dict[str, Any]] = {}
    for c in cases:
        st = runs[state_key(c, reducer)].st if c.kind == "ours" and c.ranks > 1 and c in runs else None
        if st is not None:
            counted = st.strategy.describe().get("bytes_per_step")
            out[c.label] = counted or {"activations": 0, "gradients": st.reducer.choice.get("wire_bytes_per_step")}
    return out
