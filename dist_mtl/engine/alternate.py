"""``alternate``: for each task in turn, a fresh forward, a backward and an optimizer step.

This is the working form of "separate backward and separate step per task". The naive form,
``l1.backward(retain_graph=True); opt.step(); l2.backward(); opt.step()``, cannot work: the first
step modifies in place the parameters that the retained graph saved, and autograd refuses the second
backward. Here every task step has its own forward on the updated parameters.

Only the encoder and the current task's head receive gradients, so the other heads keep
``grad=None`` and AdamW or momentum leave them untouched. Communication: one coalesced all-reduce
per task step of (encoder + that head), T per optimizer step; it cannot be fewer, because each task
step needs synchronised gradients before its update. Each starts during the task step's last
backward, in buckets (``BackwardEngine.overlapped``).
"""

from __future__ import annotations

from contextlib import nullcontext

from torch import Tensor

from .base import Batch, BackwardEngine, Update


class AlternateEngine(BackwardEngine):
    def run(self, step: int, micro_batches: list[Batch], update: Update, active: list[str]) -> dict[str, Tensor]:
        accum = len(micro_batches)
        totals: dict[str, Tensor] = {}
        for name in active:
            with self.local():
                for m, batch in enumerate(micro_batches):
                    losses = self.losses(batch, only=[name])
                    self.accumulate(totals, losses, accum)  # the task's loss before its own update
                    term = self.weighted_terms(losses, step, accum)[name] / accum
                    # The last micro-step's backward all-reduces (encoder + head) bucket by bucket.
                    with (self.overlapped(self.trainable([name]), {name: totals[name]})
                          if m == accum - 1 else nullcontext()):
                        self.backward(term)
            update({name: totals[name]}, task=name)
        return totals
