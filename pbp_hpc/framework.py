"""The same training in PyTorch on the CPU: `python -m pbp_hpc.framework --config F`.

The report compared its own code with Theano; this is that row today. Same configuration,
same examples in the same order (datasets.load and train.epoch_order), same starting
parameters (model.init_params), the same network (model.activation: nn.Sigmoid, nn.Tanh or
nn.ReLU after each Linear; with model.loss cross_entropy the last Linear gives the logits),
the same loss (mse: 0.5 * ||a - y||^2; cross_entropy: -sum y log softmax; summed over the batch)
and the same update: the mean gradient g / B into torch.optim.SGD with optimizer.momentum,
nesterov and optimizer.weight_decay (pbp_hpc's optimizers are PyTorch's form), at the
schedule's learning rate for the step (engine.schedules.Schedule). Only the arithmetic is
PyTorch's: eager mode, autograd, torch.optim.SGD, torch's own thread pool. So in float64 its
parameters equal pbp_hpc's to rounding, and its timings are a framework's.

One process, no MPI: a multi-rank request is refused rather than silently run on one rank.
Started by `mpiexec -n P` anyway, every rank loads its configuration and checks the world
together (runtime.together): a bad configuration on any rank, or P > 1, ends every rank with
exit 2 and one message from rank 0, never P copies of it nor a rank left waiting.
Checkpointing and fault injection are pbp_hpc.train's; this runner ignores those settings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import numpy as np

from pbp_hpc.data import datasets
from pbp_hpc.engine import activations, losses, model
from pbp_hpc.engine.schedules import Schedule, check_batch, describe
from pbp_hpc.parallel import provenance
from pbp_hpc.config import Config
from pbp_hpc.errors import ConfigError, DataError, DivergenceError, PbpError, WorldSizeError
from pbp_hpc.parallel.runtime import add_config_arguments, load_config, report_failure, threads_for, together
from pbp_hpc.train import epoch_order

Log = Callable[[str], None]
EVAL_CHUNK = 4096  # examples per forward pass when measuring accuracy

TORCH_HINT = "PyTorch is not installed: `pip install torch` (CPU wheel: --index-url https://download.pytorch.org/whl/cpu), or `pip install -e '.[framework]'`"


class TorchMissingError(ConfigError):
    """torch cannot be imported: the framework comparison cannot run here."""


def import_torch() -> ModuleType:
    try:
        import torch
    except ImportError as exc:
        raise TorchMissingError(f"{TORCH_HINT} ({exc})") from None
    return torch


def check_single_process(cfg: Config) -> None:
    """Refuse what this runner cannot honour: more than one rank, or a GPU backend."""
    if cfg.parallel.ranks is not None and cfg.parallel.ranks > 1:
        raise WorldSizeError(
            f"parallel.ranks={cfg.parallel.ranks}, but pbp_hpc.framework runs PyTorch in a single process; "
            "set parallel.ranks=1 (or null) and use parallel.threads_per_rank for cores, or use pbp_hpc.train for MPI runs")
    from mpi4py import MPI  # already initialised by the train import; asked only to catch `mpiexec -n P`

    if MPI.COMM_WORLD.size > 1:
        raise WorldSizeError(
            f"started as one of {MPI.COMM_WORLD.size} MPI processes, but pbp_hpc.framework is single-process; "
            "run it without mpiexec")
    if cfg.backend != "numpy":
        raise ConfigError(f"backend={cfg.backend}: pbp_hpc.framework runs PyTorch on the CPU only; set backend=numpy")
    if cfg.algorithm != "batched":
        raise ConfigError(f"algorithm={cfg.algorithm}: pbp_hpc.framework implements only the batched algorithm")
    if cfg.train.ema_decay:
        raise ConfigError(f"train.ema_decay={cfg.train.ema_decay}: pbp_hpc.framework has no weight average; set it to 0")


def choose_threads(cfg: Config) -> int:
    """One process: the config's threads, or every core it may use (pbp_hpc's rule for one rank)."""
    return threads_for(cfg, 1, provenance.cores_available())[0]


def build_network(torch: ModuleType, layout: model.Layout, theta: np.ndarray, activation: str = "sigmoid",
                  loss: str = "mse") -> Any:
    """Linear layers holding the flat parameters (pbp_hpc stores W as n_in x n_out; torch as out x in),
    each followed by the activation's torch module, but the last where the loss wants logits."""
    nn = torch.nn
    dtype = getattr(torch, str(theta.dtype))
    act, out_act = activations.get(activation), losses.get(loss).output_activation
    layers: list[Any] = []
    ws, bs = model.views(theta, layout, np)
    with torch.no_grad():
        for l, (w, b) in enumerate(zip(ws, bs)):
            lin = nn.Linear(w.shape[0], w.shape[1], dtype=dtype)
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            lin.bias.copy_(torch.from_numpy(b.copy()))
            layers.append(lin)
            if l < len(ws) - 1 or out_act:
                layers.append(getattr(nn, act.torch_name)())
    return nn.Sequential(*layers)


def make_optimizer(torch: ModuleType, net: Any, cfg: Config) -> Any:
    """torch.optim.SGD doing what optimizer.name does in pbp_hpc (engine/optimizers/, PyTorch's form)."""
    o = cfg.optimizer
    if o.name not in ("sgd", "momentum", "nesterov"):
        raise ConfigError(f"optimizer.name={o.name}: pbp_hpc.framework knows sgd, momentum and nesterov")
    mu = 0.0 if o.name == "sgd" else o.momentum
    # nesterov at momentum 0 is plain SGD (torch refuses the combination)
    return torch.optim.SGD(net.parameters(), lr=cfg.train.learning_rate, momentum=mu,
                           nesterov=o.name == "nesterov" and mu > 0, weight_decay=o.weight_decay)


def build(torch: ModuleType, cfg: Config, layout: model.Layout) -> tuple[Any, Any]:
    """The network, from pbp_hpc's initial parameters for this config, and its optimizer."""
    theta = model.init_params(layout, cfg.train.seed, cfg.model.dtype, init=cfg.model.init)
    net = build_network(torch, layout, theta, cfg.model.activation, cfg.model.loss)
    return net, make_optimizer(torch, net, cfg)


def flat_parameters(net: Any, layout: model.Layout) -> np.ndarray:
    """The network's parameters in pbp_hpc's flat layout, for comparison with train.run."""
    lins = [m for m in net if hasattr(m, "weight")]
    theta = np.empty(layout.n_params, dtype=lins[0].weight.detach().numpy().dtype)
    ws, bs = model.views(theta, layout, np)
    for w, b, lin in zip(ws, bs, lins):
        w[...] = lin.weight.detach().numpy().T
        b[...] = lin.bias.detach().numpy()
    return theta


class Batches:
    """Preallocated host buffers filled by datasets.fill_batch; torch views them without copying."""

    def __init__(self, torch: ModuleType, n_in: int, n_out: int, max_batch: int, dtype: str):
        self.torch = torch
        self.x = np.zeros((max_batch, n_in), dtype=dtype)
        self.y = np.zeros((max_batch, n_out), dtype=dtype)
        self.rows = np.arange(max_batch)

    def fill(self, source: datasets.Source, idx: np.ndarray) -> tuple[Any, Any]:
        n = idx.shape[0]
        datasets.fill_batch(source, idx, self.x, self.y, np, self.rows)
        return self.torch.from_numpy(self.x[:n]), self.torch.from_numpy(self.y[:n])


def evaluate(torch: ModuleType, net: Any, source: datasets.Source, buf: Batches) -> float:
    n = len(source)
    if n == 0:
        return float("nan")
    correct = 0
    chunk = buf.x.shape[0]
    with torch.no_grad():
        for start in range(0, n, chunk):
            idx = np.arange(start, min(n, start + chunk))
            x, _ = buf.fill(source, idx)
            pred = net(x).argmax(dim=1).numpy()
            correct += int(np.count_nonzero(pred == source.labels_of(idx)))
    return correct / n


def run(cfg: Config, log: Optional[Log] = None, quiet: bool = False, return_params: bool = False,
        directory: Optional[Path] = None) -> dict[str, Any]:
    """Train as the config says with PyTorch; return a record shaped like train.run's."""
    check_single_process(cfg)
    torch = import_torch()
    say = log if (log is not None and not quiet) else (lambda s: None)
    threads = choose_threads(cfg)
    torch.set_num_threads(threads)
    if directory is None and cfg.data.name != "synthetic":
        from pbp_hpc.data.mnist import resolve_data_dir

        directory = resolve_data_dir(cfg.data.dir, download=cfg.data.download)
    data = datasets.load(cfg, 1, directory)
    layout = model.Layout(cfg.model.layers)
    net, opt = build(torch, cfg, layout)
    buf = Batches(torch, cfg.model.layers[0], cfg.model.layers[-1], max(cfg.train.batch_size, EVAL_CHUNK), cfg.model.dtype)
    info = provenance.collect()
    info["framework"] = {"name": "torch", "version": torch.__version__, "num_threads": torch.get_num_threads(),
                         "num_interop_threads": torch.get_num_interop_threads(),
                         "mkl": bool(torch.backends.mkl.is_available()), "openmp": bool(torch.backends.openmp.is_available())}
    say(f"pbp_hpc.framework: torch {torch.__version__} x {threads} thread(s), layers {cfg.model.layers}, "
        f"{cfg.model.activation}, {cfg.model.loss}, {cfg.model.dtype}, {cfg.optimizer.name}, batch {cfg.train.batch_size}, "
        f"{describe(cfg)}, {len(data.train)} examples from {data.origin}")
    check_batch(cfg, len(data.train))
    schedule = Schedule(cfg, -(-len(data.train) // cfg.train.batch_size))
    t_run = time.perf_counter()
    records = [_epoch(torch, net, opt, cfg, data, buf, epoch, schedule, say) for epoch in range(cfg.train.epochs)]
    test_acc = evaluate(torch, net, data.test, buf)
    total = time.perf_counter() - t_run
    say(f"test accuracy {100 * test_acc:.2f}%  ({len(data.test)} examples), total {total:.2f}s")
    result = _result(cfg, layout, len(data.train), threads, info, records, total, test_acc)
    if return_params:
        result["params"] = flat_parameters(net, layout)
    return result


def train_step(torch: ModuleType, net: Any, opt: Any, buf: Batches, source: datasets.Source, idx: np.ndarray,
               lr: float, loss: Any = "mse") -> float:
    """One optimizer step on the examples idx of source at learning rate lr: their summed loss.

    The optimizer gets the mean gradient (summed gradient / len(idx): a short last batch
    divides by its own size), as pbp_hpc's optimizers do, so weight decay and momentum act on
    the same quantity. The loss's .item() is the one host sync per step, as in train.
    pbp_hpc.bench times these steps as the PyTorch peer."""
    x, y = buf.fill(source, idx)
    opt.zero_grad(set_to_none=False)
    total = losses.get(loss).torch_sum(torch, net(x), y)
    (total / idx.shape[0]).backward()
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return total.item()  # the one host sync per step, as in train


def _epoch(torch: ModuleType, net: Any, opt: Any, cfg: Config, data: datasets.Data, buf: Batches, epoch: int,
           schedule: Schedule, say: Log) -> dict[str, Any]:
    n_train, B = len(data.train), cfg.train.batch_size
    steps = -(-n_train // B)
    order = epoch_order(cfg.train.seed, epoch, n_train, cfg.train.shuffle)
    loss_sum, compute = 0.0, 0.0
    t0 = time.perf_counter()
    for step in range(steps):
        tc = time.perf_counter()
        lr = schedule(epoch * steps + step)
        step_loss = train_step(torch, net, opt, buf, data.train, order[step * B : (step + 1) * B], lr, losses.of(cfg.model))
        compute += time.perf_counter() - tc
        if not math.isfinite(step_loss):
            raise DivergenceError(f"training diverged at epoch {epoch} step {step}: loss is {step_loss} "
                                  f"(learning rate {lr} is likely too high)", epoch, step)
        loss_sum += step_loss
    wall = time.perf_counter() - t0
    evaluate_now = cfg.train.eval_every and (epoch + 1) % cfg.train.eval_every == 0
    val_acc = evaluate(torch, net, data.val, buf) if (evaluate_now or epoch == cfg.train.epochs - 1) else None
    flops = model.flops_per_example(cfg.model.layers)
    rec = {"epoch": epoch, "loss": loss_sum / max(n_train, 1), "val_accuracy": val_acc, "time_s": wall,
           "compute_s": compute, "comm_s": 0.0, "wait_s": 0.0,
           "other_s": wall - compute, "gflops": flops * n_train / wall / 1e9 if wall > 0 else 0.0,
           "examples": n_train, "partial": False}
    va = "   n/a" if val_acc is None else f"{100 * val_acc:6.2f}%"
    say(f"epoch {epoch:3d}  loss {rec['loss']:.5f}  val_acc {va}  time {wall:.3f}s  {rec['gflops']:.1f} GFLOP/s")
    return rec


def _result(cfg: Config, layout: model.Layout, n_train: int, threads: int, info: dict[str, Any],
            records: list[dict[str, Any]], total: float, test_acc: float) -> dict[str, Any]:
    timed = [r["time_s"] for r in records[cfg.train.warmup_epochs :]]
    return {
        "status": "ok",
        "config": cfg.to_dict(),
        "ranks": 1,
        "threads_per_rank": threads,
        "test_accuracy": test_acc,
        "total_time_s": total,
        "n_train": n_train,
        "n_params": layout.n_params,
        "flops_per_example": model.flops_per_example(cfg.model.layers),
        "warmup_epochs": cfg.train.warmup_epochs,
        "median_epoch_time_s": float(np.median(timed)) if timed else None,
        "epochs": records,
        "provenance": info,
    }


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.framework", description=__doc__.split("\n\n")[0])
    add_config_arguments(p)  # the same files and overrides pbp_hpc.train reads
    p.add_argument("--json", action="store_true", help="print one JSON result object to stdout (logs go to stderr)")
    p.add_argument("--quiet", "-q", action="store_true", help="no per-epoch lines")
    p.set_defaults(resume=False)  # runtime.load_config's namespace; this runner never resumes
    return p.parse_args(argv)


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, (ConfigError, WorldSizeError, DataError)):
        return 2
    if isinstance(exc, DivergenceError):
        return 3
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    from mpi4py import MPI  # initialised by the train import

    args = parse_args(argv)
    out = sys.stderr if args.json else sys.stdout
    comm = MPI.COMM_WORLD
    # Under `mpiexec -n P` every rank is started on its own, maybe with other arguments (MPMD):
    # a failure on one rank is raised on all (runtime.together), printed once by rank 0, exit 2.
    try:
        cfg = together(comm, lambda: load_config(args))
        together(comm, lambda: check_single_process(cfg))  # P > 1: refused on every rank
    except Exception as exc:  # noqa: BLE001 - every failure must end the world, not hang it
        return report_failure(exc, comm)
    try:  # one process from here on: its errors are the run's, with their own exit codes
        result = run(cfg, log=lambda s: print(s, file=out, flush=True), quiet=args.quiet)
    except DivergenceError as exc:
        if args.json:
            print(json.dumps({"status": "diverged", "error": str(exc), "epoch": exc.epoch, "step": exc.step, "ranks": 1}), flush=True)
        print(f"pbp_hpc.framework: error: {exc}", file=sys.stderr, flush=True)
        return 3
    except PbpError as exc:
        print(f"pbp_hpc.framework: error: {exc}", file=sys.stderr, flush=True)
        return _exit_code(exc)
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
