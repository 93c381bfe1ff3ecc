"""The stall check: a watchdog that notices a rank waiting too long for the others.

One StallWatch per run, made by the run's state on the world communicator and handed to the
reducer and the strategy; every blocking wait of a step, a meeting, an epoch's edge or an
evaluation runs inside `with watch.around(what):` (or `with watch:` for a step's own waits).
"""

from __future__ import annotations

import sys
import threading
from time import perf_counter, sleep, thread_time
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from pbp_hpc.errors import EXIT_STALLED

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
    EXIT_STALLED = EXIT_STALLED

    def __init__(self, comm: MPI.Comm, warning_s: float = 60.0, timeout_s: Optional[float] = None):
        self.comm, self.warning_s, self.timeout_s = comm, warning_s, timeout_s
        self.step = 0  # the global step being waited for (set by the strategy)
        self.what = ""  # how the warning names a wait that is not a step's (around()); "": "step G"
        self.stalled_s = 0.0
        # inside the watched waits: wall time, and this thread's CPU time (MPI polls while it moves
        # data; a rank off its CPU, as when oversubscribed, is waiting: parallel/accounting.py)
        self.in_s = self.cpu_s = 0.0
        self._cpu0 = 0.0
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
        self._cpu0 = thread_time()
        self._since = perf_counter()

    def leave(self) -> None:
        since, self._since = self._since, 0.0
        self.in_s += perf_counter() - since
        self.cpu_s += thread_time() - self._cpu0
        if self._flagged == since and since:
            self.stalled_s += perf_counter() - since

    def around(self, what: str = "") -> "StallWatch":
        """`with watch.around(what):` a blocking wait, watched; the warning names it `what`
        ("" : "step G"). No generator: a step pays two clock reads and two calls."""
        self.what = what
        return self

    def __enter__(self) -> "StallWatch":
        self.enter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.leave()
        self.what = ""

    def wait(self, requests: Any) -> None:
        """MPI_Wait / MPI_Waitall of the requests, watched."""
        with self:
            if isinstance(requests, list):
                MPI.Request.Waitall(requests)
            else:
                requests.Wait()

    def _watch(self) -> None:
        told, warned, arrived = 0.0, 0.0, set()
        tick = 0.25
        last = woke = perf_counter()
        while not self._quit.wait(tick):
            # the finer of the two thresholds (a timeout below the warning fires at the timeout);
            # read each tick: the strategy sets them after the watch has started
            first = self.warning_s if self.timeout_s is None else min(self.warning_s, self.timeout_s)
            tick = min(0.25, first / 4)
            now = perf_counter()
            if now - last > max(1.0, 4 * tick):  # this process itself was stopped (SIGSTOP) or starved:
                woke = now  # its own pause is not a wait for the others
            last = now
            since = self._since
            if not since:
                continue
            waited = now - max(since, woke)
            if waited < first:
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
