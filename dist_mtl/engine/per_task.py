"""``per_task``: one backward per task (the user's ``l1.backward(retain_graph=True); l2.backward()``
recipe), exact under DDP, at about the cost of ``sum``.

The feature route (the default): each piece's shared features z are computed once and cut from the
encoder's graph (``SplitFeatures``). Then, task by task, its head runs on the cut copy of z and its
backward accumulates the head's gradient and z's gradient, and the head's graph is freed. Last, ONE
encoder backward carries the summed feature gradient. By linearity, sum_t J_enc^T dL_t/dz =
J_enc^T sum_t dL_t/dz: the gradients are those of ``sum`` up to float rounding. Compute: T head
backward passes and one encoder backward (``sum``: one of each). Memory: one head's graph at a time
(``sum`` holds every head's), plus z's gradient.

The full route, kept for encoders whose features the route cannot split (a model output class, an
object holding tensors): T backward passes through the whole model, the graph retained until the
last. ``route`` (and ``route_reason``) say which one ran; the trainer writes it to run.json.

Both run locally (``no_sync``); the gradients, accumulated over tasks and micro-steps, are then
averaged over ranks in ONE all-reduce: the same bytes as ``sum``. On the feature route it runs in
buckets that start during the last micro-step's last piece (its heads' and then its encoder's
backward), as DDP's do (``BackwardEngine.overlapped``); the full route reduces after its last
backward, since every one of its T passes adds to the encoder's gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor

from .base import Batch, BackwardEngine, SplitFeatures, Update


class PerTaskEngine(BackwardEngine):
    route: str | None = None
    """``features`` or ``full``: the route this model takes (None before its first step)."""
    route_reason: str | None = None
    """Why the full route runs, if it does."""

    def run(self, step: int, micro_batches: list[Batch], update: Update, active: list[str]) -> dict[str, Tensor]:
        accum = len(micro_batches)
        totals: dict[str, Tensor] = {}
        reduced = False

        def final(losses: Callable[[], dict]) -> AbstractContextManager:
            nonlocal reduced  # the reduction then happens inside the feature route's last piece
            reduced = True
            if self.sharded:  # FSDP: sync is turned on for the encoder's backward only (feature_route)
                return self._reduce_after(self.trainable(active), losses)
            return self.overlapped(self.trainable(active), losses)

        with self.local():
            for m, batch in enumerate(micro_batches):
                if self.route != "full":
                    earlier = {name: totals[name] for name in active if name in totals}
                    self.accumulate(totals, self.feature_route(step, batch, active, accum, earlier,
                                                               final if m == accum - 1 else None), accum)
                if self.route == "full":  # decided at this model's first step
                    losses = self.losses(batch)
                    terms = self.weighted_terms({name: losses[name] for name in active}, step, accum)
                    for i, name in enumerate(active):
                        last = i == len(active) - 1
                        with self.final_sync(last and m == accum - 1):  # FSDP: one reduce-scatter, here
                            self.backward(terms[name] / accum, retain_graph=not last)
                    self.accumulate(totals, losses, accum)
        trained = {name: totals[name] for name in active}
        if not reduced:
            self.reduce_grads(self.trainable(active), trained)
        update(trained)
        return totals

    @contextmanager
    def _reduce_after(self, params, losses: Callable[[], dict]) -> Iterator[None]:
        """Under FSDP: the plain tensors among ``params`` (the weighting's learned parameters)
        all-reduced after the block; FSDP reduce-scatters the model's gradients inside it."""
        yield
        self.reduce_grads(params, losses())

    def feature_route(self, step: int, batch: Batch, active: list[str], accum: int,
                      earlier: dict[str, Tensor] | None = None,
                      final: Callable[..., AbstractContextManager] | None = None) -> dict[str, Tensor]:
        """Back-propagate one micro-step piece by piece: the encoder forward, each task's head
        forward and backward in turn, one encoder backward. Returns each task's loss (detached);
        sets ``route`` to ``full`` (and returns nothing) if the first piece's features cannot be split.
        ``final`` (the last micro-step): ``overlapped``, put around the last piece's backward passes,
        with the losses behind the gradients (``earlier`` micro-steps' and this one's) for poisoning."""
        losses: dict[str, Tensor] = {}
        pieces = [(x, targets) for x, targets in batch if any(name in self.scales for name in targets)]
        for k, (x, targets) in enumerate(pieces):
            names = [name for name in targets if name in self.scales]  # tasks with labels at this step
            with self.dist.accelerator.autocast():  # the unwrapped module: the model's own autocast is not on it
                features = self.module.encode(x)
            reason = SplitFeatures.possible(features)
            if reason is not None:
                self.route, self.route_reason = "full", reason
                return {}
            self.route = "features"
            split, features = SplitFeatures(features), None
            behind = lambda: dict(enumerate([*(earlier or {}).values(), *(losses[n] for n in active if n in losses)]))
            with final(behind) if final is not None and k == len(pieces) - 1 else nullcontext():
                for name in names:
                    trains = name in active
                    with self.dist.accelerator.autocast(), torch.set_grad_enabled(trains):
                        output = self.module.heads_forward(split.detached, x, [name])[name]
                    loss = self.task_loss(name, output, targets[name])
                    losses[name] = loss.detach()
                    if trains:
                        term = self.weighted_terms({name: loss}, step, accum, via={name: split})[name]
                        self.backward(term if accum == 1 else term / accum)  # frees this head's graph
                output = loss = term = None  # they hold the cut copy of z (its storage) and a head's graph
                # FSDP: the step's last backward reduce-scatters every unit once, the heads' (accumulated
                # unsharded, sync off) in the root's end-of-backward callback.
                with self.final_sync(final is not None and k == len(pieces) - 1):
                    split.backward_encoder()
        return losses
