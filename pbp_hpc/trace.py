"""A timeline of a run: `train.trace: PATH` writes a Chrome trace-event JSON file (what Perfetto's
UI, ui.perfetto.dev, and chrome://tracing open), one process per rank named by rank and host.

Spans ("X" events) on each rank's main thread, nested: every traced global step (or block of
steps, for the strategies that run blocks), inside it the forward pass, the backward pass, the
injected straggler delay (study.straggler_*), each reduction (named by the reducer) and the
update; inside those, the waits the stall check watches (an MPI wait, a barrier: "wait"); and,
outside the steps, every evaluation pass and checkpoint. Counters ("C" events): the loss and the
learning rate of each traced step, and the bytes this rank has sent (the reducer's count per step;
the strategies that run blocks of steps give the loss only).

Bounded: only the first `train.trace_steps` steps of every epoch are traced (evaluations and
checkpoints always). Clocks: every rank takes its zero right after one barrier at the start, so
the ranks' timelines line up to the barrier's skew (microseconds on one node). Each rank keeps
its events in memory and writes them to PATH.rank<R>.part at every epoch's end; at the end of
the run rank 0 gathers them into PATH and removes the parts. If the job died, the parts remain:

    python -m pbp_hpc.trace merge PATH     # PATH.rank*.part -> PATH

Off (the default), nothing is wrapped: the training loop runs exactly as without this module.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional


class Trace:
    """This rank's events (lists, appended only while tracing a step or a pass)."""

    def __init__(self, path: str, comm: Any, steps: int):
        self.path, self.comm, self.rank = path, comm, comm.rank
        self.host = socket.gethostname()
        self.traced_steps = steps  # per epoch
        self.events: list[dict[str, Any]] = []
        self.on = False  # inside a traced step, pass or checkpoint
        self.depth = 0
        self.sent = 0
        comm.Barrier()  # the ranks' common zero
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return (time.perf_counter() - self.t0) * 1e6  # microseconds, the format's unit

    def span(self, name: str, start: float, cat: str, **args: Any) -> None:
        self.events.append({"name": name, "cat": cat, "ph": "X", "ts": start, "dur": max(0.0, self.now() - start),
                            "pid": self.rank, "tid": 0, **({"args": args} if args else {})})

    def counter(self, name: str, value: float) -> None:
        self.events.append({"name": name, "ph": "C", "ts": self.now(), "pid": self.rank, "args": {name: value}})

    def wrap(self, owner: Any, attr: str, name: str, cat: str, always: bool = False,
             after: Optional[Callable[[Any, tuple[Any, ...]], None]] = None) -> None:
        """owner.attr(...) as a span (only inside a traced step unless `always`); after(result, args)
        runs inside the span's bracket, for counters."""
        inner = getattr(owner, attr)

        @functools.wraps(inner)
        def traced(*args: Any, **kwargs: Any) -> Any:
            if not (self.on or always):
                return inner(*args, **kwargs)
            was, self.on = self.on, True
            start = self.now()
            try:
                out = inner(*args, **kwargs)
            finally:
                self.span(name, start, cat)
                self.on = was
            if after is not None:
                after(out, args)
            return out

        setattr(owner, attr, traced)

    def metadata(self) -> list[dict[str, Any]]:
        return [{"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank} ({self.host})"}},
                {"name": "process_sort_index", "ph": "M", "pid": self.rank, "args": {"sort_index": self.rank}},
                {"name": "thread_name", "ph": "M", "pid": self.rank, "tid": 0, "args": {"name": "training loop"}}]

    def flush(self) -> None:
        """This rank's events so far to PATH.rank<R>.part (what `merge` reads if the job dies)."""
        part = Path(f"{self.path}.rank{self.rank}.part")
        tmp = part.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.metadata() + self.events))
        os.replace(tmp, part)

    def finish(self) -> Optional[str]:
        """Gather every rank's events to rank 0 and write PATH (collective); the path on rank 0."""
        mine = self.metadata() + self.events
        every = self.comm.gather(mine, root=0)
        if self.rank != 0:
            self.comm.Barrier()
            return None
        write(self.path, [e for events in every for e in events], ranks=self.comm.size)
        for r in range(self.comm.size):
            Path(f"{self.path}.rank{r}.part").unlink(missing_ok=True)
        self.comm.Barrier()
        return self.path


def check_target(path: str) -> None:
    """Before training, on every rank (each writes its part beside PATH): the folder exists or is
    made, PATH is not a folder, and a file can be written there. ConfigError otherwise."""
    from pbp_hpc import targets
    from pbp_hpc.errors import ConfigError

    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"train.trace {path} is a directory; give a file name such as {target / 'trace.json'}")
    blocker = next((q for q in target.parents if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"train.trace {path}: {blocker} is a file, not a directory")
    try:
        targets.prove_writable(target)
    except OSError as exc:
        raise ConfigError(f"train.trace {path}: cannot write there ({exc.strerror or exc})") from None


def write(path: str, events: list[dict[str, Any]], ranks: int) -> None:
    doc = {"traceEvents": events, "displayTimeUnit": "ms",
           "otherData": {"producer": "pbp_hpc", "ranks": ranks, "clock": "microseconds since a barrier at the start"}}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def instrument(st: Any, path: str, steps: int) -> Trace:
    """Wrap the run's parts (strategy, local step, reducer, stall watch) so that their calls
    inside traced steps become spans. Collective (the clock's barrier)."""
    tr = Trace(path, st.comm, steps)
    strategy, reducer, local = st.strategy, st.reducer, st.strategy.local
    per_step = reducer.wire_bytes()

    def step_counters(out: Any, args: tuple[Any, ...]) -> None:
        tr.sent += per_step
        tr.counter("loss", float(out[0]) / max(1, args[0].shape[0]))  # the step's mean loss
        tr.counter("learning rate", float(args[1]))
        tr.counter("bytes sent", float(tr.sent))

    def traced_step(inner: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(inner)
        def step(gidx: Any, lr: float, stop: bool, at: tuple[int, int, int]) -> Any:
            if at[1] >= tr.traced_steps:
                return inner(gidx, lr, stop, at)
            tr.on = True
            start = tr.now()
            try:
                out = inner(gidx, lr, stop, at)
            finally:
                tr.span(f"step {at[2]}", start, "step", epoch=at[0], step=at[1])
                tr.on = False
            step_counters(out, (gidx, lr))
            return out
        return step

    def traced_block(inner: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(inner)
        def run_block(order: Any, epoch: int, first: int, end: int, *rest: Any) -> Any:
            if first >= tr.traced_steps:
                return inner(order, epoch, first, end, *rest)
            tr.on = True
            start = tr.now()
            try:
                out = inner(order, epoch, first, end, *rest)
            finally:
                tr.span(f"steps {first}-{end - 1}", start, "step", epoch=epoch, first=first, end=end)
                tr.on = False
            tr.counter("loss", float(out[0]) / max(1, out[1]))  # block strategies send their own way: no byte count
            return out
        return run_block

    if type(strategy).run_block is _default_run_block():
        strategy.step = traced_step(strategy.step)
    else:
        strategy.run_block = traced_block(strategy.run_block)
    if hasattr(local, "backward"):  # forward = from the call to the backward pass's start
        _split_forward(tr, strategy, local)
    else:
        tr.wrap(strategy, "local", "forward + backward", "compute")
        strategy.local = _Local(local, strategy.local)
    if strategy.straggler.active:
        tr.wrap(strategy.straggler, "after", "straggler delay (study.straggler_*)", "compute")
    tr.wrap(reducer, "finish", f"reduce ({reducer.name})", "comm")
    if hasattr(strategy, "update"):
        tr.wrap(strategy, "update", "update", "compute")
    else:
        tr.wrap(strategy.optimizer, "apply", "update", "compute")
    if hasattr(strategy, "_average"):
        tr.wrap(strategy, "_average", "average parameters", "comm")
    _watch_waits(tr, reducer.watch)
    return tr


def _default_run_block() -> Any:
    from pbp_hpc.parallel.strategies.base import Strategy

    return Strategy.run_block


def _split_forward(tr: Trace, strategy: Any, local: Any) -> None:
    """Spans forward and backward from two clock reads: the local step's start and its backward's."""
    inner_backward = local.backward
    mark = [0.0]

    def backward(*args: Any, **kwargs: Any) -> Any:
        if tr.on and not mark[0]:
            mark[0] = tr.now()
        return inner_backward(*args, **kwargs)

    local.backward = backward
    inner_local = strategy.local

    def traced_local(*args: Any, **kwargs: Any) -> Any:
        if not tr.on:
            return inner_local(*args, **kwargs)
        start, mark[0] = tr.now(), 0.0
        out = inner_local(*args, **kwargs)
        split = mark[0] or start
        tr.events.append({"name": "forward", "cat": "compute", "ph": "X", "ts": start, "dur": split - start,
                          "pid": tr.rank, "tid": 0})
        tr.span("backward", split, "compute")
        return out

    strategy.local = _Local(local, traced_local)


class _Local:
    """The local step, called through `call` (its spans); every other attribute is the step's own."""

    def __init__(self, local: Any, call: Callable[..., Any]):
        self._local, self._call = local, call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._local, name)


def _watch_waits(tr: Trace, watch: Any) -> None:
    """The stall check's enter()/leave() (every blocking wait) as "wait" spans."""
    enter, leave = type(watch).enter.__get__(watch), type(watch).leave.__get__(watch)
    began = [0.0]

    def traced_enter() -> None:
        began[0] = tr.now()
        enter()

    def traced_leave() -> None:
        leave()
        if tr.on:
            tr.span("wait", began[0], "wait", what=watch.what or f"step {watch.step}")

    watch.enter, watch.leave = traced_enter, traced_leave


def span_of(tr: Optional[Trace], name: str, cat: str) -> Any:
    """A context manager: a span around a block of the loop's own (evaluation, checkpoint); a
    no-op without a trace."""
    import contextlib

    if tr is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def bracket() -> Any:
        was, tr.on = tr.on, True
        start = tr.now()
        try:
            yield
        finally:
            tr.span(name, start, cat)
            tr.on = was

    return bracket()


def merge(path: str) -> int:
    """PATH.rank*.part -> PATH (a job that died before rank 0 merged them); the ranks found."""
    parts = sorted(glob.glob(f"{glob.escape(path)}.rank*.part"))
    if not parts:
        raise FileNotFoundError(f"no trace parts {path}.rank*.part to merge")
    events: list[dict[str, Any]] = []
    for p in parts:
        events += json.loads(Path(p).read_text())
    write(path, events, ranks=len(parts))
    for p in parts:
        os.unlink(p)
    return len(parts)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.trace", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge the per-rank parts PATH.rank*.part a dead job left into PATH")
    m.add_argument("path")
    args = p.parse_args(argv)
    try:
        n = merge(args.path)
    except (OSError, ValueError) as exc:
        print(f"pbp_hpc.trace: error: {exc}", file=sys.stderr)
        return 2
    print(f"merged {n} rank(s) into {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
