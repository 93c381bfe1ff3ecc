"""The race's GEMM floor: the GEMMs of an as-typed cell's step alone (`mpiexec -n 2 python -m
pbp_hpc.bench --race-floor JSON`, started by pbp_hpc.bench.race).

For each request (a typed cell: its mode's config and sets, the ranks, threads, grid and reducer
it ran as) the first `ranks` ranks build a train.State of that configuration, record every
ops.gemm and ops.matmul call of one whole step (StepGemms: the strategy's step, so a reducer
that computes part of the gradient after its barrier, shared_batch's phase 2, or a grid's
stages, count too) and replay them alone, one epoch's worth, `reps` times, pinned one rank per
`threads` cores. The time is the slowest rank's; the others sleep. Rank 0 prints one JSON line
per request.
"""

from __future__ import annotations

import gc
import json
import time
from typing import Any

import numpy as np

from pbp_hpc.bench.cases import LEARNING_RATE
from pbp_hpc.bench.runs import GemmReplay, OurRun


class StepGemms(GemmReplay):
    """GemmReplay of a whole strategy step (local step, reducer, phase 2, update) rather than the
    local step alone; the parameters are restored after recording, as GemmReplay's are."""

    @staticmethod
    def _record(run: OurRun, batch: int, share: tuple[int, int]) -> list[tuple[Any, ...]]:
        from pbp_hpc.engine import ops

        theta = run.st.theta.copy()
        try:
            with ops.recording_gemms() as calls:
                run.st.strategy.step(np.arange(batch), LEARNING_RATE, False, (0, 0, -1))
        finally:
            run.st.comm.Barrier()  # node-shared parameters: every rank's step is done before any restores
            run.st.theta[...] = theta
        return calls


def run_floor(doc: dict[str, Any]) -> int:
    from mpi4py import MPI
    from threadpoolctl import ThreadpoolController

    from pbp_hpc import config, train
    from pbp_hpc.bench.worker import Pinning, idle_sync
    from pbp_hpc.data import datasets
    from pbp_hpc.data.mnist import resolve_data_dir

    world = MPI.COMM_WORLD
    blas = ThreadpoolController()
    pin = Pinning(True, world.rank)
    comms = {r: world.Split(0 if world.rank < r else MPI.UNDEFINED, key=world.rank) for r in (1, 2)}
    reps = int(doc["race"]["reps"])
    for req in doc["requests"]:
        r, t = int(req["ranks"]), int(req["threads"] or 1)
        out: dict[str, Any] = {**req, "type": "floor", "epochs_s": []}
        if world.rank < r:
            try:
                cfg = config.load(req["config"], req["sets"])
                directory = None if cfg.data.name == "synthetic" else resolve_data_dir(cfg.data.dir, download=False)
                data = datasets.load(cfg, r, directory)
                pin.apply(r, t)
                with blas.limit(limits=t, user_api="blas"), train.State(cfg, comms[r], np, data) as st:
                    n = len(st.data.train)
                    replay = StepGemms(OurRun(st), cfg.train.batch_size, n)
                    steps = -(-n // cfg.train.batch_size)
                    replay.epoch(min(steps, 3), time.perf_counter)  # warm-up
                    out["epochs_s"] = [replay.epoch(steps, time.perf_counter)[0] for _ in range(reps)]
                    out["n_train"] = n
            except Exception as exc:  # noqa: BLE001 - the table shows n/a and why; the other requests go on
                out["error"] = f"{type(exc).__name__}: {exc}"
            pin.release()
        gc.collect()
        idle_sync(world)
        if world.rank == 0:
            out["tpe"] = float(np.median(out["epochs_s"])) if out["epochs_s"] and "error" not in out else None
            print(json.dumps(out), flush=True)
    return 0
