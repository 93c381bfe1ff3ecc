"""How to split a node's cores into MPI ranks x BLAS threads, as `python -m pbp_hpc.bench` measured.

    from pbp_hpc.hybrid import best_split, mpiexec_args
    ranks, threads = best_split("Net-1h", 1024, cores=2)
    cmd = ["mpiexec", *mpiexec_args(ranks, threads), "python", "-m", "pbp_hpc.train",
           "--set", f"parallel.threads_per_rank={threads}", "--set", "parallel.reducer=shm", ...]

The benchmark times every split of the cores (1 x 2 and 2 x 1 on two cores) for each
network and batch size and merges the fastest into benchmarks/hybrid_splits.json (or the
file $PBP_HPC_HYBRID_SPLITS names). Unmeasured combinations fall back to one rank per core
and one thread per rank, the split that needs no threaded BLAS.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "hybrid_splits.json"
FILE_DOC = ("Fastest ranks x threads split per machine (by core count), network (layer sizes) and global batch "
            "size, written by `python -m pbp_hpc.bench`; read by pbp_hpc.hybrid.best_split. tpe_s: the median "
            "time per epoch of each split tried.")
NAMES = {"Net-1h": [784, 1024, 10], "Net-2h": [784, 1024, 1024, 10]}
NEAREST = 2.0  # an unmeasured batch size borrows the nearest measured one within this factor

Network = Union[str, Sequence[int]]


def network_key(network: Network) -> str:
    """'Net-1h', [784, 1024, 10] and '784-1024-10' all name the same entry: '784-1024-10'."""
    if isinstance(network, str):
        sizes = NAMES.get(network)
        if sizes is None:
            return network.replace(",", "-").replace(" ", "").strip("[]")
        network = sizes
    return "-".join(str(int(n)) for n in network)


def load(path: Optional[Path] = None) -> Optional[dict[str, Any]]:
    """The splits file, or None if there is none (or it is unreadable)."""
    p = Path(path) if path is not None else Path(os.environ.get("PBP_HPC_HYBRID_SPLITS", DEFAULT_PATH))
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("machines"), dict) else None


def best_split(network: Network, batch_size: int, cores: int, path: Optional[Path] = None) -> tuple[int, int]:
    """(ranks, threads) with ranks * threads == cores, the fastest measured for this network and batch.

    The entry for the same core count is used; a batch size that was not measured takes the
    nearest measured one if it is within a factor of 2 (compute per step, hence the best
    split, changes slowly with the batch). Anything else: (cores, 1).
    """
    fallback = (max(1, cores), 1)
    doc = load(path)
    if doc is None:
        return fallback
    machine = next((m for m in doc["machines"].values() if isinstance(m, dict) and m.get("cores") == cores), None)
    batches = ((machine or {}).get("networks", {}).get(network_key(network)) or {}).get("batches", {})
    measured = {int(b): v for b, v in batches.items() if str(b).isdigit()}
    if not measured:
        return fallback
    nearest = min(measured, key=lambda b: abs(math.log(b / max(1, batch_size))))
    if abs(math.log(nearest / max(1, batch_size))) > math.log(NEAREST):
        return fallback
    entry = measured[nearest]
    ranks, threads = int(entry["ranks"]), int(entry["threads"])
    return (ranks, threads) if ranks * threads == cores and ranks >= 1 else fallback


def mpiexec_args(ranks: int, threads: int) -> list[str]:
    """MPICH Hydra arguments for a ranks x threads run, each rank bound to its own `threads` cores.

    The benchmark measured every split bound this way. Unbound, Linux tended to stack two
    communicating ranks on one core (a waiting rank yields, and the scheduler wakes its peer
    where it slept): 2 x 1 ran several times slower than 1 x 1 on the 2-core test machine.
    (Open MPI: --bind-to core --map-by slot:PE=<threads>; Slurm: srun --cpu-bind=cores -c <threads>.)
    """
    return ["-n", str(ranks), "-bind-to", f"core:{threads}"]
