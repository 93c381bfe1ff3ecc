"""The sections of a run configuration (model, data, train, optimizer, schedule, parallel,
study, checkpoint, debug): each key's type, default and bounds, and why it has them.

pbp_hpc.config joins them into Config and reads YAML files and `--set` overrides into it.
"""

from __future__ import annotations

import math
import typing
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator, model_validator



# Upper bounds of the keys that feed a sleep, an allocation or a count: a few digits too many
# must be a config error naming the key, not an overflow, a sleep of years or a swapped node.
BIG_COUNT = 10**9  # epochs, examples, steps, batch sizes: far past any real run
MAX_CLASSES = 1 << 16
MAX_THREADS = 4096
MAX_WAIT_S = 7 * 24 * 3600.0  # stall warnings/timeouts, debug stalls: a week
MAX_FUSION_BYTES = 1 << 31
MAX_STRAGGLER_FACTOR = 1000.0  # a rank slowed 1000x: beyond it a step's sleep overflows the clock


def _scalar_kind(annotation: Any) -> Any:
    """int, float or bool for a field of that type (Optional or not), list[int] as ("list", int); else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is list and typing.get_args(annotation)[:1] in ((int,), (float,)):
        return ("list", typing.get_args(annotation)[0])
    return annotation if annotation in (int, float, bool) else None


def _check_scalar(kind: Any, value: Any) -> None:
    """Refuse what pydantic's lax mode would quietly convert: `epochs: true` is not 1, `"no"` is not false.

    Numeric strings stay allowed: PyYAML (YAML 1.1) reads `1e-3` as the string "1e-3", and
    pydantic parses it. Infinities and NaNs are refused however they are spelt.
    """
    if value is None:
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, not a {type(value).__name__}")
        return
    if isinstance(value, (bool, bytes)):
        raise ValueError(f"expected a number, not a {type(value).__name__}")
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return  # not a number: pydantic says so
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("expected a finite number")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        kind = _scalar_kind(field.annotation) if field is not None else None
        if isinstance(kind, tuple):
            if isinstance(value, list):
                for item in value:
                    _check_scalar(kind[1], item)
        elif kind is not None:
            _check_scalar(kind, value)
        return value


# The built-in defaults train: relu + cross-entropy + He init, Nesterov momentum, batch 1024
# with the rate ramped up over the first epoch and decayed by a cosine: Net-1h reaches ~97.9%
# test accuracy in 8 epochs, the same at any rank count (the global batch does not change).
# The report's setup (sigmoid, MSE, Glorot, plain SGD) is configs/report_net1h.yaml; every
# shipped config and sweep states these choices, so a change here changes none of them.
class ModelConfig(_Section):
    layers: list[int] = Field(default_factory=lambda: [784, 1024, 10])
    activation: Literal["sigmoid", "tanh", "relu"] = "relu"  # pbp_hpc/engine/activations.py; the report: sigmoid
    loss: Literal["mse", "cross_entropy"] = "cross_entropy"  # pbp_hpc/engine/losses.py; the report: mse
    dtype: Literal["float32", "float64"] = "float32"
    init: Literal["glorot_uniform", "he_uniform"] = "he_uniform"  # model.INITS; the report: glorot_uniform
    # cross_entropy: targets (1 - e) y + e / classes (engine/losses.py); 0: none
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if len(v) < 2:
            raise ValueError("needs at least an input and an output size, e.g. [784, 1024, 10]")
        if any(n < 1 for n in v):
            raise ValueError(f"every layer size must be at least 1, got {v}")
        return v

    @model_validator(mode="after")
    def _loss_fits_the_output(self) -> "ModelConfig":
        if self.label_smoothing and self.loss != "cross_entropy":
            raise ValueError(f"model.label_smoothing={self.label_smoothing} smooths the targets of cross_entropy; "
                             f"model.loss is {self.loss}")
        if self.loss == "cross_entropy" and self.layers[-1] < 2:
            raise ValueError("loss cross_entropy needs at least 2 outputs (a softmax over classes), "
                             f"got model.layers[-1] = {self.layers[-1]}")
        return self


class DataConfig(_Section):
    name: Literal["mnist", "fashion-mnist", "idx", "synthetic"] = "mnist"
    dir: Optional[str] = None
    download: bool = True
    val_fraction: float = Field(1.0 / 6.0, ge=0.0, lt=1.0)  # the report's 5:1 train:validation split
    n_train: Optional[int] = Field(None, ge=1, le=BIG_COUNT)  # mnist: use the first n of the training file; synthetic: size
    n_test: Optional[int] = Field(None, ge=0, le=BIG_COUNT)
    scale_with_ranks: bool = False  # synthetic weak scaling: n_train is per rank
    noise: float = Field(0.35, ge=0.0)  # synthetic: spread of examples around their class prototype
    # idx: the number of classes, when the labels do not show it (max label + 1 otherwise);
    # it must equal model.layers[-1]
    n_classes: Optional[int] = Field(None, ge=2, le=MAX_CLASSES)
    # IDX data in training: the node's first rank loads it into an MPI shared window that the
    # node's ranks read (pbp_hpc/data/node_copy.py); false: every rank loads its own copy; auto:
    # shared where a node runs more than node_copy.AUTO_MIN_RANKS - 1 ranks (where copies add up:
    # 32 ranks, 1.8 GB against 0.18), private below (2 ranks reading the shared copy trained
    # 15-25% slower per epoch at batch 128 here, cause not found)
    one_copy_per_node: Union[Literal["auto"], StrictBool] = "auto"  # strict: "yes", "off" and 0 are not booleans

    @field_validator("one_copy_per_node", mode="before")
    @classmethod
    def _auto_or_bool(cls, v: Any) -> Any:
        if v != "auto" and not isinstance(v, bool):
            raise ValueError("expected true, false or auto")
        return v


class TrainConfig(_Section):
    epochs: int = Field(8, ge=1, le=BIG_COUNT)
    batch_size: int = Field(1024, ge=1, le=BIG_COUNT)
    learning_rate: float = Field(0.5, gt=0.0)  # the base rate: the schedule's peak (see schedule)
    seed: int = Field(0, ge=0)
    shuffle: bool = True
    eval_every: int = Field(1, ge=0, le=BIG_COUNT)  # epochs between validation passes; 0: only at the end
    eval_every_steps: Optional[int] = Field(None, ge=1, le=BIG_COUNT)  # also every this many steps (a finer curve)
    # stop once validation accuracy reaches this (a fraction); the result records the time to it
    target_accuracy: Optional[float] = Field(None, gt=0.0, le=1.0)
    early_stopping: Optional[int] = Field(None, ge=1, le=BIG_COUNT)  # stop after this many evaluations without a better one
    save_model: Optional[str] = None  # HDF5 file for the parameters of the best validation pass
    warmup_epochs: int = Field(0, ge=0)  # epochs excluded from the timing summary
    progress: bool = True  # progress bar on rank 0, only when attached to a terminal
    # CPU, image data: the first layer's GEMMs skip input columns that are zero in the whole
    # minibatch (pbp_hpc/active_inputs.py); the same update up to rounding, ~20% less work on MNIST
    skip_zero_inputs: bool = True
    # the gradient noise scale B_noise (pbp_hpc/parallel/noise_scale.py): estimated every this many
    # steps from the local and summed gradients' norms (two dot products); 0: never
    noise_scale_every: int = Field(10, ge=0)
    # a timeline of the run (pbp_hpc/trace.py): a Chrome trace-event JSON file, the first
    # trace_steps steps of every epoch, every evaluation and checkpoint
    trace: Optional[str] = None
    trace_steps: int = Field(3, ge=1)
    # an exponential moving average of the weights, ema <- d ema + (1 - d) theta after every step
    # (pbp_hpc/engine/ema.py): evaluated, tested and saved in place of the raw weights; 0: off
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)


def _registered(kind: str, names: list[str], value: str) -> str:
    if value not in names:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(names)}")
    return value


class OptimizerConfig(_Section):
    name: str = "nesterov"  # pbp_hpc/engine/optimizers/: sgd (the report's), momentum, nesterov, lars, lamb
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # momentum, nesterov and lars
    weight_decay: float = Field(0.0, ge=0.0)  # L2: g / B + weight_decay * theta
    # lars and lamb (pbp_hpc/engine/optimizers/layerwise.py): the trust ratio's coefficient (lars),
    # Adam's betas (lamb), the epsilon of both, and whether biases skip the ratio and the decay
    trust_coefficient: float = Field(0.001, gt=0.0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999])
    eps: float = Field(1e-6, ge=0.0)
    exclude_biases: bool = True

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"expected two numbers in [0, 1), e.g. [0.9, 0.999], got {v}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from pbp_hpc.engine import optimizers

        return _registered("optimizer", optimizers.names(), v)


class ScheduleConfig(_Section):
    """The learning rate by step (pbp_hpc/engine/schedules.py); train.learning_rate is its base."""

    name: Literal["constant", "step", "cosine"] = "cosine"  # the report's: constant
    warmup_epochs: float = Field(1.0, ge=0.0)  # a linear ramp to the peak rate over these epochs
    # How the peak rate follows the batch (engine/schedules.py): sqrt: learning_rate * sqrt(batch_size /
    # base_batch) (the default: a study on real MNIST, jobs/batch_rule.yaml, docs/training.md);
    # linear: learning_rate * batch_size / base_batch (Goyal et al.); none: learning_rate at any batch.
    # true/false read as linear/none (older configs and results).
    scale_with_batch: Literal["none", "linear", "sqrt"] = "sqrt"
    base_batch: int = Field(1024, ge=1)  # the batch at which the peak is train.learning_rate
    # the rule's factor at most this (sqrt: reached at 4 x base_batch); null: no cap. On MNIST the
    # uncapped sqrt peak at B = 8192 (1.41) ended at 86% even over 29 epochs, capped (1.0) at 97.2%.
    max_scale: Optional[float] = Field(2.0, gt=0.0)
    step_epochs: float = Field(10.0, gt=0.0)  # step: multiply by gamma every step_epochs
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    min_lr: float = Field(0.0, ge=0.0)  # cosine: the rate it decays to

    @field_validator("scale_with_batch", mode="before")
    @classmethod
    def _rule(cls, v: Any) -> Any:
        """true/false (the field was a switch for the linear rule) read as linear/none."""
        if isinstance(v, bool):
            return "linear" if v else "none"
        return {"true": "linear", "false": "none"}.get(v, v) if isinstance(v, str) else v


class ParallelConfig(_Section):
    ranks: Optional[int] = Field(None, ge=1)  # expected world size; null accepts any
    threads_per_rank: Optional[int] = Field(None, ge=1, le=MAX_THREADS)  # null: cores on the node / ranks on the node
    # ranks that hold each layer's units in slices (tensor parallelism, pbp_hpc/parallel/tensor.py):
    # the world is data-parallel groups of this many ranks; 1: every rank holds the whole model
    tensor: int = Field(1, ge=1, le=MAX_THREADS)
    # an odd output layer under tensor parallelism: split by columns (its outputs gathered) or
    # replicated on every tensor rank; auto: whichever a start-up estimate says costs less
    # (pbp_hpc/parallel/tensor_output.py)
    tensor_output: Literal["auto", "split", "replicated"] = "auto"
    # stages of consecutive layers on consecutive ranks (pipeline parallelism, pbp_hpc/parallel/pipeline.py);
    # each share of a minibatch in `microbatches` parts, scheduled gpipe or 1f1b; pipeline_split:
    # layers per stage (null: the split whose most expensive stage is cheapest)
    pipeline: int = Field(1, ge=1, le=MAX_THREADS)
    # auto: where tensor and pipeline are left at 1, a cost model fed by start-up measurements
    # chooses them (pbp_hpc/parallel/grid_auto.py); a tensor or pipeline above 1 is the grid as
    # given. manual: data x parallel.tensor x parallel.pipeline exactly as given (1 x 1: all data,
    # as a data-parallel scaling study wants)
    grid: Literal["manual", "auto"] = "auto"
    microbatches: int = Field(4, ge=1, le=64)
    # decoupled: the stages below the last update with synthetic gradients (pbp_hpc/parallel/synthetic.py),
    # a linear module of their output trained at synthetic_lr against the true gradient as it arrives
    pipeline_schedule: Literal["1f1b", "gpipe", "decoupled"] = "1f1b"
    synthetic_lr: float = Field(0.001, ge=0.0, le=1e6, allow_inf_nan=False)
    # decoupled: the true gradient comes back (and trains the module) for one microbatch in this many
    synthetic_every: int = Field(1, ge=1, le=64)
    # decoupled: the module's A = U V of rank r (the default 64: a small module, as the issue asks,
    # and the one that is faster than 1f1b on Net-2h; the paper's width x width A doubles stage 0's
    # work there and loses, docs/model_parallel.md); 0 (or r >= width): the whole width x width A
    synthetic_rank: int = Field(64, ge=0, le=BIG_COUNT)
    pipeline_split: Optional[list[int]] = None
    # how ranks combine their work (pbp_hpc/parallel/strategies/): allreduce (the report's
    # Algorithm 5), local_sgd, async_ps, ssp, hogwild (docs/strategies.md)
    strategy: str = "allreduce"
    local_steps: int = Field(4, ge=1, le=BIG_COUNT)  # local_sgd: local steps between parameter averages (k)
    staleness_bound: int = Field(2, ge=0, le=BIG_COUNT)  # ssp: how many updates a worker may run ahead of the slowest (s)
    # async_ps, ssp, hogwild: the workers meet every this many global steps (stop requests, the
    # loss, the divergence check; hogwild across nodes: the average of the nodes' parameters)
    meet_every_steps: int = Field(16, ge=1, le=BIG_COUNT)
    # how a sum over ranks is carried out (pbp_hpc/parallel/reducers/): blocking, overlap, shm
    # (node-wide shared memory, CPU only), shared_batch (a node's ranks compute each batch
    # together, each its slice of the gradient; CPU only), or auto: shared_batch where ranks
    # share a node and have <= 64 rows of the batch each, shm where they share a node, else blocking
    reducer: str = "auto"
    oversubscribe: bool = False  # allow ranks x threads > cores
    # ranks the launcher left unbound bind themselves to disjoint cores (runtime.bind_to_cores)
    bind: bool = True
    # backend: cupy only. auto: cuda-aware if MPI says it is (PBP_HPC_CUDA_AWARE=0|1 overrides), else staged
    gpu_reducer: Literal["auto", "cuda-aware", "staged", "nccl"] = "auto"
    # a step whose reduction waits longer than this prints one warning naming the ranks not yet there
    stall_warning_s: float = Field(60.0, gt=0.0, le=MAX_WAIT_S)
    # ... and longer than this aborts the job (runtime.EXIT_STALLED); null: wait for ever
    stall_timeout_s: Optional[float] = Field(None, gt=0.0, le=MAX_WAIT_S)
    # Communication for many nodes (pbp_hpc/parallel/reducers/compression.py). compression: the
    # gradients on the wire; none: full precision (the sum bit-for-bit as without it); fp16, bf16:
    # 16-bit words, summed in float32 (the loss and stop count stay full precision)
    compression: Literal["none", "fp16", "bf16"] = "none"
    error_feedback: bool = False  # fp16/bf16: carry what rounding lost into the next step's gradient
    # reducer overlap: combine consecutive layers' messages up to this many bytes (Horovod's
    # tensor fusion); 0: a message per layer. blocking and shm send one message already
    fusion_bytes: int = Field(0, ge=0, le=MAX_FUSION_BYTES)

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        from pbp_hpc.parallel import strategies

        return _registered("strategy", strategies.names(), v)

    @field_validator("reducer")
    @classmethod
    def _reducer(cls, v: str) -> str:
        from pbp_hpc.parallel import reducers

        return _registered("reducer", reducers.names(), v)


class StudyConfig(_Section):
    """Settings of a study, not of training: a straggler to measure strategies against
    (pbp_hpc/parallel/straggler.py)."""

    straggler_factor: float = Field(1.0, ge=1.0, le=MAX_STRAGGLER_FACTOR)  # a slowed rank's steps take this many times as long; 1: none
    straggler: Literal["fixed", "random"] = "fixed"  # fixed: straggler_rank; random: a rank drawn per step
    straggler_rank: Optional[int] = Field(None, ge=0)  # fixed: which rank; null: the last


class CheckpointConfig(_Section):
    path: Optional[str] = None
    every_epochs: int = Field(0, ge=0, le=BIG_COUNT)  # 0: only on a signal (SIGUSR1/SIGTERM) and at the end
    every_steps: int = Field(0, ge=0, le=BIG_COUNT)  # also after every N global steps (0: not by steps)
    # also once rank 0's clock says this many seconds passed since the last one (0: not by time);
    # decided by rank 0 and shared, so every rank checkpoints after the same step
    every_seconds: float = Field(0.0, ge=0.0, le=MAX_WAIT_S)
    resume: bool = False


class DebugConfig(_Section):
    """Test-only settings: faults injected on purpose to prove the failure paths."""

    fail_rank: Optional[int] = Field(None, ge=0)
    fail_step: Optional[int] = Field(None, ge=0)  # global step counter, from 0
    # exception: a PbpError; oserror: a Python error that is not ours; nan: NaN gradient and loss
    # stall: the rank sleeps debug.stall_s seconds (a rank stopped by SIGSTOP, say)
    # kill: the rank sends itself SIGKILL (a process or node that dies without a word)
    fail_kind: Literal["exception", "oserror", "nan", "stall", "kill"] = "exception"
    stall_s: float = Field(0.0, ge=0.0, le=MAX_WAIT_S)
    signal_step: Optional[int] = Field(None, ge=0)  # global step at which a SIGUSR1 is simulated
    signal_rank: Optional[int] = Field(None, ge=0)  # the rank that "receives" it; null: every rank
    # the validation pass (counted from 0) before whose reduction debug.fail_rank (null: every rank)
    # sleeps debug.stall_s seconds: a rank stopped or slow during an evaluation (test-only)
    stall_evaluation: Optional[int] = Field(None, ge=0)
    # a fault outside the training loop (pbp_hpc/faults.py): debug.fail_rank (null: every rank)
    # fails as debug.fail_kind says in this phase; writes: the end-of-run checkpoint and model
    fail_phase: Optional[Literal["setup", "evaluation", "writes"]] = None
