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

    def combine(self, losses: dict[str, Tensor], step: int) -> Tensor:
        """The scalar to back-propagate: ``sum_t w_t * L_t`` unless a method says otherwise."""
        weights = self.weights(step)
        return sum(weights[name] * loss for name, loss in losses.items())

    def observe(self, step: int, global_losses: dict[str, float]) -> None:
        """Called after each optimizer step with the global mean loss of each task."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
