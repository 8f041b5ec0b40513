"""``sum``: one backward of the weighted sum of task losses.

Cost: one backward per micro-step, and DDP's bucketed all-reduce of all trainable gradients once
per optimizer step (micro-steps before the last run under ``no_sync``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor

from .base import Batch, BackwardEngine


class SumEngine(BackwardEngine):
    def run(self, step: int, micro_batches: list[Batch], update: Callable[[], None]) -> dict[str, Tensor]:
        accum = len(micro_batches)
        totals = {task.name: torch.zeros((), device=self.dist.device) for task in self.tasks}
        for m, (x, targets) in enumerate(micro_batches):
            # Only the last micro-step lets DDP all-reduce; the others accumulate locally.
            sync = nullcontext() if m == accum - 1 else self.dist.accelerator.no_sync(self.model)
            with sync:
                losses = self.task_losses(self.model(x), targets)
                # Each piece holds the same number of samples, so averaging the per-piece means
                # over micro-steps (here) and ranks (DDP) gives the global-batch mean exactly.
                self.dist.accelerator.backward(self.weighting.combine(losses, step) / accum)
            for name, loss in losses.items():
                totals[name] += loss.detach() / accum
        update()
        return totals
