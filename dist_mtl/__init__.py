"""dist_mtl: distributed multi-task training with exact gradients under DDP."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import Config, load_config  # noqa: E402
from .errors import ConfigError, DataError, UsageError  # noqa: E402


def train(cfg: Config):
    """Train ``cfg`` (see :func:`dist_mtl.trainer.train`)."""
    from .trainer import train as _train

    return _train(cfg)


__all__ = ["Config", "ConfigError", "DataError", "UsageError", "__version__", "load_config", "train"]
