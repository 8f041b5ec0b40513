"""dist_mtl: distributed multi-task training with exact gradients under DDP.

Bring your own model, tasks and data::

    import dist_mtl
    cfg = dist_mtl.load_config("my.yaml", ["train.max_steps=100"])   # or a dict
    model = dist_mtl.MultiTaskModel(encoder=my_encoder, heads={"a": head_a, "b": head_b})
    tasks = [dist_mtl.Task("a", loss="ce", target="label_a"), dist_mtl.Task("b", loss=my_loss, target="y")]
    result = dist_mtl.fit(cfg, model=model, tasks=tasks, train_data=train_ds, val_data=val_ds)

Run the script on every rank: ``python script.py``, ``torchrun --nproc_per_node N script.py`` or
``accelerate launch --config_file launch/cpu.yaml --num_processes N script.py``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import Config, load_config  # noqa: E402
from .errors import ConfigError, DataError, UsageError  # noqa: E402


def fit(cfg: Config, *, model=None, tasks=None, train_data=None, val_data=None, collate_fn=None):
    """Train on however many processes were launched; call it on every rank.

    Whatever is passed replaces what ``cfg`` would build; the run directory, checkpoints, resume,
    W&B, every engine, weighting and aggregator, and the N = 1 guarantee work unchanged.

    - ``model``: a :class:`MultiTaskModel` (not wrapped: dist-mtl wraps it). Default: the config's.
    - ``tasks``: a list of :class:`Task`. Default: the config's ``tasks``.
    - ``train_data``: a map-style dataset whose items are dicts with ``"inputs"`` (a tensor or a dict
      of tensors) and one key per task target; or ``{task: dataset}`` for per-task datasets.
      Missing labels: NaN (float targets) or -100 (integer targets), or a task's ``mask`` key.
    - ``val_data``: the same for validation (optional).
    - ``collate_fn``: builds the batch dict from a list of items (default ``default_collate``).

    Returns a ``TrainResult`` (``output_dir``, ``steps``, ``final_eval``, ``param_digests``) on every
    rank. Raises ``UsageError`` (``ConfigError``, ``DataError``) for bad input, naming the key.
    """
    from .trainer import train as _train

    if isinstance(cfg, dict):
        cfg = load_config(cfg)
    return _train(cfg, model=model, tasks=tasks, train_data=train_data, val_data=val_data, collate_fn=collate_fn)


def train(cfg: Config):
    """Train ``cfg`` as the CLI does (see :func:`fit`)."""
    from .trainer import train as _train

    return _train(cfg)


def __getattr__(name: str):
    """The model, task and registry classes, imported on first use (they pull in torch)."""
    if name == "MultiTaskModel":
        from .models import MultiTaskModel

        return MultiTaskModel
    if name in ("Task", "LOSSES", "METRICS", "IGNORE_INDEX"):
        from . import tasks

        return getattr(tasks, name)
    if name in ("MMoE", "CGC"):
        from . import encoders

        return getattr(encoders, name)
    if name in ("TimmEncoder", "TransformersEncoder"):
        from . import backbones

        return getattr(backbones, name)
    if name == "CpuSyncBatchNorm":
        from .batchnorm import CpuSyncBatchNorm

        return CpuSyncBatchNorm
    if name in ("load_tokenizer", "TextCollator"):
        from . import text

        return getattr(text, name)
    if name == "TrainResult":
        from .trainer import TrainResult

        return TrainResult
    raise AttributeError(f"module 'dist_mtl' has no attribute {name!r}")


__all__ = ["CGC", "Config", "ConfigError", "CpuSyncBatchNorm", "DataError", "IGNORE_INDEX", "LOSSES", "METRICS", "MMoE",
           "MultiTaskModel", "Task", "TextCollator", "TimmEncoder", "TrainResult", "TransformersEncoder", "UsageError",
           "__version__", "fit", "load_config", "load_tokenizer", "train"]
