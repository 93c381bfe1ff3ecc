"""Parameter sweeps: `python -m pbp_hpc.sweep jobs/X.yaml --results results/X.h5`.

A sweep file (jobs/*.yaml, format in docs/sweeps.md) names a base configuration and axes
(implementation, network, batch size, ranks, threads, dtype); their product, filtered by what
each implementation can be (naive-serial is 1 rank x 1 thread, ...) and by `where:`/`exclude:`,
is the list of points, numbered from 0 in a fixed order that does not depend on the machine
(a Slurm array task K must mean the same point everywhere). With `hybrid_split: best` the
`hybrid` implementation has one point per network, dtype and batch size instead, at the fastest
ranks x threads split that `python -m pbp_hpc.bench` measured for the cores the sweep plans for
(pbp_hpc.hybrid): the number of points still does not depend on the machine, their split does. Each point and repetition runs
as its own process, `mpiexec -n P python -m pbp_hpc.train ... --json`, and its JSON result
is appended to an HDF5 results file (pbp_hpc.results). Rerun, the sweep skips what is
recorded; a point that fails is recorded as failed and the sweep goes on. A run is keyed by its
point's number, so before anything runs the sweep checks that each run recorded under its keys
is still that point (check_recorded): after an edit of the sweep file, point K may be another.

What cannot run here (CuPy or torch missing, more cores than the machine has) is skipped at
run time with a reason, keeping its index.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import difflib
import importlib.util
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pbp_hpc import config as configmod
from pbp_hpc.parallel import hybrid
from pbp_hpc.engine import model
from pbp_hpc.parallel import provenance
from pbp_hpc import results
from pbp_hpc.errors import ConfigError, PbpError, ResultsError

ROOT = Path(__file__).resolve().parents[2]
NETWORKS: dict[str, list[int]] = {"net1h": [784, 1024, 10], "net2h": [784, 1024, 1024, 10]}
Implementation = Literal["naive-serial", "example-parallel", "blas-serial", "blas-threaded", "hybrid", "gpu", "framework"]
AXES = ("implementation", "network", "dtype", "batch_size", "batch_per_rank", "ranks", "threads_per_rank")
STDERR_TAIL = 20  # lines of a failed point's stderr kept as its error


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


# ---------------------------------------------------------------------------------------------
# The sweep file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Axes(_Strict):
    implementation: list[Implementation] = Field(min_length=1)
    network: Optional[list[Union[str, list[int]]]] = Field(None, min_length=1)
    dtype: Optional[list[Literal["float32", "float64"]]] = Field(None, min_length=1)
    batch_size: Optional[list[int]] = Field(None, min_length=1)
    batch_per_rank: Optional[list[int]] = Field(None, min_length=1)  # weak scaling: global batch = this x ranks
    ranks: list[int] = Field(default_factory=lambda: [1], min_length=1)
    threads_per_rank: list[int] = Field(default_factory=lambda: [1], min_length=1)

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
    repetitions: int = Field(1, ge=1)
    warmup_epochs: int = Field(1, ge=0)
    timeout_s: float = Field(3600.0, gt=0)
    oversubscribe: bool = False
    use_all_cores: bool = False
    cores: Optional[int] = Field(None, ge=1)  # cores to plan for; default: detected where the sweep runs
    # hybrid's (ranks, threads): `axes` -- every P>1 x T of the ranks/threads_per_rank axes; `best` -- one
    # point per network, dtype and batch at the fastest measured split with P>=2 of the planned cores.
    hybrid_split: Literal["axes", "best"] = "axes"
    networks: dict[str, list[int]] = Field(default_factory=dict)  # extra short names for the network axis
    implementation_set: dict[Implementation, dict[str, Any]] = Field(default_factory=dict)
    where: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)

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


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'epochs': 2}, 'data.n_train': 5} -> {'train.epochs': 2, 'data.n_train': 5}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _yaml_value(v: Any) -> str:
    """A value as `--set` reads it (YAML): plain where that reads back the same, else JSON (which is YAML)."""
    if isinstance(v, str):
        try:
            if v.strip() == v and v and yaml.safe_load(v) == v:
                return v
        except yaml.YAMLError:
            pass
    return json.dumps(v)


def _set_items(values: dict[str, Any]) -> list[str]:
    return [f"{k}={_yaml_value(v)}" for k, v in _flatten(values).items()]


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


def _resolve_base(base: str, jobfile: Path) -> Path:
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


def _check_controlled(spec: SweepSpec, path: Path) -> None:
    axis_keys = {"network": "model.layers", "dtype": "model.dtype", "batch_size": "train.batch_size",
                 "batch_per_rank": "train.batch_size"}
    controlled = set(CONTROLLED) | {k for a, k in axis_keys.items() if getattr(spec.axes, a) is not None}
    sources = {"set": spec.set, **{f"implementation_set.{i}": v for i, v in spec.implementation_set.items()}}
    for where, values in sources.items():
        for key in _flatten(values):
            if key in controlled:
                raise ConfigError(f"{path}: {where} sets {key}, which the sweep controls (through its axes, "
                                  "implementation or warmup_epochs); change it there instead")


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
    _check_controlled(spec, path)
    best = spec.hybrid_split == "best" and "hybrid" in spec.axes.implementation
    if best:
        _check_best_split(spec, path)
    split_cores = planned_cores(spec) if best else None
    base_path = _resolve_base(spec.base, path) if isinstance(spec.base, str) else None
    base_dict = configmod.read_yaml(base_path) if base_path else {}
    base_items = [] if base_path else _set_items(spec.base)
    base_cfg = configmod.from_dict(configmod.apply_overrides(copy.deepcopy(base_dict), base_items + _set_items(spec.set)),
                                   f"{path} (base + set)")
    ax = spec.axes
    networks = [_network(spec, n) for n in ax.network] if ax.network else [_network(spec, base_cfg.model.layers)]
    batches = ax.batch_per_rank or ax.batch_size or [base_cfg.train.batch_size]
    points: list[Point] = []
    for impl, (net, layers), dtype, batch, ranks, threads in itertools.product(
            ax.implementation, networks, ax.dtype or [base_cfg.model.dtype], batches, ax.ranks, ax.threads_per_rank):
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
                  "batch_per_rank": batch if ax.batch_per_rank else None}
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
    if spec.oversubscribe:
        fixed["parallel.oversubscribe"] = True
    overrides = base_items + _set_items(spec.set) + _set_items(spec.implementation_set.get(impl, {})) + _set_items(fixed)
    cfg = configmod.from_dict(configmod.apply_overrides(copy.deepcopy(base_dict), overrides), f"{path} (point {index})")
    if cfg.train.warmup_epochs >= cfg.train.epochs:
        raise ConfigError(f"{path}: warmup_epochs={spec.warmup_epochs} leaves no timed epoch with train.epochs={cfg.train.epochs}")
    return Point(index, impl, net, layers, values["dtype"], values["batch_size"], values["ranks"],
                 values["threads_per_rank"], overrides, cfg.to_dict())


# ---------------------------------------------------------------------------------------------
# Where and how a point runs


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


def default_mpiexec() -> str:
    return shutil.which("mpiexec") or str(Path(sys.executable).with_name("mpiexec"))


def launcher_prefix(launcher: str, ranks: int, threads: int, bind: bool = False) -> list[str]:
    """The MPI launcher's words before the program; PBP_MPIEXEC / PBP_SRUN replace the defaults.

    A replacement may use {ranks} and {threads}; without {ranks}, `-n <ranks>` is appended; it is
    used as it is (bind or not). bind: the default launcher binds each rank to its own `threads`
    cores -- srun --cpu-bind=cores; mpiexec as its flavour spells it (MPICH's Hydra, Open MPI;
    pbp_hpc.hybrid.mpiexec_args), nothing for an mpiexec it does not recognise. Pass bind only
    when ranks x threads fit the cores: binding more ranks than cores stacks them on the first.
    """
    if launcher == "srun":
        template = os.environ.get("PBP_SRUN") or (f"srun --mpi={os.environ.get('PBP_SRUN_MPI') or 'pmi2'} --kill-on-bad-exit=1 "
                                                 + ("--cpu-bind=cores " if bind else "") + "--cpus-per-task={threads}")
    elif os.environ.get("PBP_MPIEXEC"):
        template = os.environ["PBP_MPIEXEC"]
    else:
        mpiexec = default_mpiexec()
        return [mpiexec, *hybrid.mpiexec_args(ranks, threads, hybrid.mpi_flavour(mpiexec) if bind else None)]
    words = [w.format(ranks=ranks, threads=threads) for w in shlex.split(template)]
    return words if "{ranks}" in template else [*words, "-n", str(ranks)]


def checkpoint_path(results_path: Path, key: str) -> Path:
    return results_path.parent / f".{results_path.name}.checkpoints" / f"{key}.h5"


def command(sweep: Sweep, point: Point, launcher: str, ckpt: Optional[Path], data_dir: Optional[str],
            cores: Optional[int] = None) -> list[str]:
    """The point's command line; cores (default available_cores) decides whether its ranks are bound."""
    if cores is None:
        cores = available_cores(sweep.spec, launcher)
    # Each rank gets its own `threads` cores when they fit, as the benchmark measured the splits.
    # Unbound, Linux stacked two communicating ranks on one core (a waiting rank yields and the
    # scheduler wakes its peer on the CPU where it slept): 2x1 ran 3-5x slower than 1x1 at times
    # on the 2-core machine. Oversubscribed points are left unbound: binding would stack ranks.
    bind = point.ranks * point.threads <= cores
    cmd = [*launcher_prefix(launcher, point.ranks, point.threads, bind=bind), sys.executable, "-m", point.rule.module]
    if sweep.base_path:
        cmd += ["--config", str(sweep.base_path)]
    for item in point.overrides:
        cmd += ["--set", item]
    if ckpt is not None and point.rule.module == "pbp_hpc.train":
        # Per point, so a SIGUSR1/SIGTERM'd point resumes where it stopped when the sweep runs again.
        cmd += ["--set", f"checkpoint.path={_yaml_value(str(ckpt.resolve()))}", "--set", "checkpoint.resume=true"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    return [*cmd, "--json"]


def child_env(point: Point) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(point.threads)
    return env


try:
    _LIBC: Any = ctypes.CDLL(None, use_errno=True)  # loaded now: after fork only async-signal-safe work is wise
except OSError:  # no C library handle (not POSIX)
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: be SIGKILLed if the sweep dies, so no point runs on unwatched."""
    if _LIBC is not None and sys.platform.startswith("linux"):
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # elsewhere an orphaned point finishes on its own and is simply not recorded


# ---------------------------------------------------------------------------------------------
# Running


class Stop:
    """Signals received by the sweep: SIGUSR1 (Slurm: time limit near), SIGTERM, SIGINT."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.child: Optional[subprocess.Popen] = None
        self.forwarded: Optional[subprocess.Popen] = None

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)
        self.forward()

    def forward(self) -> None:
        """Pass the first signal on to the running point, once (mpiexec and srun pass it to every rank)."""
        child = self.child
        if not self.signals or child is None or child.poll() is not None or self.forwarded is child:
            return
        self.forwarded = child
        # SIGUSR1 as is; SIGTERM for SIGTERM and SIGINT: pbp_hpc.train checkpoints and stops on either.
        try:
            os.kill(child.pid, signal.SIGUSR1 if self.signals[0] == signal.SIGUSR1 else signal.SIGTERM)
        except ProcessLookupError:
            pass

    @property
    def requested(self) -> bool:
        return bool(self.signals)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_json(stdout: str) -> Optional[dict[str, Any]]:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _tail(text: str, n: int = STDERR_TAIL) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


@dataclass
class Outcome:
    status: str  # ok | diverged | failed | timeout | interrupted
    result: Optional[dict[str, Any]]
    error: str
    seconds: float


def log_path(results_path: Path, key: str) -> Path:
    """Where a run's stderr goes (its per-epoch lines, or why it failed); kept after the run."""
    return results_path.with_suffix(".logs") / f"{key}.log"


def execute(cmd: list[str], env: dict[str, str], timeout: float, stop: Stop, log: Path, grace: float = 60.0) -> Outcome:
    """Run one point's command, its stderr appended to log; classify how it ended.

    After a stop signal the child gets `grace` seconds to checkpoint and exit, then is killed.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as err_file:
        err_file.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        err_file.flush()
        start = err_file.tell()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
    stop.child = proc
    stop.forward()  # a signal that came while the child was starting
    timed_out, stopped_at = False, None
    out = ""
    try:
        while True:
            elapsed = time.perf_counter() - t0
            if stop.requested and stopped_at is None:
                stopped_at = elapsed
            limit = timeout if stopped_at is None else min(timeout, stopped_at + grace)
            try:
                out, _ = proc.communicate(timeout=max(0.01, min(1.0, limit - elapsed)))
                break
            except subprocess.TimeoutExpired:
                if time.perf_counter() - t0 >= limit:
                    timed_out = stopped_at is None
                    _kill_group(proc)  # mpiexec's ranks die with it (hydra); srun's step is cancelled with srun
                    out, _ = proc.communicate()
                    break
    finally:
        stop.child = None
    with open(log, "rb") as f:
        f.seek(start)
        err = f.read().decode(errors="replace")
    seconds = time.perf_counter() - t0
    res = _last_json(out)
    if timed_out:
        return Outcome("timeout", None, f"timed out after {timeout:g} s (timeout_s) and was killed\n{_tail(err)}", seconds)
    if res is not None and res.get("status") == "ok" and proc.returncode == 0:
        return Outcome("ok", res, "", seconds)
    if stop.requested:  # stopped by our own signal: neither a result nor a failure
        return Outcome("interrupted", res, _tail(err), seconds)
    if proc.returncode == 3:
        msg = (res or {}).get("error") or _tail(err)
        return Outcome("diverged", res if res and res.get("status") == "diverged" else None, msg, seconds)
    if proc.returncode == 0 and res is not None and res.get("status") == "checkpointed":
        return Outcome("failed", None, f"stopped by a signal from outside the sweep (checkpointed)\n{_tail(err)}", seconds)
    why = "no JSON result on stdout" if proc.returncode == 0 else f"exit code {proc.returncode}"
    return Outcome("failed", None, f"{why}\n{_tail(err)}".strip(), seconds)


def base_record(sweep: Sweep, point: Point, repetition: int) -> dict[str, Any]:
    """What the sweep knows of a run before it starts: enough for a failed run's record."""
    return {
        "sweep": sweep.spec.name, "point": point.index, "repetition": repetition,
        "implementation": point.implementation, "network": point.network, "batch_size": point.batch_size,
        "ranks": point.ranks, "threads_per_rank": point.threads, "config": point.config,
        "warmup_epochs": sweep.spec.warmup_epochs, "flops_per_example": model.flops_per_example(point.layers),
        "n_params": model.Layout(point.layers).n_params, "test_accuracy": None, "total_time_s": None, "epochs": [],
        "provenance": {"host": os.uname().nodename, "package_version": _package_version(), "git_revision": provenance.git_revision()},
    }


def _package_version() -> str:
    from pbp_hpc import __version__
    return __version__


def make_record(sweep: Sweep, point: Point, repetition: int, outcome: Outcome) -> dict[str, Any]:
    rec = base_record(sweep, point, repetition)
    identity = {k: rec[k] for k in ("sweep", "point", "repetition", "implementation", "network", "batch_size",
                                    "ranks", "threads_per_rank")}
    rec.update(outcome.result or {})
    rec.update(identity)  # the sweep's names for the run win over the child's
    rec["status"] = outcome.status
    rec["error"] = outcome.error
    rec["sweep_wall_s"] = outcome.seconds  # process start to exit, as the sweep saw it
    return rec


@dataclass
class Options:
    results: Path
    launcher: str = "mpiexec"
    retry_failed: bool = False
    data_dir: Optional[str] = None
    point: Optional[int] = None


def plan(sweep: Sweep, opts: Options) -> list[tuple[Point, int]]:
    """(point, repetition) pairs in run order: repetition-major, so drift spreads over all points."""
    points = sweep.points if opts.point is None else [sweep.points[opts.point]]
    return [(p, r) for r in range(sweep.spec.repetitions) for p in points]


def _describe(point: Point) -> str:
    origin = f" ({point.split_origin})" if point.split_origin else ""
    return f"{point.implementation} {point.network} {point.dtype} B={point.batch_size} {point.ranks}x{point.threads}{origin}"


# ---------------------------------------------------------------------------------------------
# Is a recorded run this point's? Keys are positional (sweep, point number, repetition): edit the
# sweep file and point K may be another point, whose run the old file does not hold.

# Config keys that say where a run read its data, where it checkpointed, what it showed or what it
# was allowed, not what it computed: a point that differs from its recorded run only in these is
# still that run's point (--data-dir, the per-point checkpoint, oversubscribe: true, ...).
NOT_IDENTITY_PREFIXES = ("checkpoint.",)
NOT_IDENTITY_KEYS = {"data.dir", "data.download", "train.progress", "parallel.oversubscribe"}
# Config keys compared under their own names (the record's attributes) before the rest of the config.
_NAMED_CONFIG = {"model.layers", "model.dtype", "train.batch_size", "parallel.ranks", "parallel.threads_per_rank"}


def _is_identity(config_key: str) -> bool:
    return config_key not in NOT_IDENTITY_KEYS and not config_key.startswith(NOT_IDENTITY_PREFIXES)


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, type(None))) else str(value)


def _flat_config(config: Any) -> dict[str, Any]:
    return _flatten(config) if isinstance(config, dict) else {}


def identity_differences(recorded: dict[str, Any], point: Point) -> list[str]:
    """How a recorded run (a `results.identities` value) differs from what `point` is now; [] if it is that point.

    Compared: implementation, layers, dtype, global batch size, ranks, threads per rank, and every
    other config key but those that are not the run's identity (NOT_IDENTITY_*): `train.epochs`,
    `data.n_train`, the learning rate, the seed, ... all make another point. What the record lacks
    (a run recorded without a config, a config key that pbp_hpc did not have then) cannot differ.
    """
    config = recorded.get("config") or {}
    flat = _flat_config(config)
    named = [("implementation", recorded.get("implementation") or None, point.implementation),
             ("layers", flat.get("model.layers"), point.layers),
             ("dtype", flat.get("model.dtype"), point.dtype),
             ("batch_size", recorded.get("batch_size"), point.batch_size),
             ("ranks", recorded.get("ranks"), point.ranks),
             ("threads_per_rank", recorded.get("threads_per_rank"), point.threads)]
    if "model.layers" not in flat:  # no config recorded: the network's label is all there is
        named.insert(1, ("network", recorded.get("network") or None, point.network))
    diffs = [f"{name}: recorded {_shown(was)}, the sweep file now gives {_shown(now)}"
             for name, was, now in named if was is not None and was != now]
    if diffs and point.split_origin and recorded.get("implementation") == point.implementation and all(
            d.startswith(("ranks:", "threads_per_rank:")) for d in diffs):
        diffs.append(f"(hybrid_split: best chose {point.ranks}x{point.threads} here: {point.split_origin}; the recorded run "
                     "got its split for other cores -- `cores:`, the Slurm allocation or the machine -- or from other "
                     "measurements in the splits file)")
    skip = set(_NAMED_CONFIG)
    if recorded.get("implementation") and recorded.get("implementation") != point.implementation:
        skip |= {"algorithm", "backend"}  # follow from the implementation, already named
    now = _flat_config(point.config)
    for key in sorted(flat.keys() & now.keys()):
        if key not in skip and _is_identity(key) and flat[key] != now[key]:
            diffs.append(f"{key}: recorded {_shown(flat[key])}, the sweep file now gives {_shown(now[key])}")
    return diffs


def _describe_recorded(rec: dict[str, Any]) -> str:
    """A recorded run as _describe shows a point ('?' for what it was recorded without), and its status."""
    flat = _flat_config(rec.get("config"))

    def val(v: Any) -> str:
        return "?" if v is None else str(v)

    return (f"{rec.get('implementation') or '?'} {rec.get('network') or val(flat.get('model.layers'))} "
            f"{val(flat.get('model.dtype'))} B={val(rec.get('batch_size'))} {val(rec.get('ranks'))}x"
            f"{val(rec.get('threads_per_rank'))}, status {rec.get('status') or '?'}")


def _sweep_keys(sweep: Sweep) -> dict[str, Point]:
    """Every run key of the sweep (all points, all repetitions) -> its point."""
    return {results.run_key(sweep.spec.name, p.index, r): p for p in sweep.points for r in range(sweep.spec.repetitions)}


def mismatches(sweep: Sweep, recorded: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """key -> differences, for every run recorded under a key of this sweep that is not the point it names now."""
    out = {}
    for key, point in _sweep_keys(sweep).items():
        if key in recorded:
            diffs = identity_differences(recorded[key], point)
            if diffs:
                out[key] = diffs
    return out


MAX_SHOWN_MISMATCHES = 5


def check_recorded(sweep: Sweep, results_path: Path) -> dict[str, dict[str, Any]]:
    """The runs of the results file (`results.identities`), once every run recorded under a key of the sweep
    is known to be the point that key names now; else ResultsError saying which are not and what to do.

    All points and repetitions are checked, whatever --point says: nothing runs, nothing is skipped as
    "already recorded" and nothing is retried in a file that holds other points under this sweep's keys.
    """
    recorded = results.identities(results_path)
    bad = mismatches(sweep, recorded)
    if not bad:
        return recorded
    keys = _sweep_keys(sweep)
    lines = [f"results file {results_path} holds {len(bad)} run(s) under keys of sweep {sweep.spec.name!r} that are not "
             f"the points {sweep.path} defines now (a key is sweep.p<point>.r<repetition>, and point numbers follow the "
             "sweep file: editing its axes, base, set, where/exclude or hybrid_split changes or renumbers points):"]
    for key in list(bad)[:MAX_SHOWN_MISMATCHES]:
        point = keys[key]
        lines.append(f"  {key}: recorded {_describe_recorded(recorded[key])}; point {point.index} is now {_describe(point)}")
        lines += [f"      {d}" for d in bad[key]]
    if len(bad) > MAX_SHOWN_MISMATCHES:
        lines.append(f"  ... and {len(bad) - MAX_SHOWN_MISMATCHES} more (`--list` marks them all)")
    lines.append(f"Nothing was run. Write this sweep to a new results file (--results NEW.h5; with --slurm, --results-dir "
                 f"NEW_DIR), or move {results_path} away and run again; restoring the sweep file as it was recorded "
                 "makes those runs its own again.")
    raise ResultsError("\n".join(lines))


def _stale_note(sweep: Sweep, recorded: dict[str, dict[str, Any]], results_path: Path) -> Optional[str]:
    """A note on runs of this sweep's name under keys that are no point of it now (fewer points or repetitions)."""
    keys = _sweep_keys(sweep)
    stale = sorted(k for k, rec in recorded.items() if rec.get("sweep") == sweep.spec.name and k not in keys)
    if not stale:
        return None
    return (f"note: {results_path} also holds {len(stale)} run(s) of sweep {sweep.spec.name} that are no point of "
            f"{sweep.path} now ({stale[0]}{', ...' if len(stale) > 1 else ''}: the sweep file has {len(sweep.points)} "
            f"points x {sweep.spec.repetitions} repetition(s)); they stay in the file")


def run_sweep(sweep: Sweep, opts: Options, stop: Stop, say: Any = print) -> int:
    """Run every unrecorded point; return the exit code (0 ok, 1 some point failed)."""
    identities = check_recorded(sweep, opts.results)  # before anything runs
    recorded = {key: rec["status"] for key, rec in identities.items()}
    note = _stale_note(sweep, identities, opts.results)
    if note:
        say(note)
    cores = available_cores(sweep.spec, opts.launcher)
    counts = dict.fromkeys(("ok", "diverged", "failed", "timeout", "skipped", "already recorded"), 0)
    todo = plan(sweep, opts)
    for i, (point, rep) in enumerate(todo, 1):
        if stop.requested:
            break
        key = results.run_key(sweep.spec.name, point.index, rep)
        prior = recorded.get(key)
        retry = prior in ("failed", "timeout") and opts.retry_failed
        if prior is not None and not retry:
            counts["already recorded"] += 1
            counts[prior] += prior in ("failed", "timeout")  # still a failure of this sweep
            continue
        reason = skip_reason(point, sweep.spec, cores)
        if reason:
            counts["skipped"] += 1
            say(f"[{i}/{len(todo)}] {key} {_describe(point)}: skipped: {reason}")
            continue
        ckpt = checkpoint_path(opts.results, key)
        outcome = execute(command(sweep, point, opts.launcher, ckpt, opts.data_dir, cores), child_env(point),
                          sweep.spec.timeout_s, stop, log_path(opts.results, key))
        if outcome.status == "interrupted":
            say(f"[{i}/{len(todo)}] {key}: interrupted by signal {stop.signals[0]}; not recorded (it resumes on the next run)")
            break
        results.append_run(opts.results, make_record(sweep, point, rep, outcome), replace=retry)
        ckpt.unlink(missing_ok=True)
        counts[outcome.status] += 1
        say(f"[{i}/{len(todo)}] {key} {_describe(point)}: {_summary(outcome)}")
    _cleanup_checkpoint_dir(opts.results)
    say(f"sweep {sweep.spec.name}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
        + f" ({len(todo)} runs planned) -> {opts.results}")
    if stop.requested:
        return 0 if stop.signals[0] == signal.SIGUSR1 else 128 + stop.signals[0]
    if counts["failed"] or counts["timeout"]:
        say("some points failed (see `python -m pbp_hpc.results show` for their errors; --retry-failed reruns them)")
        return 1
    return 0


def _summary(o: Outcome) -> str:
    if o.status == "ok" and o.result:
        tpe = results.tpe({**o.result, "warmup_epochs": o.result.get("warmup_epochs")})
        acc = o.result.get("test_accuracy")
        return (f"ok, TPE {tpe:.4f} s" if tpe is not None else "ok") + (f", test acc {acc:.4f}" if acc is not None else "") + f" ({o.seconds:.1f} s)"
    return f"{o.status} ({o.seconds:.1f} s): {results.headline(o.error)}"


def _cleanup_checkpoint_dir(results_path: Path) -> None:
    d = checkpoint_path(results_path, "x").parent
    if d.is_dir() and not any(d.iterdir()):
        d.rmdir()


# ---------------------------------------------------------------------------------------------
# --list, --dry-run, --slurm


def list_lines(sweep: Sweep, opts: Options) -> list[str]:
    identities = results.identities(opts.results)
    recorded = {key: rec["status"] for key, rec in identities.items()}
    other = mismatches(sweep, identities)
    cores = available_cores(sweep.spec, opts.launcher)
    rows = [["point", "rep", "implementation", "network", "dtype", "batch", "ranks", "threads", "state"]]
    for point, rep in sorted(plan(sweep, opts), key=lambda pr: (pr[0].index, pr[1])):
        key = results.run_key(sweep.spec.name, point.index, rep)
        reason = skip_reason(point, sweep.spec, cores)
        state = f"recorded ({recorded[key]})" if key in recorded else (f"skip: {reason}" if reason else "to run")
        if key in other:
            state = f"recorded ({recorded[key]}) BY ANOTHER POINT: " + "; ".join(other[key])
        if point.split_origin:
            state += f"; split {point.ranks}x{point.threads} ({point.split_origin})"
        rows.append([str(point.index), str(rep), point.implementation, point.network, point.dtype, str(point.batch_size),
                     str(point.ranks), str(point.threads), state])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]).rstrip() for r in rows]
    n = len(sweep.points)
    lines.append(f"{n} points x {sweep.spec.repetitions} repetition(s); Slurm array 0-{n - 1}; {cores} cores here; results {opts.results}")
    if other:
        lines.append(f"{len(other)} run(s) in {opts.results} are recorded by another point under this sweep's keys (the sweep "
                     "file changed since): running it into this file is refused; use a new --results file")
    note = _stale_note(sweep, identities, opts.results)
    if note:
        lines.append(note)
    if sweep.split_cores is not None:
        lines.append(f"hybrid_split: best -- each hybrid point at the fastest measured split of {sweep.split_cores} cores "
                     f"with at least 2 ranks ({hybrid.shown_path(hybrid.splits_path())}; remeasure with python -m pbp_hpc.bench)")
    return lines


def dry_run_lines(sweep: Sweep, opts: Options) -> list[str]:
    recorded = {key: rec["status"] for key, rec in check_recorded(sweep, opts.results).items()}  # as a run would
    cores = available_cores(sweep.spec, opts.launcher)
    lines = []
    for point, rep in plan(sweep, opts):
        key = results.run_key(sweep.spec.name, point.index, rep)
        if key in recorded and not (opts.retry_failed and recorded[key] in ("failed", "timeout")):
            continue
        reason = skip_reason(point, sweep.spec, cores)
        if reason:
            lines.append(f"# {key}: skipped: {reason}")
            continue
        env = f"OMP_NUM_THREADS={point.threads} OPENBLAS_NUM_THREADS={point.threads} MKL_NUM_THREADS={point.threads}"
        cmd = command(sweep, point, opts.launcher, checkpoint_path(opts.results, key), opts.data_dir, cores)
        origin = f": {point.implementation} split {point.ranks}x{point.threads} ({point.split_origin})" if point.split_origin else ""
        lines.append(f"# {key}{origin}\n{env} {shlex.join(cmd)}")
    return lines


def slurm_commands(sweep: Sweep, results_dir: Path, sbatch_args: list[str], array_job: str) -> tuple[list[str], list[str], dict[str, str]]:
    """The two sbatch commands (array of points, then the merge after array_job) and their environment."""
    if sweep.split_cores is not None and sweep.spec.cores is None:
        # Here (a login node) the split sizes the allocation; in the array task the allocation sizes the split.
        raise ConfigError(f"{sweep.path}: hybrid_split: best with --slurm needs `cores:` in the sweep file (the cores of "
                          "one array task's allocation, e.g. a node's): the hybrid splits must be chosen for the same "
                          f"cores where the array is submitted and where each task runs (here: {sweep.split_cores})")
    n = len(sweep.points)
    ranks = max(p.ranks for p in sweep.points)
    threads = max(p.threads for p in sweep.points)
    env = {"PBP_JOBFILE": str(sweep.path.resolve()), "PBP_RESULTS_DIR": str(results_dir.resolve()), "PBP_SWEEP_POINTS": str(n)}
    array = ["sbatch", "--parsable", f"--array=0-{n - 1}", f"--ntasks={ranks}", f"--cpus-per-task={threads}",
             *sbatch_args, str(ROOT / "slurm" / "sweep.sh")]
    merge = ["sbatch", "--parsable", f"--dependency=afterany:{array_job}", *sbatch_args, str(ROOT / "slurm" / "merge.sh")]
    return array, merge, env


def _sbatch(cmd: list[str], env: dict[str, str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if p.returncode != 0:
        raise ConfigError(f"{shlex.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout.strip().split(";")[0]  # --parsable prints "jobid" or "jobid;cluster"


def submit(sweep: Sweep, results_dir: Path, sbatch_args: list[str], dry_run: bool, say: Any = print) -> int:
    """Submit the points as a job array and the merge job after it (or print both commands)."""
    if dry_run:
        array, merge, env = slurm_commands(sweep, results_dir, sbatch_args, "<array job id>")
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        say(f"{prefix} {shlex.join(array)}\n{prefix} {shlex.join(merge)}")
        return 0
    if shutil.which("sbatch") is None:
        raise ConfigError("--slurm needs sbatch, which is not on PATH: run it on a Slurm login node")
    results_dir.mkdir(parents=True, exist_ok=True)
    array, _, env = slurm_commands(sweep, results_dir, sbatch_args, "")
    array_id = _sbatch(array, env)
    merge_id = _sbatch(slurm_commands(sweep, results_dir, sbatch_args, array_id)[1], env)
    say(f"submitted array job {array_id} ({len(sweep.points)} points) and merge job {merge_id}; "
        f"results in {results_dir}/point-*.h5, merged into {results_dir}/merged.h5")
    return 0


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pbp_hpc.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("jobfile", type=Path, help="sweep file, e.g. jobs/paper_net1h.yaml")
    p.add_argument("--results", type=Path, help="HDF5 results file (default results/<sweep name>.h5)")
    p.add_argument("--list", action="store_true", help="print the points and whether each is recorded, then exit")
    p.add_argument("--point", type=int, metavar="K", help="run only point K (a Slurm array task's share)")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    p.add_argument("--retry-failed", action="store_true", help="rerun points recorded as failed or timed out")
    p.add_argument("--launcher", choices=("mpiexec", "srun"), default="mpiexec",
                   help="how ranks start: mpiexec (env PBP_MPIEXEC overrides it) or srun inside a Slurm allocation "
                        "(srun --mpi=$PBP_SRUN_MPI, default pmi2; env PBP_SRUN overrides it)")
    p.add_argument("--data-dir", help="MNIST folder passed to every point (same as data.dir)")
    p.add_argument("--slurm", action="store_true", help="submit the sweep as a Slurm job array plus a merge job")
    p.add_argument("--results-dir", type=Path, help="with --slurm: folder for point-*.h5 (default results/<job file stem>)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="with --slurm: extra sbatch option, e.g. --sbatch-arg=--time=00:20:00 (repeatable)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        sweep = expand(args.jobfile)
        if args.point is not None and not 0 <= args.point < len(sweep.points):
            raise ConfigError(f"--point {args.point}: {args.jobfile} has points 0 to {len(sweep.points) - 1}")
        if args.slurm:
            return submit(sweep, args.results_dir or Path("results") / args.jobfile.stem, args.sbatch_arg, args.dry_run)
        opts = Options(results=args.results or Path("results") / f"{sweep.spec.name}.h5", launcher=args.launcher,
                       retry_failed=args.retry_failed, data_dir=args.data_dir, point=args.point)
        if args.list:
            print("\n".join(list_lines(sweep, opts)))
            return 0
        if args.dry_run:
            print("\n".join(dry_run_lines(sweep, opts)))
            return 0
        stop = Stop()
        stop.install()
        return run_sweep(sweep, opts, stop, say=lambda s: print(s, flush=True))
    except (ConfigError, ResultsError) as exc:
        print(f"pbp_hpc.sweep: error: {exc}", file=sys.stderr)
        return 2
    except PbpError as exc:
        print(f"pbp_hpc.sweep: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head` stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
