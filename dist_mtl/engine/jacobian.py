"""``jacobian``: per-task gradients of the shared parameters, combined by an aggregator.

Per micro-step, each active task's gradient of the shared (encoder) parameters is computed with
``autograd.grad`` and added to a T x P matrix J; the heads get their gradients from one backward of
the summed objective restricted to head parameters. All of it runs locally. Then:

- ``jacobian_sync: global``: J and the head gradients are averaged over ranks (T x shared + heads
  bytes), and every rank aggregates the same global J: N processes give the result of one process
  on the global batch, for any aggregator. On the last micro-step the rows are reduced in buckets
  that start as soon as they are computed, while the next rows and the heads' backward run
  (``BackwardEngine.overlapped``; one collective when everything fits in one bucket).
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

import functools

import torch
from torch import Tensor

from ..nonfinite import all_finite
from .base import Batch, BackwardEngine, Update, conflict_stats, jacobian_rows, task_jacobian


class JacobianEngine(BackwardEngine):
    def run(self, step: int, micro_batches: list[Batch], update: Update, active: list[str]) -> dict[str, Tensor]:
        accum = len(micro_batches)
        shared = self.module.shared_parameters()
        heads = self.module.head_parameters(active) + self.weighting.parameters(active)  # + learned weights
        jacobian: Tensor | None = None  # T x P; the first micro-step's matrix is used as is (no extra pass)
        totals: dict[str, Tensor] = {}
        overlap = self.options.sync == "global"
        with self.local():
            for m, batch in enumerate(micro_batches):
                with self.eager(self.batched):
                    losses = self.losses(batch)
                self.accumulate(totals, losses, accum)
                terms = self.weighted_terms({name: losses[name] for name in active}, step, accum)
                rows = [self._scaled(terms[name] / accum) for name in active]
                heads_objective = self._scaled(sum(terms.values()) / accum)
                if overlap and m == accum - 1:
                    jacobian = self._last_rows(rows, heads_objective, jacobian, shared, heads,
                                               {name: totals[name] for name in active})
                    continue
                rows = task_jacobian(rows, shared, self.batched)
                jacobian = rows if jacobian is None else jacobian.add_(rows)
                torch.autograd.backward(heads_objective, inputs=heads)

        scale = self._loss_scale()
        head_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in heads]
        trained = {name: totals[name] for name in active}
        if not overlap:  # local sync: this rank's share of the reduction below (global: done in _last_rows)
            self.poison(trained, [jacobian, *head_grads])
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

    def _last_rows(self, terms: list[Tensor], heads_objective: Tensor, jacobian: Tensor | None, shared: list[Tensor],
                   heads: list[Tensor], trained: dict[str, Tensor]) -> Tensor:
        """The last micro-step under global sync: J's rows and the head gradients, averaged over
        ranks in buckets that start while the rest is computed (row t's all-reduce runs during the
        gradient passes of rows t+1.., the last rows' during the heads' backward). Same bytes and
        values as one collective of (J, head gradients) after them."""
        first = jacobian is None
        if self.batched:  # one call gives every row: they can only overlap the heads' backward
            rows = task_jacobian(terms, shared, True)
            jacobian = rows if first else jacobian.add_(rows)
        elif first:
            dtype = functools.reduce(torch.promote_types, [p.dtype for p in shared])
            jacobian = torch.empty(len(terms), sum(p.numel() for p in shared), dtype=dtype, device=self.dist.device)
        with self.overlapped(heads, trained, tensors=list(jacobian)) as reduce:
            if self.batched:
                for t in range(len(terms)):
                    reduce.mark_ready(t)
            else:
                for t, row in enumerate(jacobian_rows(terms, shared)):
                    jacobian[t].copy_(row) if first else jacobian[t].add_(row)
                    reduce.mark_ready(t)
            torch.autograd.backward(heads_objective, inputs=heads)
        return jacobian
