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
import errno
import functools
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
import psutil
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from pbp_hpc.engine import active_inputs
from pbp_hpc.engine import backend
from pbp_hpc import checkpoint
from pbp_hpc.parallel import comm as reducers
from pbp_hpc import config as configmod
from pbp_hpc.data import datasets
from pbp_hpc.parallel import gpu
from pbp_hpc.engine import model
from pbp_hpc.engine import naive
from pbp_hpc.engine import ops
from pbp_hpc.parallel import provenance
from pbp_hpc.config import Config
from pbp_hpc.errors import ConfigError, DataError, DivergenceError, InjectedFault, PbpError, WorldSizeError
from pbp_hpc.checkpoint import CheckpointError

Log = Callable[[str], None]

# Errors every rank raises together (same config, same reduced values): they end the job
# cleanly with this exit code. Anything else is one rank's failure and aborts the world.
COLLECTIVE_EXIT = {ConfigError: 2, WorldSizeError: 2, DivergenceError: 3}
# Errors that a setup step raised on some ranks; `together` re-raises them on every rank with
# this marker, so they too are printed once and end the job with exit 2 instead of a hang.
SETUP_EXIT = 2
_SETUP_ERRORS = {cls.__name__: cls for cls in (ConfigError, DataError, WorldSizeError, CheckpointError)}
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT

_stop_signal: list[int] = []  # signals received; a list so the handler need not rebind a global


def _on_signal(signum: int, frame: Any) -> None:
    _stop_signal.append(signum)


def install_signal_handlers() -> None:
    """SIGUSR1 (Slurm's warning before the time limit) and SIGTERM ask for a checkpoint-and-stop."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def together(comm: MPI.Comm, step: Callable[[], Any], name_ranks: bool = True) -> Any:
    """Run a setup step on every rank; if it fails on any rank, fail on every rank.

    A step that fails on some ranks only (a file one node cannot read, a different --set in
    an MPMD launch) would otherwise leave the others waiting forever in the next collective.
    Every rank raises the first failing rank's error, marked `on_all_ranks`, so rank 0 prints
    it once and every rank exits with code 2. name_ranks=False for a step only rank 0 does.
    """
    try:
        value, failure = step(), None
    except tuple(_SETUP_ERRORS.values()) as exc:
        # the error's nearest class that every rank can rebuild by name (a subclass travels as its base)
        known = next(c.__name__ for c in type(exc).__mro__ if c.__name__ in _SETUP_ERRORS)
        value, failure = None, (known, str(exc))
    failures = comm.allgather(failure)
    failed = [r for r, f in enumerate(failures) if f is not None]
    if not failed:
        return value
    name, message = failures[failed[0]]
    if name_ranks and len(failed) < comm.size:
        message = f"on rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} only: {message}"
    exc = _SETUP_ERRORS[name](message)
    exc.on_all_ranks = True  # type: ignore[attr-defined]
    raise exc


def node_share(comm: MPI.Comm) -> tuple[int, int]:
    """(ranks on this node, cores they may use together).

    The cores are the union of the ranks' CPU sets: under a launcher that binds each rank to
    its own cores (srun --cpu-bind, Hydra -bind-to), a rank alone sees only its share.
    """
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        cpus = set().union(*node.allgather(provenance.cpu_set()))
        return node.size, max(1, len(cpus))
    finally:
        node.Free()


def choose_threads(cfg: Config, comm: MPI.Comm) -> int:
    on_node, cores = node_share(comm)
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
    # The digests first: every rank gets the same list, so they all raise or none does. Only
    # then the world size, which every rank now checks against the same parallel.ranks.
    digests = comm.allgather(cfg.digest())
    if len(set(digests)) != 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise ConfigError(f"ranks {bad} loaded a different configuration from rank 0; every rank must read the same config")
    if cfg.parallel.ranks is not None and comm.size != cfg.parallel.ranks:
        raise WorldSizeError(
            f"asked for {cfg.parallel.ranks} ranks (parallel.ranks) but MPI_COMM_WORLD has {comm.size}; "
            "under Slurm this usually means a wrong `srun --mpi=` plugin started separate 1-rank jobs"
        )


def resolve_data(cfg: Config, comm: MPI.Comm) -> Optional[Path]:
    """Rank 0 finds (and if need be downloads) the IDX folder; the others wait for its answer."""
    if cfg.data.name == "synthetic":
        return None
    answer: Any = None
    if comm.rank == 0:
        try:
            from pbp_hpc.data.mnist import resolve_data_dir

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
        self.grad = reducers.gradient_buffer(cfg.parallel.reducer, comm, reducers.buffer_size(self.layout), dtype, xp)
        # reducer shm: one copy of the parameters per node, in shared memory (comm.parameter_buffer)
        init = functools.partial(model.glorot_uniform, self.layout, cfg.train.seed, cfg.model.dtype)
        self.theta = reducers.parameter_buffer(self.grad, self.layout.n_params, lambda out: init(out=out))
        if self.theta is None:
            self.theta = xp.asarray(init())
        self.n_params = self.layout.n_params
        self.ws, self.bs = model.views(self.theta, self.layout, xp)
        self.gws, self.gbs = model.views(self.grad, self.layout, xp)
        self.params_grad = self.grad[: self.n_params]
        self.loss_slot = self.grad[self.n_params + reducers.LOSS_SLOT : self.n_params + reducers.LOSS_SLOT + 1]
        self.max_local = -(-cfg.train.batch_size // comm.size)
        # One rank on a BLAS we can call with alpha/beta: the SGD step happens inside the
        # gradient GEMMs (model.backward_sum accumulate=True); no update pass, no gradient buffer.
        # Up to Workspace.BLOCK_ROWS rows: beyond, its full-batch scratch would cost more memory
        # than the gradient buffer, and one update pass per step is nothing at that size.
        self.fused = (comm.size == 1 and cfg.algorithm == "batched" and ops.has_gemm(xp)
                      and self.max_local <= model.Workspace.BLOCK_ROWS)
        # The first layer on the batch's nonzero input columns only (active_inputs): CPU, uint8 data.
        # Its gathered weights and its gradient live in the first layer's part of the gradient buffer.
        self.skip: Optional[active_inputs.ActiveInputs] = None
        if (xp is np and cfg.algorithm == "batched" and cfg.train.skip_zero_inputs
                and datasets.has_active_features(data.train)):
            self.skip = active_inputs.ActiveInputs(self.layout.sizes[0], self.layout.sizes[1])
        self.work = model.Workspace(self.layout, self.max_local, xp, dtype, full_scratch=self.fused)
        self.rows = np.arange(self.work.max_batch)
        if self.skip is not None:
            # The batch, compacted or not. One rank (fused) never writes the gradient buffer:
            # the batch goes there too when it fits beside the gathered weights (Net-2h), and
            # the workspace's own batch buffer is never touched (memory is paged in on first write).
            self.x_flat = self.work.x.reshape(-1)
            rest = self.grad[self.layout.layer_slice(0).stop : self.n_params]
            if self.fused and rest.shape[0] >= self.x_flat.shape[0]:
                self.x_flat = rest[: self.x_flat.shape[0]]
            self.spare_bytes = self.work.acts[0].reshape(-1).view(np.uint8)  # free until the forward pass
            self.g1 = self.grad[self.layout.layer_slice(0)]  # the gathered W_1 rows, then their gradient
            self.layer_done_expanding = functools.partial(_layer_done_expanding, self)
        self.gpu: dict[str, Any] = {}  # device path: which reducer and why, for the result
        self.sync = gpu.stream_sync(xp)  # waits for queued device work; a no-op on numpy
        if xp is np:
            self.reducer = reducers.make_reducer(cfg.parallel.reducer, comm, self.grad, self.layout)
        else:
            self.reducer, self.gpu = gpu.make_reducer(cfg.parallel.gpu_reducer, comm, self.grad, self.layout, xp)


def epoch_order(seed: int, epoch: int, n: int, shuffle: bool) -> np.ndarray:
    """The global data order of an epoch: the same on every rank, a function of (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 0x45504F]).permutation(n)


def _epoch_order(st: State, epoch: int, n: int) -> Any:
    """Host data: epoch_order. Device data: an order drawn on the device, so none is uploaded."""
    t = st.cfg.train
    if isinstance(st.data.train, datasets.DeviceSource):
        return datasets.device_epoch_order(st.xp, t.seed, epoch, n, t.shuffle)
    return epoch_order(t.seed, epoch, n, t.shuffle)


def my_share(batch: int, size: int, rank: int) -> tuple[int, int]:
    """This rank's contiguous part of a global minibatch; sizes differ by at most one."""
    return batch * rank // size, batch * (rank + 1) // size


def _zero_grad(st: State) -> None:
    """Zero the gradients and the loss, but not the stop flag: this rank may be the one to carry it."""
    st.params_grad[...] = 0
    st.loss_slot[...] = 0


def apply_update(st: State, batch: int) -> None:
    """theta -= lr / batch * (the reduced gradient sum): one BLAS axpy pass on the CPU.

    Nothing to do where local_step already applied it inside the GEMMs (State.fused); the
    shm reducer applies it itself, each rank to its slice of the node's shared parameters.
    """
    if st.fused:
        return
    scale = -st.cfg.train.learning_rate / batch
    update = getattr(st.reducer, "update", None)  # the shm reducer owns the (shared) parameters' update
    if update is None or not update(scale):
        ops.axpy_(st.xp, scale, st.params_grad, st.theta)


def local_step(st: State, idx: np.ndarray) -> None:
    """This rank's summed gradient and loss for examples idx, into st.grad (not yet reduced)."""
    n = idx.shape[0]
    xp = st.xp
    if n == 0:  # more ranks than examples in this batch: contribute zeros
        _zero_grad(st)
        for l in reversed(range(st.layout.n_layers)):
            st.reducer.layer_done(l)
        return
    if st.skip is not None:
        _compacted_step(st, idx)
        return
    datasets.fill_batch(st.data.train, idx, st.work.x, st.work.y, xp, st.rows)
    if st.cfg.algorithm == "per_example":
        _zero_grad(st)
        x, y = st.work.x[:n], st.work.y[:n]
        st.loss_slot[0] = naive.example_grad_sum(st.theta, st.layout, x, y, st.params_grad)
        for l in reversed(range(st.layout.n_layers)):
            st.reducer.layer_done(l)
        return
    model.forward(xp, st.ws, st.bs, st.work.x, st.work, n)
    if st.fused:  # one rank: n is the global batch, and theta -= lr / n * gradient happens in the GEMMs
        model.backward_sum(xp, st.ws, st.ws, st.bs, st.work.x, st.work.y, st.work, n, st.loss_slot,
                           st.reducer.layer_done, scale=-st.cfg.train.learning_rate / n, accumulate=True)
        return
    model.backward_sum(xp, st.ws, st.gws, st.gbs, st.work.x, st.work.y, st.work, n, st.loss_slot, st.reducer.layer_done)


def _compacted_step(st: State, idx: np.ndarray) -> None:
    """local_step where the first layer may run on the batch's active input columns alone.

    No memory of its own: the gathered rows of W_1 live in the first layer's part of the
    gradient buffer (unused by one rank; elsewhere not written before the backward pass
    reaches the first layer), the compacted bytes in the activations (not written before the
    forward pass). Several ranks: the first layer's compact gradient overwrites the gathered
    weights and is then spread over its rows in place.
    """
    n, xp, skip = idx.shape[0], st.xp, st.skip
    assert skip is not None
    cols = st.data.train.active_features_into(idx, st.x_flat, skip, st.spare_bytes)
    datasets.fill_targets(st.data.train, idx, st.work.y, st.rows)
    if cols is None:  # too many active columns to pay: the plain step on the full batch
        x, ws, bs = _batch_x(st, n), st.ws, st.bs
    else:  # k columns and the ones that carry the bias; the first layer's bias inside its GEMMs
        x = st.x_flat[: n * (cols.shape[0] + 1)].reshape(n, cols.shape[0] + 1)
        ws = [skip.weights(st.ws[0], st.bs[0], st.g1), *st.ws[1:]]
        bs = [None, *st.bs[1:]]
    model.forward(xp, ws, bs, x, st.work, n)
    if st.fused:
        model.backward_sum(xp, ws, ws, bs, x, st.work.y, st.work, n, st.loss_slot,
                           st.reducer.layer_done, scale=-st.cfg.train.learning_rate / n, accumulate=True)
        if cols is not None:
            skip.put_weights(st.ws[0], st.bs[0], ws[0])
        return
    if cols is None:
        model.backward_sum(xp, ws, st.gws, st.gbs, x, st.work.y, st.work, n, st.loss_slot, st.reducer.layer_done)
        return
    gc = skip.rows(st.g1)  # over the gathered weights, which only the forward pass read
    model.backward_sum(xp, ws, [gc, *st.gws[1:]], [None, *st.gbs[1:]], x, st.work.y, st.work, n, st.loss_slot,
                       st.layer_done_expanding)


def _layer_done_expanding(st: State, l: int) -> None:
    """The reducer's layer_done, with the first layer's compact gradient spread over its rows
    before the reducer may send it."""
    if l == 0:
        st.skip.expand_gradient(st.g1)  # type: ignore[union-attr]
    st.reducer.layer_done(l)


def _batch_x(st: State, n: int) -> Any:
    """The full n x d batch buffer: the workspace's, or where State put it beside the skip's."""
    if st.skip is None:
        return st.work.x
    d = st.layout.sizes[0]
    return st.x_flat[: n * d].reshape(n, d)


def evaluate(st: State, source: datasets.Source) -> float:
    """Accuracy on a whole source, the work split across ranks; every rank gets the answer."""
    n_total = len(source)
    if n_total == 0:
        return float("nan")
    lo, hi = my_share(n_total, st.comm.size, st.comm.rank)
    correct = 0
    chunk = st.work.max_batch
    for start in range(lo, hi, chunk):
        idx = datasets.index_range(source, start, min(hi, start + chunk))
        x = _batch_x(st, chunk)
        datasets.fill_batch(source, idx, x, st.work.y, st.xp, st.rows)
        pred = model.predict_into(st.xp, st.ws, st.bs, x, st.work, idx.shape[0])
        correct += datasets.count_correct(source, pred, idx)  # device data: summed there, read once below
    return st.comm.allreduce(int(correct), op=MPI.SUM) / n_total


def _inject_fault(st: State, global_step: int) -> None:
    dbg = st.cfg.debug
    if dbg.fail_step is None or global_step != dbg.fail_step:
        return
    if dbg.fail_rank is not None and st.comm.rank != dbg.fail_rank:
        return
    if dbg.fail_kind == "nan":  # what an overflow does: this step's gradient and loss become NaN
        st.params_grad[0] = float("nan")
        st.loss_slot[...] = float("nan")
        return
    if dbg.fail_kind == "oserror":  # a failure that is not one of ours, as a dying disk would raise
        raise OSError(errno.EIO, f"injected I/O error on rank {st.comm.rank} at step {global_step} (debug.fail_kind=oserror)")
    raise InjectedFault(f"injected fault on rank {st.comm.rank} at step {global_step} (debug.fail_step)")


def _stop_requested(st: State, global_step: int) -> bool:
    """A SIGUSR1/SIGTERM reached this rank, or debug.signal_step stands in for one (tests)."""
    dbg = st.cfg.debug
    simulated = global_step == dbg.signal_step and dbg.signal_rank in (None, st.comm.rank)
    return bool(_stop_signal) or simulated


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


def _check_checkpoint_target(cfg: Config) -> None:
    """Before training, not hours later: a checkpoint can be written where the config says."""
    if cfg.checkpoint.path or cfg.checkpoint.every_epochs:
        checkpoint.check_target(_checkpoint_path(cfg))


def check_memory(cfg: Config, world_size: int) -> None:
    """Refuse a model that cannot fit in this node's memory, before allocating it.

    A typo such as a hidden layer of 10240000 would otherwise swap the node to a halt or be
    OOM-killed with no message. The estimate is a lower bound: parameters, gradients, this
    rank's activations and deltas, and the epoch's permutation.
    """
    layers = cfg.model.layers
    n_params = sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(layers, layers[1:]))
    local_batch = -(-cfg.train.batch_size // world_size)
    n_train = (cfg.data.n_train or 0) * (world_size if cfg.data.scale_with_ranks else 1)
    need = np.dtype(cfg.model.dtype).itemsize * (2 * n_params + 2 * local_batch * sum(layers)) + 8 * n_train
    total = psutil.virtual_memory().total
    if need > total:
        raise ConfigError(
            f"model.layers {layers} with train.batch_size {cfg.train.batch_size} and data.n_train {cfg.data.n_train} "
            f"needs at least {need / 2**30:.1f} GiB per rank; this node has {total / 2**30:.1f} GiB in all"
        )


def _read_checkpoint(path: Path) -> Optional[dict[str, Any]]:
    """The checkpoint at path, checked to be ours and complete; None if there is none."""
    if not path.exists():
        return None
    ck = checkpoint.load(path)
    meta = ck["meta"]
    if not isinstance(meta, dict) or not {"resume_key", "ranks", "records"} <= meta.keys():
        raise CheckpointError(f"{path} is a pbp_hpc checkpoint without the resume information (resume_key, ranks, records)")
    return ck


def _try_resume(st: State, log: Log) -> tuple[int, int, list[dict[str, Any]]]:
    cfg = st.cfg
    if not cfg.checkpoint.resume:
        return 0, 0, []
    path = _checkpoint_path(cfg)
    # Rank 0 alone reads and sends what it found: every rank resumes from the same bytes, and a
    # rank on a node that sees another (or no) file cannot make the ranks disagree.
    ck = together(st.comm, lambda: _read_checkpoint(path) if st.comm.rank == 0 else None, name_ranks=False)
    ck = st.comm.bcast(ck, root=0)
    if ck is None:
        log(f"no checkpoint at {path}: starting from scratch")
        return 0, 0, []
    if ck["meta"]["resume_key"] != _resume_key(cfg):
        raise ConfigError(f"checkpoint {path} was written by a run with other model/data/training settings; refusing to resume it")
    if ck["meta"]["ranks"] != st.comm.size:
        raise ConfigError(
            f"checkpoint {path} was written by a {ck['meta']['ranks']}-rank run and this run has {st.comm.size}; "
            "resume with the same rank count (a different count sums gradients in another order, so the result "
            "would not be bit-for-bit that of an uninterrupted run)"
        )
    if ck["theta"].shape != (st.n_params,):
        raise ConfigError(f"checkpoint {path} holds parameters of shape {ck['theta'].shape}, the model has {st.n_params}")
    st.theta[...] = st.xp.asarray(ck["theta"])
    log(f"resumed from {path} at epoch {ck['epoch']} step {ck['step']}")
    return ck["epoch"], ck["step"], ck["meta"]["records"]


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
    check_world(cfg, comm)
    threads = together(comm, lambda: choose_threads(cfg, comm))  # nodes may differ in cores
    together(comm, lambda: check_memory(cfg, comm.size))  # ... and in memory
    together(comm, lambda: _check_checkpoint_target(cfg) if comm.rank == 0 else None, name_ranks=False)
    xp = backend.namespace(cfg.backend) if xp is None else xp
    devices = gpu.select_device(comm, xp)  # CuPy: this rank's GPU, chosen before any allocation
    directory = resolve_data(cfg, comm)
    with threadpool_limits(limits=threads, user_api="blas"):
        data = together(comm, lambda: datasets.load(cfg, comm.size, directory))
        prints = comm.allgather(data.fingerprint())
        if len(set(prints)) != 1:
            exc = DataError(f"ranks loaded different data (fingerprints {prints}); check that every node sees the same files")
            exc.on_all_ranks = True  # type: ignore[attr-defined]  # every rank compared the same list
            raise exc
        if xp is not np:
            data = datasets.to_device(data, xp)  # uploaded once; batches are gathered on the device
        st = State(cfg, comm, xp, data)
        info = provenance.collect() if comm.rank == 0 else {}
        if devices is not None and comm.rank == 0:
            info["gpus"] = devices  # every rank's device: id, name, PCI bus id
        if st.gpu:
            log(f"device reducer: {st.gpu['gpu_reducer']} ({st.gpu['cuda_aware_reason']})")
        result = _train(st, threads, info, log, quiet)
        result.update(st.gpu)
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
    stop_ranks = 0
    for epoch in range(start_epoch, cfg.train.epochs):
        order = _epoch_order(st, epoch, n_train)
        first = start_step if epoch == start_epoch else 0
        comm.Barrier()  # epochs start together, so the slowest rank's time is the epoch's time
        t0 = time.perf_counter()
        compute = data_s = 0.0
        comm_before = st.reducer.seconds
        loss_sum, seen = 0.0, 0
        bar = _progress(cfg, comm, steps - first, epoch, quiet)
        for step in range(first, steps):
            gidx = order[step * B : min((step + 1) * B, n_train)]  # in bounds: the Array API wants it
            Bk = gidx.shape[0]
            lo, hi = my_share(Bk, comm.size, comm.rank)
            tc = time.perf_counter()
            st.grad[st.n_params + reducers.STOP_SLOT] = 1.0 if _stop_requested(st, epoch * steps + step) else 0.0
            local_step(st, gidx[lo:hi])
            _inject_fault(st, epoch * steps + step)
            st.sync()  # GPU kernels run asynchronously: wait here so compute_s holds them
            t_reduce = time.perf_counter()
            st.reducer.finish()
            tu = time.perf_counter()
            extras = backend.to_host(st.grad[st.n_params :])  # the one host sync per step: loss and stop flag
            step_loss = float(extras[reducers.LOSS_SLOT])
            if not math.isfinite(step_loss):
                raise DivergenceError(
                    f"training diverged at epoch {epoch} step {step}: loss is {step_loss} "
                    f"(learning rate {cfg.train.learning_rate} is likely too high)", epoch, step)
            apply_update(st, Bk)
            compute += (t_reduce - tc) + (time.perf_counter() - tu)
            loss_sum += step_loss
            seen += Bk
            if bar is not None:
                bar.update(1)
            if float(extras[reducers.STOP_SLOT]) > 0:  # the count of ranks asked to stop, the same on all
                stopped_at, stop_ranks = (epoch, step + 1), int(extras[reducers.STOP_SLOT])
                break
        if bar is not None:
            bar.close()
        wall = time.perf_counter() - t0
        allreduce = st.reducer.seconds - comm_before
        slow = _slowest(comm, [wall, compute - 0.0, allreduce])
        if stopped_at is not None and stopped_at[1] < steps:  # mid-epoch: the part-epoch is not recorded
            return _stop(st, threads, info, records, stopped_at, stop_ranks, time.perf_counter() - t_run, log)
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
        if stopped_at is not None and epoch + 1 < cfg.train.epochs:  # asked at an epoch's last step: it is recorded
            return _stop(st, threads, info, records, (epoch + 1, 0), stop_ranks, time.perf_counter() - t_run, log)
        if cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0 and epoch + 1 < cfg.train.epochs:
            _save_checkpoint(st, epoch + 1, 0, records)
    test_acc = evaluate(st, st.data.test)
    total = time.perf_counter() - t_run
    log(f"test accuracy {100 * test_acc:.2f}%  ({len(st.data.test)} examples), total {total:.2f}s")
    if cfg.checkpoint.path or cfg.checkpoint.every_epochs:
        _save_checkpoint(st, cfg.train.epochs, 0, records)
    return _result(st, threads, info, records, total, test_accuracy=test_acc)


def _stop(st: State, threads: int, info: dict[str, Any], records: list[dict[str, Any]], at: tuple[int, int],
          stop_ranks: int, total: float, log: Log) -> dict[str, Any]:
    """Every rank was asked to stop at the same step: checkpoint where the next step would begin."""
    path = _save_checkpoint(st, *at, records)
    log(f"stop requested by a signal (SIGUSR1/SIGTERM) on {stop_ranks} of {st.comm.size} rank(s): checkpoint written "
        f"to {path} at epoch {at[0]} step {at[1]}; run again with --resume to continue")
    return _result(st, threads, info, records, total, status="checkpointed", checkpoint=str(path),
                   stopped_at={"epoch": at[0], "step": at[1]})


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
        # rank 0's count: ranks see different batches, and so compact differently
        "active_inputs": st.skip.summary() if st.skip is not None else None,
    }
    out.update(extra)
    return out


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--config, --set and --data-dir, as load_config reads them (train, framework, search_lr)."""
    p.add_argument("--config", "-c", help="YAML run configuration (defaults apply where it is silent)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.learning_rate=0.1 (repeatable)")
    p.add_argument("--data-dir", help="folder with the four MNIST-format IDX files (.gz or not); same as data.dir")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.train", description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
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
    code = SETUP_EXIT if getattr(exc, "on_all_ranks", False) else next((c for t, c in COLLECTIVE_EXIT.items() if isinstance(exc, t)), None)
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


def report_interrupt(comm: MPI.Comm) -> int:
    """Ctrl-C (SIGINT, which Hydra forwards to every rank): end the whole job now, without a checkpoint.

    Python raises KeyboardInterrupt only between bytecodes, so a rank waiting inside an MPI
    collective never sees it; once any rank has left, that wait is forever. Abort ends them all.
    """
    print(f"pbp_hpc: rank {comm.rank} of {comm.size} interrupted (SIGINT): stopping every rank without a checkpoint "
          "(send SIGUSR1 or SIGTERM instead to checkpoint and stop)", file=sys.stderr, flush=True)
    if comm.size > 1:
        comm.Abort(EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED


def main(argv: Optional[list[str]] = None) -> int:
    comm = MPI.COMM_WORLD
    args = parse_args(argv)
    out = sys.stderr if args.json else sys.stdout
    install_signal_handlers()
    try:
        cfg = together(comm, lambda: load_config(args))  # an MPMD launch may give ranks other arguments
        result = run(cfg, comm, log=lambda s: print(s, file=out, flush=True), quiet=args.quiet)
    except DivergenceError as exc:
        if args.json and comm.rank == 0:
            print(json.dumps({"status": "diverged", "error": str(exc), "epoch": exc.epoch, "step": exc.step,
                              "ranks": comm.size}), flush=True)
        return report_failure(exc, comm)
    except KeyboardInterrupt:
        return report_interrupt(comm)
    except Exception as exc:  # noqa: BLE001 - every failure must end the world, not hang it
        return report_failure(exc, comm)
    if args.json and comm.rank == 0:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
