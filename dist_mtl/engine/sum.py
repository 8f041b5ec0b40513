"""``sum``: one backward of the weighted sum of task losses.

Cost: one backward per micro-step, and DDP's bucketed all-reduce of all trainable gradients once
per optimizer step (micro-steps before the last run under ``no_sync``), overlapped with backward.
When a schedule phase trains only some tasks, the unused heads would make DDP's reducer fail, so
that case runs locally and reduces the used parameters once instead: the same bytes or fewer.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from .base import Batch, BackwardEngine, Update


class SumEngine(BackwardEngine):
    def run(self, step: int, micro_batches: list[Batch], update: Update, active: list[str]) -> dict[str, Tensor]:
        accum = len(micro_batches)
        use_ddp = len(active) == len(self.tasks)
        totals = {task.name: torch.zeros((), device=self.dist.device) for task in self.tasks}
        for m, (x, targets) in enumerate(micro_batches):
            if not use_ddp:
                sync = self.local()
            else:  # only the last micro-step lets DDP all-reduce; the others accumulate locally
                sync = nullcontext() if m == accum - 1 else self.local()
            with sync:
                losses = self.task_losses(self.model(x), targets)
                # Each piece holds the same number of samples, so averaging the per-piece means
                # over micro-steps (here) and ranks (DDP) gives the global-batch mean exactly.
                objective = self.weighting.combine({name: losses[name] for name in active}, step)
                self.backward(objective / accum)
            for name, loss in losses.items():
                totals[name] += loss.detach() / accum
        if not use_ddp:
            self.reduce_grads(self.trainable(active))
        update()
        return totals
