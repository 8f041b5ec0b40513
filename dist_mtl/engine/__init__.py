"""Backward engines: how per-task losses become synchronised gradients, registered by name.

| engine     | backward passes per micro-step | gradient bytes all-reduced per optimizer step |
|------------|--------------------------------|-----------------------------------------------|
| sum        | 1                              | all trainable parameters (overlapped)         |
| per_task   | T head + 1 encoder (features)  | all trainable parameters (overlapped)         |
| alternate  | T forwards and T backwards     | T x (encoder + one head), one per task step   |
| jacobian   | T encoder + 1 head backward    | global: T x encoder + heads; local: as sum    |
| jacobian, wrt features | 1 batched head pass + 1 | T^2 (Gramian) + all trainable parameters  |
| jacobian under FSDP2   | T (each reduce-scattered)     | accum x T x encoder + heads, reduce-scattered; T^2 |

Every engine starts its gradient all-reduce during its final backward pass, in buckets (DDP's
reducer for ``sum`` under DDP, ``dist_mtl.overlap`` otherwise; ``per_task``'s full route, T passes
through the whole model, reduces after the last).
"""

from __future__ import annotations

from .alternate import AlternateEngine
from ..aggregation import Aggregation
from ..distributed import Distributed
from ..tasks import Task
from ..weighting import Weighting
from .base import Batch, BackwardEngine, JacobianOptions, Piece, Update
from .jacobian import JacobianEngine
from .jacobian_features import FeatureJacobianEngine
from .jacobian_sharded import ShardedJacobianEngine
from ..sharding import is_sharded
from .per_task import PerTaskEngine
from .sum import SumEngine

BACKWARDS: dict[str, type[BackwardEngine]] = {
    "sum": SumEngine,
    "per_task": PerTaskEngine,
    "alternate": AlternateEngine,
    "jacobian": JacobianEngine,
}



def build_engine(name: str, dist: Distributed, model, tasks: list[Task], weighting: Weighting,
                 aggregate: Aggregation | None, options: JacobianOptions) -> BackwardEngine:
    """The engine registered as ``name``; ``jacobian`` with ``wrt: features`` is the MGDA-UB route."""
    cls = FeatureJacobianEngine if name == "jacobian" and options.wrt == "features" else BACKWARDS[name]
    if cls is JacobianEngine and is_sharded(dist.accelerator.unwrap_model(model)):
        cls = ShardedJacobianEngine  # FSDP2: no rank holds a whole parameter (see jacobian_sharded)
    return cls(dist, model, tasks, weighting, aggregate, options)


__all__ = ["BACKWARDS", "Batch", "Piece", "FeatureJacobianEngine", "JacobianOptions", "build_engine", "BackwardEngine", "Update", "AlternateEngine", "JacobianEngine", "PerTaskEngine", "ShardedJacobianEngine",
           "SumEngine"]
