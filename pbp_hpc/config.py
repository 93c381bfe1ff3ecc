"""Typed run configuration: YAML in, validated objects out, errors that name the key and the file.

pydantic does the type checking; this module adds what it lacks for a command-line tool:
`--set a.b=value` overrides, "did you mean" suggestions for misspelt keys, and one error
type (ConfigError) whatever went wrong.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from pbp_hpc.config_yaml import MAX_CONFIG_BYTES, MAX_OVERRIDE_CHARS, _Refused, _short_repr, parse_yaml
from pbp_hpc.errors import ConfigError


from pbp_hpc.config_sections import (  # noqa: F401  (the sections and bounds, re-exported)
    ModelConfig,
    DataConfig,
    TrainConfig,
    OptimizerConfig,
    ScheduleConfig,
    ParallelConfig,
    StudyConfig,
    CheckpointConfig,
    DebugConfig,
    BIG_COUNT,
    MAX_CLASSES,
    MAX_THREADS,
    MAX_WAIT_S,
    MAX_FUSION_BYTES,
    MAX_STRAGGLER_FACTOR,
    _Section,
)


class Config(_Section):
    backend: Literal["numpy", "cupy"] = "numpy"
    algorithm: Literal["batched", "per_example"] = "batched"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.data.name in ("mnist", "fashion-mnist") and self.model.layers[0] != 784:
            raise ValueError(f"model.layers[0] must be 784 for {self.data.name} (28x28 images), got {self.model.layers[0]}")
        if self.data.name in ("mnist", "fashion-mnist") and self.model.layers[-1] != 10:
            raise ValueError(f"model.layers[-1] must be 10 for {self.data.name} (10 classes), got {self.model.layers[-1]}")
        if self.data.n_classes is not None and self.data.n_classes != self.model.layers[-1]:
            raise ValueError(f"data.n_classes is {self.data.n_classes} but model.layers[-1] (the output layer) is "
                             f"{self.model.layers[-1]}; they must be equal")
        if self.data.name == "synthetic" and self.model.layers[-1] < 2:
            raise ValueError("model.layers[-1] (the number of classes) must be at least 2 for synthetic data")
        if self.model.label_smoothing and self.algorithm == "per_example":
            raise ValueError("model.label_smoothing is not implemented by algorithm per_example (the report's "
                             "baseline); use algorithm batched")
        if self.train.ema_decay and self.parallel.strategy != "allreduce":
            raise ValueError(f"train.ema_decay averages the weights of parallel.strategy allreduce; "
                             f"strategy {self.parallel.strategy} keeps no average")
        rank = self.study.straggler_rank
        if rank is not None and self.parallel.ranks is not None and rank >= self.parallel.ranks:
            raise ValueError(f"study.straggler_rank is {rank} but parallel.ranks is {self.parallel.ranks}")
        from pbp_hpc.parallel import combinations

        broken = combinations.violation(self)
        if broken is not None:
            raise ValueError(broken)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """A hash of everything that decides the computation, to check that all ranks agree."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _known_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_known_paths(ann, path + "."))
    return out


KNOWN_KEYS = _known_paths(Config)


def _suggest(path: str) -> str:
    near = difflib.get_close_matches(path, KNOWN_KEYS, n=1, cutoff=0.6)
    if not near:
        leaf = path.rsplit(".", 1)[-1]
        near = [k for k in KNOWN_KEYS if k.rsplit(".", 1)[-1] in difflib.get_close_matches(leaf, [p.rsplit(".", 1)[-1] for p in KNOWN_KEYS], n=1, cutoff=0.75)]
    return f" (did you mean '{near[0]}'?)" if near else ""


MAX_ERRORS_SHOWN = 20


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    errors = err.errors()
    for e in errors[:MAX_ERRORS_SHOWN]:
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key{_suggest(path)}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {_short_repr(got)})"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {path or '(top level)'}: {msg}{shown}")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS_SHOWN} more")
    return f"invalid configuration in {source}:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.learning_rate=0.1' -> (['train', 'learning_rate'], 0.1); values are read as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {item!r}")
    if len(raw) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"--set {key}: value is {len(raw)} characters long, more than the {MAX_OVERRIDE_CHARS} allowed")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except _Refused as exc:
        raise ConfigError(f"--set {key}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {_short_repr(raw)} is not valid YAML: {exc}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with open(p, "rb") as f:  # read no more than the limit, whatever the file's size
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p} is larger than {MAX_CONFIG_BYTES} bytes: too large to be a configuration")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    try:
        data = parse_yaml(text)  # safe: a config must never run code (no !!python tags)
    except _Refused as exc:
        raise ConfigError(f"{p}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of sections (model:, train:, ...), got a {type(data).__name__}")
    return data


def from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: expected a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    except (TypeError, ValueError, RecursionError) as exc:  # pydantic can raise these on exotic inputs
        raise ConfigError(f"invalid configuration in {source}: {exc}") from None


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config file (or the defaults when path is None) and apply `--set` overrides."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "the defaults"
    if overrides:
        data = apply_overrides(data, overrides)
        source += " with --set " + " ".join(overrides)
    return from_dict(data, source)
