"""`python -m pbp_hpc.bench --race`: issue 26's race table in one command.

pbp_hpc as a user types it (`mpiexec -n P python -m pbp_hpc.train`, no tuning flags) against the
JAX and PyTorch peers doing the same training on the same cores, in two modes: "report"
(`--config configs/report_net1h.yaml`: sigmoid, MSE, SGD) and "default" (the built-in defaults:
relu, cross-entropy, Nesterov, the cosine schedule, whatever pbp_hpc/config_sections.py says);
each with only model.layers, train.batch_size, train.epochs and the data set. Per (mode,
network, batch) the cells are, in the issue's order:

  typed1    `mpiexec -n 1 python -m pbp_hpc.train ...` started on 1 core (its affinity, as `taskset -c 0`)
  jax1      the JAX peer on that core (XLA on one thread)
  torch1    the PyTorch peer on that core, 1 thread
  typed2    `mpiexec -n 2 python -m pbp_hpc.train ...` started on 2 cores
  threads2  `mpiexec -n 1 ... --set parallel.threads_per_rank=2` on the same 2 cores
  jax2      the JAX peer on those 2 cores (XLA sizes its pools by them)
  torch2    the PyTorch peer on those 2 cores, 2 threads

Each cell trains `epochs` epochs; its time is the median of its epochs' times (train's own
`time_s`: the slowest rank, evaluation excluded; the peers time their steps the same way, setup
and compilation untimed), and the table shows the median over `reps` repetitions, interleaved:
each repetition runs every cell of the group once, the order rotated. After every group, one
`mpiexec -n 2` job (pbp_hpc.bench.race_floor) measures each as-typed cell's GEMM floor: the
GEMMs of a whole step of the split, grid and reducer that cell ran as, replayed alone. The
table is pbp_hpc.bench.race_table's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

import pbp_hpc.bench.stopping as stopping
import pbp_hpc.bench.typed as typed
from pbp_hpc.bench.cases import NETWORKS, data_sets
from pbp_hpc.parallel.hybrid import REPO

MODES = {"report": "configs/report_net1h.yaml", "default": None}  # the config file each mode types, if any
CELLS = ("typed1", "jax1", "torch1", "typed2", "threads2", "jax2", "torch2")
TYPED_CELLS = {"typed1": (1, []), "typed2": (2, []), "threads2": (1, ["parallel.threads_per_rank=2"])}  # ranks, extra --set
PEER_CELLS = {"jax1": ("jax", 1), "torch1": ("torch", 1), "jax2": ("jax", 2), "torch2": ("torch", 2)}
CORES = {"typed1": 1, "jax1": 1, "torch1": 1, "typed2": 2, "threads2": 2, "jax2": 2, "torch2": 2}


@dataclass
class Race:
    """What one race measures; sent to the floor job as JSON."""

    mode: str  # full | quick | smoke
    modes: list[str]
    nets: list[str]
    batches: list[int]
    epochs: int
    reps: int
    n_train: Optional[int]  # None: all 50,000 training examples
    data_dir: Optional[str]
    synthetic: bool
    cpus: list[int]  # the two cores: 1-core cells on the first
    torch: bool = True
    jax: bool = True
    floor: bool = True

    def sets(self, net: str, batch: int) -> list[str]:
        """The `--set` items every cell of a group has: network, batch, epochs and data; nothing else."""
        return [f"model.layers={NETWORKS[net]}", f"train.batch_size={batch}", f"train.epochs={self.epochs}",
                *data_sets(self.synthetic, self.data_dir, self.n_train)]


def config_path(mode: str) -> Optional[str]:
    return str(REPO / MODES[mode]) if MODES[mode] else None


def make_race(args: argparse.Namespace, cpus: list[int]) -> Race:
    """--race with --smoke (a tiny network on synthetic data, 1 repetition), --quick (10,000
    examples) or neither (the issue's table: all 50,000)."""
    if len(cpus) < 2:
        from pbp_hpc.errors import ConfigError

        raise ConfigError(f"--race needs 2 cores (its 1-core and 2-core columns); this process may use {len(cpus)}")
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    common = dict(modes=args.modes or list(MODES), cpus=cpus[:2], torch=not args.no_torch, jax=not args.no_jax,
                  floor=args.floor, data_dir=data_dir)
    if args.smoke:
        return Race("smoke", nets=["tiny"], batches=[64], epochs=2, reps=1, n_train=600, synthetic=True,
                    **{**common, "data_dir": None})
    return Race("quick" if args.quick else "full", nets=args.nets or ["Net-1h", "Net-2h"],
                batches=args.batches or [1024, 128], epochs=3, reps=args.reps or 2,
                n_train=args.n_train or (10000 if args.quick else None), synthetic=False, **common)


def train_command(race: Race, mode: str, net: str, batch: int, cell: str) -> list[str]:
    ranks, extra = TYPED_CELLS[cell]
    path = config_path(mode)
    sets = [arg for item in race.sets(net, batch) + extra for arg in ("--set", item)]
    return [typed.mpiexec(), "-n", str(ranks), sys.executable, "-m", "pbp_hpc.train",
            *(["--config", path] if path else []), *sets, "--json"]


def shown(cmd: list[str]) -> str:
    """As typed in the repository's root: `mpiexec`, `python`, configs/... relative."""
    return typed.shown(cmd).replace(f"{REPO}{os.sep}", "")


class Peers:
    """The peer children, each started on the cores of its column and kept for the whole race."""

    def __init__(self, race: Race):
        from pbp_hpc.bench.jax_peer import JaxClient
        from pbp_hpc.bench.peers import TorchClient

        self.clients: dict[str, Any] = {}
        for cell, (kind, threads) in PEER_CELLS.items():
            if kind == "torch" and race.torch:
                self.clients[cell] = TorchClient(race.cpus[:threads])
            elif kind == "jax" and race.jax:
                self.clients[cell] = JaxClient(threads, race.cpus[:threads])
        self.info = {cell: c.info for cell, c in self.clients.items()}  # all started side by side, then read

    def setup(self, race: Race, mode: str, net: str, batch: int) -> dict[str, str]:
        """Each peer builds the group's training (its config: the mode's file and the group's sets); errors by cell."""
        errors = {}
        for cell, client in self.clients.items():
            reply = client.ask(cmd="setup", overrides=race.sets(net, batch), config=config_path(mode))
            if "error" in reply:
                errors[cell] = reply["error"]
        return errors

    def epochs(self, cell: str, race: Race) -> dict[str, Any]:
        client = self.clients.get(cell)
        if client is None:
            return {"epochs_s": [], "error": "not run"}
        times = []
        for epoch in range(race.epochs):
            reply = client.ask(cmd="epoch", threads=PEER_CELLS[cell][1], epoch=epoch, steps=None, cpu=False)
            if "time" not in reply:
                return {"epochs_s": times, "error": reply.get("error", "no time")}
            times.append(reply["time"])
        return {"epochs_s": times}

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def run_cell(race: Race, peers: Peers, mode: str, net: str, batch: int, cell: str, rep: int,
             timeout: Optional[float], setup_errors: dict[str, str]) -> dict[str, Any]:
    rec: dict[str, Any] = {"type": "race", "mode": mode, "net": net, "batch": batch, "cell": cell, "rep": rep,
                           "cpus": race.cpus[: CORES[cell]]}
    if cell in TYPED_CELLS:
        rec = typed.timed(train_command(race, mode, net, batch, cell), rec, timeout, race.cpus[: CORES[cell]])
        rec["command"] = rec["command"].replace(f"{REPO}{os.sep}", "")
    elif cell in setup_errors:
        rec.update(epochs_s=[], error=setup_errors[cell])
    else:
        rec.update(peers.epochs(cell, race))
    rec["tpe"] = float(np.median(rec["epochs_s"])) if rec["epochs_s"] and not rec.get("error") else None
    return rec


def run_groups(race: Race, timeout: Optional[float] = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every group's cells, repetitions interleaved; the peers' info and the records."""
    peers = Peers(race)
    records: list[dict[str, Any]] = []
    try:
        for mode in race.modes:
            for net in race.nets:
                for batch in race.batches:
                    errors = peers.setup(race, mode, net, batch)
                    for rep in range(race.reps):
                        shift = rep % len(CELLS)
                        for cell in CELLS[shift:] + CELLS[:shift]:
                            records.append(run_cell(race, peers, mode, net, batch, cell, rep, timeout, errors))
                        print(f"[race] {mode} {net} batch {batch}: repetition {rep + 1} of {race.reps} done",
                              file=sys.stderr, flush=True)
    finally:
        peers.close()
    return peers.info, records


def floor_requests(race: Race, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One GEMM-floor measurement per as-typed cell (typed1, typed2) that ran: the split, grid and
    reducer it ran as, from its first repetition's record."""
    out = []
    for rec in records:
        if rec["cell"] in ("typed1", "typed2") and rec["rep"] == 0 and rec.get("tpe"):
            grid = rec.get("grid") or {}
            par = rec.get("parallel") or {}
            out.append({"mode": rec["mode"], "net": rec["net"], "batch": rec["batch"], "cell": rec["cell"],
                        "config": config_path(rec["mode"]), "ranks": rec["ranks"], "threads": rec["threads"],
                        "sets": race.sets(rec["net"], rec["batch"]) + [
                            "parallel.grid=manual", f"parallel.tensor={grid.get('tensor', 1)}",
                            f"parallel.pipeline={grid.get('pipeline', 1)}",
                            f"parallel.microbatches={par.get('microbatches', 4)}",
                            f"parallel.reducer={rec.get('reducer_used') or rec.get('reducer') or 'auto'}",
                            "train.progress=false"]})
    return out


def run_floors(race: Race, requests: list[dict[str, Any]], timeout: Optional[float]) -> list[dict[str, Any]]:
    """The floor job: `mpiexec -n 2 python -m pbp_hpc.bench --race-floor JSON` on the race's cores."""
    if not requests:
        return []
    doc = json.dumps({"race": asdict(race), "requests": requests})
    cmd = [typed.mpiexec(), "-n", "2", sys.executable, "-m", "pbp_hpc.bench", "--race-floor", doc]
    env = {k: v for k, v in os.environ.items() if k not in typed.THREAD_ENV}
    try:
        proc = stopping.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, timeout=timeout,
                            preexec_fn=lambda: os.sched_setaffinity(0, race.cpus))
    except subprocess.TimeoutExpired:
        return [{**r, "type": "floor", "error": f"timed out after {timeout:.0f} s"} for r in requests]
    found = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        done = {(f["mode"], f["net"], f["batch"], f["cell"]) for f in found}
        found += [{**r, "type": "floor", "error": f"exit {proc.returncode}: {tail}"} for r in requests
                  if (r["mode"], r["net"], r["batch"], r["cell"]) not in done]
    return found
