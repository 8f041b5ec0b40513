"""``per_task``: one forward, then one backward per task (the user's ``l1.backward(retain_graph=True);
l2.backward()`` recipe), exact under DDP.

Everything runs locally (``no_sync``); the gradients, accumulated over tasks and micro-steps, are
then averaged over ranks in ONE coalesced all-reduce: the same bytes as ``sum``. Compute: T
backward passes through the shared encoder instead of one, and the graph is retained until the last.
"""

from __future__ import annotations

from torch import Tensor

from .base import Batch, BackwardEngine, Update


class PerTaskEngine(BackwardEngine):
    def run(self, step: int, micro_batches: list[Batch], update: Update, active: list[str]) -> dict[str, Tensor]:
        accum = len(micro_batches)
        totals: dict[str, Tensor] = {}
        with self.local():
            for batch in micro_batches:
                losses = self.losses(batch)
                terms = self.weighted_terms({name: losses[name] for name in active}, step, accum)
                for i, name in enumerate(active):
                    self.backward(terms[name] / accum, retain_graph=i < len(active) - 1)
                self.accumulate(totals, losses, accum)
        trained = {name: totals[name] for name in active}
        self.reduce_grads(self.trainable(active), trained)
        update(trained)
        return totals
