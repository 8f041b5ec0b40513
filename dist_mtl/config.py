"""Typed run configuration: dataclasses, YAML loading, dotted overrides and validation.

Every field has a docstring under it; ``dist-mtl validate CONFIG`` prints the resolved result.
Validation runs before any process group or data work starts, so a bad config costs nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError, did_you_mean

TaskKind = Literal["regression", "classification", "binary", "multilabel", "segmentation", "depth", "normals",
                   "token_classification"]
TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass
class SyntheticConfig:
    """Knobs of the synthetic multi-task generator (``data.source: synthetic``)."""

    num_samples: int = 4096
    """Rows to generate, before the validation split."""
    input_dim: int = 16
    """Number of input features; must exceed ``num_tasks``."""
    num_tasks: int = 3
    """Number of regression targets ``t0 .. t{num_tasks-1}`` (used when ``tasks`` is empty)."""
    conflict: float = 0.5
    """Task conflict in [0, 1]. Task t's target follows a unit direction w_t, and the pairwise cosine
    of those directions is ``1 - conflict * T / (T - 1)``: 0 gives identical tasks, ``(T-1)/T``
    orthogonal ones, 1 the most opposed set of T directions (cosine -1/(T-1))."""
    nonlinearity: float = 0.5
    """Amplitude of the ``sin(3 x.w_t)`` term added to each linear target, so an MLP has work to do."""
    noise: float = 0.1
    """Standard deviation of the Gaussian noise added to every target."""


@dataclass
class DataConfig:
    """Where the rows come from and how they are prepared."""

    source: Literal["parquet", "csv", "json", "hub", "synthetic", "python"] = "synthetic"
    """Loader: a local file or directory (parquet/csv/json), a HF hub dataset name, the generator, or
    ``python``: map-style datasets built from ``train`` and ``val`` (or passed to ``dist_mtl.fit``)."""
    path: str | None = None
    """File or directory for local sources (relative to the config file that names it, or to the
    working directory for command-line overrides); the dataset name for ``hub``."""
    hub_config: str | None = None
    """Dataset configuration name for ``hub`` sources."""
    split: str = "train"
    """Split to load; the validation rows are held out of it (see ``val_fraction``)."""
    revision: str | None = None
    """Hub revision (commit, tag or branch) for ``hub`` sources; pin it for reproducible runs."""
    features: list[str] | None = None
    """Input columns. Default: every numeric column that is not a task target."""
    val_fraction: float = 0.1
    """Fraction of rows held out for validation, chosen deterministically from ``seed``."""
    dropna: bool = False
    """Drop rows with a missing, NaN or infinite (inf, -inf) feature or target. By default such
    rows are an error naming the column."""
    standardize: bool = True
    """Standardise features with the training split's mean and standard deviation."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Generator knobs, used when ``source`` is ``synthetic``."""
    train: Any = None
    """``source: python``: the training dataset, ``{class_path: pkg.module.Name, init_args: {...}}``
    of a map-style dataset whose items are dicts: ``"inputs"`` (a tensor or a dict of tensors) plus
    one key per task target."""
    val: Any = None
    """``source: python``: the validation dataset, as ``train``. Without it nothing is evaluated."""
    collate: Any = None
    """``source: python``: a dotted path to the function that makes a batch (a dict) from a list of
    items, or ``{class_path, init_args}`` of a callable class (``dist_mtl.text.TextCollator`` pads
    text per batch). Default: the dataset's own ``collate`` attribute if it has one, else
    ``torch.utils.data.default_collate``."""
    num_workers: int = 0
    """Map-style datasets (``source: python``, ``fit``): worker processes per training process
    that read, decode and augment items ahead of the loop (``torch.utils.data.DataLoader``). 0
    reads them in the training process. In-memory tables ignore it."""
    prefetch_factor: int = 2
    """Micro-batches each worker reads ahead."""
    pin_memory: bool = True
    """Pin batches in page-locked memory for faster copies to the GPU (GPU runs only)."""
    skip_bad_examples: bool = False
    """An item that cannot be read (a corrupt image, a null text, a missing key) is an error that
    names it (exit 2). With true, it is left out of its micro-batch (the global label counts
    keep every task's loss exact), counted in the log as ``data/skipped``, and named on stderr."""
    worker_timeout_s: int = 300
    """Seconds the training process waits for a worker's micro-batch before failing (a stuck
    read, a dead file system) instead of hanging."""


@dataclass
class TaskConfig:
    """One task: a target column, a head and a loss."""

    name: str
    """Unique task name (letters, digits, underscores); used in metric keys and head names."""
    kind: TaskKind | None = "regression"
    """``regression`` (one output), ``classification`` (classes read from the data, or
    ``num_classes``) or ``binary``; for ``source: python`` also ``multilabel``, ``segmentation``,
    ``depth``, ``normals`` and ``token_classification`` (shapes, losses and metrics: docs/tasks.md);
    null for a custom task of a ``python`` source (its loss then gives the metrics: none but the
    loss, unless ``metrics`` names some)."""
    target: str | None = None
    """Target column (or, for ``source: python``, the key of the target in a dataset item).
    Default: the task name."""
    loss: Any = None
    """A loss name (mse, l1, huber, smooth_l1, ce, bce, multilabel_bce, cosine; a built-in kind allows
    its own), a dotted path to a function ``(output, target) -> per-element losses``, or
    ``{class_path, init_args}`` of a module doing that. Default: mse / ce / bce."""
    metrics: list[Any] | None = None
    """Metric names (mse, rmse, mae, accuracy; f1, mean_ap, miou, pixel_accuracy, abs_err, rel_err,
    mean_angle, within_11.25) or dotted paths to functions ``(output, target) -> per-element
    values``, reported as means over the labelled elements. Default: the kind's."""
    mask: str | None = None
    """``source: python``: the key of a boolean mask in a dataset item; False elements are
    unlabelled, as NaN (float) or -100 (integer) targets are."""
    weight: float = 1.0
    """Static loss weight, used by ``mtl.weighting: static``."""
    transform: Literal["none", "log", "log1p"] = "none"
    """Regression only: transform applied to the target before standardising (e.g. log price)."""
    standardize: bool = True
    """Regression only: standardise the (transformed) target with training-split statistics."""
    num_classes: int | None = None
    """Classification: the number of classes. The labels must then be integers in
    ``[0, num_classes)`` and each label is its own class index, so classes absent from the data
    still get a head output (other labels are an error naming the column). Default: the distinct
    values in the data, sorted, are the classes. Required for segmentation and
    token_classification (classes) and multilabel (labels K), whose python datasets cannot tell."""
    data: DataConfig | None = None
    """This task's own dataset (same number of input features as the others). Default: the
    top-level ``data``. Each dataset costs one forward per step."""


@dataclass
class TimmConfig:
    """``model.encoder: timm``: any timm model as the shared encoder (see docs/encoders.md)."""

    name: str | None = None
    """A timm model name (``timm.list_models()``), e.g. ``resnet18`` or ``vit_tiny_patch16_224``;
    an unknown name is refused with the nearest ones."""
    pretrained: bool = False
    """Load timm's pretrained weights for ``name`` (downloaded and cached by timm itself)."""
    features_only: bool = False
    """Return the list of feature maps (for dense heads; ``model.heads`` must then read the list)
    instead of the pooled features."""
    out_indices: list[int] | None = None
    """With ``features_only``: the feature levels to return. Default: all of them."""
    in_chans: int = 3
    """Input channels of the images."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """More keyword arguments for ``timm.create_model``, e.g. ``{img_size: 16, embed_dim: 32, depth: 2}``."""


@dataclass
class TransformersConfig:
    """``model.encoder: transformers``: a HuggingFace transformers model (``AutoModel``)."""

    name_or_path: str | None = None
    """A hub model name or a local directory written by ``save_pretrained``."""
    pretrained: bool = False
    """``true``: load the weights (``AutoModel.from_pretrained``); ``false``: only the config, with
    randomly initialised weights (``AutoModel.from_config``)."""
    pooling: Literal["cls", "mean", "none"] = "cls"
    """``cls``: the first token's features (B, D); ``mean``: the mean over the tokens whose
    attention mask is 1 (B, D); ``none``: every token's features (B, L, D), for token-level tasks."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Model config attributes set before building, e.g. ``{hidden_dropout_prob: 0}``."""


@dataclass
class ModelConfig:
    """Shared encoder plus one head per task."""

    encoder: Any = "mlp"
    """A registered encoder (``mlp``, ``timm``, ``transformers``, ``mmoe``, ``cgc``), a dotted path to
    an nn.Module class, or ``{class_path, init_args}``. ``mlp`` is built from the fields below,
    ``timm`` and ``transformers`` from their blocks below; the others from their ``init_args``
    (``tasks`` is passed when the class takes it)."""
    heads: dict[str, Any] = field(default_factory=dict)
    """Per task, ``{class_path, init_args}`` (or a dotted path) of its head, replacing the default
    MLP head (which needs the encoder's ``out_dim``)."""
    sync_batchnorm: bool = False
    """Normalise with the batch statistics of the global micro-batch (all ranks): every BatchNorm
    becomes ``nn.SyncBatchNorm`` on GPUs, and dist-mtl's ``CpuSyncBatchNorm`` on CPU processes. N
    processes then match 1 with ``grad_accum: 1`` (see docs/encoders.md)."""
    timm: TimmConfig = field(default_factory=TimmConfig)
    """The timm model of ``encoder: timm``."""
    transformers: TransformersConfig = field(default_factory=TransformersConfig)
    """The transformers model of ``encoder: transformers``."""
    hidden: list[int] = field(default_factory=lambda: [128, 128])
    """Hidden layer widths of the encoder; the last one is the representation size."""
    activation: str = "relu"
    """Activation between layers (relu, gelu, silu, tanh)."""
    dropout: float = 0.0
    """Dropout after each hidden layer. Off by default: dropout masks depend on how a batch is split
    across ranks, so N-process runs then match 1-process runs only in distribution."""
    layer_norm: bool = False
    """LayerNorm after each hidden linear layer."""
    head_hidden: list[int] = field(default_factory=list)
    """Hidden widths of each task head; empty means a single linear layer."""


@dataclass
class PhaseConfig:
    """One training phase of ``mtl.schedule``. Phases run in order; a phase ends at ``until_step``,
    when ``until_loss`` is reached, or at whichever comes first if both are given. After the last
    phase ends, training continues with the top-level ``mtl`` settings."""

    until_step: int | None = None
    """The phase ends before this optimizer step (0-based count of completed steps)."""
    until_loss: dict[str, float] | None = None
    """The phase ends after the first step at which every listed task's *global* training loss
    (mean over the last ``loss_window`` steps, reduced across ranks) is below its threshold, e.g.
    ``{price: 0.1}``. Every rank sees the same reduced values, so every rank switches at the same step.
    The listed tasks must train during the phase."""
    loss_window: int = 1
    """Steps averaged for ``until_loss`` (1: the step's own global batch loss; more smooths the noise)."""
    backward: str | None = None
    """Backward engine during the phase. Default: ``mtl.backward``."""
    weighting: str | None = None
    """Loss weighting during the phase. Default: ``mtl.weighting``. Phases that name the same method
    with the same arguments share one instance, so its state carries over."""
    weighting_args: dict[str, Any] | None = None
    """Arguments of the phase's weighting. Default: ``mtl.weighting_args`` if the phase uses
    ``mtl.weighting``, else none."""
    tasks: list[str] | None = None
    """Tasks trained during the phase (the others are still evaluated and logged). Default: all."""


@dataclass
class MTLConfig:
    """How per-task losses become one update."""

    backward: str = "sum"
    """Backward engine: how task losses become synchronised gradients."""
    weighting: str = "equal"
    """Loss-level weighting method (see docs/weighting.md)."""
    weighting_args: dict[str, Any] = field(default_factory=dict)
    """Arguments of the weighting method, e.g. ``{temperature: 2}`` for dwa; unknown keys are
    refused with the list of allowed ones."""
    weights: dict[str, float] = field(default_factory=dict)
    """Per-task static weights for ``weighting: static``; they override ``tasks[].weight``."""
    aggregator: str = "none"
    """Gradient-level aggregator for ``backward: jacobian`` (required there, refused elsewhere)."""
    aggregator_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the aggregator's constructor."""
    jacobian_sync: Literal["global", "local"] = "global"
    """Jacobian mode: all-reduce per-task gradients before aggregating (exact), or aggregate per rank."""
    jacobian_method: Literal["auto", "loop", "batched"] = "auto"
    """How per-task gradients are computed: T ``autograd.grad`` calls (``loop``), or one vmap-batched
    call (``batched``). ``auto``: loop on CPU, batched on GPU (see benchmarks/)."""
    jacobian_wrt: Literal["params", "features"] = "params"
    """``params``: aggregate per-task gradients of the encoder's parameters (exact). ``features``:
    weights from the Gramian of per-task gradients of the encoder OUTPUT, then one weighted backward
    (MGDA-UB's cheaper approximation; Gramian-based aggregators only)."""
    task_sampling: Literal["all", "sample"] = "all"
    """``all``: every active task trains every step. ``sample``: ``tasks_per_step`` tasks per step,
    drawn with probability proportional to (training rows of the task's dataset)^``sampling_alpha``;
    the draw depends only on the seed and the step, so every rank draws the same tasks."""
    tasks_per_step: int = 1
    """Tasks drawn per step with ``task_sampling: sample``."""
    sampling_alpha: float = 1.0
    """Temperature of the size-proportional draw: 1 = proportional to size, 0 = uniform."""
    schedule: list[PhaseConfig] = field(default_factory=list)
    """Training phases, e.g. ``[{until_step: 200, backward: sum}, {backward: per_task}]`` or
    ``[{until_loss: {price: 0.1}, tasks: [price]}]``. Switches depend only on the step and on
    globally reduced losses, so every rank switches at the same step."""


@dataclass
class TrainConfig:
    """Optimisation, evaluation and checkpointing."""

    max_steps: int = 1000
    """Optimizer steps to train for."""
    batch_size: int = 256
    """Global batch per optimizer step, across all processes and accumulation micro-steps. It must
    divide evenly by ``num_processes * grad_accum``."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Optimizer."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 penalty (SGD)."""
    momentum: float = 0.9
    """SGD momentum."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    task_lr: dict[str, float] = field(default_factory=dict)
    """Per-task learning rates for the task heads; heads not named here use ``lr``."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of the peak learning rate."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision. fp16 needs a GPU."""
    eval_every: int = 0
    """Evaluate every N optimizer steps; 0 evaluates only at the end."""
    eval_batch_size: int = 2048
    """Per-process batch size for evaluation."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N optimizer steps; 0 disables periodic checkpoints."""
    keep_checkpoints: int = 2
    """Keep the newest K checkpoints; 0 keeps all."""
    resume: str = "auto"
    """``auto`` (newest complete checkpoint in output_dir, if any), ``none``, or a checkpoint path."""
    signal_check_every: int = 10
    """On several processes, look every N steps whether any rank received SIGUSR1 (preemption
    warning: checkpoint, requeue, exit 3) or SIGTERM (checkpoint, exit 3). One all-reduce of one
    number per check; a single process looks at every step for free."""
    check_consistency_every: int = 0
    """Compare a checksum of every rank's parameters every N steps and stop if they differ; 0 = only
    at the end of training (always done, recorded in run.json)."""
    deterministic: bool = False
    """Use deterministic torch algorithms (slower on GPU; needed for bitwise resume there)."""
    compile: bool = False
    """Compile the encoder and each head with ``torch.compile`` (in place: parameter names, state-dict
    keys and checkpoints are unchanged). Every backward engine works compiled; the first steps pay
    the compilation (seconds per module on CPU). Needs a C++ compiler (inductor's: ``$CXX`` or
    ``g++``); without one, exit 2. May change on a resume: it changes only float rounding."""
    on_nonfinite: Literal["abort", "skip"] = "abort"
    """A NaN or infinite loss or gradient on ANY rank: ``abort`` checkpoints the last good step and
    stops every rank with an error naming the task, rank and step (exit 1); ``skip`` drops that
    update on every rank together (the step still counts), logs it and counts it in
    ``nonfinite/skipped``. The decision is made on the reduced gradients, identical on every rank."""
    max_consecutive_skips: int = 10
    """With ``on_nonfinite=skip``, stop after this many skipped updates in a row (the data or the
    model is broken, not unlucky); 0 never stops."""
    checkpoint_required: bool = False
    """Whether a checkpoint that cannot be written (disk full, quota, I/O error) stops the run
    (exit 1). By default the run says so, keeps the previous checkpoints and trains on."""
    find_unused_parameters: bool = False
    """DDP's ``find_unused_parameters``: needed when a model has parameters that the forward does
    not always use (an unused pooler, a conditional branch) and ``mtl.backward: sum`` reduces
    through DDP. The other engines reduce by hand and do not need it."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """How the model is spread over the processes: ``ddp`` (a whole replica on each, gradients
    all-reduced) or ``fsdp`` (FSDP2 ``fully_shard``: parameters, gradients and optimizer state
    sharded over the processes; each sharding unit is all-gathered for its forward and backward and
    its gradients are reduce-scattered once per update). Launch with ``launch/fsdp.yaml`` or any
    launcher; on one process it trains unsharded. Every engine is exact under it; ``jacobian`` takes
    the aggregators whose weights depend on the Gramian only (docs/fsdp.md), with
    ``jacobian_sync: global`` and ``jacobian_wrt: params``. fp16, ``train.compile`` and
    ``log.grad_conflict`` are refused. Checkpoints are sharded (torch.distributed.checkpoint) and
    resume on any world size, under DDP too."""
    fsdp_units: list[str] | None = None
    """With ``parallel: fsdp``, the class names of the modules that form the sharding units (each
    module of those classes in the encoder and the heads, innermost first; the whole model is the
    last unit). Default: each top-level block of the encoder (the elements of its main
    ``Sequential``/``ModuleList``, else its children), the encoder, and each head."""
    collective_timeout_s: int = 600
    """Seconds a collective may wait for the other ranks before the process fails (a rank that
    hangs, a lost node). A rank that dies or raises is noticed at once on one machine: the launcher
    stops the others."""


@dataclass
class LogConfig:
    """Metrics, progress bar and Weights & Biases."""

    wandb: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode; offline runs are written under ``output_dir/wandb``."""
    every: int = 10
    """Log every N optimizer steps (and always at the last step)."""
    project: str = "dist_mtl"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user)."""
    group: str | None = None
    """W&B group."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    run_name: str | None = None
    """W&B run name. Default: the output directory's name."""
    run_id: str | None = None
    """W&B run id (letters, digits, ``-``, ``_``). Default: the id kept in ``output_dir/wandb_run_id``
    when resuming, so a resumed or requeued job continues the same W&B run; for a fresh run,
    ``slurm-<array job>_<array task>`` or ``slurm-<job>`` under SLURM, else a hash of ``output_dir``."""
    wandb_per_rank: bool = False
    """One W&B run per rank (ids ``<run id>-rank<r>``, grouped by ``group`` or else the run id), each
    also logging its own losses as ``rank/loss/<task>``. Default: one run per job, from the main process."""
    progress: bool = True
    """Show a progress bar on the main process."""
    grad_conflict: bool = False
    """In modes other than ``jacobian`` (which always logs them), also log per-task gradient norms
    and cosines at log steps. Costs T extra gradient passes and a T x encoder all-reduce per log step."""
    rank_spread: bool = False
    """Also log ``loss_rank_min/<task>`` and ``loss_rank_max/<task>``: the lowest and highest of the
    ranks' own losses at each log step (one extra all-reduce of 2T numbers), to spot a bad shard."""
    comm_bytes: bool = False
    """Log ``perf/comm_bytes``: gradient bytes all-reduced in each logged optimizer step (adds a
    counting hook to DDP's all-reduce; a debugging and benchmarking aid)."""
    vanishing_loss_fraction: float = 1e-3
    """Warn once per task when its global training loss at a log step falls to this fraction of
    the first value logged for it (a task fitted exactly, a constant target), naming the configured
    methods that react to it (see ``dist_mtl/vanishing.py``); 0 never warns."""


@dataclass
class Config:
    """A whole run. The run is a function of this config (and the number of processes only through
    float rounding)."""

    seed: int = 0
    """Seed for initialisation, the validation split, the batch order and the synthetic data."""
    output_dir: str = "runs/default"
    """Where config.yaml, run.json, metrics.jsonl, checkpoints/, final/ and wandb/ are written."""
    data: DataConfig = field(default_factory=DataConfig)
    """The dataset shared by all tasks."""
    tasks: list[TaskConfig] = field(default_factory=list)
    """Tasks. Empty with a synthetic source: ``t0 .. t{num_tasks-1}`` regression tasks."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape."""
    mtl: MTLConfig = field(default_factory=MTLConfig)
    """Multi-task method."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


# ---------------------------------------------------------------------------------------------
# dict -> dataclass conversion with key paths in every error


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null", Any: "anything"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to ``tp`` or raise ConfigError naming ``key`` and what is allowed."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        if len(choices) == 1 and typing.get_origin(choices[0]) is Literal:  # an optional choice: list the choices
            return _convert(value, choices[0], key)
        nested = None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                if e.key != key and nested is None:  # the right shape, with a bad key or value inside
                    nested = e
        if nested is not None:
            raise nested
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        _, item_tp = typing.get_args(tp)
        return {str(k): _convert(v, item_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if not -2**63 <= value < 2**63:
            raise ConfigError(key, f"expected a 64-bit integer, got {value}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            value = value.strip()  # YAML 1.1 reads 3e-3 (no dot) as a string
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer with hundreds of digits
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # YAML reads log.group=12345 (a SLURM job id) as a number
        if type(value) is datetime.date:
            return value.isoformat()  # and run_name: 2024-05-01 as a date
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this module


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or "config", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        shown = name if isinstance(name, str) and name.strip() == name and name else repr(name)  # '' or ' a'
        key = f"{prefix}.{shown}" if prefix else str(shown)
        if name not in fields:
            hint = did_you_mean(name, fields, show=lambda field: f"'{prefix + '.' if prefix else ''}{field}'")
            raise ConfigError(key, f"unknown key{hint}; allowed here: {', '.join(fields)}")
        kwargs[name] = _convert(value, hints[name], key)
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]}" if prefix else missing[0], "is required")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# loading, overrides, paths


class _SafeLoaderNoDupes(yaml.SafeLoader):
    """SafeLoader (so ``!!python`` tags are refused) that also rejects duplicate keys, and reports
    scalars that its constructors cannot read (``2001-13-45``, ``!!int x``) as YAML errors with a
    position rather than as bare ValueErrors."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            shown = f" {node.value!r}" if isinstance(node, yaml.ScalarNode) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.tag.rsplit(':', 1)[-1]}{shown}: {e}", node.start_mark) from None


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (list, dict, set)):
            raise yaml.constructor.ConstructorError(
                None, None, f"a mapping key must be a scalar, not a {type(key).__name__}", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_SafeLoaderNoDupes.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping safely; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.load(text, Loader=_SafeLoaderNoDupes)  # noqa: S506 - safe subclass
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError("", f"{path}: invalid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping at the top level")
    return data


def apply_override(data: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override in place. The value is parsed as YAML; list items are
    addressed by index or, for ``tasks``, by task name (``tasks.price.weight=2``)."""
    if "=" not in override:
        raise ConfigError("", f"override {override!r} must look like key.path=value")
    dotted, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = dotted.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            index = _list_index(node, part, here)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(here, f"cannot set a key below a {type(node).__name__}")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:  # absent, or an explicit null that the override fills in
                node[part] = {}
            node = node[part]


def _list_index(items: list, part: str, key: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise ConfigError(key, f"index out of range (the list has {len(items)} items)")
        return index
    names = [item.get("name") for item in items if isinstance(item, dict)]
    if part in names:
        return names.index(part)
    raise ConfigError(key, f"no item named {part!r}; items: {', '.join(map(str, names)) or '(none)'}")


def _resolve_paths(data: dict, base: Path) -> None:
    """Make relative ``data.path`` values (top level and per task) absolute against ``base``.
    Values of the wrong type are left for ``_build`` to refuse with their key."""
    tasks = data.get("tasks")
    blocks = [("data", data.get("data"))] + [(f"tasks[{i}].data", t.get("data"))
                                             for i, t in enumerate(tasks if isinstance(tasks, list) else [])
                                             if isinstance(t, dict)]
    for key, block in blocks:
        if not isinstance(block, dict) or block.get("source") == "hub":
            continue
        path = block.get("path")
        if isinstance(path, str) and path and not os.path.isabs(path):
            _require("\0" not in path, f"{key}.path", f"contains a NUL character: {path!r}")
            block["path"] = str((base / path).resolve())


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merge key by key, anything else (lists included) is replaced."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def read_config_file(path: str | Path, chain: tuple[Path, ...] = ()) -> dict:
    """A config file with its ``extends: <file>`` chain applied (paths relative to each file), and
    relative data paths made absolute against the file that names them."""
    path = Path(path).resolve()
    if path in chain:
        raise ConfigError("extends", f"{path} extends itself (through {' -> '.join(p.name for p in chain)})")
    data = read_yaml(path)
    _resolve_paths(data, path.parent)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError("extends", f"{path.name}: must be the path of another config file, got {parent!r}")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise ConfigError("extends", f"{path.name}: config file not found: {parent_path}")
    return _merge(read_config_file(parent_path, (*chain, path)), data)


def load_config(path: str | Path | dict | None, overrides: list[str] = (), world_size: int | None = None) -> Config:
    """Load a YAML config (or take a dict of the same shape), apply dotted overrides, and validate it.

    A file may start from another with ``extends: <file>`` (mappings merge, lists are replaced).
    Relative data paths in a file are relative to that file; those given as overrides are
    relative to the working directory. ``world_size`` defaults to ``$WORLD_SIZE`` (1 if unset) and
    is used to check that the global batch divides evenly.
    """
    try:
        if isinstance(path, dict):
            import copy

            data = copy.deepcopy(path)
        else:
            data = read_config_file(path) if path is not None else {}
        for override in overrides:
            apply_override(data, override)
        _resolve_paths(data, Path.cwd())
        cfg = _build(Config, data, "")
        validate(cfg, world_size=world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:  # keys and values come from the user: a newline in one must not split the line
        e.key, e.args = one_line(e.key), (one_line(str(e)),)
        raise
    return cfg


def one_line(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``), so that an error stays one line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def to_dict(cfg: Config) -> dict:
    """The config as plain data (for config.yaml, run.json and W&B)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# validation across fields


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def _check_name(name: str, registry: dict, key: str) -> None:
    if name not in registry:
        hint = did_you_mean(name, registry, show=lambda known: f"'{known}'")
        raise ConfigError(key, f"unknown name {name!r}{hint}; allowed: {', '.join(sorted(registry))}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Cross-field checks. Fills in defaults that depend on other fields (synthetic tasks)."""
    # Registries are imported here so that config.py stays importable on its own.
    from .aggregation import AGGREGATORS, GRAMIAN_AGGREGATORS, AggregatorUnavailable, make_torchjd_aggregator
    from .engine import BACKWARDS
    from .models import ACTIVATIONS, ENCODER_PATHS, ENCODERS
    from .tasks import CLASS_KINDS, KIND_LOSSES, LOSSES, METRIC_NAMES

    from .weighting import WEIGHTINGS, build_weighting

    _require(0 <= cfg.seed < 2**32, "seed", f"must be an integer in [0, 2**32), got {cfg.seed}")
    _validate_data(cfg.data, "data")
    if not cfg.tasks and cfg.data.source == "synthetic":
        cfg.tasks = [TaskConfig(name=f"t{i}", kind="regression", target=f"t{i}")
                     for i in range(cfg.data.synthetic.num_tasks)]
    # A python source may leave the tasks to dist_mtl.fit: what refers to them is checked then.
    pending = not cfg.tasks and cfg.data.source == "python"
    _require(bool(cfg.tasks) or pending, "tasks", "at least one task is required (a list of {name, kind, target})")
    seen: set[str] = set()
    for i, task in enumerate(cfg.tasks):
        key = f"tasks[{i}]"
        _require(bool(TASK_NAME.match(task.name)), f"{key}.name",
                 f"{task.name!r} is not a valid task name (letters, digits and underscores, starting with a letter)")
        _require(task.name not in seen, f"{key}.name", f"duplicate task name {task.name!r}")
        seen.add(task.name)
        if task.target is None:
            task.target = task.name
        source = (task.data or cfg.data).source
        _require(task.kind is not None or source == "python", f"{key}.kind",
                 "is required (regression, classification or binary) for a task read from a table")
        _require(task.kind in (None, "regression", "classification", "binary") or source == "python", f"{key}.kind",
                 f"{task.kind} applies to data.source: python only (a table holds regression, classification or "
                 "binary targets)")
        if task.loss is None:
            _require(task.kind is not None, f"{key}.loss", "a task without a kind needs a loss (a name, a dotted path "
                     "or {class_path, init_args})")
            task.loss = KIND_LOSSES[task.kind][0]
        if source == "python":
            _check_plugin(task.loss, LOSSES, f"{key}.loss", call=False)
            for j, metric in enumerate(task.metrics or []):
                _check_plugin(metric, METRIC_NAMES, f"{key}.metrics[{j}]", call=False)
        else:
            _require(isinstance(task.loss, str), f"{key}.loss", "a task read from a table takes a loss name")
            _check_name(task.loss, {name: None for name in KIND_LOSSES[task.kind]}, f"{key}.loss")
            _require(task.metrics is None and task.mask is None, f"{key}.metrics" if task.metrics is not None
                     else f"{key}.mask", "applies to data.source: python only")
        _require(task.transform == "none" or task.kind == "regression", f"{key}.transform",
                 "a target transform applies to regression tasks only")
        _require(task.weight >= 0, f"{key}.weight", f"must be >= 0, got {task.weight}")
        if task.num_classes is not None:
            # (a table has one kind with classes; a python source has the image and text kinds too)
            kinds = ", ".join(CLASS_KINDS) if source == "python" else "classification"
            _require(task.kind in CLASS_KINDS, f"{key}.num_classes",
                     f"applies to {kinds} tasks only (this task's kind is {task.kind!r}); remove it")
            least = 1 if task.kind == "multilabel" else 2
            _require(task.num_classes >= least, f"{key}.num_classes", f"must be at least {least}, got {task.num_classes}")
        elif task.kind in CLASS_KINDS and task.kind != "classification":
            _require(False, f"{key}.num_classes", f"is required for a {task.kind} task (the number of "
                     f"{'labels K' if task.kind == 'multilabel' else 'classes'}: the head's width and the layout of "
                     "its metrics; a python dataset cannot tell it)")
        if task.data is not None:
            _validate_data(task.data, f"{key}.data")
    for i, task in enumerate(cfg.tasks):
        d = task.data or cfg.data
        if d.source == "synthetic":  # its columns are known without loading anything
            _require(_is_synthetic_column(task.target, d.synthetic), f"tasks[{i}].target",
                     f"column {task.target!r} is not in the synthetic data; targets: "
                     f"{_name_range('t', d.synthetic.num_tasks)}")

    m = cfg.model
    if isinstance(m.encoder, str) and "." not in m.encoder and not m.encoder.startswith("<python> "):
        _check_name(m.encoder, {**ENCODERS, **ENCODER_PATHS}, "model.encoder")
        _require(m.encoder in BLOCK_ENCODERS, "model.encoder",
                 f"{m.encoder!r} is built from init_args: write it as {{class_path: {m.encoder}, init_args: {{...}}}}")
    else:
        _check_plugin(m.encoder, {**ENCODERS, **ENCODER_PATHS}, "model.encoder")
    _validate_library_encoders(m)
    for name, head in m.heads.items():
        if not pending:
            _check_name(name, {t: None for t in seen}, f"model.heads.{name}")
        _check_plugin(head, {}, f"model.heads.{name}")
    _check_name(m.activation, ACTIVATIONS, "model.activation")
    _require(bool(m.hidden) and all(h > 0 for h in m.hidden), "model.hidden",
             f"must be a non-empty list of positive widths, got {m.hidden}")
    _require(all(h > 0 for h in m.head_hidden), "model.head_hidden", f"widths must be positive, got {m.head_hidden}")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")

    mtl = cfg.mtl
    _check_name(mtl.backward, BACKWARDS, "mtl.backward")
    _check_name(mtl.weighting, WEIGHTINGS, "mtl.weighting")
    for name, w in mtl.weights.items():
        if not pending:
            _check_name(name, {t: None for t in seen}, f"mtl.weights.{name}")
        _require(w >= 0, f"mtl.weights.{name}", f"must be >= 0, got {w}")
    _require(1 <= mtl.tasks_per_step <= (len(cfg.tasks) if not pending else mtl.tasks_per_step), "mtl.tasks_per_step",
             f"must be between 1 and the number of tasks ({len(cfg.tasks)}), got {mtl.tasks_per_step}")
    _require(mtl.sampling_alpha >= 0, "mtl.sampling_alpha", f"must be >= 0, got {mtl.sampling_alpha}")
    if cfg.model.sync_batchnorm and mtl.jacobian_method == "batched" and world_size > 1:
        import torch

        # CpuSyncBatchNorm all-reduces inside the forward and backward; vmap cannot batch a collective
        _require(torch.cuda.is_available(), "mtl.jacobian_method", "batched cannot run with model.sync_batchnorm on CPU "
                 "processes (its all-reduce cannot be vmapped); use loop (the CPU default)")
    for name in ("weighting_args", "aggregator_args"):  # free-form: their numbers are not checked by type
        _require_finite(getattr(mtl, name), f"mtl.{name}")
    modes = {mtl.backward}
    weightings = [(mtl.weighting, mtl.weighting_args, "mtl.weighting_args")]  # built once train.* is checked
    previous = 0
    for i, phase in enumerate(mtl.schedule):
        key = f"mtl.schedule[{i}]"
        if phase.until_step is None and phase.until_loss is None:
            _require(i == len(mtl.schedule) - 1, f"{key}.until_step",
                     "only the last phase may omit both until_step and until_loss")
        if phase.until_step is not None:
            _require(phase.until_step > previous, f"{key}.until_step",
                     f"must be greater than the previous phase's end ({previous}), got {phase.until_step}")
            previous = phase.until_step
        if phase.backward is not None:
            _check_name(phase.backward, BACKWARDS, f"{key}.backward")
            modes.add(phase.backward)
        if phase.tasks is not None:
            _require(bool(phase.tasks), f"{key}.tasks", "must name at least one task (omit it for all tasks)")
            _require(len(set(phase.tasks)) == len(phase.tasks), f"{key}.tasks", f"lists a task twice: {phase.tasks}")
            for name in phase.tasks:
                if not pending:
                    _check_name(name, {t: None for t in seen}, f"{key}.tasks")
        if phase.until_loss is not None:
            _require(bool(phase.until_loss), f"{key}.until_loss", "must map at least one task to a loss threshold")
            trained = phase.tasks or [t.name for t in cfg.tasks]
            for name, threshold in phase.until_loss.items():
                if pending:
                    continue
                _check_name(name, {t: None for t in seen}, f"{key}.until_loss.{name}")
                _require(name in trained, f"{key}.until_loss.{name}",
                         f"task {name!r} does not train in this phase (tasks: {trained}); its loss is not measured")
                _require(math.isfinite(threshold) and threshold > 0, f"{key}.until_loss.{name}",
                         f"must be a positive loss, got {threshold}")
        _require(phase.loss_window >= 1, f"{key}.loss_window", f"must be a positive number of steps, got {phase.loss_window}")
        if phase.weighting is not None:
            _check_name(phase.weighting, WEIGHTINGS, f"{key}.weighting")
        _require(phase.weighting_args is None or phase.weighting is not None, f"{key}.weighting_args",
                 "needs the phase's own weighting (set weighting too, or use mtl.weighting_args)")
        if phase.weighting_args is not None:
            _require_finite(phase.weighting_args, f"{key}.weighting_args")
        if phase.weighting is not None:
            weightings.append((phase.weighting, phase.weighting_args or {}, f"{key}.weighting_args"))
    if "jacobian" in modes:
        _require(mtl.aggregator != "none", "mtl.aggregator",
                 f"backward 'jacobian' needs an aggregator; allowed: {', '.join(sorted(AGGREGATORS))}")
        _check_name(mtl.aggregator, AGGREGATORS, "mtl.aggregator")
        if mtl.aggregator in _ALL_TASKS_AGGREGATORS and not pending:  # its solver's problem is built for T tasks
            partial = (["mtl.tasks_per_step"] if mtl.task_sampling == "sample" and mtl.tasks_per_step < len(cfg.tasks)
                       else []) + [f"mtl.schedule[{i}].tasks" for i, p in enumerate(mtl.schedule)
                                   if (p.backward or mtl.backward) == "jacobian" and p.tasks is not None
                                   and len(p.tasks) < len(cfg.tasks)]
            _require(len(cfg.tasks) >= 2 and not partial, "mtl.aggregator",
                     f"{mtl.aggregator} needs the gradients of every task (at least 2) at every jacobian step; "
                     + (f"{partial[0]} trains fewer" if partial else f"there are {len(cfg.tasks)}"))
        if mtl.jacobian_wrt == "features":
            _require(mtl.aggregator in GRAMIAN_AGGREGATORS, "mtl.aggregator",
                     f"jacobian_wrt: features needs a Gramian-based aggregator; allowed: {', '.join(GRAMIAN_AGGREGATORS)}")
            _require(mtl.jacobian_sync == "global", "mtl.jacobian_sync",
                     "jacobian_wrt: features always reduces the (tiny) Gramian globally; use global")
        try:  # builds it once: a missing optional package or a bad argument fails here, not mid-run
            make_torchjd_aggregator(mtl.aggregator, mtl.aggregator_args, max(len(cfg.tasks), 2))
        except AggregatorUnavailable as e:
            raise ConfigError("mtl.aggregator", str(e)) from None
        except ConfigError:  # the adapter's own keys (vanished_rtol) name themselves
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError("mtl.aggregator_args", f"{mtl.aggregator}: {' '.join(str(e).split())}") from None
        except Exception as e:  # torchjd checks some arguments only by using them (a list for a tensor)
            raise ConfigError("mtl.aggregator_args", f"{mtl.aggregator}: invalid arguments {mtl.aggregator_args} "
                              f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    else:
        _require(mtl.aggregator == "none", "mtl.aggregator",
                 f"{mtl.aggregator!r} combines per-task gradients and needs mtl.backward: jacobian "
                 f"(or a schedule phase using it); got backward {mtl.backward!r}")

    t = cfg.train
    for name in ("max_steps", "batch_size", "grad_accum", "eval_batch_size"):
        _require(getattr(t, name) > 0, f"train.{name}", f"must be a positive integer, got {getattr(t, name)}")
    for name in ("eval_every", "checkpoint_every", "keep_checkpoints", "warmup_steps", "check_consistency_every"):
        _require(getattr(t, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(t.max_consecutive_skips >= 0, "train.max_consecutive_skips", f"must be >= 0, got {t.max_consecutive_skips}")
    _require(t.collective_timeout_s >= 1, "train.collective_timeout_s", f"must be >= 1 second, got {t.collective_timeout_s}")
    _require(t.signal_check_every > 0, "train.signal_check_every", f"must be >= 1, got {t.signal_check_every}")
    _require(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 disables clipping), got {t.grad_clip}")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas",
             f"must be two numbers in [0, 1), got {t.betas}")
    for name, lr in t.task_lr.items():
        if not pending:
            _check_name(name, {n: None for n in seen}, f"train.task_lr.{name}")
        _require(lr > 0, f"train.task_lr.{name}", f"must be > 0, got {lr}")
    shards = world_size * t.grad_accum
    _require(t.batch_size % shards == 0, "train.batch_size",
             f"the global batch {t.batch_size} must divide evenly by num_processes * grad_accum "
             f"= {world_size} * {t.grad_accum} = {shards}")
    if t.compile:
        from .compiled import missing_compiler

        missing = missing_compiler()
        _require(missing is None, "train.compile", f"needs a C++ compiler for torch.compile's CPU code, and "
                 f"{missing} was not found; install one (apt-get install g++), set CXX, or use train.compile=false")
    _validate_parallel(cfg)
    if t.mixed_precision == "fp16":
        import torch

        _require(torch.cuda.is_available(), "train.mixed_precision",
                 "fp16 needs a GPU (no CUDA device found); use bf16 or no")
    _require(t.resume in ("auto", "none") or os.path.isdir(t.resume), "train.resume",
             f"must be auto, none or an existing checkpoint directory; {t.resume!r} not found")
    _require(cfg.log.every > 0, "log.every", f"must be a positive integer, got {cfg.log.every}")
    _require(0 <= cfg.log.vanishing_loss_fraction < 1, "log.vanishing_loss_fraction",
             f"must be in [0, 1), got {cfg.log.vanishing_loss_fraction}")
    _require(cfg.log.run_id is None or re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cfg.log.run_id) is not None,
             "log.run_id", f"must be 1-64 letters, digits, '-' or '_', got {cfg.log.run_id!r}")
    for name, args, key in weightings if not pending else []:  # built once: a bad argument exits 2 here
        build_weighting(cfg, name, args, key=key)
    _require(bool(cfg.output_dir) and "\0" not in cfg.output_dir, "output_dir",
             f"must be a non-empty path without NUL characters, got {cfg.output_dir!r}")


def _validate_parallel(cfg: Config) -> None:
    """``train.parallel: fsdp``: what FSDP2 sharding does not support, refused in one line."""
    t = cfg.train
    _require(t.fsdp_units is None or t.parallel == "fsdp", "train.fsdp_units",
             "applies with train.parallel: fsdp only; remove it or set train.parallel=fsdp")
    if t.fsdp_units is not None:
        _require(isinstance(t.fsdp_units, list) and bool(t.fsdp_units) and all(isinstance(n, str) and n for n in t.fsdp_units),
                 "train.fsdp_units", f"must be a non-empty list of module class names, got {t.fsdp_units!r}")
    if t.parallel != "fsdp":
        return
    backwards = {cfg.mtl.backward, *(p.backward for p in cfg.mtl.schedule if p.backward)}
    if "jacobian" in backwards:  # the Gramian route: aggregators that need J itself are refused
        from .engine.jacobian_sharded import check_sharded_jacobian

        check_sharded_jacobian(cfg.mtl.aggregator, cfg.mtl.jacobian_sync, cfg.mtl.jacobian_wrt)
    _require(t.mixed_precision != "fp16", "train.mixed_precision",
             "fp16 is not supported with train.parallel=fsdp (its loss scaler does not handle sharded gradients); "
             "use bf16 or no")
    _require(not t.compile, "train.compile", "is not supported with train.parallel=fsdp yet; use train.compile=false")
    _require(not cfg.log.grad_conflict, "log.grad_conflict",
             "is not supported with train.parallel=fsdp (it takes per-task gradients of sharded parameters); "
             "use log.grad_conflict=false")


BLOCK_ENCODERS = ("mlp", "timm", "transformers")
"""Encoder names built from ``model.*`` fields (``mlp``) or their own ``model.<name>`` block."""


def _validate_library_encoders(m: ModelConfig) -> None:
    """``model.timm`` / ``model.transformers``: required with their encoder, refused without it (a
    block that is set but unused is a mistake worth one line). The timm name is checked against
    timm's registry here (no download); a transformers path, when local, must exist; a hub name is
    resolved when the model is built."""
    from .backbones import check_timm_name, check_transformers_path

    if m.encoder == "timm":
        check_timm_name(m.timm.name, "model.timm.name")
        _require(m.timm.in_chans > 0, "model.timm.in_chans", f"must be a positive integer, got {m.timm.in_chans}")
        _require(m.timm.out_indices is None or m.timm.features_only, "model.timm.out_indices",
                 "applies with model.timm.features_only: true only")
        _require_finite(m.timm.kwargs, "model.timm.kwargs")
    else:
        _require(m.timm == TimmConfig(), "model.timm", f"applies to model.encoder: timm only (encoder is "
                 f"{m.encoder if isinstance(m.encoder, str) else 'a class path'}); remove it")
    if m.encoder == "transformers":
        check_transformers_path(m.transformers.name_or_path, "model.transformers.name_or_path")
        _require_finite(m.transformers.config_overrides, "model.transformers.config_overrides")
    else:
        _require(m.transformers == TransformersConfig(), "model.transformers", f"applies to model.encoder: "
                 f"transformers only (encoder is {m.encoder if isinstance(m.encoder, str) else 'a class path'}); remove it")


_ALL_TASKS_AGGREGATORS = ("nashmtl",)
"""Aggregators that fail on fewer rows than the number of tasks they were built for."""


def _check_plugin(spec: Any, registry: dict, key: str, call: bool = True) -> None:
    """A short name, dotted path or ``{class_path, init_args}`` that resolves: the path imports and
    the arguments fit the signature (without building anything: that happens at run time)."""
    from .plugins import check_arguments, import_path, is_spec

    if isinstance(spec, str) and spec.startswith("<python> "):  # an object given in code (fit), recorded
        return
    if is_spec(spec):
        target = import_path(spec["class_path"], f"{key}.class_path", registry)
        args = spec.get("init_args") or {}
        _require(isinstance(args, dict), f"{key}.init_args", f"must be a mapping, got {args!r}")
        check_arguments(target, args, key)
        for name, value in args.items():
            if is_spec(value):
                _check_plugin(value, registry, f"{key}.init_args.{name}")
    elif isinstance(spec, str):
        import_path(spec, key, registry)
    elif isinstance(spec, dict):
        raise ConfigError(key, "a mapping here needs class_path (and optionally init_args), "
                          f"got keys {sorted(map(str, spec))}")
    else:
        raise ConfigError(key, f"expected a name, a dotted path or {{class_path, init_args}}, got {spec!r}")



def _validate_data(d: DataConfig, key: str) -> None:
    _require(0.0 < d.val_fraction < 1.0, f"{key}.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    _require(d.num_workers >= 0, f"{key}.num_workers", f"must be >= 0 (0 reads in the training process), got {d.num_workers}")
    _require(d.prefetch_factor >= 1, f"{key}.prefetch_factor", f"must be >= 1, got {d.prefetch_factor}")
    _require(d.worker_timeout_s > 0, f"{key}.worker_timeout_s", f"must be > 0 seconds, got {d.worker_timeout_s}")
    _require(d.features is None or len(d.features) > 0, f"{key}.features",
             "the list is empty; name at least one input column, or omit it for every numeric column")
    twice = sorted({name for name in d.features or [] if d.features.count(name) > 1})
    _require(not twice, f"{key}.features", f"lists column {twice[0]!r} twice" if twice else "")
    if d.source == "synthetic":
        s = d.synthetic
        for name in ("num_samples", "input_dim", "num_tasks"):
            _require(getattr(s, name) > 0, f"{key}.synthetic.{name}", f"must be a positive integer, got {getattr(s, name)}")
        _require(s.input_dim > s.num_tasks, f"{key}.synthetic.input_dim",
                 f"must exceed num_tasks ({s.num_tasks}) so task directions fit, got {s.input_dim}")
        val_rows = math.ceil(d.val_fraction * s.num_samples)  # as datasets' train_test_split counts
        _require(0 < val_rows < s.num_samples, f"{key}.synthetic.num_samples",
                 f"{s.num_samples} rows leave an empty training or validation split with val_fraction "
                 f"{d.val_fraction} ({s.num_samples - val_rows} train, {val_rows} validation)")
        _require(0.0 <= s.conflict <= 1.0, f"{key}.synthetic.conflict", f"must be in [0, 1], got {s.conflict}")
        _require(s.noise >= 0, f"{key}.synthetic.noise", f"must be >= 0, got {s.noise}")
        for name in d.features or []:
            _require(_is_synthetic_column(name, s), f"{key}.features",
                     f"column {name!r} is not in the synthetic data; inputs: {_name_range('x', s.input_dim)}, "
                     f"targets: {_name_range('t', s.num_tasks)}")
        return
    if d.source == "python":
        for name in ("train", "val"):
            if getattr(d, name) is not None:
                _check_plugin(getattr(d, name), {}, f"{key}.{name}")
        if d.collate is not None:
            _check_plugin(d.collate, {}, f"{key}.collate")
        return
    for name in ("train", "val", "collate"):
        _require(getattr(d, name) is None, f"{key}.{name}", f"applies to source: python only (source is {d.source!r})")
    _require(bool(d.path), f"{key}.path", f"is required for source {d.source!r}")
    _require("\0" not in d.path, f"{key}.path", f"contains a NUL character: {d.path!r}")
    if d.source != "hub":
        _require(os.path.exists(d.path), f"{key}.path", f"file not found: {d.path}")


def _is_synthetic_column(name: str, s: SyntheticConfig) -> bool:
    """Whether the generator makes column ``name``: an input ``x0 ..`` or a target ``t0 ..``."""
    match = re.fullmatch(r"([xt])(0|[1-9][0-9]*)", name)
    return match is not None and int(match[2]) < (s.input_dim if match[1] == "x" else s.num_tasks)


def _name_range(prefix: str, count: int) -> str:
    return f"{prefix}0" if count == 1 else f"{prefix}0 .. {prefix}{count - 1}"


def _require_finite(value: Any, key: str) -> None:
    """Refuse NaN and infinite numbers anywhere in a free-form (``Any``) value, naming the key."""
    stack = [(value, key)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(where, f"must be a finite number, got {item}")
        if isinstance(item, dict):
            stack.extend((v, f"{where}.{k}") for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
