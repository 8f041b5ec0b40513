"""``jacobian`` under FSDP2 (``train.parallel: fsdp``): per-task gradients that stay sharded.

Under FSDP no rank holds a whole parameter, and ``autograd.grad`` with respect to a sharded
parameter either fails or returns the local, unreduced gradient. So each task's gradient comes from
FSDP's own reduction instead: per micro-step, one backward per task (the graph retained until the
last), each reduce-scattered by FSDP, leaves in every shared parameter's ``.grad`` this rank's shard
of that task's GLOBAL gradient (the mean over ranks). Row t of this rank's shard R_r of J is
copied out and the gradient cleared before the next task. Then:

- The T x T Gramian G = J J^T is the sum over ranks of R_r R_r^T, because the shards partition
  the parameters: one all-reduce of T^2 numbers.
- A Gramian-based aggregator turns G into task weights w (``Aggregation.weights_from_gramian``;
  ``mean`` and ``sum`` have fixed weights), identically on every rank.
- Each rank writes its shard of the combined gradient, sum_t w_t R_r[t], into ``.grad``.

Exact: the aggregated update is that of one process on the global batch, for every aggregator whose
weights depend on the Gramian only (``SHARDED_AGGREGATORS``). The others (Nash-MTL, ConFIG,
GradDrop) need J itself; they are refused under FSDP rather than gathered (gathering T x P would
undo the sharding).

Cost per optimizer step, against ``sum`` under FSDP: T backward passes per micro-step instead of one,
each with its all-gather of the encoder (the graph is retained, the parameters resharded after each
pass) and its reduce-scatter: ``grad_accum`` x T reduce-scatters of the encoder (per-task gradients
cannot be accumulated unreduced: FSDP's unsharded gradient buffer mixes the tasks), plus the heads
once each and T^2 numbers. Memory: T x (encoder parameters / N) for the rows, instead of DDP's
T x encoder. Heads get their own task's gradient from the same passes (as in ``sum``).

Non-finite losses: a rank with a non-finite loss fills its Gramian share with NaN, so every rank's
reduced Gramian is NaN, no rank calls the aggregator, and every rank's guard skips the update.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..aggregation import GRAMIAN_AGGREGATORS
from ..errors import ConfigError
from ..nonfinite import all_finite
from ..sharding import local, no_sync, sync
from .base import Batch, BackwardEngine, Update, conflict_stats

SHARDED_AGGREGATORS = ("mean", "sum", *GRAMIAN_AGGREGATORS)  # mean and sum: fixed weights
"""Aggregators usable with ``jacobian`` under FSDP: their task weights depend on J J^T only."""


def check_sharded_jacobian(aggregator: str | None, sync: str, wrt: str) -> None:
    """Raise a ConfigError if ``mtl.backward: jacobian`` with these options cannot run exactly
    under ``train.parallel: fsdp`` (see the module docstring for why)."""
    if wrt != "params":
        raise ConfigError("mtl.jacobian_wrt", f"{wrt!r} is not supported with train.parallel=fsdp; use params (the "
                          "per-task gradients are then reduce-scattered, see docs/fsdp.md)")
    if sync != "global":
        raise ConfigError("mtl.jacobian_sync", f"{sync!r} is not supported with train.parallel=fsdp: FSDP reduces "
                          "each task's gradient as it is computed, so aggregation is always global; use global")
    if aggregator is not None and aggregator not in SHARDED_AGGREGATORS:
        raise ConfigError("mtl.aggregator", f"{aggregator!r} needs the whole Jacobian, which no rank holds under "
                          f"train.parallel=fsdp; use one of {', '.join(SHARDED_AGGREGATORS)}, or train.parallel=ddp")


class ShardedJacobianEngine(BackwardEngine):
    def run(self, step: int, micro_batches: list[Batch], update: Update, active: list[str]) -> dict[str, Tensor]:
        accum, tasks = len(micro_batches), len(active)
        shared = self.module.shared_parameters()
        learned = self.weighting.parameters(active)  # plain tensors outside FSDP: reduced by us
        sizes = [local(p).numel() for p in shared]  # this rank's shard of each parameter
        rows = torch.zeros(tasks, sum(sizes), dtype=torch.float32, device=self.dist.device)
        totals: dict[str, Tensor] = {}
        for m, batch in enumerate(micro_batches):
            losses = self.losses(batch)
            self.accumulate(totals, losses, accum)
            with no_sync(self.module):  # GradNorm's autograd.grad passes must not reduce-scatter anything
                terms = self.weighted_terms({name: losses[name] for name in active}, step, accum)
            for t, name in enumerate(active):
                # Sync on for every pass: FSDP's unsharded gradient buffer would mix the tasks. After it,
                # the shared grads hold this rank's shard of this task's global gradient.
                with sync(self.module):
                    self.backward(terms[name] / accum, retain_graph=t < tasks - 1)
                last = m == accum - 1 and t == tasks - 1  # its grads stay, to take the combination
                offset = 0
                with torch.no_grad():
                    for p, size in zip(shared, sizes):
                        if p.grad is not None:
                            rows[t, offset:offset + size] += local(p.grad).reshape(-1).float()
                            if not last:
                                p.grad = None  # the next pass starts from nothing
                        offset += size
        trained = {name: totals[name] for name in active}
        gram = rows.double() @ rows.double().T  # this rank's share: its shards' products
        self.poison(trained, [gram])
        self.dist.all_reduce_sum(gram)  # T^2 numbers: the global Gramian (shards partition J's columns)
        if learned:  # uncertainty's log-variances, learnable weights: the same on every rank
            self.reduce_grads(learned, trained)
        if all_finite([gram]):  # the same answer on every rank
            weights = self.task_weights(gram.float(), step).to(rows.device)
        else:  # the update will be skipped or stop the run: keep the aggregator out of it
            weights = rows.new_full((tasks,), float("nan"))
        combined = weights @ rows
        with torch.no_grad():
            offset = 0
            for p, size in zip(shared, sizes):
                part = combined[offset:offset + size]
                if p.grad is None:  # no task reached it at the last pass: build it from the shard
                    p.grad = torch.zeros_like(p)
                local(p.grad).copy_(part.view_as(local(p.grad)).to(local(p.grad).dtype))
                offset += size
        if self.collect_stats:
            self.stats = conflict_stats(gram, active, weights)
        update(trained)
        return totals

    def task_weights(self, gram: Tensor, step: int) -> Tensor:
        """The aggregator's task weights from the global Gramian (``mean``: 1/T, ``sum``: 1)."""
        name = self.aggregate.name
        if name in ("mean", "sum"):
            weights = gram.new_full((len(gram),), 1.0 / len(gram) if name == "mean" else 1.0)
            self.aggregate.last_weights = weights
            return weights
        return self.aggregate.weights_from_gramian(gram, step)
