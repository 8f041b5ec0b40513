"""``equal``: every task's loss counts once (the plain sum)."""

from __future__ import annotations

from .base import Weighting


class EqualWeighting(Weighting):
    name = "equal"

    def weights(self, step: int) -> dict[str, float]:
        return {name: 1.0 for name in self.task_names}
