"""``jacobian`` with ``jacobian_wrt: features``: task weights from gradients of the encoder OUTPUT.

The cheaper route of MGDA-UB (Sener & Koltun 2018): instead of T backward passes through the encoder,
take each task's gradient with respect to the shared representation Z (one vmap-batched call through
the heads only), form their Gramian G = J_Z J_Z^T, let a Gramian-based aggregator turn G into task
weights w, and run ONE backward of sum_t w_t L_t through the encoder. It approximates aggregating
parameter gradients (the exact ``jacobian_wrt: params``), and is far cheaper for deep encoders.

Exact across ranks: the rows of the global J_Z concatenate every rank's samples, so the global
Gramian is the sum of the ranks' Gramians. Each rank's local gradients are ``world`` times the
global per-sample ones (local means over fewer samples), hence G = sum_r G_r / world^2. Only T x T
numbers are all-reduced for the weights, then the gradients once, as ``sum`` does (in buckets that
start during the final backward passes, ``BackwardEngine.overlapped``).

Gradient accumulation keeps every micro-step's graph until the weights are known (they depend on
all micro-steps): memory grows with ``grad_accum``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from ..errors import UsageError
from ..nonfinite import all_finite
from .base import Batch, BackwardEngine, Update, conflict_stats


class FeatureJacobianEngine(BackwardEngine):
    def run(self, step: int, micro_batches: list[Batch], update: Update, active: list[str]) -> dict[str, Tensor]:
        accum, index = len(micro_batches), {name: i for i, name in enumerate(active)}
        gram = torch.zeros(len(active), len(active), dtype=torch.float64, device=self.dist.device)
        retained: list[dict[str, Tensor]] = []
        totals: dict[str, Tensor] = {}
        for batch in micro_batches:
            terms: dict[str, Tensor] = {}
            for x, targets in batch:
                with self.dist.accelerator.autocast():
                    features = self.module.encode(x)
                    carried = [n for n in targets if n in self.scales]  # tasks with labels at this step
                    names = [n for n in carried if n in index]
                    if not isinstance(features, Tensor):
                        raise UsageError("mtl.jacobian_wrt: features needs an encoder that returns one tensor of "
                                         f"shared features, not a {type(features).__name__}; use jacobian_wrt: params")
                    with self.eager():  # the heads' graph is vmapped below; the encoder stays compiled
                        outputs = self.module.heads_forward(features, x, carried)
                losses = {n: self.task_loss(n, outputs[n], targets[n]) for n in carried}
                self.accumulate(totals, losses, accum)
                if not names:
                    continue
                piece_terms = self.weighted_terms({n: losses[n] for n in names}, step, accum)
                stacked = torch.stack([piece_terms[n] / accum for n in names])
                (grads,) = torch.autograd.grad(stacked, features, grad_outputs=torch.eye(len(names), device=x.device),
                                               retain_graph=True, is_grads_batched=True)
                rows = grads.reshape(len(names), -1).double()
                where = torch.tensor([index[n] for n in names], device=gram.device)
                gram[where[:, None], where[None, :]] += rows @ rows.T  # tasks on other pieces: 0
                terms.update({n: piece_terms[n] / accum for n in names})
            retained.append(terms)

        trained = {name: totals[name] for name in active}
        self.poison(trained, [gram])
        self.dist.all_reduce_grads_([gram])  # the mean over ranks ...
        gram /= self.dist.world_size  # ... divided by world is sum_r G_r / world^2, the global Gramian
        if all_finite([gram, *trained.values()]):  # the same answer on every rank
            weights = self.aggregate.weights_from_gramian(gram.float(), step).to(gram.device)
        else:  # the update will be skipped or stop the run: keep the aggregator out of it
            weights = gram.new_full((len(active),), float("nan"), dtype=torch.float32)
        shared = self.module.shared_parameters()
        heads = self.module.head_parameters(active) + self.weighting.parameters(active)  # + learned weights
        for m, terms in enumerate(retained):
            last = m == len(retained) - 1
            weighted = sum(weights[index[n]] * t for n, t in terms.items())
            # Each head follows its own task's loss; the encoder follows the weighted objective. The
            # last micro-step's passes all-reduce the gradients bucket by bucket as they go: heads
            # first, as their buckets come first (reverse parameter order).
            with self.overlapped(self.trainable(active), trained) if last else nullcontext():
                self.backward(sum(terms.values()), inputs=heads, retain_graph=True)
                self.backward(weighted, inputs=shared, retain_graph=not last)
        if self.collect_stats:
            self.stats = conflict_stats(gram, active, weights)
        update(trained)
        return totals
