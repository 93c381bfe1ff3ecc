"""The peers' shared machinery, and the PyTorch peer: a framework's training, timed in a child
process of rank 0.

Rank 0 drives each peer over pipes with JSON lines (PeerClient); the child (started as `python
-m pbp_hpc.bench --torch-worker`, or `--jax-worker T` for the JAX peer, pbp_hpc.bench.jax_peer)
is no MPI rank, so the framework's memory and thread pools stay out of ours. Every child answers
the same requests through serve(): setup (the config overrides of a group), epoch (the first
`steps` steps of an epoch, timed) and quit. The PyTorch peer's steps are framework.train_step,
the step `python -m pbp_hpc.framework` runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Protocol

from pbp_hpc.bench.cases import SEED

MPI_ENV = ("PMI_", "HYDRA_", "MPIR_", "MPICH_", "OMPI_")  # a child must not think it is a rank


class PeerClient:
    """A peer in a child process of rank 0, driven over pipes with JSON lines.

    The child starts at once; its first line (`info`: versions, or the error that stops it) is
    read when first asked for, so that several children can start side by side."""

    def __init__(self, name: str, args: list[str], cpus: Optional[list[int]] = None) -> None:
        self.name = name
        env = {k: v for k, v in os.environ.items() if not k.startswith(MPI_ENV)}
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # the race: on the cores of its column
        self.proc = subprocess.Popen([sys.executable, "-m", "pbp_hpc.bench", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, preexec_fn=pin)
        LIVE.append(self)
        self._info: Optional[dict[str, Any]] = None

    @property
    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = self._read()
        return self._info

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            return {"error": f"{self.name} worker exited ({self.proc.poll()})"}
        return json.loads(line)

    def ask(self, **msg: Any) -> dict[str, Any]:
        if self.proc.poll() is not None or "error" in self.info:
            return {"error": self.info.get("error", f"{self.name} worker is gone")}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.ask(cmd="quit")
            self.proc.wait(timeout=30)
        LIVE.remove(self)


LIVE: list[PeerClient] = []  # the children started and not yet closed


def kill_all() -> None:
    """End every peer child now (a stop signal): one in the middle of an epoch would run it to its end."""
    while LIVE:
        peer = LIVE.pop()
        peer.proc.kill()
        peer.proc.wait()


class TorchClient(PeerClient):
    """PyTorch in a child process of rank 0; one child serves every thread count."""

    def __init__(self, cpus: Optional[list[int]] = None) -> None:
        super().__init__("torch", ["--torch-worker"], cpus)


class PeerRun(Protocol):
    def epoch(self, epoch: int, steps: Optional[int], clock: Callable[[], float]) -> float: ...


def serve(info: dict[str, Any], setup: Callable[[list[str], Optional[str]], PeerRun], threads: Callable[[int], None],
          cpu_clock: Callable[[], float]) -> int:
    """Print `info`, then answer setup/epoch/quit requests from rank 0 on stdin; one JSON line per answer.

    threads(t): make the next epoch run on t threads (or raise: the table shows n/a);
    cpu_clock: the peer's CPU-time clock for `cpu` epochs (the clock that counts its compute threads).
    """
    print(json.dumps(info), flush=True)
    run: Optional[PeerRun] = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "quit":
                print(json.dumps({"ok": True}), flush=True)
                return 0
            if msg["cmd"] == "setup":
                run = None  # the last group's buffers go before the next group's are made
                run = setup(msg["overrides"], msg.get("config"))
                print(json.dumps({"ok": True}), flush=True)
            elif msg["cmd"] == "epoch" and run is not None:
                threads(int(msg["threads"]))
                clock = cpu_clock if msg.get("cpu") else time.perf_counter
                print(json.dumps({"time": run.epoch(int(msg["epoch"]), msg.get("steps"), clock)}), flush=True)
            else:
                print(json.dumps({"error": f"bad request {msg}"}), flush=True)
        except Exception as exc:  # noqa: BLE001 - report, keep serving: the table shows n/a
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    return 0


def torch_worker() -> int:
    """The PyTorch peer's child: serve() with TorchRun."""
    import mpi4py

    mpi4py.rc.initialize = False  # framework imports train, which imports MPI: not a rank of anything
    try:
        import torch

        from pbp_hpc import framework
    except ImportError as exc:
        print(json.dumps({"error": f"PyTorch is not importable: {exc}"}), flush=True)
        return 0
    info = {"version": torch.__version__, "mkl": bool(torch.backends.mkl.is_available()),
            "config": torch.__config__.show().splitlines()[3:5]}
    # one thread: torch computes on the calling thread, so that thread's CPU time is the step's
    return serve(info, lambda overrides, config=None: TorchRun(torch, framework, overrides, config), torch.set_num_threads,
                 time.thread_time)


def load_case(overrides: list[str], path: Optional[str] = None) -> tuple[Any, Any]:
    """The config of a group's overrides (over the config file at path, else the defaults) and its
    data set, loaded as pbp_hpc.train loads it (one rank)."""
    from pbp_hpc import config
    from pbp_hpc.data import datasets

    cfg = config.load(path, overrides)
    directory = None
    if cfg.data.name != "synthetic":
        from pbp_hpc.data.mnist import resolve_data_dir

        directory = resolve_data_dir(cfg.data.dir, download=False)
    return cfg, datasets.load(cfg, 1, directory)


class TorchRun:
    """pbp_hpc.framework's network, optimiser, schedule and batches (framework.build: the config's
    activation, loss, init and optimizer); its training steps without evaluation."""

    def __init__(self, torch: Any, framework: Any, overrides: list[str], config: Optional[str] = None):
        from pbp_hpc.engine import model
        from pbp_hpc.engine.schedules import Schedule
        self.torch, self.framework = torch, framework
        cfg, self.data = load_case(overrides, config)
        layout = model.Layout(cfg.model.layers)
        self.net, self.opt = framework.build(torch, cfg, layout)
        self.buf = framework.Batches(torch, cfg.model.layers[0], cfg.model.layers[-1], cfg.train.batch_size, cfg.model.dtype)
        self.B, self.loss = cfg.train.batch_size, cfg.model.loss
        self.steps = -(-len(self.data.train) // self.B)  # per epoch
        self.schedule = Schedule(cfg, self.steps)

    def epoch(self, epoch: int, steps: Optional[int], clock: Callable[[], float]) -> float:
        """The first `steps` steps of an epoch (None: all of them), in train.epoch_order's order."""
        from pbp_hpc.train import epoch_order

        B, source, n = self.B, self.data.train, len(self.data.train)
        order = epoch_order(SEED, epoch, n, True)
        train_step, args = self.framework.train_step, (self.torch, self.net, self.opt, self.buf, source)
        t0 = clock()
        for step in range(steps if steps is not None else self.steps):
            train_step(*args, order[step * B : (step + 1) * B], self.schedule(epoch * self.steps + step), self.loss)
        return clock() - t0
