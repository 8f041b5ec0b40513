"""``static``: fixed manual weights, ``mtl.weights.<task>`` if given, else ``tasks[].weight``."""

from __future__ import annotations

from .base import Weighting


class StaticWeighting(Weighting):
    name = "static"

    def setup(self, cfg) -> None:
        from_tasks = {task.name: task.weight for task in cfg.tasks}
        self._weights = {name: float(cfg.mtl.weights.get(name, from_tasks.get(name, 1.0))) for name in self.task_names}

    def weights(self, step: int) -> dict[str, float]:
        return dict(self._weights)
