"""Memory of one rank: peak resident set against a budget, and growth of the traced heap per step.

RSS is read from /proc (VmHWM, reset through /proc/self/clear_refs) so that each case's peak is
its own; the budget is dataset + parameters + gradients + one batch's activations + the step's
buffers + 20%, all above the process's footprint before any data.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pbp_hpc.bench.runs import OurRun

BUDGET_MARGIN = 1.2


def rss_now() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Return freed heap to the OS and restart the kernel's peak-RSS counter (VmHWM)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """VmHWM (peak since the last reset) in bytes; ru_maxrss (lifetime) where /proc has none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return lifetime_peak_rss()


def lifetime_peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def heap_growth(run: OurRun, b: int, n: int, warm: int = 100, k: int = 400) -> tuple[int, int]:
    """Bytes the traced heap grows by over k steps (after `warm` steps under tracemalloc).

    Small batches: what is checked is the code path, which allocates alike at any size.
    The warm-up lets numpy fill its small-object caches; gc.collect() before each reading
    counts only what is still reachable (temporaries and cyclic garbage are not growth).
    """
    import tracemalloc

    batches = (np.arange(s * b, (s + 1) * b) % n for s in range(warm + k))
    tracemalloc.start()
    try:
        for _ in range(warm):
            run.step(next(batches))
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(k):
            run.step(next(batches))
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, k
    finally:
        tracemalloc.stop()


def dataset_bytes(data: Any) -> int:
    """Bytes of the arrays that hold the data set in memory (each base array counted once)."""
    seen: dict[int, int] = {}

    def add(a: Any) -> None:
        if isinstance(a, np.ndarray):
            base = a
            while isinstance(base.base, np.ndarray):
                base = base.base
            seen[id(base)] = base.nbytes

    def walk(src: Any) -> None:
        for name in ("images", "labels", "index", "protos", "noise"):
            add(getattr(src, name, None))
        if hasattr(src, "base") and not isinstance(src, np.ndarray):
            walk(src.base)

    for src in (data.train, data.val, data.test):
        walk(src)
    return sum(seen.values())


def budget_sizes(st: Any, data: Any) -> dict[str, int]:
    """What a rank of this State must hold, in bytes, by part (the budget is their sum + 20%)."""
    from pbp_hpc.parallel.reducers.base import buffer_size

    cfg, comm, layout = st.cfg, st.comm, st.layout
    layers = list(cfg.model.layers)
    local = -(-cfg.train.batch_size // comm.size)
    item = np.dtype(cfg.model.dtype).itemsize
    grads = buffer_size(layout) * item
    if st.reducer.name == "shm" and comm.size > 1:
        grads += grads * (comm.size - 1) // comm.size  # it also touches its slice of every other rank's buffer
    if st.reducer.name == "shared_batch" and comm.size > 1:  # its slice of the gradient, and it reads the node's batch
        grads = grads // comm.size + local * comm.size * (layers[0] + 2 * sum(layers[1:])) * item
    return {"dataset": dataset_bytes(data), "parameters": layout.n_params * item, "gradients": grads,
            "activations": local * (sum(layers) + layers[-1]) * item, "step buffers": st.local.own_bytes()}


def measure(new_state: Callable[[], Any], data: Any, steps: int, blas: Any) -> dict[str, Any]:
    """Peak RSS of a fresh State over `steps` steps on one BLAS thread, then its heap growth per step.

    new_state builds the State after the peak counter is reset (the data is loaded before);
    blas is the rank's threadpoolctl.ThreadpoolController. The State is closed before returning.
    """
    ok = reset_peak_rss()
    st = new_state()
    run = OurRun(st)
    B, n = st.cfg.train.batch_size, len(st.data.train)
    with blas.limit(limits=1, user_api="blas"):
        for s in range(steps):
            run.step(np.arange(s * B, (s + 1) * B) % n)
        peak = peak_rss()
        growth, k = heap_growth(run, min(B, 8 * st.comm.size), n)
    sizes = budget_sizes(st, data)
    st.close()
    del st, run
    return {"peak_rss": peak, "lifetime_peak_rss": lifetime_peak_rss(),  # lifetime: loading the data included
            "hwm_reset": ok, "heap_growth": growth, "steps": k, "sizes": sizes,
            "budget": int(BUDGET_MARGIN * sum(sizes.values()))}
