"""What a backward engine is: per-task losses in, synchronised gradients (and an update) out."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..distributed import Distributed
from ..tasks import Task
from ..weighting import Weighting

Batch = tuple[Tensor, dict[str, Tensor]]


class BackwardEngine:
    """Turns one optimizer step's micro-batches into synchronised gradients and applies them.

    Contract, for every engine: every rank issues the same collectives in the same order; the
    gradients equal those of the single-process computation on the global batch; ``update`` is
    called when the gradients are ready (engines that step per task call it several times).
    """

    def __init__(self, dist: Distributed, model: nn.Module, tasks: list[Task], weighting: Weighting) -> None:
        self.dist, self.model, self.tasks, self.weighting = dist, model, tasks, weighting

    def run(self, step: int, micro_batches: list[Batch], update: Callable[[], None]) -> dict[str, Tensor]:
        """Back-propagate one optimizer step and call ``update``. Returns each task's mean loss on
        this rank over its micro-batches (detached)."""
        raise NotImplementedError

    def task_losses(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        return {task.name: task.loss(outputs[task.name], targets[task.name]) for task in self.tasks}
