"""Backward engines: how per-task losses become synchronised gradients, registered by name."""

from __future__ import annotations

from .base import Batch, BackwardEngine
from .sum import SumEngine

BACKWARDS: dict[str, type[BackwardEngine]] = {
    "sum": SumEngine,
}

__all__ = ["BACKWARDS", "Batch", "BackwardEngine", "SumEngine"]
