"""What a backward engine is: per-task losses in, synchronised gradients (and an update) out."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..aggregation import Aggregation
from ..distributed import Distributed
from ..nonfinite import all_finite
from ..tasks import Task
from ..weighting import Weighting

Piece = tuple[Tensor, dict[str, Tensor]]
"""Inputs and the targets of the tasks that read them (one dataset's share of a micro-step)."""
Batch = list[Piece]
"""One micro-step: a piece per dataset that has an active task (one piece for shared-input tasks)."""
Update = Callable[..., None]
"""Applies the current (reduced) gradients: clip, optimizer step, zero grads; or skips them if they
are non-finite. ``update(losses)`` gets this rank's losses of the tasks being updated (to name
them if the update is skipped); ``update(losses, task=name)`` marks a per-task step (the
``alternate`` engine), so the trainer can apply that task's learning rate."""


@dataclass(frozen=True)
class JacobianOptions:
    """How the ``jacobian`` engine computes and synchronises per-task gradients (``mtl.jacobian_*``)."""

    sync: str = "global"
    method: str = "auto"
    wrt: str = "params"


def conflict_stats(gram: Tensor, active: list[str], weights: Tensor | None) -> dict[str, Tensor]:
    """Per-task gradient norms, pairwise cosines (conflict) and the aggregator's effective task weights
    from a Gramian G = J J^T of per-task gradients."""
    gram = gram.double()
    norms = gram.diagonal().clamp_min(0).sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    stats = {f"grad_norm/{name}": norms[i] for i, name in enumerate(active)}
    stats.update({f"cos/{a}__{b}": cos[i, j] for i, a in enumerate(active) for j, b in enumerate(active) if i < j})
    if weights is not None:
        stats.update({f"agg_weight/{name}": weights[i] for i, name in enumerate(active)})
    return stats


def task_jacobian(terms: list[Tensor], shared: list[Tensor], batched: bool) -> Tensor:
    """The T x P matrix of each term's gradient of the ``shared`` parameters: T ``autograd.grad``
    calls (LibMTL's loop), or one vmap-batched call over the rows of I_T (torchjd's way). The graph
    is retained; ``.grad`` is not touched."""
    if batched:
        stacked = torch.stack(terms)
        grads = torch.autograd.grad(stacked, shared, grad_outputs=torch.eye(len(terms), device=stacked.device),
                                    retain_graph=True, allow_unused=True, is_grads_batched=True)
        return torch.cat([(g if g is not None else stacked.new_zeros(len(terms), *p.shape)).reshape(len(terms), -1)
                          for g, p in zip(grads, shared)], dim=1)
    rows = []
    for term in terms:
        grads = torch.autograd.grad(term, shared, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, shared)]))
    return torch.stack(rows)


class BackwardEngine:
    """Turns one optimizer step's micro-batches into synchronised gradients and applies them.

    Contract, for every engine: every rank issues the same collectives in the same order; the
    gradients equal those of the single-process computation on the global batch; ``update`` is
    called when the gradients are ready (engines that step per task call it once per task).
    """

    def __init__(self, dist: Distributed, model: nn.Module, tasks: list[Task], weighting: Weighting,
                 aggregate: Aggregation | None = None, jacobian: JacobianOptions = JacobianOptions()) -> None:
        self.dist, self.model, self.tasks, self.weighting = dist, model, tasks, weighting
        self.module = dist.accelerator.unwrap_model(model)
        self.aggregate, self.options = aggregate, jacobian
        self.by_name = {task.name: task for task in tasks}
        self.stats: dict[str, Tensor] = {}
        """Diagnostics of the last step (this rank's values; the trainer averages them over ranks)."""
        self.collect_stats = True
        """Whether ``run`` fills ``stats``; the trainer turns it on for log steps only."""
        self.scales: dict[str, float] = {}
        """This step's multiplier of each task's per-piece loss sum (``set_counts``)."""
        self.complete: set[str] | frozenset = frozenset()
        self._task_grads: dict[str, Tensor] = {}

    def set_counts(self, counts: dict[str, float], accum: int, complete: set[str] | frozenset = frozenset()) -> None:
        """This step's global count C_t of labelled elements of each task (every rank, every
        micro-step). A piece's loss is then its sum of per-element losses times world * accum / C_t:
        the engines divide by ``accum`` and DDP averages over the world, so the gradient is exactly
        that of the global-batch masked mean, whatever the number of labels on each rank and
        micro-step. A task with C_t = 0 has no loss at this step (on every rank alike)."""
        world = self.dist.world_size
        self.scales = {name: world * accum / count for name, count in counts.items() if count > 0}
        self.complete = complete
        """Tasks whose every target element is labelled: their losses need no mask."""

    def run(self, step: int, micro_batches: list[Batch], update: Update, active: list[str]) -> dict[str, Tensor]:
        """Back-propagate the ``active`` tasks for one optimizer step and call ``update``. Returns
        each task's mean loss on this rank over its micro-batches (detached)."""
        raise NotImplementedError

    @property
    def batched(self) -> bool:
        """Whether per-task gradients use one vmap-batched call (``mtl.jacobian_method``)."""
        method = self.options.method
        return method == "batched" or (method == "auto" and self.dist.device.type == "cuda")

    def probe_conflict(self, step: int, micro_batches: list[Batch], active: list[str]) -> None:
        """Opt-in diagnostics for the engines that never form per-task gradients (``log.grad_conflict``):
        T extra gradient passes and one T x shared all-reduce, at log steps only. Fills ``stats``
        with global per-task gradient norms and cosines of this step's batch, before its update."""
        shared = self.module.shared_parameters()
        jacobian = torch.zeros(len(active), sum(p.numel() for p in shared), device=self.dist.device)
        with self.local():
            for batch in micro_batches:
                losses = self.losses(batch, only=active)
                terms = self.weighting.terms(losses, step)
                jacobian += task_jacobian([terms[n] / len(micro_batches) for n in active], shared, self.batched)
        jacobian = self.dist.all_reduce_sum(jacobian) / self.dist.world_size  # diagnostics: not counted
        self.stats = conflict_stats(jacobian @ jacobian.T, active, None)

    @torch.no_grad()
    def batch_losses(self, micro_batches: list[Batch], active: list[str]) -> dict[str, Tensor]:
        """This rank's mean loss of each active task over the step's micro-batches, in eval mode and
        without a graph (FAMO measures its batch before and after the update this way)."""
        totals: dict[str, Tensor] = {}
        self.module.eval()
        for batch in micro_batches:
            with self.dist.accelerator.autocast():  # the unwrapped module: no DDP forward bookkeeping
                self.accumulate(totals, self.losses(batch, only=active, model=self.module), len(micro_batches))
        self.module.train()
        return totals

    def take_task_grads(self) -> dict[str, Tensor]:
        """Each task's gradient of the last shared layer accumulated by ``weighted_terms`` (this
        rank's mean over micro-steps), and reset."""
        grads, self._task_grads = self._task_grads, {}
        return grads

    # -- helpers shared by the engines -----------------------------------------------------------
    def weighted_terms(self, losses: dict[str, Tensor], step: int, accum: int) -> dict[str, Tensor]:
        """The weighting's terms for these losses. For GradNorm, also each task's gradient of the
        last shared layer (T backward passes through the heads and that layer only; the graph is
        retained), accumulated for ``take_task_grads``."""
        if self.weighting.needs_task_grads:
            layer = self.module.last_shared_parameters(self.weighting.args.get("layer"))
            scale = self._loss_scale()
            for name, loss in losses.items():
                grads = torch.autograd.grad(self._scaled(loss), layer, retain_graph=True, allow_unused=True)
                flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, layer)])
                flat = flat.float() / (scale * accum)
                self._task_grads[name] = self._task_grads[name] + flat if name in self._task_grads else flat
        return self.weighting.terms(losses, step)

    def losses(self, batch: Batch, only: list[str] | None = None, model: nn.Module | None = None) -> dict[str, Tensor]:
        """Each task's loss on its piece of ``batch``, scaled so that the mean over micro-steps and
        ranks is the global masked mean (``set_counts``): one forward per piece (through ``model``,
        default the DDP-wrapped one), through the heads of the tasks it carries that have labels at
        this step (restricted to ``only`` if given)."""
        model = model if model is not None else self.model
        losses = {}
        for x, targets in batch:
            names = [name for name in targets if (only is None or name in only) and name in self.scales]
            if names:
                outputs = model(x, tasks=names)
                losses.update({name: self.task_loss(name, outputs[name], targets[name]) for name in names})
        return losses

    def task_loss(self, name: str, output: Tensor, target: Tensor) -> Tensor:
        """One piece's loss of task ``name``: its labelled elements' loss sum times this step's scale."""
        return self.by_name[name].loss_sum(output, target, masked=name not in self.complete) * self.scales[name]

    @staticmethod
    def accumulate(totals: dict[str, Tensor], losses: dict[str, Tensor], accum: int) -> None:
        """Add each loss (detached) / ``accum`` to ``totals``: the mean over micro-steps."""
        for name, loss in losses.items():
            value = loss.detach() if accum == 1 else loss.detach() / accum
            totals[name] = totals[name] + value if name in totals else value

    def local(self) -> AbstractContextManager:
        """Forward and backward without DDP's reducer: DDP decides in forward what to all-reduce, so
        several backward passes on one forward either raise or silently stay local. The engines
        that back-propagate more than once work locally and reduce once with ``reduce_grads``."""
        return self.dist.accelerator.no_sync(self.model)

    def trainable(self, active: list[str]) -> list[Tensor]:
        """Encoder parameters, the heads of ``active`` tasks and the weighting's learnable
        parameters for them (uncertainty, learnable), in a fixed order."""
        return self.module.shared_parameters() + self.module.head_parameters(active) + self.weighting.parameters(active)

    def reduce_grads(self, params: list[nn.Parameter], losses: dict[str, Tensor]) -> None:
        """One coalesced all-reduce (mean over ranks) of these parameters' gradients. A parameter
        that got no gradient on this step contributes zeros so every rank sends the same layout.
        ``losses`` are this rank's losses behind them (see ``poison``)."""
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        self.poison(losses, grads)
        self.dist.all_reduce_grads_(grads)

    def must_poison(self, losses: dict[str, Tensor]) -> bool:
        """Whether this rank must make its share of the next reduction NaN: one of its own
        ``losses`` is non-finite, and other ranks will only learn it through the reduced values, so
        that every rank skips or stops together (``train.on_nonfinite``). A loss can be infinite
        while its gradient is finite, so the gradient alone would not tell. One host sync on
        several processes; nothing on one, where the guard sees the losses themselves."""
        return self.dist.distributed and not all_finite(list(losses.values()))

    @staticmethod
    def poison_factor(losses: dict[str, Tensor]) -> Tensor:
        """1 if every one of this rank's ``losses`` is finite, else NaN, as a tensor and without a
        host sync: an objective multiplied by it back-propagates bitwise the same gradients, or NaN
        ones that a reduction inside backward (DDP's) carries to every rank (see ``must_poison``).
        The sum of the losses is non-finite iff one is, short of a total beyond 3e38."""
        witness = functools.reduce(operator.add, (loss.detach() for loss in losses.values()))
        return witness * 0 + 1

    def poison(self, losses: dict[str, Tensor], tensors: list[Tensor]) -> None:
        """Before a reduction: fill ``tensors`` (this rank's share) with NaN if ``must_poison``."""
        if self.must_poison(losses):
            for t in tensors:
                t.fill_(float("nan"))

    def backward(self, loss: Tensor, **kwargs) -> None:
        """``loss.backward`` through Accelerate, which applies the fp16 loss scale when there is one."""
        self.dist.accelerator.backward(loss, **kwargs)

    def _scaled(self, loss: Tensor) -> Tensor:
        """The loss times the fp16 loss scale, through the scaler (which also initialises it)."""
        scaler = self.dist.accelerator.scaler
        return scaler.scale(loss) if scaler is not None and scaler.is_enabled() else loss

    def _loss_scale(self) -> float:
        scaler = self.dist.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
