"""Training at the BLAS limit: time per epoch against the GEMMs alone, PyTorch, and more ranks.

    python -m pbp_hpc.bench [--quick | --smoke] [--data-dir DIR] [--json FILE] [--splits FILE]

Prints one table. For each network, batch size and split of this node's cores into
ranks x threads (plus 1 x 1, the baseline), a row says:

  TPE          median training time per epoch (slowest rank; epoch loop as in pbp_hpc.train)
  GFLOP/s      model.flops_per_example x examples / TPE: the dense network's work, whatever was skipped
  peak%        GFLOP/s as a fraction of square-2048 SGEMM measured here at the same cores
  in%          mean share of the input columns the first layer's GEMMs used (train.skip_zero_inputs:
               columns zero in the whole batch are left out); /dense rows use them all
  GEMM         the same epoch's matmuls alone, replayed into the same buffers (each rank its own)
  /GEMM        TPE / GEMM: what everything that is not a GEMM costs
  torch        PyTorch eager, same network, update, batch, data order; threads = ranks x threads
  /torch       TPE / torch
  speedup      TPE(1 x 1) / TPE
  comm%        the reducer's share of the epoch (slowest rank)
  RSS, budget  peak resident memory per rank (MB), and dataset + parameters + gradients + one
               batch's activations + 20%; both above the process's footprint before the data
  heap B/step  growth of the traced heap per step over 400 steps (tracemalloc, after gc): 0.0 = nothing kept
  best         * on the fastest split of all the cores (written to --splits for pbp_hpc.hybrid)

How: the parent starts one `mpiexec -n C` job (C = cores); every case runs inside it, so
cases are measured side by side: each repetition runs one epoch of every case, in rotated
order, and the table shows medians. A case with fewer ranks runs on the first ranks while
the others sleep (not spin) in a non-blocking barrier. Rank 0 drives PyTorch in a child
process of its own, so torch's memory and thread pools stay out of our ranks.

Modes: full (default; Net-1h and Net-2h, batches 128, 1024, 4096, all of MNIST's 50,000
training examples, about 8 minutes on 2 idle cores), --quick (batches 128 and 1024, 10,000
examples: GFLOP/s do not depend on the data size; under 2 minutes), --smoke (a tiny network
on synthetic data, one epoch: for the tests).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

NETWORKS = {"Net-1h": [784, 1024, 10], "Net-2h": [784, 1024, 1024, 10], "tiny": [784, 32, 10]}
LEARNING_RATE = 0.1  # any stable rate: timings do not depend on it
SEED = 0
REPO = Path(__file__).resolve().parents[2]
DEFAULT_SPLITS = REPO / "benchmarks" / "hybrid_splits.json"

COLUMNS = ["net", "batch", "split", "TPE s", "GFLOP/s", "peak%", "in%", "GEMM s", "/GEMM", "torch s", "/torch",
           "speedup", "comm%", "RSS MB", "budget MB", "heap B/step", "best"]


# ---------------------------------------------------------------- what to measure


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
    torch: bool
    pin: bool
    peak_n: int  # side of the square SGEMM that defines peak
    cores: int
    mem_steps: int = 3
    clock: str = "wall"  # or "cpu": one-thread cases timed by CPU time (see Worker.cpu_clock)

    def overrides(self, layers: list[int], batch: int, reducer: str, dense: bool = False) -> list[str]:
        """`--set` items for a config with this network, batch and reducer (dense: every input column)."""
        out = [f"model.layers={layers}", f"train.batch_size={batch}", f"train.learning_rate={LEARNING_RATE}",
               f"train.seed={SEED}", "model.dtype=float32", f"parallel.reducer={reducer}", "train.progress=false",
               f"train.skip_zero_inputs={'false' if dense else 'true'}"]
        if self.synthetic:
            out += ["data.name=synthetic", "data.n_test=10"]
        elif self.data_dir:
            out.append(f"data.dir={self.data_dir}")
        if self.n_train is not None:
            out.append(f"data.n_train={self.n_train}")
        return out


def make_spec(args: argparse.Namespace, cores: int) -> Spec:
    if args.smoke:
        return Spec("smoke", ["tiny"], [64], reps=1, warmup_steps=1, n_train=600, data_dir=None, synthetic=True,
                    reducer=args.reducer, compare_reducers=False, compare_dense=False, torch=not args.no_torch, pin=args.pin,
                    peak_n=256, cores=cores, mem_steps=2, clock=args.clock)
    quick = args.quick
    return Spec("quick" if quick else "full", args.nets or ["Net-1h", "Net-2h"],
                args.batches or ([128, 1024] if quick else [128, 1024, 4096]),
                reps=args.reps or 3, warmup_steps=3, n_train=args.n_train or (10000 if quick else None),
                data_dir=args.data_dir, synthetic=False, reducer=args.reducer,
                compare_reducers=args.compare_reducers if args.compare_reducers is not None else not quick,
                compare_dense=args.compare_dense,
                torch=not args.no_torch, pin=args.pin, peak_n=2048, cores=cores, clock=args.clock)


def splits_of(cores: int) -> list[tuple[int, int]]:
    """Every way to use all the cores as ranks x threads, after the 1 x 1 baseline."""
    out = [(1, 1)]
    out += [(r, cores // r) for r in range(1, cores + 1) if cores % r == 0 and (r, cores // r) != (1, 1)]
    return out


@dataclass(frozen=True)
class Case:
    kind: str  # ours | gemm | torch
    ranks: int
    threads: int
    reducer: str = ""
    dense: bool = False  # train.skip_zero_inputs off: the first layer on every input column

    @property
    def label(self) -> str:
        base = f"{self.ranks}x{self.threads}"
        return f"{base}/{self.reducer}" if self.reducer else f"{base}/dense" if self.dense else base


def cases_for(spec: Spec, net: str, batch: int) -> list[Case]:
    """The cases of one (network, batch) group, interleaved by split."""
    out: list[Case] = []
    for r, t in splits_of(spec.cores):
        out += [Case("ours", r, t), Case("gemm", r, t)]
        if spec.torch and r == 1:
            out.append(Case("torch", 1, t))
    if spec.compare_dense and batch == 1024:  # one batch size: the full run must stay under 10 minutes
        out += [Case("ours", 1, 1, dense=True), Case("gemm", 1, 1, dense=True)]
    if spec.compare_reducers and net == "Net-1h" and spec.cores > 1:
        out += [Case("ours", spec.cores, 1, red) for red in ("blocking", "overlap", "shm") if red != spec.reducer]
    return out


# ---------------------------------------------------------------- worker side (under mpiexec)


def _rss_now() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_peak_rss() -> bool:
    """Return freed heap to the OS and restart the kernel's peak-RSS counter (VmHWM)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    """VmHWM (peak since the last reset) in bytes; ru_maxrss (lifetime) where /proc has none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _idle_sync(world: Any) -> None:
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


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)
    comm: list[float] = field(default_factory=list)  # the reducer's fraction of each epoch


class OurRun:
    """pbp_hpc.train's epoch loop on one State: local_step, reducer.finish, the loss, the update."""

    def __init__(self, st: Any):
        self.st = st

    def step(self, gidx: np.ndarray) -> float:
        from pbp_hpc.parallel import comm as reducers
        from pbp_hpc import train
        st = self.st
        lo, hi = train.my_share(gidx.shape[0], st.comm.size, st.comm.rank)
        st.grad[st.n_params + reducers.STOP_SLOT] = 0.0
        train.local_step(st, gidx[lo:hi])
        st.reducer.finish()
        loss = float(st.grad[st.n_params + reducers.LOSS_SLOT])  # the host sync train makes
        train.apply_update(st, gidx.shape[0])
        return loss

    def epoch(self, order: np.ndarray, batch: int, steps: int, clock: Callable[[], float]) -> tuple[float, float]:
        st = self.st
        comm0 = st.reducer.seconds
        st.comm.Barrier()
        t0, w0 = clock(), time.perf_counter()
        for s in range(steps):
            self.step(order[s * batch : (s + 1) * batch])
        t, wall = clock() - t0, time.perf_counter() - w0
        # the reducer's share of the wall time (its seconds are wall seconds, whatever the clock)
        return _slowest(st.comm, t, (st.reducer.seconds - comm0) / wall if wall > 0 else 0.0)


class GemmReplay:
    """The matmuls of one epoch alone: recorded from real steps, replayed into the same buffers.

    Every ops.gemm and ops.matmul call of a step is recorded with its operands (views of the
    State's buffers) and its alpha and beta; an epoch replays the full-batch step's list for
    each full batch and the last step's list once. Where the GEMMs update the parameters in
    place (one rank, State.fused) they are saved before and restored after, untimed.
    """

    def __init__(self, run: OurRun, batch: int, n: int):
        from pbp_hpc import train
        st = run.st
        self.st, self.comm = st, st.comm
        self.n_full, rest = n // batch, n % batch
        self.full = self._record(run, train.my_share(batch, st.comm.size, st.comm.rank))
        self.last = self._record(run, train.my_share(rest, st.comm.size, st.comm.rank)) if rest else []
        self.saved = np.empty_like(st.theta)

    @staticmethod
    def _record(run: OurRun, share: tuple[int, int]) -> list[tuple[Any, ...]]:
        from pbp_hpc.engine import ops
        from pbp_hpc import train
        calls: list[tuple[Any, ...]] = []
        real_gemm, real_matmul = ops.gemm, ops.matmul
        inside = [False]

        def gemm(xp: Any, a: Any, b: Any, out: Any, alpha: float = 1.0, beta: float = 0.0) -> Any:
            calls.append((a, b, out, alpha, beta))
            inside[0] = True
            try:
                return real_gemm(xp, a, b, out, alpha, beta)
            finally:
                inside[0] = False

        def matmul(xp: Any, a: Any, b: Any, out: Any) -> Any:
            if not inside[0]:
                calls.append((a, b, out, 1.0, 0.0))
            return real_matmul(xp, a, b, out)

        ops.gemm, ops.matmul = gemm, matmul  # module attributes: model and ops itself look them up per call
        theta = run.st.theta.copy()
        try:
            train.local_step(run.st, np.arange(share[0], share[1]))
        finally:
            ops.gemm, ops.matmul = real_gemm, real_matmul
            run.st.theta[...] = theta
        run.st.reducer.finish()  # a reducer may have started sends in layer_done
        return calls

    def epoch(self, steps: int, clock: Callable[[], float]) -> tuple[float, float]:
        from pbp_hpc.engine.ops import gemm

        self.saved[...] = self.st.theta
        self.comm.Barrier()
        t0 = clock()
        with np.errstate(over="ignore", invalid="ignore"):  # replayed into the same buffers, values grow: no matter
            for s in range(steps):
                for a, b, out, alpha, beta in (self.full if s < self.n_full else self.last):
                    if beta == 0.0 and alpha == 1.0:
                        np.matmul(a, b, out=out)
                    else:
                        gemm(np, a, b, out, alpha, beta)
        t = clock() - t0
        self.st.theta[...] = self.saved
        return _slowest(self.comm, t, 0.0)


def _slowest(comm: Any, wall: float, comm_s: float) -> tuple[float, float]:
    from mpi4py import MPI

    out = np.array([wall, comm_s])
    comm.Allreduce(MPI.IN_PLACE, out, op=MPI.MAX)
    return float(out[0]), float(out[1])


class TorchClient:
    """PyTorch in a child process of rank 0, driven over pipes with JSON lines."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "MPIR_", "MPICH_", "OMPI_"))}
        self.proc = subprocess.Popen([sys.executable, "-m", "pbp_hpc.bench", "--torch-worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            return {"error": f"torch worker exited ({self.proc.poll()})"}
        return json.loads(line)

    def ask(self, **msg: Any) -> dict[str, Any]:
        if self.proc.poll() is not None or "error" in self.info:
            return {"error": self.info.get("error", "torch worker is gone")}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.ask(cmd="quit")
            self.proc.wait(timeout=30)


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
        self.comms = {r: self._first(r) for r in sorted({r for r, _ in splits_of(spec.cores)})}
        self.torch = TorchClient() if (spec.torch and self.rank == 0) else None
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

    def emit(self, obj: dict[str, Any]) -> None:
        if self.rank == 0:
            print(json.dumps(obj), flush=True)

    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    # -- setup

    def config(self, layers: list[int], batch: int, reducer: str, dense: bool = False) -> Any:
        from pbp_hpc import config
        return config.load(None, self.spec.overrides(layers, batch, reducer, dense))

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
                comm = self.comms[r]
                if comm != self.MPI.COMM_NULL:
                    self.pin.apply(r, t)
                    with self.blas.limit(limits=t, user_api="blas"):
                        np.matmul(a, a, out=c)
                        comm.Barrier()
                        t0 = time.perf_counter()
                        np.matmul(a, a, out=c)
                        mine = 2 * n**3 / (time.perf_counter() - t0) / 1e9
                    total = comm.allreduce(mine)  # ranks x each one's rate
                    if self.rank == 0 and rep > 0:
                        peaks.setdefault(f"{r}x{t}", []).append(total)
                _idle_sync(self.world)
        self.pin.release()
        return {k: float(np.median(v)) for k, v in peaks.items()}

    # -- one group

    def group(self, net: str, batch: int) -> dict[str, Any]:
        from pbp_hpc.train import epoch_order

        spec = self.spec
        layers = NETWORKS[net]
        cases = cases_for(spec, net, batch)
        memory = self.memory(layers, batch)
        runs: dict[Case, Any] = {}
        states: list[Any] = []
        n = 0
        for case in cases:
            comm = self.comms[case.ranks]
            if case.kind == "torch" or comm == self.MPI.COMM_NULL:
                continue
            red = case.reducer or spec.reducer
            key = Case("ours", case.ranks, 0, red, case.dense)
            if key not in runs:  # one State per rank count and reducer, shared by its thread counts
                st = self.state(self.config(layers, batch, red, case.dense), comm)
                states.append(st)
                runs[key] = OurRun(st)
                n = len(st.data.train)
            if case.kind == "gemm":
                runs[case] = GemmReplay(runs[key], batch, n)
            else:
                runs[case] = runs[key]
        n = self.world.bcast(n, root=0)
        if self.torch is not None:
            reply = self.torch.ask(cmd="setup", overrides=spec.overrides(layers, batch, spec.reducer))
            if "error" in reply:
                self.say(f"torch: {reply['error']}")
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
                _idle_sync(self.world)
            self.say(f"{net} batch {batch}: repetition {rep + 1} of {spec.reps} done")
        active = {}  # mean fraction of the input columns the first layer used, per State (rank 0's)
        for c in cases:
            st = runs[Case("ours", c.ranks, 0, c.reducer or spec.reducer, c.dense)].st if c.kind == "ours" and c in runs else None
            if st is not None and st.skip is not None:
                active[c.label] = st.skip.summary()["mean_active_fraction"]
        for st in states:
            close = getattr(st.reducer, "close", None)
            if close is not None:
                close()
        del states, runs
        gc.collect()
        return {"net": net, "layers": layers, "batch": batch, "n_train": n, "memory": memory,
                "cases": [{"kind": c.kind, "ranks": c.ranks, "threads": c.threads, "reducer": c.reducer or spec.reducer,
                           "label": c.label, "times": timings[c].times, "comm": timings[c].comm,
                           "active": active.get(c.label) if c.kind == "ours" else None} for c in cases]}

    def run_case(self, case: Case, runs: dict[Case, Any], order: np.ndarray, batch: int, steps: int,
                 rep: int) -> Optional[tuple[float, float]]:
        if case.kind == "torch":
            if self.torch is None:
                return None
            reply = self.torch.ask(cmd="epoch", threads=case.threads, epoch=max(rep, 0), steps=steps,
                                   cpu=self.cpu_clock(case))
            return (reply["time"], 0.0) if "time" in reply else None
        if self.comms[case.ranks] == self.MPI.COMM_NULL:
            return None
        self.pin.apply(case.ranks, case.threads)
        clock = time.thread_time if self.cpu_clock(case) else time.perf_counter
        with self.blas.limit(limits=case.threads, user_api="blas"):
            if case.kind == "gemm":
                return runs[case].epoch(steps, clock)
            return runs[case].epoch(order, batch, steps, clock)

    def cpu_clock(self, case: Case) -> bool:
        """--clock cpu: a one-thread case is timed by its threads' CPU time, which other
        processes on a shared machine do not lengthen (they do still share caches and memory)."""
        return self.spec.clock == "cpu" and case.threads == 1

    # -- memory

    def memory(self, layers: list[int], batch: int) -> dict[str, Any]:
        """Peak RSS and heap growth of a fresh State per rank count, measured before the timings."""
        out: dict[str, Any] = {"base_rss": self.base_rss}
        for r in sorted(self.comms):
            comm = self.comms[r]
            rec = None
            if comm != self.MPI.COMM_NULL:
                self.pin.apply(r, 1)
                rec = self._memory_case(self.config(layers, batch, self.spec.reducer), comm)
            recs = self.world.gather(rec, root=0)
            if self.rank == 0:
                out[str(r)] = [x for x in recs if x is not None]
        return out

    def _memory_case(self, cfg: Any, comm: Any) -> dict[str, Any]:
        from pbp_hpc.parallel import comm as reducers
        data = self.data(cfg)
        ok = _reset_peak_rss()
        st = self.state(cfg, comm)
        run = OurRun(st)
        B, n = cfg.train.batch_size, len(st.data.train)
        with self.blas.limit(limits=1, user_api="blas"):
            for s in range(self.spec.mem_steps):
                run.step(np.arange(s * B, (s + 1) * B) % n)
            peak = _peak_rss()
            growth, k = self._heap_growth(run, min(B, 8 * comm.size), n)
        local = -(-B // comm.size)
        layout = st.layout
        item = np.dtype(cfg.model.dtype).itemsize
        grads = reducers.buffer_size(layout) * item
        if cfg.parallel.reducer == "shm" and comm.size > 1:
            grads += grads * (comm.size - 1) // comm.size  # it also touches its slice of every other rank's buffer
        sizes = {"dataset": dataset_bytes(data), "parameters": layout.n_params * item, "gradients": grads,
                 "activations": local * (sum(layers_of(cfg)) + layers_of(cfg)[-1]) * item}
        close = getattr(st.reducer, "close", None)
        if close is not None:
            close()
        del st, run
        import resource

        lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # loading the data included
        return {"rank": self.world.rank, "peak_rss": peak, "lifetime_peak_rss": lifetime, "hwm_reset": ok,
                "heap_growth": growth, "steps": k,
                "sizes": sizes, "budget": int(1.2 * sum(sizes.values()))}

    @staticmethod
    def _heap_growth(run: OurRun, b: int, n: int, warm: int = 100, k: int = 400) -> tuple[int, int]:
        """Bytes the traced heap grows by over k steps (after `warm` steps under tracemalloc).

        Small batches: what is checked is the code path, which allocates alike at any size.
        The warm-up lets numpy fill its small-object caches; gc.collect() before each reading
        counts only what is still reachable (temporaries and cyclic garbage are not growth).
        """
        import tracemalloc

        batches = (np.arange(s * b, (s + 1) * b) % n for s in range(warm + k))
        tracemalloc.start()
        try:
            for _ in range(warm):
                run.step(next(batches))
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(k):
                run.step(next(batches))
            gc.collect()
            return tracemalloc.get_traced_memory()[0] - before, k
        finally:
            tracemalloc.stop()

    # -- main

    def main(self) -> None:
        from pbp_hpc.parallel import provenance
        spec = self.spec
        self.say(f"load average {os.getloadavg()[0]:.2f}; measuring SGEMM peak")
        peak = self.measure_peak()
        self._warm_libraries()
        _reset_peak_rss()
        self.base_rss = _rss_now()  # interpreter, libraries, MPI: before any data
        info = provenance.collect() if self.rank == 0 else {}
        self.emit({"type": "header", "peak_gflops": peak, "provenance": info, "base_rss": self.base_rss,
                   "torch": self.torch.info if self.torch else None})
        for net in spec.nets:
            for batch in spec.batches:
                self.emit({"type": "group", **self.group(net, batch)})
        if self.torch is not None:
            self.torch.close()
        self.emit({"type": "end", "load": os.getloadavg()})


def layers_of(cfg: Any) -> list[int]:
    return list(cfg.model.layers)


def dataset_bytes(data: Any) -> int:
    """Bytes of the arrays that hold the data set in memory (each base array counted once)."""
    seen: dict[int, int] = {}

    def add(a: Any) -> None:
        if isinstance(a, np.ndarray):
            base = a
            while isinstance(base.base, np.ndarray):
                base = base.base
            seen[id(base)] = base.nbytes

    def walk(src: Any) -> None:
        for name in ("images", "labels", "index", "protos", "noise"):
            add(getattr(src, name, None))
        if hasattr(src, "base") and not isinstance(src, np.ndarray):
            walk(src.base)

    for src in (data.train, data.val, data.test):
        walk(src)
    return sum(seen.values())


# ---------------------------------------------------------------- the PyTorch child


def torch_worker() -> int:
    """Answer setup/epoch/quit requests from rank 0 on stdin; one JSON line per answer."""
    import mpi4py

    mpi4py.rc.initialize = False  # framework imports train, which imports MPI: not a rank of anything
    try:
        import torch

        from pbp_hpc import framework
    except ImportError as exc:
        print(json.dumps({"error": f"PyTorch is not importable: {exc}"}), flush=True)
        return 0
    print(json.dumps({"version": torch.__version__, "mkl": bool(torch.backends.mkl.is_available()),
                      "config": torch.__config__.show().splitlines()[3:5]}), flush=True)
    run: Optional[TorchRun] = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "quit":
                print(json.dumps({"ok": True}), flush=True)
                return 0
            if msg["cmd"] == "setup":
                run = TorchRun(torch, framework, msg["overrides"])
                print(json.dumps({"ok": True}), flush=True)
            elif msg["cmd"] == "epoch" and run is not None:
                torch.set_num_threads(int(msg["threads"]))
                clock = time.thread_time if msg.get("cpu") else time.perf_counter
                print(json.dumps({"time": run.epoch(int(msg["epoch"]), msg.get("steps"), clock)}), flush=True)
            else:
                print(json.dumps({"error": f"bad request {msg}"}), flush=True)
        except Exception as exc:  # noqa: BLE001 - report, keep serving: the table shows n/a
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    return 0


class TorchRun:
    """pbp_hpc.framework's network, optimiser and batches; its epoch loop without evaluation."""

    def __init__(self, torch: Any, framework: Any, overrides: list[str]):
        from pbp_hpc import config
        from pbp_hpc.data import datasets
        from pbp_hpc.engine import model
        self.torch = torch
        cfg = config.load(None, overrides)
        directory = None
        if cfg.data.name != "synthetic":
            from pbp_hpc.data.mnist import resolve_data_dir

            directory = resolve_data_dir(cfg.data.dir, download=False)
        self.data = datasets.load(cfg, 1, directory)
        layout = model.Layout(cfg.model.layers)
        self.net = framework.build_network(torch, layout, model.glorot_uniform(layout, cfg.train.seed, cfg.model.dtype))
        self.opt = torch.optim.SGD(self.net.parameters(), lr=cfg.train.learning_rate)
        self.buf = framework.Batches(torch, cfg.model.layers[0], cfg.model.layers[-1], cfg.train.batch_size, cfg.model.dtype)
        self.B, self.lr = cfg.train.batch_size, cfg.train.learning_rate

    def epoch(self, epoch: int, steps: Optional[int], clock: Callable[[], float]) -> float:
        from pbp_hpc.train import epoch_order

        torch, B, n = self.torch, self.B, len(self.data.train)
        order = epoch_order(SEED, epoch, n, True)
        mse = torch.nn.functional.mse_loss
        t0 = clock()
        for step in range(steps if steps is not None else -(-n // B)):
            idx = order[step * B : (step + 1) * B]
            x, y = self.buf.fill(self.data.train, idx)
            self.opt.zero_grad(set_to_none=False)
            loss = 0.5 * mse(self.net(x), y, reduction="sum")
            loss.backward()
            self.opt.param_groups[0]["lr"] = self.lr / idx.shape[0]
            self.opt.step()
            loss.item()
        return clock() - t0


# ---------------------------------------------------------------- parent: launch, table, splits


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_summary() -> list[str]:
    from threadpoolctl import threadpool_info

    return [f"{d.get('internal_api')} {d.get('version')} core type {d.get('architecture')} "
            f"({d.get('threading_layer')}, {Path(d.get('filepath', '')).name})" for d in threadpool_info()]


THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "OMP_WAIT_POLICY")


def header_lines(spec: Spec, load_start: tuple[float, float, float]) -> list[str]:
    env = ", ".join(f"{k}={os.environ[k]}" for k in THREAD_VARS if k in os.environ) or "none set"
    return [
        f"pbp_hpc.bench ({spec.mode}): {platform.node()}, {cpu_model()}, {spec.cores} cores, {platform.platform()}",
        f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}"
        + ("   << busy machine: ratios are measured side by side, absolute times are not to be trusted"
           if load_start[0] > 0.5 else ""),
        "BLAS: " + "; ".join(blas_summary()),
        f"thread settings in the caller's environment: {env} (cases set theirs: threadpoolctl, torch.set_num_threads);"
        f" OPENBLAS_CORETYPE {os.environ.get('OPENBLAS_CORETYPE', 'not set (OpenBLAS detects the core)')}",
        f"data: {'synthetic' if spec.synthetic else 'MNIST'}, {spec.n_train or 'all 50,000'} training examples; "
        f"float32; {spec.reps} timed epochs per case after {spec.warmup_steps} warm-up steps, medians; "
        f"reducer {spec.reducer}; ranks {'pinned to their cores (-bind-to core:t)' if spec.pin else 'not pinned'}; clock: "
        + ("wall" if spec.clock == "wall" else "CPU time for 1-thread cases (ranks x 1, torch 1 thread), wall otherwise"),
    ]


def launch(spec: Spec, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the worker job; return its JSON records."""
    bindir = Path(sys.executable).parent
    mpiexec = str(bindir / "mpiexec") if (bindir / "mpiexec").exists() else (shutil.which("mpiexec") or "mpiexec")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [mpiexec, "-n", str(spec.cores), sys.executable, "-m", "pbp_hpc.bench", "--worker", json.dumps(spec.__dict__)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=args.timeout)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        raise SystemExit(f"pbp_hpc.bench: the worker job failed (exit {proc.returncode}); its output is above")
    return records


def _median(xs: list[float]) -> Optional[float]:
    return float(np.median(xs)) if xs else None


def rows_of(records: list[dict[str, Any]], spec: Spec) -> list[dict[str, Any]]:
    """One row per (network, batch, split), with every column computed."""
    from pbp_hpc.engine.model import flops_per_example

    head = next(r for r in records if r["type"] == "header")
    peaks = head["peak_gflops"]
    rows: list[dict[str, Any]] = []
    for g in (r for r in records if r["type"] == "group"):
        by = {(c["kind"], c["ranks"], c["threads"], c["label"]): c for c in g["cases"]}
        med = {k: _median(c["times"]) for k, c in by.items()}
        base = med.get(("ours", 1, 1, "1x1"))
        flops = flops_per_example(g["layers"]) * g["n_train"]
        full = [(r, t) for r, t in splits_of(spec.cores) if r * t == spec.cores]
        timed_full = {(r, t): med.get(("ours", r, t, f"{r}x{t}")) for r, t in full}
        best = min((v, k) for k, v in timed_full.items() if v is not None)[1] if any(timed_full.values()) else None
        for c in g["cases"]:
            if c["kind"] != "ours":
                continue
            r, t, label = c["ranks"], c["threads"], c["label"]
            tpe = med[("ours", r, t, label)]
            gemm = med.get(("gemm", r, t, label))
            torch = med.get(("torch", 1, r * t, f"1x{r * t}"))
            comm = _median(c["comm"]) if r > 1 else None
            mem = [m for m in g["memory"].get(str(r), [])]
            peak_rss = max((m["peak_rss"] for m in mem), default=None)
            budget = max((m["budget"] for m in mem), default=None)
            growth = max((m["heap_growth"] / m["steps"] for m in mem), default=None)
            base_rss = g["memory"]["base_rss"]
            rows.append({
                "net": g["net"], "layers": g["layers"], "batch": g["batch"], "split": label, "ranks": r, "threads": t,
                "reducer": c["reducer"], "n_train": g["n_train"], "times": c["times"],
                "tpe": tpe, "gflops": flops / tpe / 1e9 if tpe else None, "active": c.get("active"),
                "peak_frac": (flops / tpe / 1e9) / peaks[f"{r}x{t}"] if tpe and f"{r}x{t}" in peaks else None,
                "gemm": gemm, "gemm_ratio": tpe / gemm if tpe and gemm else None,
                "torch": torch, "torch_ratio": tpe / torch if tpe and torch else None,
                "speedup": base / tpe if base and tpe else None, "comm_frac": comm,
                "rss_mb": (peak_rss - base_rss) / 2**20 if peak_rss and not _variant(c) else None,
                "rss_abs_mb": peak_rss / 2**20 if peak_rss and not _variant(c) else None,
                "budget_mb": budget / 2**20 if budget and not _variant(c) else None,
                "heap": growth if not _variant(c) else None,
                "best": (r, t) == best and not _variant(c),
            })
    return rows


def _variant(c: dict[str, Any]) -> bool:
    """A row added to compare reducers (not the table's main reducer)."""
    return "/" in c["label"]


def _fmt(v: Any, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def table(rows: list[dict[str, Any]]) -> str:
    cells = [COLUMNS] + [[
        r["net"], str(r["batch"]), r["split"], _fmt(r["tpe"], ".3f"), _fmt(r["gflops"], ".1f"),
        _fmt(None if r["peak_frac"] is None else 100 * r["peak_frac"], ".0f"),
        _fmt(100.0 if r["active"] is None else 100 * r["active"], ".0f"), _fmt(r["gemm"], ".3f"),
        _fmt(r["gemm_ratio"], ".3f"), _fmt(r["torch"], ".3f"), _fmt(r["torch_ratio"], ".2f"),
        _fmt(r["speedup"], ".2f"), _fmt(None if r["comm_frac"] is None else 100 * r["comm_frac"], ".1f"),
        _fmt(r["rss_mb"], ".0f"), _fmt(r["budget_mb"], ".0f"), _fmt(r["heap"], ".1f"), "*" if r["best"] else "",
    ] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


GOALS = {"gemm_1024": 1.08, "gemm_128": 1.20, "torch": 0.80, "speedup_1024": 1.85, "speedup_128": 1.60}


def checks(rows: list[dict[str, Any]], cores: int) -> list[str]:
    """The issue's goals, each as measured in this run."""
    out = []
    for r in rows:
        if "/" in r["split"]:
            continue
        if r["ranks"] == 1 and r["gemm_ratio"] is not None:
            limit = GOALS["gemm_1024"] if r["batch"] >= 1024 else GOALS["gemm_128"]
            out.append(_check(f"{r['net']} b{r['batch']} {r['split']}: TPE/GEMM", r["gemm_ratio"], "<=", limit))
        if r["ranks"] == 1 and r["torch_ratio"] is not None:
            out.append(_check(f"{r['net']} b{r['batch']} {r['split']}: TPE/torch", r["torch_ratio"], "<=", GOALS["torch"]))
        if r["net"] == "Net-1h" and r["ranks"] == cores > 1 and r["threads"] == 1 and r["speedup"] is not None:
            limit = GOALS["speedup_1024"] if r["batch"] >= 1024 else GOALS["speedup_128"] if r["batch"] >= 128 else None
            if limit is not None:
                out.append(_check(f"{r['net']} b{r['batch']} {r['split']}: speedup", r["speedup"], ">=", limit))
        if r["budget_mb"] is not None and r["rss_mb"] is not None:
            out.append(_check(f"{r['net']} b{r['batch']} {r['split']}: RSS MB", r["rss_mb"], "<=", r["budget_mb"]))
    return out


def _check(what: str, value: float, op: str, limit: float) -> str:
    ok = value <= limit if op == "<=" else value >= limit
    return f"  {'ok  ' if ok else 'MISS'} {what} = {value:.3f} ({op} {limit:.3f})"


def write_splits(path: Path, rows: list[dict[str, Any]], cores: int, host: str) -> None:
    """Merge this run's best splits into the JSON file pbp_hpc.hybrid reads."""
    from pbp_hpc.parallel import hybrid
    doc = hybrid.load(path) or {"about": hybrid.FILE_DOC, "machines": {}}
    machine = doc["machines"].setdefault(f"{cores} cores", {"cores": cores, "networks": {}})
    machine["host"] = host
    machine["measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
    for r in rows:
        if r["best"]:
            net = machine["networks"].setdefault(hybrid.network_key(r["layers"]), {"name": r["net"], "batches": {}})
            tried = {x["split"]: round(x["tpe"], 4) for x in rows if x["net"] == r["net"] and x["batch"] == r["batch"]
                     and x["ranks"] * x["threads"] == cores and "/" not in x["split"] and x["tpe"]}
            net["batches"][str(r["batch"])] = {"ranks": r["ranks"], "threads": r["threads"], "tpe_s": tried}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="batches 128 and 1024 on 10,000 examples (under 2 minutes)")
    mode.add_argument("--smoke", action="store_true", help="a tiny network on synthetic data, one epoch (for tests)")
    p.add_argument("--data-dir", help="MNIST IDX folder (else data.dir's usual search: $PBP_HPC_DATA, the cache)")
    p.add_argument("--nets", nargs="+", choices=[k for k in NETWORKS if k != "tiny"], help="networks (default both)")
    p.add_argument("--batches", nargs="+", type=int, help="global batch sizes")
    p.add_argument("--reps", type=int, help="timed epochs per case (default 3)")
    p.add_argument("--n-train", type=int, help="use the first N MNIST training images (5/6 of them train)")
    p.add_argument("--reducer", default="shm", choices=["blocking", "overlap", "shm"], help="reducer of multi-rank cases")
    p.add_argument("--compare-reducers", action=argparse.BooleanOptionalAction, default=None,
                   help="add Net-1h rows for the other reducers (default: on in full mode)")
    p.add_argument("--compare-dense", action=argparse.BooleanOptionalAction, default=True,
                   help="add a 1 x 1 row at batch 1024 (/dense) with train.skip_zero_inputs off: every input column in the GEMMs")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="pin rank i of an r x t case to cores i*t..i*t+t-1, as mpiexec -bind-to core:t (default on)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: time one-thread cases by CPU time (for a machine others are using; see README)")
    p.add_argument("--cores", type=int, help="cores to use (default: this process's affinity)")
    p.add_argument("--json", help="also write every measurement to this file")
    p.add_argument("--splits", help=f"write the best splits here (default {DEFAULT_SPLITS.relative_to(REPO)}; "
                                     "'' for nowhere; never in --smoke)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before the worker job is killed")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.torch_worker:
        return torch_worker()
    if args.worker:
        Worker(Spec(**json.loads(args.worker))).main()
        return 0
    from pbp_hpc.parallel.provenance import cores_available

    spec = make_spec(args, args.cores or cores_available())
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    for line in header_lines(spec, load_start):
        print(line, flush=True)
    records = launch(spec, args)
    head = next(r for r in records if r["type"] == "header")
    end = next((r for r in records if r["type"] == "end"), {"load": [float("nan")] * 3})
    prov = head.get("provenance", {})
    torch_info = head.get("torch") or {}
    peaks = ", ".join(f"{k} {v:.1f}" for k, v in head["peak_gflops"].items())
    print(f"MPI: {prov.get('mpi_library', '?')}; PyTorch: {torch_info.get('version', torch_info.get('error', 'not run'))}")
    print(f"SGEMM {spec.peak_n}^2 peak GFLOP/s by split (ranks x threads): {peaks}")
    rows = rows_of(records, spec)
    print()
    print(table(rows))
    print()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in end['load'])}; wall time {time.perf_counter() - t0:.0f} s")
    print("goals:")
    print("\n".join(checks(rows, spec.cores)))
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec.__dict__, "load_start": load_start, "records": records,
                                               "rows": rows}, indent=1))
    splits = DEFAULT_SPLITS if args.splits is None else (Path(args.splits) if args.splits else None)
    if splits is not None and spec.mode != "smoke" and spec.cores > 1:
        write_splits(splits, rows, spec.cores, platform.node())
        print(f"best splits written to {splits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
