"""Loss-level weighting methods: one small file per method, registered by short name."""

from __future__ import annotations

from ..config import Config
from .base import Weighting
from .equal import EqualWeighting
from .static import StaticWeighting

WEIGHTINGS: dict[str, type[Weighting]] = {
    "equal": EqualWeighting,
    "static": StaticWeighting,
}


def build_weighting(cfg: Config) -> Weighting:
    """The weighting named by ``cfg.mtl.weighting`` (validated against WEIGHTINGS by the config)."""
    return WEIGHTINGS[cfg.mtl.weighting](cfg.task_names, cfg)


__all__ = ["WEIGHTINGS", "Weighting", "build_weighting"]
