"""How to split a node's cores into MPI ranks x BLAS threads, as `python -m pbp_hpc.bench` measured.

    from pbp_hpc.parallel.hybrid import best_split, mpi_flavour, mpiexec_args
    ranks, threads = best_split("Net-1h", 1024, cores=2)
    cmd = ["mpiexec", *mpiexec_args(ranks, threads, mpi_flavour("mpiexec")), "python", "-m", "pbp_hpc.train",
           "--set", f"parallel.threads_per_rank={threads}", "--set", "parallel.reducer=shm", ...]

The benchmark times every split of the cores (1 x 2 and 2 x 1 on two cores) for each
network and batch size and merges the fastest into pbp_hpc/parallel/hybrid_splits.json (or the
file $PBP_HPC_HYBRID_SPLITS names). Unmeasured combinations fall back to one rank per core
and one thread per rank, the split that needs no threaded BLAS. `python -m pbp_hpc.sweep`
uses choose_split (best_split with its origin in words) for `hybrid_split: best`, and
mpiexec_args to bind each rank of a point to its own cores.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PATH = Path(__file__).resolve().parent / "hybrid_splits.json"  # shipped in the package
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


def splits_path(path: Optional[Path] = None) -> Path:
    """The splits file read: `path`, else $PBP_HPC_HYBRID_SPLITS, else pbp_hpc/parallel/hybrid_splits.json."""
    return Path(path) if path is not None else Path(os.environ.get("PBP_HPC_HYBRID_SPLITS") or DEFAULT_PATH)


def load(path: Optional[Path] = None) -> Optional[dict[str, Any]]:
    """The splits file, or None if there is none (or it is unreadable)."""
    try:
        doc = json.loads(splits_path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("machines"), dict) else None


@dataclass(frozen=True)
class Split:
    """A ranks x threads split and where it came from, in words (for --list and logs)."""

    ranks: int
    threads: int
    origin: str

    def __str__(self) -> str:
        return f"{self.ranks}x{self.threads} ({self.origin})"


def shown_path(path: Path) -> str:
    """The file as a person would name it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except (ValueError, OSError):
        return str(path)


def _measured_splits(entry: dict[str, Any], cores: int) -> dict[tuple[int, int], float]:
    """{(ranks, threads): median TPE} of the entry's tpe_s, the splits of exactly `cores` cores."""
    out: dict[tuple[int, int], float] = {}
    tpe = entry.get("tpe_s")
    for name, seconds in (tpe.items() if isinstance(tpe, dict) else ()):
        m = re.fullmatch(r"(\d+)x(\d+)", str(name))
        if m and isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0:
            r, t = int(m.group(1)), int(m.group(2))
            if r >= 1 and r * t == cores:
                out[(r, t)] = float(seconds)
    return out


def choose_split(network: Network, batch_size: int, cores: int, min_ranks: int = 1,
                 path: Optional[Path] = None) -> Split:
    """The fastest measured split of `cores` cores with at least `min_ranks` ranks, and why it was chosen.

    The entry for the same core count is used; a batch size that was not measured takes the
    nearest measured one if it is within a factor of 2 (compute per step, hence the best
    split, changes slowly with the batch). The entry's own best split is taken if it has
    min_ranks ranks or more; else the fastest of its timed splits (tpe_s) that has. Anything
    else: one rank per core, (cores, 1) -- or (min_ranks, 1), oversubscribed, on fewer cores.
    """
    cores, min_ranks = max(1, int(cores)), max(1, int(min_ranks))
    file = splits_path(path)
    shown = shown_path(file)
    if cores < min_ranks:
        return Split(min_ranks, 1, f"{cores} core(s) cannot hold {min_ranks} ranks: {min_ranks} ranks x 1 thread, oversubscribed")

    def fallback(why: str) -> Split:
        return Split(cores, 1, f"{why}: one rank per core")

    doc = load(file)
    if doc is None:
        return fallback(f"no readable splits file {shown}")
    machine = next((m for m in doc["machines"].values() if isinstance(m, dict) and m.get("cores") == cores), None)
    if machine is None:
        return fallback(f"no measurement for {cores} cores in {shown}")
    key = network_key(network)
    batches = ((machine.get("networks") or {}).get(key) or {}).get("batches") or {}
    measured = {int(b): v for b, v in batches.items() if str(b).isdigit() and int(b) > 0 and isinstance(v, dict)}
    if not measured:
        return fallback(f"no measurement of {key} on {cores} cores in {shown}")
    nearest = min(measured, key=lambda b: (abs(math.log(b / max(1, batch_size))), b))
    if abs(math.log(nearest / max(1, batch_size))) > math.log(NEAREST):
        return fallback(f"no measurement of {key} within {NEAREST:g}x of B={batch_size} on {cores} cores in {shown}")
    entry = measured[nearest]
    at = "" if nearest == batch_size else f" for B={nearest}"
    try:
        ranks, threads = int(entry["ranks"]), int(entry["threads"])
    except (KeyError, TypeError, ValueError):
        ranks = threads = 0
    valid = ranks >= 1 and ranks * threads == cores
    if valid and ranks >= min_ranks:
        return Split(ranks, threads, f"best measured split{at}, {shown}")
    timed = {s: tpe for s, tpe in _measured_splits(entry, cores).items() if s[0] >= min_ranks}
    if timed:
        r, t = min(timed, key=lambda s: (timed[s], s))  # ties: fewer ranks, so the choice is deterministic
        overall = f"; {ranks}x{threads} was faster" if valid else ""
        return Split(r, t, f"fastest measured split with at least {min_ranks} ranks{at}, {shown}{overall}")
    return fallback(f"no measured split of {key} with at least {min_ranks} ranks{at} on {cores} cores in {shown}")


def best_split(network: Network, batch_size: int, cores: int, path: Optional[Path] = None,
               min_ranks: int = 1) -> tuple[int, int]:
    """(ranks, threads) with ranks * threads == cores, the fastest measured for this network and batch.

    Only splits with at least min_ranks ranks are considered (min_ranks=2: a hybrid, P>1 ranks).
    The entry for the same core count is used; a batch size that was not measured takes the
    nearest measured one if it is within a factor of 2 (compute per step, hence the best
    split, changes slowly with the batch). Anything else: (cores, 1). See choose_split.
    """
    split = choose_split(network, batch_size, cores, min_ranks=min_ranks, path=path)
    return split.ranks, split.threads


# ---------------------------------------------------------------------------------------------
# Binding ranks to cores

MPICH = "mpich"  # MPICH's Hydra (also MVAPICH): -bind-to core:T
OPENMPI = "openmpi"  # Open MPI's ORTE (<= 4) or PRRTE (5): --bind-to core --map-by slot:PE=T


def flavour_of(version_text: str) -> Optional[str]:
    """MPICH, OPENMPI or None (unknown: pass no binding flags), from `mpiexec --version`'s output."""
    text = version_text.lower()
    if "intel(r) mpi" in text:
        return None  # Intel MPI's Hydra pins by I_MPI_PIN_* (on by default), not by -bind-to
    if re.search(r"\b(open mpi|openmpi|open-mpi|openrte|orte|prrte|prterun)\b", text):
        return OPENMPI
    if re.search(r"\b(hydra|mpich|mvapich2?)\b", text):
        return MPICH
    return None


@functools.lru_cache(maxsize=None)
def mpi_flavour(mpiexec: str = "mpiexec") -> Optional[str]:
    """Which launcher `mpiexec` is (MPICH, OPENMPI or None), from `mpiexec --version`; asked once per path."""
    try:
        p = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return flavour_of(p.stdout + p.stderr)


def mpiexec_args(ranks: int, threads: int, flavour: Optional[str] = MPICH) -> list[str]:
    """mpiexec arguments for a ranks x threads run, each rank bound to its own `threads` cores.

    flavour: MPICH (Hydra: -bind-to core:T), OPENMPI (--bind-to core --map-by slot:PE=T) or None
    (an unknown launcher: -n only, no binding). Only for ranks x threads <= the cores: binding
    more ranks than cores stacks them (Hydra wraps around to core 0 again).

    The benchmark measured every split bound this way. Unbound, Linux tended to stack two
    communicating ranks on one core (a waiting rank yields, and the scheduler wakes its peer
    where it slept): 2 x 1 ran 3 to 5 times slower than 1 x 1 at times on the 2-core test machine.
    (Slurm: srun --cpu-bind=cores -c <threads>.)
    """
    args = ["-n", str(ranks)]
    if flavour == MPICH:
        return [*args, "-bind-to", f"core:{threads}"]
    if flavour == OPENMPI:
        return [*args, "--bind-to", "core", "--map-by", f"slot:PE={threads}"]
    if flavour is not None:
        raise ValueError(f"unknown MPI flavour {flavour!r}: use {MPICH!r}, {OPENMPI!r} or None")
    return args


def best_threads(network: Network, batch_size: int, cores: int, ranks: int,
                 path: Optional[Path] = None) -> Optional[tuple[int, str]]:
    """Threads per rank for `ranks` ranks on a node of `cores` cores: the fastest measured split
    with that many ranks (same core count, the nearest batch size within NEAREST), and where
    it came from; None without such a measurement."""
    doc = load(path)
    file = shown_path(splits_path(path))
    machine = next((m for m in (doc or {}).get("machines", {}).values() if isinstance(m, dict) and m.get("cores") == cores), None)
    batches = (((machine or {}).get("networks") or {}).get(network_key(network)) or {}).get("batches") or {}
    measured = {int(b): v for b, v in batches.items() if str(b).isdigit() and int(b) > 0 and isinstance(v, dict)}
    if not measured:
        return None
    nearest = min(measured, key=lambda b: (abs(math.log(b / max(1, batch_size))), b))
    if abs(math.log(nearest / max(1, batch_size))) > math.log(NEAREST):
        return None
    timed = {t: tpe for (r, t), tpe in _measured_splits(measured[nearest], cores).items() if r == ranks}
    if not timed:
        return None
    threads = min(timed, key=lambda t: (timed[t], t))
    return threads, f"fastest measured split for {ranks} rank(s) on {cores} cores at B={nearest}, {file}"
