"""The small base class that every loss-level weighting method builds on."""

from __future__ import annotations

from torch import Tensor

from ..config import Config


class Weighting:
    """Turns per-task losses into one scalar to differentiate.

    A method sees only *global* values (reduced across ranks by the trainer), so every rank computes
    the same weights. Stateful methods put all of their state in ``state_dict`` so checkpoints
    restore it exactly.
    """

    def __init__(self, task_names: list[str], cfg: Config) -> None:
        self.task_names = list(task_names)

    def weights(self, step: int) -> dict[str, float]:
        """The weight of each task for optimizer step ``step``."""
        raise NotImplementedError

    def terms(self, losses: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Each task's contribution to the objective: ``w_t * L_t`` unless a method says otherwise
        (e.g. learned-variance terms). Engines that back-propagate tasks separately use these."""
        weights = self.weights(step)
        return {name: weights[name] * loss for name, loss in losses.items()}

    def combine(self, losses: dict[str, Tensor], step: int) -> Tensor:
        """The scalar to back-propagate: the sum of ``terms``."""
        return sum(self.terms(losses, step).values())

    def observe(self, step: int, global_losses: dict[str, float]) -> None:
        """Called after each optimizer step with the global mean loss of each task."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
