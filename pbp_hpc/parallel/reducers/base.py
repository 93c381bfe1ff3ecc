"""The reducer interface: how the ranks' gradient sums become one global sum.

Every reducer owns the same flat buffer, laid out as [layer 0 | layer 1 | ... | extras], where
the extras are scalars that ride along for free: the summed loss and the count of ranks that
were asked to stop (a signal), so no step needs a second collective.

A step, as the allreduce strategy runs it:
    local step writes grad (calling layer_done(l) as each layer's gradient is final)
    finish()                      grad's extras are global; every span of shares() sums to the global gradient
    for span, parts in shares():  the optimizer updates parameters[span] from sum(parts)
    updated()                     every rank sees the new parameters before its next forward pass

A new reducer is a module with a subclass of Reducer, registered by name in
pbp_hpc.parallel.reducers (or from outside with reducers.register). Only finish() must be
written; the rest have defaults for a reducer that sums the whole buffer in place.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from time import perf_counter, sleep
from typing import Any, Callable, ClassVar, Iterator, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.engine.model import Layout

EXTRAS = 2  # slots after the gradients
LOSS_SLOT = 0  # offsets within the extras
STOP_SLOT = 1

Fill = Callable[[Optional[np.ndarray]], np.ndarray]  # fill(out) -> the initial parameters (into out if given)
_STALL_TAG = 0x5741  # the side channel's messages: "I have arrived at step g"


class StallWatch:
    """Notices a step that waits too long for the other ranks (Horovod's stall check).

    The reducer brackets each blocking wait with enter() / leave(): two clock reads a step, the
    MPI call itself unchanged (a non-blocking collective polled with Test costs up to 1.4x an
    MPI_Allreduce of a 3 MB buffer on MPICH). A watchdog thread, started with the first wait,
    looks every `tick` seconds. Past warning_s in one wait, it tells every other rank through a
    side channel (point-to-point, a tag of its own on the reducer's communicator: it never
    matches a collective) that this rank has arrived at step g; after GRACE_S, the lowest rank
    that arrived prints one warning naming the ranks it has not heard from, the ones not yet
    there. Past timeout_s (None: never) it prints why and aborts the job with
    runtime.EXIT_STALLED. stalled_s adds up the waits that passed warning_s (the epoch's record).
    """

    GRACE_S = 0.5  # after warning_s, how long arrivals are collected before the warning is printed
    EXIT_STALLED = 4  # runtime.EXIT_STALLED (not imported: runtime imports the reducers' users)

    def __init__(self, comm: MPI.Comm, warning_s: float = 60.0, timeout_s: Optional[float] = None):
        self.comm, self.warning_s, self.timeout_s = comm, warning_s, timeout_s
        self.step = 0  # the global step being waited for (set by the strategy)
        self.what = ""  # how the warning names a wait that is not a step's (around()); "": "step G"
        self.stalled_s = 0.0
        self.warnings = 0
        self.size, self.rank = comm.size, comm.rank
        self._since = 0.0  # perf_counter() when the current wait began; 0.0: not waiting
        self._flagged = 0.0  # the _since of the wait the watchdog found stalled
        self._thread: Optional[threading.Thread] = None
        self._quit = threading.Event()
        self._inbox = np.zeros(1, dtype=np.int64)
        self._sends: list[Any] = []
        # the side channel needs MPI calls from the watchdog thread while this one is in a collective
        self._can_name = MPI.Query_thread() == MPI.THREAD_MULTIPLE

    def enter(self) -> None:
        if self._thread is None and self.size > 1:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="pbp_hpc-stall-watch")
            self._thread.start()
        self._since = perf_counter()

    def leave(self) -> None:
        since, self._since = self._since, 0.0
        if self._flagged == since and since:
            self.stalled_s += perf_counter() - since

    @contextlib.contextmanager
    def around(self, what: str) -> Iterator[None]:
        """enter() / leave() around a blocking call of the caller's own (an evaluation's reduction),
        which the warning names `what` instead of "step G"."""
        self.what = what
        self.enter()
        try:
            yield
        finally:
            self.leave()
            self.what = ""

    def wait(self, requests: Any) -> None:
        """MPI_Wait / MPI_Waitall of the requests, watched."""
        self.enter()
        try:
            if isinstance(requests, list):
                MPI.Request.Waitall(requests)
            else:
                requests.Wait()
        finally:
            self.leave()

    def _watch(self) -> None:
        told, warned, arrived = 0.0, 0.0, set()
        tick = min(0.25, self.warning_s / 4)
        last = woke = perf_counter()
        while not self._quit.wait(tick):
            now = perf_counter()
            if now - last > max(1.0, 4 * tick):  # this process itself was stopped (SIGSTOP) or starved:
                woke = now  # its own pause is not a wait for the others
            last = now
            since = self._since
            if not since:
                continue
            waited = now - max(since, woke)
            if waited < self.warning_s:
                continue
            step, what = self.step, self.what or f"step {self.step}"
            if told != since:  # a new stalled wait
                told, self._flagged, arrived = since, since, {self.rank}
                self._tell(step)
            arrived |= self._listen(step)
            if warned != since and waited >= self.warning_s + self.GRACE_S:
                warned = since
                if min(arrived) == self.rank:
                    self.warnings += 1
                    print(f"pbp_hpc: warning: {what} has waited {waited:.0f} s (parallel.stall_warning_s "
                          f"{self.warning_s:g}) for {self._late(arrived)}: stopped, hung or lost? "
                          + (f"the job is aborted at {self.timeout_s:g} s (parallel.stall_timeout_s)" if self.timeout_s
                             else "it waits for ever (set parallel.stall_timeout_s to abort)"), file=sys.stderr, flush=True)
            if self.timeout_s is not None and waited >= self.timeout_s and self._since == since:
                print(f"pbp_hpc: rank {self.rank} of {self.size} failed: {what} waited {waited:.0f} s, more than "
                      f"parallel.stall_timeout_s {self.timeout_s:g}, for {self._late(arrived)}; aborting the job "
                      f"(exit {self.EXIT_STALLED})", file=sys.stderr, flush=True)
                sleep(0.5)  # the launcher forwards the line before the abort ends this process
                self.comm.Abort(self.EXIT_STALLED)

    def _late(self, arrived: set[int]) -> str:
        if not self._can_name:
            return "another rank (MPI is not thread-multiple: which is not known)"
        late = [r for r in range(self.size) if r not in arrived]
        return f"rank{'s' if len(late) != 1 else ''} {', '.join(map(str, late)) or '(none known)'}"

    def _tell(self, step: int) -> None:
        if not self._can_name:
            return
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]
        note = np.array([step], dtype=np.int64)  # its own buffer: sends may be in flight for long
        for r in range(self.size):
            if r != self.rank:
                self._sends.append((self.comm.Isend(note, dest=r, tag=_STALL_TAG), note))

    def _listen(self, step: int) -> set[int]:
        """Ranks whose note for this step has come; older notes are read and dropped."""
        got: set[int] = set()
        if not self._can_name:
            return got
        status = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_STALL_TAG, status=status):
            self.comm.Recv(self._inbox, source=status.Get_source(), tag=_STALL_TAG)
            if int(self._inbox[0]) == step:
                got.add(status.Get_source())
        return got

    def close(self) -> None:
        if self._thread is not None:
            self._quit.set()
            self._thread.join(1.0)
            self._thread = None
        if self.size > 1 and self._can_name:
            self._listen(-1)  # notes never read (this rank was the late one): drop them
        self._sends = []  # tiny, sent eagerly


def buffer_size(layout: Layout) -> int:
    return layout.n_params + EXTRAS


class Reducer:
    """Base class: a gradient buffer of its own, parameters of the caller's namespace, no update of its own."""

    name: ClassVar[str] = ""
    # True where the summation happens in the update (shm): its time counts as communication
    sums_in_update: ClassVar[bool] = False

    def __init__(self, comm: MPI.Comm, layout: Layout, dtype: Any, xp: Any):
        self.comm, self.layout, self.xp, self.dtype = comm, layout, xp, dtype
        self.n = layout.n_params
        self.seconds = 0.0  # time in communication calls, accumulated over the run
        self.choice: dict[str, Any] = {}  # how the factory chose this reducer (device runs), for the record
        self.watch = StallWatch(comm)  # limits set by the strategy (parallel.stall_warning_s / _timeout_s)
        self.grad = self.allocate(buffer_size(layout))
        self.extras = self.grad[self.n :]
        self._shares = [(slice(0, self.n), [self.grad[: self.n]])]

    def allocate(self, size: int) -> Any:
        """The flat gradient buffer (collective where a reducer shares it)."""
        return self.xp.zeros((size,), dtype=self.dtype)

    def parameters(self, fill: Fill) -> Any:
        """The parameter buffer, filled by fill (collective where a reducer shares it)."""
        return self.xp.asarray(fill(None))

    def state_buffer(self) -> Any:
        """A zeroed buffer shaped like the parameters, for an optimizer's state (shared where they are)."""
        return self.xp.zeros((self.n,), dtype=self.dtype)

    def node_batch(self, rows_per_rank: int) -> Any:
        """Node-shared buffers for a batch the node's ranks compute together
        (engine.shared_batch.NodeBatch), where this reducer sums that way; None otherwise."""
        return None

    def layer_done(self, l: int) -> None:
        """Layer l's gradient is final in grad (called from the top layer down)."""

    def finish(self) -> None:
        """Return when the extras are global and every span of shares() sums to the global gradient."""
        raise NotImplementedError

    def shares(self) -> list[tuple[slice, list[Any]]]:
        """The parameter spans this rank updates, each with the buffers whose sum is its global gradient."""
        return self._shares

    def spans(self) -> list[slice]:
        """The parameter spans this rank updates (those of shares(), known without a step)."""
        return [span for span, _ in self._shares]

    def updated(self) -> None:
        """This rank applied its shares; on return every rank may read the new parameters."""

    def slice_sum(self) -> Optional[Callable[[np.ndarray], None]]:
        """Where shares() are slices of parameters that other ranks update the rest of (shm,
        shared_batch): a function that sums a small float64 array over those ranks in place (an
        optimizer's per-layer norms); None where this rank's shares are the whole parameters."""
        return None

    def use_compression(self, kind: str, feedback: bool) -> None:
        """parallel.compression: send the gradients as 16-bit floats (compression.py); a
        reducer that can overrides this (blocking, overlap, shm)."""
        from pbp_hpc.errors import ConfigError

        raise ConfigError(f"parallel.compression={kind} is not supported by reducer {self.name}: "
                          "choose parallel.compression=none, or reducer blocking, overlap or shm")

    def fuse(self, fusion_bytes: int) -> None:
        """parallel.fusion_bytes: combine small messages up to this size; a reducer that sends
        one message per step (blocking, shm) has nothing to combine."""

    def wire_bytes(self) -> int:
        """Bytes this rank sends per step at best (the algorithm's count, not a measurement)."""
        from pbp_hpc.parallel.reducers.compression import allreduce_bytes

        return allreduce_bytes(self.comm.size, self.grad.shape[0], np.dtype(self.dtype).itemsize)

    def describe(self) -> dict[str, Any]:
        """What the run's record says about the reducer."""
        return {"reducer": self.name, **self.choice}

    def close(self) -> None:
        """Free what the reducer holds outside Python's reach (windows, communicators); idempotent."""
        self.watch.close()

    def __enter__(self) -> "Reducer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _watched(self, call: Callable[[], None]) -> None:
        """A blocking MPI call under the stall check."""
        self.watch.enter()
        try:
            call()
        finally:
            self.watch.leave()

    def _start_extras(self) -> Any:
        """The extras' own nonblocking Allreduce, in full precision, beside a compressed sum."""
        return self.comm.Iallreduce(MPI.IN_PLACE, self.extras, op=MPI.SUM)

    def _timed_allreduce(self, buf: Any) -> None:
        if self.comm.size == 1:
            return
        t = perf_counter()
        self.watch.enter()
        try:
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        finally:
            self.watch.leave()
        self.seconds += perf_counter() - t
