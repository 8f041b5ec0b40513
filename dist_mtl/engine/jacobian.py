"""``jacobian``: per-task gradients of the shared parameters, combined by an aggregator.

Per micro-step, each active task's gradient of the shared (encoder) parameters is computed with
``autograd.grad`` and added to a T x P matrix J; the heads get their gradients from one backward of
the summed objective restricted to head parameters. All of it runs locally. Then:

- ``jacobian_sync: global``: J and the head gradients are averaged over ranks in ONE collective
  (T x shared + heads bytes), and every rank aggregates the same global J: N processes give the
  result of one process on the global batch, for any aggregator.
- ``jacobian_sync: local``: each rank aggregates its own J, and the aggregated shared gradient and
  the head gradients are averaged in one collective (shared + heads bytes, as ``sum``). Exact only
  for linear aggregators (mean, sum); for the others it is a cheaper approximation.

Accumulating J over micro-steps before aggregating makes ``grad_accum`` equivalent to one big batch.
The aggregator runs under an RNG seeded by (seed, step) (see ``aggregation.Aggregation``), so
random methods draw the same on every rank.
Under fp16 the per-task gradients come from the scaled loss: J is unscaled once after the
reduction, and the aggregated gradient is handed back scaled so the optimizer's scaler unscales it
and detects inf/nan (identically on every rank, since every rank holds the same reduced values).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nonfinite import all_finite
from .base import Batch, BackwardEngine, Update, conflict_stats, task_jacobian


class JacobianEngine(BackwardEngine):
    def run(self, step: int, micro_batches: list[Batch], update: Update, active: list[str]) -> dict[str, Tensor]:
        accum = len(micro_batches)
        shared = self.module.shared_parameters()
        heads = self.module.head_parameters(active) + self.weighting.parameters(active)  # + learned weights
        jacobian: Tensor | None = None  # T x P; the first micro-step's matrix is used as is (no extra pass)
        totals: dict[str, Tensor] = {}
        with self.local():
            for batch in micro_batches:
                with self.eager(self.batched):
                    losses = self.losses(batch)
                terms = self.weighted_terms({name: losses[name] for name in active}, step, accum)
                rows = task_jacobian([self._scaled(terms[name] / accum) for name in active], shared, self.batched)
                jacobian = rows if jacobian is None else jacobian.add_(rows)
                torch.autograd.backward(self._scaled(sum(terms.values()) / accum), inputs=heads)
                self.accumulate(totals, losses, accum)

        scale = self._loss_scale()
        head_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in heads]
        trained = {name: totals[name] for name in active}
        self.poison(trained, [jacobian, *head_grads])
        if self.options.sync == "global":
            self.dist.all_reduce_grads_([jacobian, *head_grads])
        if scale != 1.0:  # fp16: unscale once after the reduction (each pass costs T x P memory traffic)
            jacobian /= scale
        if all_finite([jacobian, *trained.values()]):  # the same answer on every rank (global sync)
            combined = self.aggregate(jacobian, step)
        else:  # the update will be skipped or stop the run: keep the aggregator's state out of it
            combined = jacobian.new_full((jacobian.shape[1],), float("nan"))
        if scale != 1.0:
            combined = combined * scale
        if self.options.sync != "global":
            self.dist.all_reduce_grads_([combined, *head_grads])
        # T^2 P flops, cheap next to T backward passes; local sync gives this rank's values
        if self.collect_stats:
            self.stats = conflict_stats(jacobian @ jacobian.T, active, self.aggregate.last_weights)
        for p, g in zip(heads, head_grads):
            p.grad = g
        offset = 0
        for p in shared:
            p.grad = combined[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        update(trained)
        return totals
