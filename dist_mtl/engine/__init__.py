"""Backward engines: how per-task losses become synchronised gradients, registered by name.

| engine     | backward passes per micro-step | gradient bytes all-reduced per optimizer step |
|------------|--------------------------------|-----------------------------------------------|
| sum        | 1                              | all trainable parameters (DDP, overlapped)    |
| per_task   | T (retained graph)             | all trainable parameters, one collective      |
| alternate  | T forwards and T backwards     | T x (encoder + one head), one per task step   |
| jacobian   | T encoder + 1 head backward    | global: T x encoder + heads; local: as sum    |
"""

from __future__ import annotations

from .alternate import AlternateEngine
from .base import Batch, BackwardEngine, Piece, Update
from .jacobian import JacobianEngine
from .per_task import PerTaskEngine
from .sum import SumEngine

BACKWARDS: dict[str, type[BackwardEngine]] = {
    "sum": SumEngine,
    "per_task": PerTaskEngine,
    "alternate": AlternateEngine,
    "jacobian": JacobianEngine,
}

__all__ = ["BACKWARDS", "Batch", "Piece", "BackwardEngine", "Update", "AlternateEngine", "JacobianEngine", "PerTaskEngine",
           "SumEngine"]
