"""Loss-level weighting methods: one small file per method, registered by short name."""

from __future__ import annotations

from typing import Any

import torch

from .base import StepResult, Weighting
from .dwa import DWAWeighting
from .equal import EqualWeighting
from .famo import FAMOWeighting
from .gradnorm import GradNormWeighting
from .learnable import LearnableWeighting
from .rlw import RandomWeighting
from .static import StaticWeighting
from .uncertainty import UncertaintyWeighting

WEIGHTINGS: dict[str, type[Weighting]] = {cls.name: cls for cls in (
    EqualWeighting, StaticWeighting, UncertaintyWeighting, DWAWeighting, GradNormWeighting, RandomWeighting,
    FAMOWeighting, LearnableWeighting)}


def build_weighting(cfg, name: str | None = None, args: dict[str, Any] | None = None,
                    device: torch.device = torch.device("cpu"), key: str = "mtl.weighting_args",
                    steps_per_epoch: int = 1) -> Weighting:
    """The weighting registered as ``name`` (default ``cfg.mtl.weighting``, with ``args`` default
    ``cfg.mtl.weighting_args``) for ``cfg.tasks``. Unknown names are refused by the config."""
    if name is None:
        name, args = cfg.mtl.weighting, cfg.mtl.weighting_args if args is None else args
    return WEIGHTINGS[name](cfg.tasks, args or {}, cfg, device, key, steps_per_epoch)


__all__ = ["WEIGHTINGS", "StepResult", "Weighting", "build_weighting"]
