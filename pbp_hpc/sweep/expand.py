"""A sweep file's points: the product of its axes, filtered by what each implementation can be and
by `where:`/`exclude:`, numbered from 0 in an order that does not depend on the machine; with
`hybrid_split: best`, one hybrid point per network, dtype and batch at the measured fastest split.
Also what a point needs of the machine it runs on: the cores, and why it cannot run here.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pbp_hpc import config as configmod
from pbp_hpc.errors import ConfigError
from pbp_hpc.parallel import hybrid, provenance
from pbp_hpc.sweep.spec import NETWORKS, RULES, Rule, SweepSpec, check_controlled, load_spec, resolve_base, set_items


@dataclass
class Point:
    index: int
    implementation: str
    network: str
    layers: list[int]
    dtype: str
    batch_size: int
    ranks: int
    threads: int
    overrides: list[str]  # --set KEY=VALUE items, after --config base (if any)
    config: dict[str, Any] = field(repr=False)
    split_origin: Optional[str] = None  # hybrid_split: best -- where (ranks, threads) came from, in words
    strategy: str = "allreduce"  # parallel.strategy
    straggler_factor: float = 1.0  # study.straggler_factor
    variant: Optional[str] = None  # the sweep's variants: entry, where it has a variant axis
    seed: Optional[int] = None  # train.seed, where the sweep runs several seeds (seeds: N)

    @property
    def rule(self) -> Rule:
        return RULES[self.implementation]


@dataclass
class Sweep:
    spec: SweepSpec
    path: Path
    base_path: Optional[Path]
    points: list[Point]
    split_cores: Optional[int] = None  # hybrid_split: best -- the cores the hybrid splits were chosen for


def describe(point: Point) -> str:
    """A point in one line, as progress lines and identity errors show it."""
    origin = f" ({point.split_origin})" if point.split_origin else ""
    study = "" if point.strategy == "allreduce" else f" {point.strategy}"
    study += f" straggler x{point.straggler_factor:g}" if point.straggler_factor != 1 else ""
    study += f" {point.variant}" if point.variant else ""
    study += f" seed {point.seed}" if point.seed is not None else ""
    return (f"{point.implementation} {point.network} {point.dtype} B={point.batch_size} {point.ranks}x{point.threads}"
            f"{study}{origin}")


def _network(spec: SweepSpec, value: Union[str, list[int]]) -> tuple[str, list[int]]:
    names = {**NETWORKS, **spec.networks}
    if isinstance(value, str):
        if value not in names:
            raise ConfigError(f"unknown network {value!r}: use one of {', '.join(names)}, a layer list, or define it under networks:")
        return value, names[value]
    named = [n for n, layers in names.items() if layers == value]
    return (named[0] if named else str(value)), value


def _matches(rule: dict[str, Any], values: dict[str, Any], spec: SweepSpec) -> bool:
    for key, wanted in rule.items():
        have = values[key]
        if key == "network":
            options = [wanted] if isinstance(wanted, str) or (isinstance(wanted, list) and all(isinstance(x, int) for x in wanted)) else wanted
            if not any(_network(spec, o) == have for o in options):
                return False
            continue
        options = wanted if isinstance(wanted, list) else [wanted]
        if have not in options:
            return False
    return True


def _check_best_split(spec: SweepSpec, path: Path) -> None:
    """What hybrid_split: best cannot be combined with: weak scaling, rules on hybrid's ranks/threads."""
    if spec.axes.batch_per_rank is not None:
        raise ConfigError(f"{path}: hybrid_split: best cannot be combined with axes.batch_per_rank (weak scaling): the "
                          "global batch would depend on the split chosen, and the split is chosen for a global batch; "
                          "give axes.batch_size, or use hybrid_split: axes")
    for kind in ("where", "exclude"):
        for rule in getattr(spec, kind):
            named = [k for k in ("ranks", "threads_per_rank") if k in rule]
            impls = rule.get("implementation")
            admits_hybrid = impls is None or "hybrid" in (impls if isinstance(impls, list) else [impls])
            if named and admits_hybrid:
                raise ConfigError(f"{path}: {kind}: rule {rule} names {' and '.join(named)}, but with hybrid_split: best "
                                  "a hybrid point's ranks and threads are the measured split for the cores it runs on, "
                                  "so the rule would make the points depend on the machine; limit the rule to other "
                                  "implementations (implementation: [...] without hybrid), or use hybrid_split: axes")


def expand(path: str | Path) -> Sweep:
    """Read and validate a sweep file and list its points (each point's config validated too)."""
    path = Path(path)
    spec = load_spec(path)
    check_controlled(spec, path)
    best = spec.hybrid_split == "best" and "hybrid" in spec.axes.implementation
    if best:
        _check_best_split(spec, path)
    split_cores = planned_cores(spec) if best else None
    base_path = resolve_base(spec.base, path) if isinstance(spec.base, str) else None
    base_dict = configmod.read_yaml(base_path) if base_path else {}
    base_items = [] if base_path else set_items(spec.base)
    base_cfg = configmod.from_dict(configmod.apply_overrides(copy.deepcopy(base_dict), base_items + set_items(spec.set)),
                                   f"{path} (base + set)")
    ax = spec.axes
    networks = [_network(spec, n) for n in ax.network] if ax.network else [_network(spec, base_cfg.model.layers)]
    batches = ax.batch_per_rank or ax.batch_size or [base_cfg.train.batch_size]
    points: list[Point] = []
    # strategy, straggler, variant and seed innermost: a sweep without those axes numbers its points
    # as before they existed (and a point's seeds are neighbours)
    seeds = [base_cfg.train.seed + k for k in range(spec.seeds)] if spec.seeds > 1 else [None]
    for impl, (net, layers), dtype, batch, ranks, threads, strategy, straggler, variant, seed in itertools.product(
            ax.implementation, networks, ax.dtype or [base_cfg.model.dtype], batches, ax.ranks, ax.threads_per_rank,
            ax.strategy or [None], ax.straggler_factor or [None], ax.variant or [None], seeds):
        split = None
        if impl == "hybrid" and best:
            # one point, where the axes' first (ranks, threads) would be: same place and number on every machine
            if (ranks, threads) != (ax.ranks[0], ax.threads_per_rank[0]):
                continue
            assert split_cores is not None
            split = hybrid.choose_split(layers, batch, split_cores, min_ranks=2)  # hybrid: P>1 ranks
            ranks, threads = split.ranks, split.threads
        values = {"implementation": impl, "network": (net, layers), "dtype": dtype, "ranks": ranks, "threads_per_rank": threads,
                  "batch_size": batch * ranks if ax.batch_per_rank else batch,
                  "batch_per_rank": batch if ax.batch_per_rank else None,
                  "strategy": strategy or base_cfg.parallel.strategy,
                  "straggler_factor": straggler if straggler is not None else base_cfg.study.straggler_factor,
                  "variant": variant, "seed": seed}
        if not RULES[impl].fits(ranks, threads):
            continue
        if spec.where and not any(_matches(r, values, spec) for r in spec.where):
            continue
        if any(_matches(r, values, spec) for r in spec.exclude):
            continue
        point = _make_point(spec, path, base_dict, base_items, len(points), values)
        point.split_origin = split.origin if split else None
        points.append(point)
    if not points:
        raise ConfigError(f"{path}: the axes produce no points: every combination is ruled out by the implementations' "
                          f"shapes ({'; '.join(f'{i}: {RULES[i].shape}' for i in ax.implementation)}) or by where:/exclude:")
    return Sweep(spec, path, base_path, points, split_cores)


def _make_point(spec: SweepSpec, path: Path, base_dict: dict[str, Any], base_items: list[str], index: int,
                values: dict[str, Any]) -> Point:
    impl, (net, layers) = values["implementation"], values["network"]
    rule = RULES[impl]
    fixed = {"algorithm": rule.algorithm, "backend": rule.backend, "model.layers": layers, "model.dtype": values["dtype"],
             "train.batch_size": values["batch_size"], "train.warmup_epochs": spec.warmup_epochs,
             "parallel.ranks": values["ranks"], "parallel.threads_per_rank": values["threads_per_rank"]}
    stated = [spec.axes.batch_size, spec.axes.batch_per_rank, "batch_size" in (base_dict.get("train") or {}),
              "train.batch_size" in spec.set, "train.batch_size" in spec.implementation_set.get(impl, {})]
    if not any(stated):  # the built-in default batch, as a run without --set has it (train refuses only a stated
        del fixed["train.batch_size"]  # batch larger than the training set)
    if spec.oversubscribe:
        fixed["parallel.oversubscribe"] = True
    if spec.axes.strategy:
        fixed["parallel.strategy"] = values["strategy"]
    if spec.axes.straggler_factor:
        fixed["study.straggler_factor"] = values["straggler_factor"]
    if values["seed"] is not None:
        fixed["train.seed"] = values["seed"]
    variant = set_items(spec.variants[values["variant"]]) if values["variant"] else []
    by_batch = set_items(spec.batch_set.get(values["batch_size"], {}))
    # A study runs the grid its points state (all data, unless a variant sets parallel.tensor or
    # pipeline), not one that start-up measurements pick (parallel.grid auto, the default for a
    # run): otherwise two points of a scaling axis could differ in what they parallelise. A sweep
    # whose base or set names parallel.grid gets what it names.
    study_grid = [] if "grid" in (base_dict.get("parallel") or {}) else ["parallel.grid=manual"]
    overrides = (study_grid + base_items + set_items(spec.set) + set_items(spec.implementation_set.get(impl, {})) + by_batch
                 + variant + set_items(fixed))
    cfg = configmod.from_dict(configmod.apply_overrides(copy.deepcopy(base_dict), overrides), f"{path} (point {index})")
    if cfg.train.warmup_epochs >= cfg.train.epochs:
        raise ConfigError(f"{path}: warmup_epochs={spec.warmup_epochs} leaves no timed epoch with train.epochs={cfg.train.epochs}")
    return Point(index, impl, net, layers, values["dtype"], values["batch_size"], values["ranks"],
                 values["threads_per_rank"], overrides, cfg.to_dict(), strategy=cfg.parallel.strategy,
                 straggler_factor=cfg.study.straggler_factor, variant=values["variant"], seed=values["seed"])


# ---------------------------------------------------------------------------------------------
# Where a point can run


def _slurm_cores() -> Optional[int]:
    """The Slurm allocation's cores (SLURM_NTASKS x SLURM_CPUS_PER_TASK) when in one, else None."""
    if not os.environ.get("SLURM_NTASKS"):
        return None
    return int(os.environ["SLURM_NTASKS"]) * int(os.environ.get("SLURM_CPUS_PER_TASK") or "1")


def available_cores(spec: SweepSpec, launcher: str) -> int:
    """Cores a point may use: the sweep's `cores:`, else the Slurm allocation (srun), else this machine's."""
    if spec.cores:
        return spec.cores
    allocation = _slurm_cores() if launcher == "srun" else None
    return allocation or provenance.cores_available()


def planned_cores(spec: SweepSpec) -> int:
    """Cores hybrid_split: best chooses splits of: `cores:`, else the Slurm allocation if in one, else this machine's."""
    return spec.cores or _slurm_cores() or provenance.cores_available()


def skip_reason(point: Point, spec: SweepSpec, cores: int) -> Optional[str]:
    """Why this point cannot run here, or None."""
    if point.implementation == "gpu" and importlib.util.find_spec("cupy") is None:
        return "CuPy is not importable here (pip install .[gpu] on a GPU machine)"
    if point.implementation == "framework" and importlib.util.find_spec("torch") is None:
        return "torch is not importable here (pip install .[framework])"
    need = point.ranks * point.threads
    if spec.use_all_cores and need != cores:
        return f"use_all_cores: {point.ranks} ranks x {point.threads} threads = {need}, not the {cores} cores available"
    if need > cores and not spec.oversubscribe:
        return f"needs {need} cores ({point.ranks} ranks x {point.threads} threads), {cores} available; set oversubscribe: true to run it anyway"
    return None
