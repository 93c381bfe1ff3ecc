"""What every entry point shares: configs loaded together, failures that end the whole job,
exit codes, signals, and the checks of the world and the node before any work.

Entry points (train, search_lr, framework, bench) run their setup through together() and end
through report_failure(): an error on some ranks only must end every rank, or the others
wait forever in their next collective.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from typing import Any, Callable, Mapping, Optional

import numpy as np
import psutil
from mpi4py import MPI

from pbp_hpc import config as configmod
from pbp_hpc.checkpoint import CheckpointError
from pbp_hpc.config import Config
from pbp_hpc.engine.model import Layout
from pbp_hpc.errors import (EXIT_DIVERGED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_SETUP, EXIT_STALLED,  # noqa: F401
                            EXIT_STOPPED, ConfigError, DataError, DivergenceError, PbpError, StallError, Stopped,
                            WorldSizeError)
from pbp_hpc.parallel import provenance


# Errors every rank raises together (same config, same reduced values): they end the job
# cleanly with this exit code. Anything else is one rank's failure and aborts the world.
COLLECTIVE_EXIT = {ConfigError: EXIT_SETUP, WorldSizeError: EXIT_SETUP, DivergenceError: EXIT_DIVERGED}
# Errors that a setup step raised on some ranks; together() re-raises them on every rank with
# the on_all_ranks marker, so they too are printed once and end the job with EXIT_SETUP.
_SETUP_ERRORS = {cls.__name__: cls for cls in (ConfigError, DataError, WorldSizeError, CheckpointError)}

# Errors one rank raises alone that have an exit code of their own (the world is aborted with it)
_ALONE_EXIT = {StallError: EXIT_STALLED}

_stop_signal: list[int] = []  # signals received; a list so the handler need not rebind a global
# [raise Stopped outside the loop, inside the training loop now, raise Stopped inside it too]
_mode = [False, False, False]


def _on_signal(signum: int, frame: Any) -> None:
    _stop_signal.append(signum)
    if _mode[2] or (_mode[0] and not _mode[1]):
        raise Stopped(signum)


def install_signal_handlers(stop_outside_loop: bool = False, stop_in_loop: bool = False) -> None:
    """SIGUSR1 (Slurm's warning before the time limit) and SIGTERM ask for a checkpoint-and-stop.

    stop_outside_loop: outside training_loop() (setup, download, evaluation, writing results) the
    handler raises Stopped at once, so that no phase outside the loop can outlast a stop request;
    inside it, it only sets the flag the loop reads at its next step (checkpoint-and-stop).
    stop_in_loop: for a command that has no checkpoint to write (search_lr, bench): Stopped at
    once in every phase, the training loop included."""
    _mode[0], _mode[2] = stop_outside_loop or stop_in_loop, stop_in_loop
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _on_signal)


@contextlib.contextmanager
def training_loop() -> Any:
    """The part of a run where a stop signal means checkpoint-and-stop at the next step."""
    _mode[1] = True
    try:
        yield
    finally:
        _mode[1] = False


def stop_signalled() -> bool:
    """Whether a SIGUSR1/SIGTERM reached this process."""
    return bool(_stop_signal)


def together(comm: MPI.Comm, step: Callable[[], Any], name_ranks: bool = True) -> Any:
    """Run a setup step on every rank; if it fails on any rank, fail on every rank.

    A step that fails on some ranks only (a file one node cannot read, a different --set in
    an MPMD launch) would otherwise leave the others waiting forever in the next collective.
    Every rank raises the first failing rank's error, marked `on_all_ranks`, so rank 0 prints
    it once and every rank exits with EXIT_SETUP. name_ranks=False for a step only rank 0 does.
    """
    try:
        value, failure = step(), None
    except tuple(_SETUP_ERRORS.values()) as exc:
        # the error's nearest class that every rank can rebuild by name (a subclass travels as its base)
        known = next(c.__name__ for c in type(exc).__mro__ if c.__name__ in _SETUP_ERRORS)
        value, failure = None, (known, str(exc))
    wait_answering_signals(comm)
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


def wait_answering_signals(comm: MPI.Comm) -> None:
    """A barrier that polls: a blocking MPI wait never returns to Python, so a SIGTERM to a rank
    waiting for a slow one (rank 0 writing the model, a node loading data) would go unanswered
    until the wait ended; here the handler runs within milliseconds (Stopped, outside the loop)."""
    if comm.size == 1:
        return
    request, pause = comm.Ibarrier(), 1e-4
    while not request.Test():
        time.sleep(pause)
        pause = min(2 * pause, 0.01)


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


# What HPC users set to size a process's threads, in the order they are consulted
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "SLURM_CPUS_PER_TASK")


def _env_threads(env: Mapping[str, str]) -> Optional[tuple[int, str]]:
    """The first of THREAD_VARS that holds a positive count (OMP's "4,2" lists: the first level)."""
    for var in THREAD_VARS:
        value = env.get(var, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value), f"{var}={env[var]}"
    return None


def threads_for(cfg: Config, on_node: int, cores: int, env: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """BLAS threads per rank for on_node ranks sharing cores, and what decided it.

    The config's parallel.threads_per_rank; else the variables every HPC user sets
    (THREAD_VARS: OMP_NUM_THREADS, ..., Slurm's --cpus-per-task), obeyed as given; else an
    equal share of the node's cores.
    """
    wanted = cfg.parallel.threads_per_rank
    if wanted is None:
        from_env = _env_threads(env)
        if from_env is not None:
            return from_env
        from pbp_hpc.parallel import hybrid

        measured = hybrid.best_threads(cfg.model.layers, cfg.train.batch_size, cores, on_node)
        if measured is not None and on_node * measured[0] <= cores:
            return measured
        return max(1, cores // on_node), f"{cores} core(s) shared by {on_node} rank(s) on the node"
    if wanted > 1 and on_node * wanted > cores and not cfg.parallel.oversubscribe:
        raise ConfigError(
            f"parallel.threads_per_rank={wanted} with {on_node} ranks on this node needs {on_node * wanted} cores, "
            f"but only {cores} are available; lower it, or set parallel.oversubscribe=true to run anyway"
        )
    return wanted, "parallel.threads_per_rank"


def choose_threads(cfg: Config, comm: MPI.Comm) -> tuple[int, str]:
    return threads_for(cfg, *node_share(comm))


def bind_to_cores(cfg: Config, comm: MPI.Comm, threads: int) -> dict[str, Any]:
    """Ranks that the launcher left unbound bind themselves to disjoint cores of their node.

    A rank free to run anywhere migrates between cores, and two ranks' BLAS threads end up
    sharing one while another idles: binding is what `mpiexec -bind-to core` does, and what
    users forget. Done only where it cannot hurt: several ranks on the node (one rank alone
    has the node), every rank free to use the same CPUs (else the launcher or Slurm bound
    them: left as they are), and no more threads than cores (oversubscribed runs need the
    scheduler's freedom). Every thread of the process is bound, including the BLAS threads
    started before. Returns {"how": in words, "cpus": this node's ranks' CPU lists}.
    """
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        mine = sorted(os.sched_getaffinity(0))
        sets = node.allgather(mine)
        local, on_node = node.rank, node.size
        slurm_bind = os.environ.get("SLURM_CPU_BIND_TYPE", "").strip(",").lower()
        if not cfg.parallel.bind:
            how = "not bound (parallel.bind: false)"
        elif on_node == 1:
            how = "not bound (one rank on its node)"
        elif any(s != sets[0] for s in sets) or slurm_bind not in ("", "none", "none,"):
            how = "bound by the launcher"
        elif on_node * threads > len(sets[0]):
            how = f"not bound ({on_node} ranks x {threads} threads on {len(sets[0])} CPUs: oversubscribed)"
        else:
            how = _bind(sets[0][local * threads : (local + 1) * threads], threads)
            mine = sorted(os.sched_getaffinity(0))
        return {"how": how, "cpus": node.allgather(mine)}
    finally:
        node.Free()


def _bind(cpus: list[int], threads: int) -> str:
    """Bind every thread of this process to cpus (sched_setaffinity(0) would bind the calling one only)."""
    try:
        for task in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(task), cpus)
            except ProcessLookupError:  # a thread that ended meanwhile
                pass
    except OSError as exc:  # a container that forbids it: run unbound, and say so
        return f"not bound ({exc.strerror or exc})"
    return f"bound by pbp_hpc to {threads} core(s) per rank"


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
    rank = cfg.study.straggler_rank
    if rank is not None and rank >= comm.size:
        raise ConfigError(f"study.straggler_rank is {rank} but the job has {comm.size} rank(s) (0..{comm.size - 1})")


def check_memory(cfg: Config, world_size: int) -> None:
    """Refuse a model that cannot fit in this node's memory, before allocating it.

    A typo such as a hidden layer of 10240000 would otherwise swap the node to a halt or be
    OOM-killed with no message. The estimate is a lower bound: parameters, gradients, this
    rank's activations and deltas, and the epoch's permutation.
    """
    layers = cfg.model.layers
    n_params = Layout(layers).n_params
    local_batch = -(-cfg.train.batch_size // world_size)
    n_train = (cfg.data.n_train or 0) * (world_size if cfg.data.scale_with_ranks else 1)
    need = np.dtype(cfg.model.dtype).itemsize * (2 * n_params + 2 * local_batch * sum(layers)) + 8 * n_train
    total = psutil.virtual_memory().total
    if need > total:
        raise ConfigError(
            f"model.layers {layers} with train.batch_size {cfg.train.batch_size} and data.n_train {cfg.data.n_train} "
            f"needs at least {need / 2**30:.1f} GiB per rank; this node has {total / 2**30:.1f} GiB in all"
        )


def slowest(comm: MPI.Comm, values: list[float], watch: Any = None) -> np.ndarray:
    """Element-wise max over ranks: an epoch lasts as long as its slowest rank. watch: a
    parallel.stall.StallWatch that notices a rank stalled here."""
    out = np.array(values, dtype=np.float64)
    with (watch if watch is not None else contextlib.nullcontext()):
        comm.Allreduce(MPI.IN_PLACE, out, op=MPI.MAX)
    return out


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--config, --set and --data-dir, as load_config reads them (train, framework, search_lr)."""
    p.add_argument("--config", "-c", help="YAML run configuration (defaults apply where it is silent)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.learning_rate=0.1 (repeatable)")
    p.add_argument("--data-dir", help="folder with the four MNIST-format IDX files (.gz or not); same as data.dir")


def load_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.dir={args.data_dir}")
    if getattr(args, "resume", False):
        overrides.append("checkpoint.resume=true")
    return configmod.load(args.config, overrides)


def report_failure(exc: BaseException, comm: MPI.Comm) -> int:
    """Print a failure once and return the exit code; abort the world if only this rank failed."""
    code = EXIT_SETUP if getattr(exc, "on_all_ranks", False) else next((c for t, c in COLLECTIVE_EXIT.items() if isinstance(exc, t)), None)
    if code is not None:
        if comm.rank == 0:
            print(f"pbp_hpc: error: {exc}", file=sys.stderr, flush=True)
        return code
    what = str(exc) if isinstance(exc, PbpError) else f"{type(exc).__name__}: {exc}"
    print(f"pbp_hpc: rank {comm.rank} of {comm.size} failed: {what}", file=sys.stderr, flush=True)
    if not isinstance(exc, PbpError):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    code = next((c for t, c in _ALONE_EXIT.items() if isinstance(exc, t)), EXIT_FAILED)
    if comm.size > 1:
        _let_the_launcher_read()
        comm.Abort(code)  # the other ranks are blocked in a collective: without this they hang
    return code


def _let_the_launcher_read() -> None:
    """Before MPI_Abort: the launcher forwards a rank's stderr through a pipe, and an abort that
    comes at once can cut off the end of what was just printed (a traceback's last lines)."""
    sys.stderr.flush()
    time.sleep(0.3)


OUTSIDE_LOOP = "outside the training loop (setup, download, evaluation or writing results)"


def report_stopped(exc: Stopped, comm: MPI.Comm, where: str = OUTSIDE_LOOP) -> int:
    """SIGTERM/SIGUSR1 outside the training loop (where: in words): end the whole job now, exit
    EXIT_STOPPED + signal."""
    code = EXIT_STOPPED + exc.signum
    print(f"pbp_hpc: rank {comm.rank} of {comm.size} stopped by {signal_name(exc.signum)} {where}: nothing more was "
          "written; run the same command again", file=sys.stderr, flush=True)
    if comm.size > 1:
        _let_the_launcher_read()
        comm.Abort(code)  # the other ranks may be waiting for this one in a collective
    return code


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)


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
