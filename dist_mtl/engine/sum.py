"""``sum``: one backward of the weighted sum of task losses.

Cost: one backward per micro-step, and DDP's bucketed all-reduce of all trainable gradients once
per optimizer step (micro-steps before the last run under ``no_sync``), overlapped with backward.
DDP's reducer needs one forward per backward and every parameter used, so when a step has several
forwards (per-task datasets) or trains only some tasks (schedule phases, task sampling), the step
runs locally and the used parameters are reduced once instead: the same bytes or fewer, in buckets
that start during the last backward as DDP's do (``BackwardEngine.overlapped``).
"""

from __future__ import annotations

import functools
import operator
from contextlib import nullcontext

from torch import Tensor

from .base import Batch, BackwardEngine, Update


class SumEngine(BackwardEngine):
    def run(self, step: int, micro_batches: list[Batch], update: Update, active: list[str]) -> dict[str, Tensor]:
        accum = len(micro_batches)
        # GradNorm's per-task gradients of the last layer are extra autograd.grad calls on the graph
        # that DDP's reducer is watching: that step runs locally, with the same single reduction.
        use_ddp = (all(len(batch) == 1 for batch in micro_batches) and len(active) == len(self.tasks)
                   and not self.weighting.needs_task_grads)
        totals: dict[str, Tensor] = {}
        for m, batch in enumerate(micro_batches):
            if not use_ddp:
                sync = self.local()
            else:  # only the last micro-step lets DDP all-reduce; the others accumulate locally
                sync = nullcontext() if m == accum - 1 else self.local()
            with sync:
                losses = self.losses(batch)
                self.accumulate(totals, losses, accum)
                # Each piece holds the same number of samples, so averaging the per-piece means
                # over micro-steps (here) and ranks (DDP) gives the global-batch mean exactly.
                terms = self.weighted_terms({name: losses[name] for name in active}, step, accum)
                objective = functools.reduce(operator.add, terms.values())  # no `0 +` op, unlike sum()
                if use_ddp and m == accum - 1 and self.dist.distributed:
                    # DDP reduces inside backward: a non-finite loss of this rank turns the gradients
                    # NaN on every rank (poison), through a factor of exactly 1 otherwise; no host sync
                    objective = objective * self.poison_factor({name: totals[name] for name in active})
                # Local route: the last backward all-reduces its gradients bucket by bucket as it goes.
                overlap = not use_ddp and m == accum - 1
                with (self.overlapped(self.trainable(active), {name: totals[name] for name in active})
                      if overlap else nullcontext()):
                    self.backward(objective if accum == 1 else objective / accum)
        trained = {name: totals[name] for name in active}
        learned = self.weighting.parameters(active)
        if use_ddp and learned:  # learned weights are not in DDP's buckets: T numbers
            self.reduce_grads(learned, trained)
        update(trained)
        return totals
