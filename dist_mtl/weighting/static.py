"""Fixed manual weights: ``mtl.weights.<task>`` if given, else ``tasks[].weight``."""

from __future__ import annotations

from ..config import Config
from .base import Weighting


class StaticWeighting(Weighting):
    def __init__(self, task_names: list[str], cfg: Config) -> None:
        super().__init__(task_names, cfg)
        from_tasks = {task.name: task.weight for task in cfg.tasks}
        self._weights = {name: float(cfg.mtl.weights.get(name, from_tasks.get(name, 1.0))) for name in task_names}

    def weights(self, step: int) -> dict[str, float]:
        return dict(self._weights)
