"""The JAX peer: the PyTorch peer's network and update, jit-compiled by XLA, in a child process of
rank 0 (`python -m pbp_hpc.bench --jax-worker T`), driven like it (peers.PeerClient, peers.serve).

JAX in its best form on the CPU: the training split lives on the device (float32 features, one-hot
targets); each epoch permutes it once on the device (one jitted gather, in train.epoch_order's
order) and each step is one jitted update on a slice of the permuted arrays (lax.dynamic_slice:
no gather per step, no host copy), with the parameter buffers donated to the update. The short
last batch has an update of its own shape, compiled at setup with the full one, so no epoch
compiles. The loss stays on the device (no host sync per step: JAX dispatches steps ahead
asynchronously); an epoch ends when its last parameters are ready.

The computation is pbp_hpc's and framework's: the config's layers and activation (sigmoid in the
report's setup), the loss as pbp_hpc defines it (mse: 0.5 * ||a - y||^2 per example, summed over
the outputs; cross_entropy: -sum y log softmax), averaged over the batch (a short last batch by
its own size), the config's optimizer (sgd, momentum or nesterov in pbp_hpc's PyTorch form, with
optimizer.weight_decay as pbp_hpc adds it) at the schedule's rate, the start of model.init_params.

XLA's CPU thread count is fixed when JAX starts, so there is one child per thread count: T = 1
runs with `--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1` in XLA_FLAGS, and
every child is bound to the first T cores it may use (XLA sizes its thread pools by the cores a
process may run on), as rank 0 of a 1 x T case is.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

import numpy as np

from pbp_hpc.bench.cases import SEED
from pbp_hpc.bench.peers import PeerClient, load_case, serve

ONE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


class JaxClient(PeerClient):
    """JAX on `threads` threads in a child process of rank 0."""

    def __init__(self, threads: int, cpus: Optional[list[int]] = None) -> None:
        self.threads = threads
        super().__init__(f"jax ({threads} thread{'s' if threads > 1 else ''})", ["--jax-worker", str(threads)], cpus)


def limit_threads(threads: int) -> list[int]:
    """Before JAX is imported: this process on its first `threads` cores, XLA on one thread for 1."""
    cpus: list[int] = []
    if hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[: max(threads, 1)]
        os.sched_setaffinity(0, set(cpus))
    if threads == 1:
        os.environ["XLA_FLAGS"] = f"{ONE_THREAD_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()
    return cpus


def jax_worker(threads: int) -> int:
    """The JAX peer's child: serve() with JaxRun, on `threads` threads for its whole life."""
    import mpi4py

    mpi4py.rc.initialize = False  # the config and data modules import train, which imports MPI
    cpus = limit_threads(threads)
    try:
        import jax
        import jaxlib
    except ImportError as exc:
        print(json.dumps({"error": f"JAX is not importable: {exc}"}), flush=True)
        return 0
    info = {"version": jax.__version__, "jaxlib": getattr(jaxlib, "__version__", "?"), "threads": threads,
            "backend": jax.default_backend(), "cpus": cpus, "xla_flags": os.environ.get("XLA_FLAGS", "")}

    def check_threads(t: int) -> None:
        if t != threads:
            raise ValueError(f"this JAX worker runs on {threads} thread(s), not {t}")

    # XLA computes on threads of its own: the process's CPU time is the steps'
    return serve(info, lambda overrides, config=None: JaxRun(jax, overrides, config), check_threads, time.process_time)


class JaxRun:
    """One (network, batch) group's training in JAX: data on the device, jitted steps."""

    def __init__(self, jax: Any, overrides: list[str], config: Optional[str] = None):
        from pbp_hpc.data import datasets
        from pbp_hpc.engine import activations, losses, model
        from pbp_hpc.engine.schedules import Schedule
        from pbp_hpc.errors import ConfigError

        cfg, data = load_case(overrides, config)
        if cfg.optimizer.name not in ("sgd", "momentum", "nesterov"):
            raise ConfigError(f"optimizer.name={cfg.optimizer.name}: the JAX peer knows sgd, momentum and nesterov")
        if cfg.model.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.layout = model.Layout(cfg.model.layers)
        self.dtype = np.dtype(cfg.model.dtype)
        self.B, src = cfg.train.batch_size, data.train
        self.n = n = len(src)
        self.steps = -(-n // self.B)  # per epoch
        self.schedule = Schedule(cfg, self.steps)
        rows = np.arange(n)
        x = np.empty((n, cfg.model.layers[0]), dtype=self.dtype)
        y = np.zeros((n, cfg.model.layers[-1]), dtype=self.dtype)
        src.features_into(rows, x)
        datasets.fill_targets(src, rows, y, rows)
        self.X, self.Y = jax.device_put(x), jax.device_put(y)
        del x, y
        theta = model.init_params(self.layout, cfg.train.seed, cfg.model.dtype, init=cfg.model.init)
        ws, bs = model.views(theta, self.layout, np)
        self.params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in zip(ws, bs)]

        act = {"sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "relu": jax.nn.relu}[activations.get(cfg.model.activation).name]
        out_act = losses.get(cfg.model.loss).output_activation
        mse, decay = cfg.model.loss == "mse", cfg.optimizer.weight_decay
        smooth, classes = (0.0 if mse else cfg.model.label_smoothing), cfg.model.layers[-1]
        mu = 0.0 if cfg.optimizer.name == "sgd" else cfg.optimizer.momentum
        nesterov = cfg.optimizer.name == "nesterov"
        # the velocity buffers (zero at the start, as pbp_hpc's): only where there is momentum
        self.velocity = [(jnp.zeros_like(w), jnp.zeros_like(b)) for w, b in self.params] if mu else None
        L = len(self.params)

        def loss(params: Any, xb: Any, yb: Any) -> Any:
            a = xb
            for l, (w, b) in enumerate(params):
                a = a @ w + b
                if l < L - 1 or out_act:
                    a = act(a)
            if smooth:  # engine/losses.py: targets (1 - e) y + e / classes
                yb = yb * (1.0 - smooth) + smooth / classes
            total = 0.5 * jnp.sum((a - yb) ** 2) if mse else -jnp.sum(yb * jax.nn.log_softmax(a, axis=1))
            return total / xb.shape[0]

        def make_step(size: int) -> Callable[..., Any]:
            # pbp_hpc's update in PyTorch's form (engine/optimizers/momentum.py): g' = g / B + wd theta;
            # v <- mu v + g'; theta <- theta - lr v (momentum), theta - lr (g' + mu v) (nesterov)
            def step(state: Any, xp: Any, yp: Any, start: Any, lr: Any) -> Any:
                params, velocity = state
                xb = jax.lax.dynamic_slice_in_dim(xp, start, size, axis=0)
                yb = jax.lax.dynamic_slice_in_dim(yp, start, size, axis=0)
                grads = jax.grad(loss)(params, xb, yb)  # the mean gradient g / B
                if decay:
                    grads = jax.tree_util.tree_map(lambda p, g: g + decay * p, params, grads)
                if velocity is None:
                    return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), None
                velocity = jax.tree_util.tree_map(lambda v, g: mu * v + g, velocity, grads)
                if nesterov:
                    params = jax.tree_util.tree_map(lambda p, g, v: p - lr * (g + mu * v), params, grads, velocity)
                else:
                    params = jax.tree_util.tree_map(lambda p, v: p - lr * v, params, velocity)
                return params, velocity

            return jax.jit(step, donate_argnums=0)

        self.full = make_step(self.B) if n >= self.B else None
        rest = n % self.B
        self.tail = make_step(rest) if rest else None
        self.permute = jax.jit(lambda X, Y, p: (jnp.take(X, p, axis=0), jnp.take(Y, p, axis=0)))
        self._compile()

    def _compile(self) -> None:
        """Compile the permutation and both step shapes now, on a copy of the parameters."""
        jax, jnp = self.jax, self.jnp
        xp, yp = self.permute(self.X, self.Y, jnp.arange(self.n, dtype=jnp.int32))
        lr = np.asarray(self.schedule(0), dtype=self.dtype)
        for fn, start in ((self.full, 0), (self.tail, self.n - self.n % self.B)):
            if fn is not None:
                jax.block_until_ready(fn(jax.tree_util.tree_map(jnp.copy, (self.params, self.velocity)), xp, yp, start, lr))

    def epoch(self, epoch: int, steps: Optional[int], clock: Callable[[], float]) -> float:
        """The first `steps` steps of an epoch (None: all of them), in train.epoch_order's order."""
        from pbp_hpc.train import epoch_order

        B, n = self.B, self.n
        order = epoch_order(SEED, epoch, n, True).astype(np.int32)
        lrs = [np.asarray(self.schedule(epoch * self.steps + s), dtype=self.dtype) for s in range(self.steps)]
        t0 = clock()
        xp, yp = self.permute(self.X, self.Y, order)
        state = (self.params, self.velocity)
        for s in range(steps if steps is not None else self.steps):
            state = (self.full if (s + 1) * B <= n else self.tail)(state, xp, yp, s * B, lrs[s])
        self.params, self.velocity = self.jax.block_until_ready(state)
        return clock() - t0

    def flat_params(self) -> np.ndarray:
        """The parameters in pbp_hpc's flat layout (model.views), for comparison with train."""
        from pbp_hpc.engine import model

        theta = np.empty(self.layout.n_params, dtype=self.dtype)
        ws, bs = model.views(theta, self.layout, np)
        for (w, b), (jw, jb) in zip(zip(ws, bs), self.params):
            w[...], b[...] = np.asarray(jw), np.asarray(jb)
        return theta
