"""Data: loading through HF ``datasets`` (local files, hub, synthetic), preparation, and the
global-batch-invariant sampler.

The sampler is what makes N processes train on exactly the same global batches as 1 process:
global batch k is a fixed slice of a seeded stream of permutations, and each (rank, micro-step)
takes an equal, disjoint share of it. Nothing depends on the number of processes or on
``grad_accum`` except which share a process reads.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import Config, DataConfig, SyntheticConfig, TaskConfig
from .errors import DataError, error_line
from .tasks import IGNORE_INDEX, Task, target_dtype

# ---------------------------------------------------------------------------------------------
# loading


def synthetic_dataset(s: SyntheticConfig, seed: int):
    """A multi-task regression set made only from ``seed``: inputs ``x0..x{D-1}`` ~ N(0, 1), and
    targets ``t_i = z_i + a*sin(3 z_i) + noise`` with ``z_i = x . w_i``. The unit task directions
    ``w_i`` have pairwise cosine ``1 - conflict * T/(T-1)`` (see ``SyntheticConfig.conflict``)."""
    import datasets

    rng = np.random.default_rng(seed)
    T, D = s.num_tasks, s.input_dim
    directions = task_directions(T, D, s.conflict, rng)
    x = rng.standard_normal((s.num_samples, D))
    z = x @ directions.T
    y = z + s.nonlinearity * np.sin(3.0 * z) + s.noise * rng.standard_normal(z.shape)
    columns = {f"x{j}": x[:, j].astype(np.float32) for j in range(D)}
    columns.update({f"t{i}": y[:, i].astype(np.float32) for i in range(T)})
    return datasets.Dataset.from_dict(columns)


def task_directions(num_tasks: int, dim: int, conflict: float, rng: np.random.Generator) -> np.ndarray:
    """``num_tasks`` unit vectors in R^dim with equal pairwise cosine ``1 - conflict*T/(T-1)``.

    Their Gram matrix ``(1-c) I + c 11^T`` is PSD for c in [-1/(T-1), 1]; its square root gives
    coordinates in R^T, which a random orthonormal basis embeds in R^dim."""
    T = num_tasks
    c = 1.0 - conflict * T / (T - 1) if T > 1 else 1.0
    gram = (1.0 - c) * np.eye(T) + c * np.ones((T, T))
    eigval, eigvec = np.linalg.eigh(gram)
    # LAPACK builds differ in the signs of eigenvectors and of QR factors (and, for this Gram
    # matrix's repeated eigenvalue, in the basis of its eigenspace): the symmetric square root
    # V sqrt(L) V^T and a sign-fixed QR make the data a function of the seed alone, on any machine.
    coords = (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T  # rows: task vectors in R^T
    basis, r = np.linalg.qr(rng.standard_normal((dim, T)))  # dim x T, orthonormal columns
    basis = basis * np.where(np.diag(r) < 0, -1.0, 1.0)  # the unique QR with a positive diagonal
    return coords @ basis.T


def load_source(d: DataConfig, seed: int, key: str = "data"):
    """Load the configured source as one ``datasets.Dataset`` (``key`` names the block in errors)."""
    import datasets

    if d.source == "synthetic":
        return synthetic_dataset(d.synthetic, seed)
    try:
        if d.source == "hub":
            ds = datasets.load_dataset(d.path, d.hub_config, split=d.split, revision=d.revision)
        else:
            ds = datasets.load_dataset(d.source, data_files=d.path, split="train")
    except FileNotFoundError as e:
        raise DataError(f"{key}.path: not found: {d.path} ({_one_line(e)})") from None
    except Exception as e:  # datasets raises many types for unreadable files or unreachable hubs
        if d.source != "hub" and _has_no_rows(d, e):
            raise DataError(f"{key}.path: {d.path} has no data rows (an empty file, or column names only)") from None
        raise DataError(f"{key}.path: cannot load {d.source} data from {d.path!r}: {_one_line(e)}") from None
    if ds.num_rows == 0:
        raise DataError(f"{key}.path: {d.path} has no data rows"
                        + (f" in split {d.split!r}" if d.source == "hub" else ""))
    return ds


def _has_no_rows(d: DataConfig, error: Exception) -> bool:
    """Whether a local file failed to load because it holds no rows: datasets then raises one of
    several errors (no data for the split, pandas' EmptyDataError, an arrow batch size of 0)."""
    if "corresponds to no data" in str(error):  # e.g. a CSV file with a header line only
        return True
    path = Path(d.path)
    if not path.is_file():
        return False
    if d.source == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(path).num_rows == 0
        except Exception:  # not a parquet file at all: the caller's message says why
            return False
    return path.stat().st_size <= 1 << 16 and not path.read_bytes().strip()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] or type(e).__name__


# ---------------------------------------------------------------------------------------------
# preparation


@dataclass
class TensorData:
    """One split as tensors: features ``x`` (N, D) and one target tensor per task (NaN or -100 where
    a label is missing). A data source: ``batch(indices) -> (inputs, {task: target})``."""

    x: Tensor
    targets: dict[str, Tensor]

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def complete_tasks(self) -> list[str]:
        """The tasks with a label on every row (one per row: their counts need no collective)."""
        return [name for name, y in self.targets.items() if y.dim() == 1 and bool(Task.labelled(y).all())]

    def batch(self, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.x[indices], {name: y[indices] for name, y in self.targets.items()}


@dataclass
class PreparedData:
    """Train and validation tensors plus what is needed to interpret them."""

    train: TensorData
    val: TensorData
    tasks: list[Task]
    features: list[str]
    preprocessing: dict = field(default_factory=dict)
    """Feature means/stds, target transforms and class names: enough to reproduce the inputs."""
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    """Validation metrics of trivial predictors (train mean, train majority class)."""


@dataclass
class MultiTaskData:
    """All of a run's data: one group per dataset. Tasks that share a dataset share a group, and
    each group is one forward per step; a task with its own ``data`` block is a group of its own."""

    groups: list[PreparedData]

    @property
    def tasks(self) -> list[Task]:
        return [task for group in self.groups for task in group.tasks]

    @property
    def input_dim(self) -> int:
        """The width of the first dataset's inputs (tabular data, or tensor inputs of a dataset)."""
        train = self.groups[0].train
        if isinstance(train, TensorData):
            return train.x.shape[1]
        inputs = train.batch(torch.arange(1))[0]
        if not isinstance(inputs, Tensor):
            raise DataError("model.encoder: mlp needs tensor inputs (B, D); this dataset's inputs are a "
                            f"{type(inputs).__name__}: give an encoder (model.encoder class_path, or fit(model=...))")
        return inputs.shape[-1]

    @property
    def baselines(self) -> dict[str, dict[str, float]]:
        return {name: value for group in self.groups for name, value in group.baselines.items()}

    @property
    def preprocessing(self) -> dict:
        return {"groups": [{"tasks": [t.name for t in g.tasks], **g.preprocessing} for g in self.groups]}


def prepare(cfg: Config) -> MultiTaskData:
    """Load and prepare every dataset of ``cfg``: the top-level ``data`` for the tasks without a
    ``data`` block of their own, and each task's own block. Group g is split and (for synthetic data)
    generated with seed ``cfg.seed + g``; the top-level group is group 0."""
    import datasets

    datasets.disable_progress_bars()  # the trainer shows one progress bar; per-map bars are noise
    shared = [(i, t) for i, t in enumerate(cfg.tasks) if t.data is None]
    own = [(i, t) for i, t in enumerate(cfg.tasks) if t.data is not None]
    plans = ([(cfg.data, shared, "data")] if shared else []) + [(t.data, [(i, t)], f"tasks[{i}].data") for i, t in own]
    groups = [prepare_group(d, tasks, cfg.seed + g, key) for g, (d, tasks, key) in enumerate(plans)]
    for (_, _, key), group in zip(plans[1:], groups[1:]):
        if group.train.x.shape[1] != groups[0].train.x.shape[1]:
            raise DataError(f"{key}.features: {group.train.x.shape[1]} input columns, but the shared encoder takes "
                            f"{groups[0].train.x.shape[1]} ({plans[0][2]}: {', '.join(groups[0].features)})")
    return MultiTaskData(groups)


def prepare_group(d: DataConfig, indexed_tasks: list[tuple[int, TaskConfig]], seed: int, key: str) -> PreparedData:
    """Load, split, check, encode and standardise one dataset for its tasks (``key`` names its
    config block in error messages)."""
    task_cfgs = [t for _, t in indexed_tasks]
    ds = load_source(d, seed, key)
    columns = list(ds.column_names)
    targets = [t.target for t in task_cfgs]
    for i, task in indexed_tasks:
        if task.target not in columns:
            raise DataError(f"tasks[{i}].target: column {task.target!r} is not in {d.path or 'the data'}; "
                            f"columns: {', '.join(columns)}")
    features = _resolve_features(d, ds, targets, key)
    used = list(dict.fromkeys(features + targets))
    ds = ds.select_columns(used)
    loaded = ds.num_rows
    ds = _drop_or_reject_missing(ds, used, d, key, targets=set(targets) - set(features))
    if ds.num_rows < 2:
        if ds.num_rows < loaded:
            raise DataError(f"{key}.dropna: dropping the rows with missing, NaN or infinite values leaves "
                            f"{ds.num_rows} of {loaded} rows; at least 2 are needed for a train/validation split")
        raise DataError(f"{key}.path: {ds.num_rows} data row in {d.path or 'the data'}; at least 2 are needed "
                        f"for a train/validation split")
    val_rows = math.ceil(d.val_fraction * ds.num_rows)  # as train_test_split counts them
    if val_rows >= ds.num_rows:
        raise DataError(f"{key}.val_fraction: {d.val_fraction} of {ds.num_rows} rows leaves no training rows "
                        f"({val_rows} validation rows); lower it or add rows")

    split = ds.train_test_split(test_size=d.val_fraction, seed=seed)
    train, val = split["train"], split["test"]

    tasks, encoders, prep = [], {}, {"features": features, "targets": {}}
    for task_cfg in task_cfgs:
        task, encode, info = _task_encoding(task_cfg, ds, train)
        tasks.append(task)
        encoders[task_cfg.name] = (task_cfg.target, encode)  # by task: two tasks may read one column
        prep["targets"][task.name] = info
    mean, std = _feature_stats(train, features, d.standardize)
    prep["feature_mean"], prep["feature_std"] = mean.tolist(), std.tolist()

    def transform(batch: dict) -> dict:
        out = {"__x": ((np.stack([np.asarray(batch[f], dtype=np.float64) for f in features], 1) - mean) / std)
               .astype(np.float32)}
        for name, (target, encode) in encoders.items():
            out[f"__y_{name}"] = encode(np.asarray(batch[target]))
        return out

    train_t = _to_tensors(train.map(transform, batched=True, remove_columns=train.column_names), tasks)
    val_t = _to_tensors(val.map(transform, batched=True, remove_columns=val.column_names), tasks)
    return PreparedData(train_t, val_t, tasks, features, prep, _baselines(train_t, val_t, tasks))


def _resolve_features(d: DataConfig, ds, targets: list[str], key: str) -> list[str]:
    columns = list(ds.column_names)
    if d.features is not None:
        for name in d.features:
            if name not in columns:
                raise DataError(f"{key}.features: column {name!r} is not in the data; columns: {', '.join(columns)}")
            if not _is_numeric(ds.features[name]):
                raise DataError(f"{key}.features: column {name!r} is not numeric ({ds.features[name]})")
        overlap = sorted(set(d.features) & set(targets))
        if overlap:
            raise DataError(f"{key}.features: {overlap[0]!r} is also a task target; a target cannot be an input")
        if not d.features:
            raise DataError(f"{key}.features: the list is empty; name at least one input column")
        return list(d.features)
    if d.source == "synthetic":  # the other targets t* are outputs of the generator, never inputs
        return [f"x{j}" for j in range(d.synthetic.input_dim)]
    features = [c for c in columns if c not in targets and _is_numeric(ds.features[c])]
    if not features:
        raise DataError(f"{key}.features: no numeric input columns remain after removing the targets; "
                        f"columns: {', '.join(columns)}")
    return features


def _is_numeric(feature) -> bool:
    dtype = getattr(feature, "dtype", "")
    return dtype.startswith(("int", "uint", "float")) or dtype == "bool"


def _drop_or_reject_missing(ds, columns: list[str], d: DataConfig, key: str, targets: set[str] = frozenset()):
    """Missing, NaN or infinite feature values: an error naming the column, or with ``dropna`` the row
    dropped. A missing target (null or NaN) is a missing label, kept (the task's loss skips it, the
    row still trains the other tasks); an infinite target is an error, or dropped with ``dropna``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]  # the rows as they are (after any earlier selection)
    keep = None
    for name in columns:
        column = table.column(name)
        usable = pc.is_valid(column)
        missing, infinite = column.null_count, 0
        if pa.types.is_floating(column.type):
            missing += pc.sum(pc.is_nan(column)).as_py() or 0
            infinite = pc.sum(pc.is_inf(column)).as_py() or 0
            usable = pc.and_kleene(usable, pc.is_finite(column))
        if name in targets:  # a missing label is not a bad row; only an infinite one is
            missing = 0
            usable = pc.invert(pc.is_inf(column)) if pa.types.is_floating(column.type) else None
            if usable is not None:
                usable = pc.fill_null(usable, True)
        if (missing or infinite) and not d.dropna:
            what = " and ".join(text for count, text in [(missing, f"{missing} missing or NaN"),
                                                         (infinite, f"{infinite} infinite (inf or -inf)")] if count)
            raise DataError(f"{key}: column {name!r} has {what} values; "
                            f"clean the data or set {key}.dropna=true to drop those rows")
        if usable is not None:
            keep = usable if keep is None else pc.and_kleene(keep, usable)
    if d.dropna and keep is not None:
        rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
        if len(rows) < ds.num_rows:
            ds = ds.select(rows)
    return ds


def _floats(v: np.ndarray) -> np.ndarray:
    """A column as float64 with NaN for missing labels (None in an object column)."""
    if v.dtype == object:
        return np.array([np.nan if item is None else item for item in v.tolist()], dtype=np.float64)
    return v.astype(np.float64)


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _task_encoding(task_cfg: TaskConfig, ds, train):
    """The run-time Task, a numpy encoder for its target column, and the info to undo it. A missing
    label (null or NaN) becomes NaN (regression, binary) or -100 (classification)."""
    col = task_cfg.target
    task = Task(task_cfg.name, loss=task_cfg.loss, target=task_cfg.name, kind=task_cfg.kind, weight=task_cfg.weight)
    if task_cfg.kind == "regression":
        if not _is_numeric(ds.features[col]):
            raise DataError(f"tasks.{task_cfg.name}.target: column {col!r} is not numeric; a regression target must be")
        values = _floats(_columns(train, [col])[col])
        if np.isnan(values).all():
            raise DataError(f"tasks.{task_cfg.name}.target: column {col!r} has no labelled row in the training split")
        forward = {"none": lambda v: v, "log": np.log, "log1p": np.log1p}[task_cfg.transform]
        if task_cfg.transform != "none":
            smallest = float(np.nanmin(_floats(_columns(ds, [col])[col])))
            if smallest <= (0 if task_cfg.transform == "log" else -1):
                raise DataError(f"tasks.{task_cfg.name}.transform: {task_cfg.transform} needs "
                                f"{'positive' if task_cfg.transform == 'log' else '> -1'} values; "
                                f"column {col!r} has {smallest}")
        transformed = forward(values)
        mu = float(np.nanmean(transformed)) if task_cfg.standardize else 0.0
        sd = float(np.nanstd(transformed)) or 1.0 if task_cfg.standardize else 1.0

        def encode(v: np.ndarray) -> np.ndarray:
            return ((forward(_floats(v)) - mu) / sd).astype(np.float32)

        info = {"kind": "regression", "transform": task_cfg.transform, "mean": mu, "std": sd}
        return task, encode, info

    if task_cfg.kind == "classification" and task_cfg.num_classes is not None:
        return _indexed_classes(task_cfg, ds, task)
    classes = sorted((v for v in ds.unique(col) if not _is_missing(v)), key=lambda v: (str(type(v)), v))
    if task_cfg.kind == "binary" and len(classes) != 2:
        raise DataError(f"tasks.{task_cfg.name}.target: a binary target needs exactly 2 distinct values; "
                        f"column {col!r} has {len(classes)}: {classes[:10]}")
    if task_cfg.kind == "classification" and len(classes) < 2:
        raise DataError(f"tasks.{task_cfg.name}.target: column {col!r} has {len(classes)} class(es); at least 2 are needed")
    lookup = {value: i for i, value in enumerate(classes)}
    classification = task_cfg.kind == "classification"
    missing = IGNORE_INDEX if classification else np.nan
    dtype = np.int64 if classification else np.float32

    def encode(v: np.ndarray) -> np.ndarray:
        return np.fromiter((missing if _is_missing(item) else lookup[item] for item in v.tolist()), dtype=dtype,
                           count=len(v))

    info = {"kind": task_cfg.kind, "classes": [c if isinstance(c, (int, float, str, bool)) else str(c) for c in classes]}
    task.num_classes = len(classes) if classification else 0
    return task, encode, info


def _indexed_classes(task_cfg: TaskConfig, ds, task: Task):
    """A classification target whose labels are the class indices ``0 .. num_classes-1``."""
    col, count = task_cfg.target, task_cfg.num_classes
    values = [v for v in ds.unique(col) if not _is_missing(v)]
    not_integers = [v for v in values if not _is_integer(v)]
    if not_integers:
        raise DataError(f"tasks.{task_cfg.name}.target: column {col!r} has labels that are not integers "
                        f"(num_classes: {count} needs labels in [0, {count})): {_some(not_integers)}")
    outside = [int(v) for v in values if not 0 <= v < count]
    if outside:
        raise DataError(f"tasks.{task_cfg.name}.target: column {col!r} has labels outside [0, {count}) "
                        f"(num_classes: {count}): {_some(outside)}")

    def encode(v: np.ndarray) -> np.ndarray:
        labels = _floats(np.asarray(v))
        return np.where(np.isnan(labels), IGNORE_INDEX, labels).astype(np.int64)

    info = {"kind": "classification", "classes": list(range(count))}
    task.num_classes = count
    return task, encode, info


def _is_integer(value) -> bool:
    """An int, a bool, or a float with an integer value (integer labels stored as floats)."""
    if isinstance(value, (bool, int, np.integer, np.bool_)):
        return True
    return isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()


def _some(values: list, shown: int = 5) -> str:
    """A few of ``values``, sorted as far as they sort, with the total when there are more."""
    try:
        values = sorted(values)
    except TypeError:
        pass
    text = ", ".join(repr(v) for v in values[:shown])
    return f"[{text}{f', ... ({len(values)} in all)' if len(values) > shown else ''}]"


def _feature_stats(train, features: list[str], standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    if not standardize:
        return np.zeros(len(features)), np.ones(len(features))
    columns = _columns(train, features)
    x = np.stack([columns[f].astype(np.float64) for f in features], 1)
    std = x.std(0)
    return x.mean(0), np.where(std > 0, std, 1.0)


def _columns(ds, names: list[str]) -> dict[str, np.ndarray]:
    """Whole columns as numpy arrays in one arrow read (row iteration would be ~1000x slower)."""
    return ds.select_columns(names).with_format("numpy")[:]


def _to_tensors(ds, tasks: list[Task]) -> TensorData:
    columns = _columns(ds, list(ds.column_names))
    x = torch.from_numpy(np.ascontiguousarray(np.stack(columns["__x"]) if columns["__x"].dtype == object
                                              else columns["__x"], dtype=np.float32))
    targets = {task.name: torch.from_numpy(np.asarray(columns[f"__y_{task.name}"])).to(target_dtype(task.kind))
               for task in tasks}
    return TensorData(x, targets)


def _baselines(train: TensorData, val: TensorData, tasks: list[Task]) -> dict[str, dict[str, float]]:
    """Validation metrics of the trivial predictors that a model must beat, on the labelled rows."""
    out = {}
    for task in tasks:
        y_train, y_val = train.targets[task.name], val.targets[task.name]
        y_train, y_val = y_train[Task.labelled(y_train)], y_val[Task.labelled(y_val)]
        if len(y_train) == 0 or len(y_val) == 0:
            continue
        if task.kind == "regression":
            err = (y_val.double() - y_train.double().mean())
            out[task.name] = {"mse": float((err * err).mean()), "mae": float(err.abs().mean())}
        else:
            majority = torch.mode(y_train).values
            out[task.name] = {"accuracy": float((y_val == majority).double().mean())}
    return out


# ---------------------------------------------------------------------------------------------
# map-style datasets (bring your own)


class DatasetSource:
    """A map-style dataset as a data source: ``batch(indices) -> (inputs, {task: target})``.

    Each item is a dict: ``"inputs"`` (a tensor or a dict of tensors) plus one key per task target
    (and per mask key). ``collate`` (default ``torch.utils.data.default_collate``) makes the batch
    dict from the items. A task's mask turns its False elements into missing labels (NaN, -100).
    Any ``torch.utils.data.Dataset`` or ``datasets.Dataset`` (with a torch format or a transform)
    works. A dataset with a ``collate`` attribute (a function of a list of items: per-batch text
    padding, say) uses it when no ``collate`` is given. ``key`` names the dataset in errors
    (``data.train``, ``train_data``).
    """

    complete_tasks: tuple[str, ...] = ()  # unknown without reading every item: counted per step

    def __init__(self, dataset, tasks: list[Task], collate=None, key: str = "train_data") -> None:
        from torch.utils.data import default_collate

        try:
            size = len(dataset)
        except TypeError:
            raise DataError(f"{key}: a map-style dataset (with __len__ and __getitem__) is needed, "
                            f"got {type(dataset).__name__}") from None
        if size == 0:
            raise DataError(f"{key}: the dataset is empty")
        self.dataset, self.tasks, self.key = dataset, tasks, key
        self.collate = collate or getattr(dataset, "collate", None) or default_collate
        try:
            first = dataset[0]
        except Exception:  # an unreadable item: training names it (or skips it, data.skip_bad_examples)
            return
        self._check(first, 0)  # before training starts: item 0, the same item validate names

    def __len__(self) -> int:
        return len(self.dataset)

    def _check(self, item, index: int) -> None:
        """The first item has what the tasks read: one clear error (exit 2) instead of a KeyError."""
        if not isinstance(item, dict):
            raise DataError(f"{self.key}: item {index} is a {type(item).__name__}; an item must be a dict with "
                            "'inputs' and one key per task target")
        needed = [("inputs", "the model's inputs")] + [(t.target, f"the target of task {t.name!r}") for t in self.tasks]
        needed += [(t.mask, f"the mask of task {t.name!r}") for t in self.tasks if t.mask]
        for name, what in needed:
            if name not in item:
                raise DataError(f"{self.key}: item {index} has no key {name!r} ({what}); its keys: "
                                f"{', '.join(map(str, item))}")

    def batch(self, indices: Tensor) -> tuple:
        """Items ``indices`` read in this process (as they are: no seeding), collated."""
        return self.from_items([self.dataset[int(i)] for i in indices])

    def from_items(self, items: list) -> tuple:
        """``(inputs, {task: target})`` of a list of items: collated, masks applied."""
        batch = self.collate(items)
        targets = {}
        for task in self.tasks:
            target = batch[task.target]
            if not isinstance(target, Tensor):
                raise DataError(f"{self.key}: task {task.name!r}'s target {task.target!r} is a "
                                f"{type(target).__name__} after collate; it must be a tensor")
            if task.mask:
                keep = batch[task.mask].bool()
                if keep.dim() + 1 == target.dim():  # one flag per pixel of (B, 3, H, W) normals: every channel
                    keep = keep.unsqueeze(1)
                target = (target.masked_fill(~keep, float("nan")) if target.is_floating_point()
                          else target.masked_fill(~keep, IGNORE_INDEX))
            targets[task.name] = target
        return batch["inputs"], targets


def python_data(tasks: list[Task], train_data, val_data=None, collate=None,
                keys: tuple[str, str] = ("train_data", "val_data")) -> MultiTaskData:
    """Groups of map-style datasets: ``train_data`` is one dataset for every task, or
    ``{task: dataset}`` (tasks given the same dataset object share a group: one forward per step);
    ``val_data`` likewise (optional: without it nothing is evaluated)."""
    by_name = {task.name: task for task in tasks}
    groups: list[PreparedData] = []
    if isinstance(train_data, dict):
        unknown = sorted(set(train_data) - set(by_name))
        if unknown:
            raise DataError(f"{keys[0]}: no task named {unknown[0]!r}; tasks: {', '.join(by_name)}")
        missing = [name for name in by_name if name not in train_data]
        if missing:
            raise DataError(f"{keys[0]}: no dataset for task {missing[0]!r}")
        plans: dict[int, tuple] = {}
        for name, ds in train_data.items():
            plans.setdefault(id(ds), (ds, []))[1].append(by_name[name])
    else:
        plans = {id(train_data): (train_data, list(tasks))}
    for ds, group_tasks in plans.values():
        val = val_data.get(group_tasks[0].name) if isinstance(val_data, dict) else val_data
        groups.append(PreparedData(DatasetSource(ds, group_tasks, collate, keys[0]),
                                   DatasetSource(val, group_tasks, collate, keys[1]) if val is not None else None,
                                   group_tasks, []))
    return MultiTaskData(groups)


# ---------------------------------------------------------------------------------------------
# sampling


class GlobalBatchSampler:
    """Global batch ``k`` is positions ``[k*B, (k+1)*B)`` of an endless stream made of one seeded
    permutation of the rows per epoch. It depends only on ``seed`` and ``batch_size``.

    ``local_batches(k, rank, world, accum)`` cuts global batch k into ``world*accum`` equal
    micro-batches; micro-step m of rank r reads piece ``m*world + r``. Equal pieces mean that the
    mean over ranks and micro-steps of per-piece mean losses is exactly the global-batch mean.
    Resuming at step k needs no sampler state: the position is a function of k.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int) -> None:
        if num_rows <= 0:
            raise DataError("data: the training split is empty")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self._perms: dict[int, Tensor] = {}

    def _permutation(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # batches only ever straddle two neighbouring epochs
                self._perms.pop(min(self._perms))
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.num_rows, generator=generator)
        return self._perms[epoch]

    def epoch(self, step: int) -> float:
        """Epochs completed after ``step`` optimizer steps."""
        return step * self.batch_size / self.num_rows

    def global_batch(self, step: int) -> Tensor:
        """The row indices of global batch ``step`` (``batch_size`` of them)."""
        return self.global_batch_epochs(step)[0]

    def global_batch_epochs(self, step: int) -> tuple[Tensor, Tensor]:
        """The row indices of global batch ``step`` and the epoch each position belongs to (a batch
        that straddles two epochs reads the end of one permutation and the start of the next)."""
        start = step * self.batch_size
        stop = start + self.batch_size
        pieces, epochs = [], []
        while start < stop:
            epoch, offset = divmod(start, self.num_rows)
            take = min(stop - start, self.num_rows - offset)
            pieces.append(self._permutation(epoch)[offset:offset + take])
            epochs.append(torch.full((take,), epoch, dtype=torch.long))
            start += take
        return torch.cat(pieces), torch.cat(epochs)

    def local_batches(self, step: int, rank: int, world: int, accum: int) -> list[Tensor]:
        return [indices for indices, _ in self.local_pieces(step, rank, world, accum)]

    def local_pieces(self, step: int, rank: int, world: int, accum: int) -> list[tuple[Tensor, Tensor]]:
        """``local_batches`` with each position's epoch: ``accum`` pairs of (indices, epochs)."""
        indices, epochs = self.global_batch_epochs(step)
        size = self.batch_size // (world * accum)
        cuts = [slice((m * world + rank) * size, (m * world + rank + 1) * size) for m in range(accum)]
        return [(indices[cut], epochs[cut]) for cut in cuts]


def eval_shard(num_rows: int, rank: int, world: int) -> Tensor:
    """This rank's validation rows: a strided, disjoint share (no sample is counted twice)."""
    return torch.arange(rank, num_rows, world)



class StepLoader:
    """This rank's micro-batches for an optimizer step: for each micro-step, one piece per dataset
    that carries an active task. Dataset g has its own sampler seeded with ``seed + 7919 g``, so
    every dataset's global batch sequence is a function of the seed and ``batch_size`` only.

    In-memory tables are indexed directly. Map-style datasets stream: once ``start`` is called, a
    ``torch.utils.data.DataLoader`` per dataset (``loading.num_workers`` workers, prefetching,
    pinned memory on GPUs) reads this rank's micro-batches of the following steps ahead of the
    training loop, driven by the global-batch sampler. Every item is read with the global RNGs
    seeded from (dataset seed, item index, epoch) (``SeededItems``), so random augmentation is the
    same on any number of processes, workers or ``grad_accum``, and a resumed run reads exactly
    what an uninterrupted one would have. Before ``start`` (and for a step out of order), items
    are read in this process the same way.
    """

    def __init__(self, data: MultiTaskData, batch_size: int, seed: int, loading: DataConfig | None = None) -> None:
        self.groups = data.groups
        self.seeds = [seed + 7919 * i for i in range(len(data.groups))]
        self.samplers = [GlobalBatchSampler(len(g.train), batch_size, s) for g, s in zip(data.groups, self.seeds)]
        self.complete: set[str] = {name for g in data.groups for name in getattr(g.train, "complete_tasks", ())}
        """Tasks whose every training sample has one label: their count per global batch is its size."""
        self.loading = loading or DataConfig()
        self.skipped: list[BadItem] = []
        """The items of the last ``micro_batches`` that could not be read (``data.skip_bad_examples``)."""
        self._streams: dict[int, _Stream] = {}

    def epoch(self, step: int) -> float:
        """Epochs of the first dataset completed after ``step`` optimizer steps."""
        return self.samplers[0].epoch(step)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of the first dataset (rounded, at least 1)."""
        return max(1, round(self.samplers[0].num_rows / self.samplers[0].batch_size))

    @property
    def streamed(self) -> bool:
        """Whether any dataset is a map-style dataset read item by item (not an in-memory table)."""
        return any(isinstance(g.train, DatasetSource) for g in self.groups)

    def start(self, step: int, stop: int, rank: int, world: int, accum: int, pin_memory: bool = False) -> None:
        """Stream the map-style datasets' micro-batches of steps ``step .. stop-1`` for this rank from
        now on (worker processes start here and prefetch). ``micro_batches`` must then be asked for
        those steps in order."""
        self.close()
        for g, (group, sampler) in enumerate(zip(self.groups, self.samplers)):
            if isinstance(group.train, DatasetSource) and step < stop:
                self._streams[g] = _Stream(group.train, sampler, self.seeds[g], self.loading, step, stop,
                                           (rank, world, accum), pin_memory)

    def close(self) -> None:
        """Stop the worker processes (they also stop with this process)."""
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()

    def micro_batches(self, step: int, rank: int, world: int, accum: int, active: list[str],
                      device: torch.device, streamed: bool = True) -> list[list[tuple[Tensor, dict[str, Tensor]]]]:
        """Micro-step m's pieces ``[(inputs, {task: target}), ...]`` (one per dataset with an active
        task), for each m. ``streamed=False`` reads in this process and leaves the streams where they
        are (a look at other steps' data: the baselines' label prior)."""
        batches: list[list] = [[] for _ in range(accum)]
        self.skipped = []
        for g, (group, sampler) in enumerate(zip(self.groups, self.samplers)):
            stream = self._streams.get(g) if streamed else None
            wanted = any(task.name in active for task in group.tasks)
            if stream is not None and stream.next_step == step < stream.stop and stream.layout == (rank, world, accum):
                loaded = stream.take(accum)  # read even when no task of it trains now: the stream moves on
            elif not wanted:
                continue  # no active task reads this dataset at this step: no forward, no loading
            elif isinstance(group.train, DatasetSource):
                reader = SeededItems(group.train, self.seeds[g])
                loaded = [reader.collate([reader[(int(i), int(e))] for i, e in zip(indices, epochs)])
                          for indices, epochs in sampler.local_pieces(step, rank, world, accum)]
            else:
                loaded = [LoadedBatch(group.train.batch(indices))
                          for indices in sampler.local_batches(step, rank, world, accum)]
            if not wanted:
                continue
            for m, piece in enumerate(loaded):
                batches[m].append(to_device(self._usable(piece, group.train), device))
        return batches

    def _usable(self, loaded: "LoadedBatch", source) -> tuple:
        """The batch of a micro-batch's readable items; the unreadable ones are an error (exit 2)
        naming the dataset and item, or, with ``data.skip_bad_examples``, recorded in ``skipped``."""
        if loaded.bad and not self.loading.skip_bad_examples:
            raise loaded.bad[0].refused()
        self.skipped.extend(loaded.bad)
        if loaded.batch is None:
            raise DataError(f"{source.key}: every item of a micro-batch is unreadable (items "
                            f"{', '.join(str(b.index) for b in loaded.bad[:5])}): {loaded.bad[0].error}")
        return loaded.batch


def item_seed(seed: int, index: int, epoch: int) -> int:
    """The seed of item ``index``'s random augmentation in ``epoch``: a 63-bit hash of the three
    (numpy's SeedSequence), never of the rank or the worker."""
    state = np.random.SeedSequence([seed % (1 << 63), epoch, index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


@dataclass
class BadItem:
    """An item that could not be read (a corrupt image, a null text, a missing key)."""

    key: str
    """The dataset's name in errors (``data.train``, ``train_data``)."""
    index: int | None
    """The item's index in its dataset; None when a whole micro-batch failed to collate."""
    error: str

    def where(self) -> str:
        return f"{self.key}: item {self.index}" if self.index is not None else f"{self.key}: a micro-batch"

    def refused(self) -> DataError:
        """The error (exit 2) that stops a run on this item when it is not skipped."""
        return DataError(f"{self.where()}: {self.error}; fix the data, or set data.skip_bad_examples=true to "
                         "skip such items (they are counted in the log)")


@dataclass
class LoadedBatch:
    """A micro-batch as the loader delivers it: ``(inputs, {task: target})`` of the readable items
    (None if there are none) and the items that could not be read."""

    batch: tuple | None
    bad: list[BadItem] = field(default_factory=list)


class SeededItems(torch.utils.data.Dataset):
    """``reader[(index, epoch)]``: item ``index`` of a map-style source, read with torch's, numpy's
    and Python's global RNGs seeded by ``item_seed(seed, index, epoch)``, so a dataset's random
    augmentation (``torch.rand``, torchvision transforms, ``random``) draws the same numbers for
    that item on any rank, worker or process count. The caller's RNG states are restored after
    each item (in the training process, dropout and the model's own draws are untouched).
    An item that raises becomes a ``BadItem`` (workers never raise: a raising worker would end the
    DataLoader with a multi-line traceback)."""

    def __init__(self, source: DatasetSource, seed: int) -> None:
        self.source, self.seed = source, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        seed = item_seed(self.seed, index, epoch)
        # A worker's RNGs serve nothing else: seed them and go on. The training process (0 workers)
        # gets its own states back after the item. torch's CPU generator alone: torch.manual_seed
        # would also reseed every accelerator's (80 us an item, against 1 us).
        restore = torch.utils.data.get_worker_info() is None
        if restore:
            states = torch.default_generator.get_state(), np.random.get_state(), random.getstate()
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % (1 << 32))
        random.seed(seed)
        try:
            item = self.source.dataset[index]
            self.source._check(item, index)
            return item
        except Exception as e:  # reported (or skipped) by the training process, naming the item
            return BadItem(self.source.key, index, _one_line(e) if isinstance(e, DataError) else error_line(e))
        finally:
            if restore:
                torch.default_generator.set_state(states[0])
                np.random.set_state(states[1])
                random.setstate(states[2])

    def collate(self, items: list) -> LoadedBatch:
        """The ``LoadedBatch`` of a list of ``__getitem__`` results."""
        bad = [item for item in items if isinstance(item, BadItem)]
        good = [item for item in items if not isinstance(item, BadItem)]
        if not good:
            return LoadedBatch(None, bad)
        try:
            batch = self.source.from_items(good)
        except Exception as e:  # a collate that fails on these items fails the whole micro-batch
            return LoadedBatch(None, bad + [BadItem(self.source.key, None, f"collate failed: {_one_line(e)}")])
        return LoadedBatch(_by_value(batch) if torch.utils.data.get_worker_info() is not None else batch, bad)


BY_VALUE_BYTES = 1 << 20
"""Tensors up to this size leave a worker by value (pickled through its pipe) rather than in
shared memory: torch sends each shared-memory tensor as a file descriptor over a new socket
connection, which measured 3 ms per tensor here (10 ms for a 3-tensor MultiMNIST micro-batch
that a pipe carries in 0.3 ms); a large tensor is cheaper to share than to copy."""


class _Array:
    """A small tensor on its way from a worker: its numpy view, pickled by value."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


def _by_value(obj):
    """``obj`` with its small tensors (``BY_VALUE_BYTES``; dtypes numpy has) wrapped as ``_Array``."""
    def wrap(v):
        small = isinstance(v, Tensor) and v.numel() * v.element_size() <= BY_VALUE_BYTES and v.dtype != torch.bfloat16
        return _Array(v.numpy()) if small and v.device.type == "cpu" else v

    return map_leaves(obj, wrap)


def _as_tensors(obj):
    """``_by_value`` undone in the training process (no copy: the tensors share the arrays' memory)."""
    return map_leaves(obj, lambda v: torch.from_numpy(v.array) if isinstance(v, _Array) else v)


def _received(loaded: LoadedBatch) -> LoadedBatch:
    return LoadedBatch(_as_tensors(loaded.batch), loaded.bad) if loaded.batch is not None else loaded


class _RankBatches(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: for each step of ``[start, stop)``, this rank's ``accum``
    micro-batches, each a list of ``(index, epoch)``."""

    def __init__(self, sampler: GlobalBatchSampler, start: int, stop: int, layout: tuple[int, int, int]) -> None:
        self.sampler, self.start, self.stop, self.layout = sampler, start, stop, layout

    def __iter__(self):
        for step in range(self.start, self.stop):
            for indices, epochs in self.sampler.local_pieces(step, *self.layout):
                yield list(zip(indices.tolist(), epochs.tolist()))

    def __len__(self) -> int:
        return (self.stop - self.start) * self.layout[2]


class _Stream:
    """One dataset's DataLoader over the steps ``[start, stop)`` of one (rank, world, accum) layout."""

    def __init__(self, source: DatasetSource, sampler: GlobalBatchSampler, seed: int, loading: DataConfig,
                 start: int, stop: int, layout: tuple[int, int, int], pin_memory: bool) -> None:
        reader = SeededItems(source, seed)
        workers = loading.num_workers
        self.loader = torch.utils.data.DataLoader(
            reader, batch_sampler=_RankBatches(sampler, start, stop, layout), collate_fn=reader.collate,
            num_workers=workers, pin_memory=pin_memory and loading.pin_memory,
            prefetch_factor=loading.prefetch_factor if workers else None, persistent_workers=False,
            timeout=loading.worker_timeout_s if workers else 0)
        self.iterator = iter(self.loader)
        self.next_step, self.stop, self.layout = start, stop, layout

    def take(self, accum: int) -> list[LoadedBatch]:
        """The ``accum`` micro-batches of step ``next_step``."""
        loaded = [_received(next(self.iterator)) for _ in range(accum)]
        self.next_step += 1
        return loaded

    def close(self) -> None:
        self.iterator = None  # the DataLoader iterator's __del__ stops its workers


def val_batches(source, shard: Tensor, batch_size: int, loading: DataConfig | None = None):
    """The validation batches ``(inputs, {task: target})`` of ``shard`` (row indices), in order.
    Map-style datasets are read through a DataLoader with ``loading.num_workers`` workers (items
    seeded as in training, epoch 0); unreadable items are an error, or skipped as in training."""
    loading = loading or DataConfig()
    cuts = [shard[start:start + batch_size] for start in range(0, len(shard), batch_size)]
    if not isinstance(source, DatasetSource):
        for indices in cuts:
            yield source.batch(indices)
        return
    reader = SeededItems(source, 0)
    loader = torch.utils.data.DataLoader(
        reader, batch_sampler=[[(int(i), 0) for i in indices] for indices in cuts], collate_fn=reader.collate,
        num_workers=loading.num_workers, timeout=loading.worker_timeout_s if loading.num_workers else 0)
    for loaded in map(_received, loader):
        if loaded.bad and not loading.skip_bad_examples:
            raise loaded.bad[0].refused()
        if loaded.batch is not None:
            yield loaded.batch


def map_leaves(obj, fn):
    """``fn`` applied to every value inside dicts, lists and tuples (nested), the containers rebuilt."""
    if isinstance(obj, dict):
        return {k: map_leaves(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_leaves(v, fn) for v in obj)
    return fn(obj)


def to_device(obj, device: torch.device):
    """Tensors, and dicts, lists and tuples of them, moved to ``device`` (other values as they are)."""
    return map_leaves(obj, lambda v: v.to(device) if isinstance(v, Tensor) else v)
