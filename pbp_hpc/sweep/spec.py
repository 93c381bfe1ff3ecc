"""The sweep file: its schema (pydantic models), the implementations it names (RULES), loading it,
and the errors that say what in it is wrong.

Nothing here knows about points: pbp_hpc.sweep.expand turns a validated SweepSpec into them.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pbp_hpc.errors import ConfigError

# The repository root (pbp_hpc/sweep/spec.py -> ../../..): base configs and slurm/*.sh are found there.
ROOT = Path(__file__).resolve().parents[2]
NETWORKS: dict[str, list[int]] = {"net1h": [784, 1024, 10], "net2h": [784, 1024, 1024, 10]}
Implementation = Literal["naive-serial", "example-parallel", "blas-serial", "blas-threaded", "hybrid", "gpu", "framework"]
AXES = ("implementation", "network", "dtype", "batch_size", "batch_per_rank", "ranks", "threads_per_rank", "strategy",
        "straggler_factor", "variant")


@dataclass(frozen=True)
class Rule:
    """What an implementation is: which (ranks, threads) it accepts and how it is run."""

    fits: Callable[[int, int], bool]  # (ranks, threads) -> can this implementation be that?
    shape: str  # the constraint in words, for --list and errors
    algorithm: str = "batched"
    backend: str = "numpy"
    module: str = "pbp_hpc.train"


RULES: dict[str, Rule] = {
    "naive-serial": Rule(lambda p, t: p == 1 and t == 1, "1 rank x 1 thread", algorithm="per_example"),
    "example-parallel": Rule(lambda p, t: p > 1 and t == 1, "P>1 ranks x 1 thread", algorithm="per_example"),
    "blas-serial": Rule(lambda p, t: p == 1 and t == 1, "1 rank x 1 thread"),
    "blas-threaded": Rule(lambda p, t: p == 1 and t > 1, "1 rank x T>1 threads"),
    # The report's hybrid is P>1 ranks x T>1 threads; T=1 is allowed so that a 2-core machine has
    # one (pure-MPI BLAS) split. Add `where: [{implementation: hybrid, threads_per_rank: [2, 4]}]` to require T>1.
    "hybrid": Rule(lambda p, t: p > 1, "P>1 ranks x T threads"),
    "gpu": Rule(lambda p, t: t == 1, "P ranks (one GPU each) x 1 thread", backend="cupy"),
    "framework": Rule(lambda p, t: p == 1, "1 rank x T threads", module="pbp_hpc.framework"),
}
# Config keys the sweep sets itself for every point; `set:` may not name them.
CONTROLLED = {"algorithm", "backend", "parallel.ranks", "parallel.threads_per_rank", "parallel.oversubscribe",
              "train.warmup_epochs", "checkpoint.path", "checkpoint.resume"}


MAX_REPEATS = 10_000  # repetitions, seeds: a typo of a few zeros is an error, not a sweep of years


class _Strict(BaseModel):
    # strict: as in run configs, a quoted "3" is not a number and "yes" is not a boolean
    model_config = ConfigDict(extra="forbid", strict=True)


class Axes(_Strict):
    implementation: list[Implementation] = Field(min_length=1)
    network: Optional[list[Union[str, list[int]]]] = Field(None, min_length=1)
    dtype: Optional[list[Literal["float32", "float64"]]] = Field(None, min_length=1)
    batch_size: Optional[list[int]] = Field(None, min_length=1)
    batch_per_rank: Optional[list[int]] = Field(None, min_length=1)  # weak scaling: global batch = this x ranks
    ranks: list[int] = Field(default_factory=lambda: [1], min_length=1)
    threads_per_rank: list[int] = Field(default_factory=lambda: [1], min_length=1)
    strategy: Optional[list[str]] = Field(None, min_length=1)  # parallel.strategy (pbp_hpc/parallel/strategies/)
    straggler_factor: Optional[list[float]] = Field(None, min_length=1)  # study.straggler_factor (>= 1)
    variant: Optional[list[str]] = Field(None, min_length=1)  # names of the sweep's `variants:` (config overrides)

    @field_validator("strategy")
    @classmethod
    def _strategies(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        from pbp_hpc.parallel import strategies

        for name in v or []:
            if name not in strategies.names():
                raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(strategies.names())}")
        return v

    @field_validator("straggler_factor")
    @classmethod
    def _factors(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is not None and any(f < 1 for f in v):
            raise ValueError(f"every straggler factor must be at least 1 (1: no straggler), got {v}")
        return v

    @field_validator("batch_size", "batch_per_rank", "ranks", "threads_per_rank")
    @classmethod
    def _positive(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and any(n < 1 for n in v):
            raise ValueError(f"every value must be at least 1, got {v}")
        return v

    @model_validator(mode="after")
    def _one_batch_axis(self) -> "Axes":
        if self.batch_size is not None and self.batch_per_rank is not None:
            raise ValueError("give batch_size (global) or batch_per_rank (weak scaling), not both")
        return self


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    base: Union[str, dict[str, Any]] = Field(default_factory=dict)
    set: dict[str, Any] = Field(default_factory=dict)
    axes: Axes
    repetitions: int = Field(1, ge=1, le=MAX_REPEATS)
    # each point trained with this many seeds (train.seed + 0 .. seeds - 1), each its own point;
    # repetitions time the same seed again. 1: the base config's seed, points as before seeds existed
    seeds: int = Field(1, ge=1, le=MAX_REPEATS)
    # named sets of config overrides (`set:`'s form), chosen per point by the `variant` axis
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    warmup_epochs: int = Field(1, ge=0)
    timeout_s: float = Field(3600.0, gt=0)
    oversubscribe: bool = False
    use_all_cores: bool = False
    cores: Optional[int] = Field(None, ge=1)  # cores to plan for; default: detected where the sweep runs
    # a few seconds of Allreduce and latency timings before the first point (pbp_hpc.sweep.network),
    # stored with every run: what analyze fits alpha and beta to
    measure_network: bool = True
    # a timeline per point (train.trace, pbp_hpc/trace.py): <results>.traces/<run key>.json
    trace: bool = False
    # hybrid's (ranks, threads): `axes` -- every P>1 x T of the ranks/threads_per_rank axes; `best` -- one
    # point per network, dtype and batch at the fastest measured split with P>=2 of the planned cores.
    hybrid_split: Literal["axes", "best"] = "axes"
    networks: dict[str, list[int]] = Field(default_factory=dict)  # extra short names for the network axis
    implementation_set: dict[Implementation, dict[str, Any]] = Field(default_factory=dict)
    # overrides for the points of one global batch size (e.g. a smaller data.n_train where batch 1's
    # steps are slow); applied after implementation_set, before the variant
    batch_set: dict[int, dict[str, Any]] = Field(default_factory=dict)
    where: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _variants_named(self) -> "SweepSpec":
        for name in self.axes.variant or []:
            if name not in self.variants:
                raise ValueError(f"axes.variant names {name!r}, which variants: does not define "
                                 f"(it defines {', '.join(self.variants) or 'none'})")
        return self

    @model_validator(mode="after")
    def _batch_set_batches(self) -> "SweepSpec":
        batches = self.axes.batch_size
        for batch in self.batch_set:
            if batches is None or batch not in batches:
                raise ValueError(f"batch_set names batch {batch}, which axes.batch_size does not hold "
                                 f"({', '.join(map(str, batches)) if batches else 'axes.batch_size is not given'})")
        return self

    @field_validator("where", "exclude")
    @classmethod
    def _axis_keys(cls, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for rule in rules:
            for key in rule:
                if key not in AXES:
                    near = difflib.get_close_matches(key, AXES, n=1)
                    raise ValueError(f"unknown axis {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                                     + f"; rules match on {', '.join(AXES)}")
        return rules


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'epochs': 2}, 'data.n_train': 5} -> {'train.epochs': 2, 'data.n_train': 5}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def yaml_value(v: Any) -> str:
    """A value as `--set` reads it (YAML): plain where that reads back the same, else JSON (which is YAML)."""
    if isinstance(v, str):
        try:
            if v.strip() == v and v and yaml.safe_load(v) == v:
                return v
        except yaml.YAMLError:
            pass
    return json.dumps(v)


def set_items(values: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml_value(v)}" for k, v in flatten(values).items()]


def _suggestion(loc: tuple, bad: str) -> str:
    node: Any = SweepSpec
    for part in loc[:-1]:
        ann = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        node = ann.annotation if ann is not None else None
    names = list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []
    near = difflib.get_close_matches(bad, names, n=1, cutoff=0.6)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _format_errors(err: ValidationError, source: Path) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key{_suggestion(loc, str(loc[-1]))}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"  {path or '(top level)'}: {e['msg']}{shown}")
    return f"invalid sweep file {source}:\n" + "\n".join(lines)


def resolve_base(base: str, jobfile: Path) -> Path:
    """A base config path: relative to the job file, else to the repository, else to the cwd."""
    for candidate in (jobfile.parent / base, ROOT / base, Path(base)):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{jobfile}: base config {base!r} not found next to the job file, in {ROOT} or in {Path.cwd()}")


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read sweep file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping (name:, base:, axes:, ...), got {type(data).__name__}")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, path)) from None


def check_controlled(spec: SweepSpec, path: Path) -> None:
    axis_keys = {"network": "model.layers", "dtype": "model.dtype", "batch_size": "train.batch_size",
                 "batch_per_rank": "train.batch_size", "strategy": "parallel.strategy",
                 "straggler_factor": "study.straggler_factor"}
    controlled = set(CONTROLLED) | {k for a, k in axis_keys.items() if getattr(spec.axes, a) is not None}
    if spec.seeds > 1:
        controlled.add("train.seed")
    sources = {"set": spec.set, **{f"implementation_set.{i}": v for i, v in spec.implementation_set.items()},
               **{f"batch_set.{b}": v for b, v in spec.batch_set.items()},
               **{f"variants.{n}": v for n, v in spec.variants.items()}}
    for where, values in sources.items():
        for key in flatten(values):
            if key in controlled:
                raise ConfigError(f"{path}: {where} sets {key}, which the sweep controls (through its axes, "
                                  "implementation, seeds or warmup_epochs); change it there instead")
