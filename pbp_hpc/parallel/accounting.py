"""Where an epoch's time goes, per rank: time = compute + comm + wait + other.

* compute: the strategy's local work (forward, backward, update), as it times it (compute_s);
* comm: the time the transfers themselves need. A rank's time in a collective is the transfer
  plus its wait for the ranks that arrived later; the rank that arrived last waits for no one,
  so the fastest rank's time in each block's communication is the transfer. Time a rank spends
  off its CPU inside a watched wait (StallWatch's in_s - cpu_s: descheduled, as when ranks
  outnumber cores, or asleep) moves no data of its own and is not counted as transfer. comm is
  the sum over the epoch's blocks (one step each for allreduce) of that minimum over ranks, the
  same on every rank (never more than a rank's own time in communication calls);
* wait: the rest of this rank's time in communication calls: imbalance, stragglers,
  oversubscription (a rank that is not scheduled arrives late, and its peers wait for its CPU);
* other: the loop around the steps (data order, progress bar, the evaluation check).

Evaluation passes are excluded, as before. The record shows the parts of the slowest rank (the
epoch's time is its time, and its parts add up to it exactly) and the spread of compute and
wait over ranks. Cost: one clock-free subtraction per block into a buffer allocated once, and
two small collectives per epoch.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from mpi4py import MPI


class EpochAccount:
    """Per-block communication times of one epoch, then the split of its time over the ranks."""

    def __init__(self, comm: MPI.Comm, max_blocks: int):
        self.comm = comm
        self.blocks = np.zeros(max(1, max_blocks), dtype=np.float64)  # allocated once for the run
        self.rows = np.zeros((comm.size, 4), dtype=np.float64)  # per rank: wall, compute, in comm calls, stalled
        self.mine = np.zeros(4, dtype=np.float64)
        self.n = 0
        self.last = self.off = 0.0

    def start(self) -> None:
        """The epoch begins."""
        self.n = 0

    def begin(self, comm_s: float, watch: Any) -> None:
        """A block of steps begins; comm_s: the strategy's running total of time in communication
        calls; watch: the reducer's StallWatch (its time off the CPU in waits). Taken per block, so
        that what happens between blocks (an evaluation's waits) is not counted."""
        self.last, self.off = comm_s, watch.in_s - watch.cpu_s

    def block(self, comm_s: float, watch: Any) -> None:
        """The block ended (the same blocks on every rank)."""
        off = watch.in_s - watch.cpu_s
        moved = max(0.0, (comm_s - self.last) - max(0.0, off - self.off))
        if self.n < self.blocks.shape[0]:
            self.blocks[self.n] = moved
            self.n += 1
        else:  # more blocks than planned (cannot happen with the loop's limits): fold into the last
            self.blocks[-1] += moved

    def close(self, wall: float, compute: float, in_comm: float, stalled: float, watch: Any = None) -> dict[str, Any]:
        """The epoch's split (collective): the slowest rank's parts, and the spread over ranks."""
        self.mine[:] = (wall, compute, in_comm, stalled)
        if watch is not None:
            watch.enter()
        try:
            if self.comm.size > 1:
                self.comm.Allreduce(MPI.IN_PLACE, self.blocks[: self.n], op=MPI.MIN)
            self.comm.Allgather(self.mine, self.rows)
        finally:
            if watch is not None:
                watch.leave()
        return split(self.rows, float(self.blocks[: self.n].sum()))


def split(rows: np.ndarray, transfer: float) -> dict[str, Any]:
    """rows[r] = (wall, compute, time in communication calls, stalled) of rank r; transfer: the
    epoch's communication time as the fastest rank saw it. The slowest rank's parts (summing to
    its wall exactly) and the spread of compute and wait over ranks."""
    wall, compute, in_comm = rows[:, 0], rows[:, 1], rows[:, 2]
    comm = np.minimum(in_comm, transfer)  # never more than the rank's own time in communication
    wait = in_comm - comm
    other = wall - compute - in_comm
    r = int(np.argmax(wall))
    return {
        "time_s": float(wall[r]), "compute_s": float(compute[r]), "comm_s": float(comm[r]),
        "wait_s": float(wait[r]), "other_s": float(other[r]),
        "compute_s_min": float(compute.min()), "compute_s_max": float(compute.max()),
        "wait_s_min": float(wait.min()), "wait_s_max": float(wait.max()),
        "slowest_rank": r, "stalled_s": float(rows[:, 3].max()),
    }


def parts_line(rec: dict[str, Any]) -> str:
    """The epoch line's account: parts that add up to the time, and what dominates."""
    t = rec["time_s"]
    parts = [("compute", rec["compute_s"]), ("comm", rec["comm_s"]), ("wait", rec["wait_s"]), ("other", rec["other_s"])]
    text = " + ".join(f"{name} {v:.3f}" for name, v in parts)
    spread = ""
    if rec.get("wait_s_max") is not None and rec["wait_s_max"] > rec["wait_s_min"] + 1e-3:
        spread = f"; wait over ranks {rec['wait_s_min']:.3f}-{rec['wait_s_max']:.3f}s"
    top_name, top = max(parts, key=lambda p: p[1])
    mostly = f", mostly {'waiting for other ranks' if top_name == 'wait' else top_name}" \
        if t > 0 and top / t > 0.5 and top_name != "compute" else ""
    return f"time {t:.3f}s = {text}{spread}{mostly}"


# What each reducer's and strategy's communication (comm_s + wait_s) is: the calls it times.
REDUCERS = {
    "blocking": "one MPI_Allreduce of the whole gradient buffer (and the loss and stop extras) per step",
    "overlap": "nonblocking Allreduces of layer buckets started during the backward pass: their starts, and the "
               "wait for them after it (the transfer hidden behind the backward pass is not counted)",
    "shm": "the node's sum in shared memory (done in the update: each rank sums its span of every rank's rows), "
           "the node barriers around it and an Allreduce across nodes",
    "shared_batch": "no gradient Allreduce on one node: the barriers around the node-shared batch buffers, the "
                    "extras' mailboxes, and across nodes an Allreduce of each rank's gradient slices",
    "cuda-aware": "MPI_Allreduce of the device buffer (CUDA-aware MPI), stream synchronised before and after",
    "staged": "device-to-host copy, MPI_Allreduce on the host, host-to-device copy",
    "nccl": "an NCCL allreduce of the device buffer, its stream synchronised",
}
STRATEGIES = {
    "local_sgd": "one Allreduce of parameters, optimizer state and extras every parallel.local_steps steps",
    "async_ps": "one-sided reads and adds of the parameters in MPI windows, the claim counter, and the block-end "
                "barrier and settle (staleness waits are none)",
    "ssp": "as async_ps, plus the waits for the slowest worker's clock (parallel.staleness_bound)",
    "hogwild": "the block-end node barrier, an Allreduce of the node's parameters across nodes, and settle",
}


def communication(strategy: str, reducer: str, grid: Optional[tuple[int, int, int]] = None) -> str:
    """What the run's comm_s and wait_s time, in words (the record's `communication`); grid:
    (data, tensor, pipeline), where the model is split the model group's messages are added."""
    if strategy in STRATEGIES:
        return f"{strategy}: {STRATEGIES[strategy]}"
    D, T, S = grid or (0, 1, 1)
    data = ("a data group of one rank: no gradient exchange (the one Allreduce of the reducer is local)" if D == 1 and T * S > 1
            else REDUCERS.get(reducer, 'the reducer timed its own calls (seconds)'))
    model = (f"; the tensor group's Allreduces of activations and input gradients ({T} ranks)" if T > 1 else "") + \
            (f"; the pipeline's point-to-point activations and deltas between its {S} stages, and one Allreduce of "
             "the loss and stop flags" if S > 1 else "")
    return f"{strategy} with reducer {reducer}: {data}{model}"
