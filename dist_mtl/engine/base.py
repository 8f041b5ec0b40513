"""What a backward engine is: per-task losses in, synchronised gradients (and an update) out."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..aggregation import Aggregation
from ..distributed import Distributed
from ..nonfinite import all_finite
from ..overlap import BUCKET_BYTES, OverlappedReduce
from ..sharding import is_dtensor, is_sharded, no_sync, sync, unsharded
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
    return torch.stack(list(jacobian_rows(terms, shared)))


def jacobian_rows(terms: list[Tensor], shared: list[Tensor]) -> Iterator[Tensor]:
    """The rows of ``task_jacobian``'s loop, one ``autograd.grad`` call each, as they are computed."""
    for term in terms:
        grads = torch.autograd.grad(term, shared, retain_graph=True, allow_unused=True)
        yield torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, shared)])


class _Unarmed:
    """What ``overlapped`` yields when overlap is off: nothing to mark."""

    def mark_ready(self, k: int) -> None:
        pass


class SplitFeatures:
    """Shared features cut from the encoder's graph: the heads run on ``detached`` (a copy of the
    features whose tensors are new leaves), so each task's backward stops at the features, and
    ``backward_encoder`` then runs the encoder's backward ONCE with the summed feature gradient.
    By linearity, sum_t J_enc^T dL_t/dz = J_enc^T sum_t dL_t/dz: the encoder's gradient is that of
    the summed objective up to float rounding, for one encoder backward instead of T."""

    def __init__(self, features: Any) -> None:
        self.originals: list[Tensor] = []
        self.leaves: list[Tensor] = []

        def cut(value):
            if isinstance(value, Tensor) and value.requires_grad:
                leaf = value.detach().requires_grad_()
                self.originals.append(value)
                self.leaves.append(leaf)
                return leaf
            return value

        self.detached = _map_plain(features, cut)

    @staticmethod
    def possible(features: Any) -> str | None:
        """None if ``features`` can be split: tensors (or other values) in plain dicts, lists and
        tuples; else why not (a container type the heads may rely on, such as a model output class)."""
        if type(features) in (dict, list, tuple):
            for value in (features.values() if isinstance(features, dict) else features):
                reason = SplitFeatures.possible(value)
                if reason is not None:
                    return reason
            return None
        if isinstance(features, (Tensor, int, float, bool, str)) or features is None:
            return None
        return (f"the encoder's features hold a {type(features).__name__}; the feature route splits tensors "
                "in plain dicts, lists and tuples only")

    def vjp(self, loss: Tensor, params: list[Tensor]) -> list[Tensor | None]:
        """``loss``'s gradient of ``params`` through the features (the graph is retained)."""
        grads = torch.autograd.grad(loss, self.leaves, retain_graph=True, allow_unused=True)
        pairs = [(o, g) for o, g in zip(self.originals, grads) if g is not None]
        if not pairs:
            return [None] * len(params)
        return list(torch.autograd.grad([o for o, _ in pairs], params, grad_outputs=[g for _, g in pairs],
                                        retain_graph=True, allow_unused=True))

    def backward_encoder(self) -> None:
        """The encoder's one backward, with the feature gradients the heads accumulated (already
        loss-scaled under fp16: they came from scaled losses). The leaves' gradients are freed."""
        pending: dict[Any, dict[int, Tensor]] = {}  # node -> the real gradients of its outputs
        roots, seeds = [], []
        for o, leaf in zip(self.originals, self.leaves):
            if leaf.grad is None:
                continue
            if o.grad_fn is None:  # a leaf of the encoder: no node to hand the gradient to
                roots.append(o), seeds.append(leaf.grad)
            else:
                slots = pending.setdefault(o.grad_fn, {})
                slots[o.output_nr] = slots[o.output_nr] + leaf.grad if o.output_nr in slots else leaf.grad
                # The backward is rooted at o.sum() * 0, whose backward is a free expand; the node's
                # pre-hook swaps the real gradient in. Neither o nor its gradient is then held by this
                # frame, so both are freed as soon as the encoder's backward is done with them, as in
                # ``sum``'s backward. (Passing o and its gradient to backward holds both to the end:
                # + 2 x z's size at the peak.)
                # The root adds exactly 0 to o's gradient, so a feature that also feeds another
                # feature (a pyramid's stages) keeps the gradient that reaches it through that one.
                roots.append(o.sum() * 0.0), seeds.append(None)
            leaf.grad = None
        self.originals, self.leaves, self.detached = [], [], None  # the cut copy shares z's storage
        slots = o = leaf = None  # no reference of this frame may keep a gradient or z alive
        if not roots:
            return

        def swap(node):
            def hook(grad_outputs):
                real = pending.pop(node)
                return tuple(g if i not in real else real[i] if _stand_in(g) else g + real[i]
                             for i, g in enumerate(grad_outputs))
            return hook

        handles = [node.register_prehook(swap(node)) for node in pending]
        try:
            torch.autograd.backward(roots, grad_tensors=seeds)
        finally:
            for handle in handles:
                handle.remove()


def _stand_in(grad: Tensor | None) -> bool:
    """Whether a gradient is still the root's expanded zero (nothing else reached that output)."""
    return grad is not None and grad.dim() > 0 and all(stride == 0 for stride in grad.stride())


def _map_plain(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` on every value inside plain dicts, lists and tuples, the containers rebuilt."""
    if type(obj) is dict:
        return {k: _map_plain(v, fn) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_map_plain(v, fn) for v in obj)
    return fn(obj)


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
        self.overlap = True
        """Whether ``overlapped`` starts the all-reduce during backward; False: one collective after
        it, as ``reduce_grads`` (the reference of the tests and benchmarks)."""
        self.bucket_bytes = BUCKET_BYTES
        """Bucket size of the all-reduces overlapped with backward (``overlapped``)."""
        self.overlap_counts = {"buckets": 0, "in_backward": 0, "early": 0}
        """Buckets all-reduced by ``overlapped`` so far; how many of them left during a backward pass
        (from a hook), and before the block's end (from a hook or ``mark_ready``)."""
        self.sharded = is_sharded(self.module)
        """FSDP2 (``train.parallel: fsdp``): the model's gradients are reduce-scattered by FSDP in
        the update's last backward pass (``final_sync``), not all-reduced by the engine; only the
        plain tensors outside the model (the weighting's learned parameters) are."""

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

    def eager(self, vmapped: bool = True) -> AbstractContextManager:
        """Forwards whose graph a vmap-batched ``autograd.grad`` (``is_grads_batched``) will go
        through run eagerly, even with ``train.compile``: inductor's compiled backward kernels take
        real tensors, not vmap's batched ones ("Cannot access data pointer of Tensor that doesn't
        have storage"). ``vmapped``: whether this forward's graph will be vmapped (default: yes).
        Costs nothing when nothing is compiled."""
        return torch.compiler.set_stance("force_eager") if vmapped else nullcontext()

    def probe_conflict(self, step: int, micro_batches: list[Batch], active: list[str]) -> None:
        """Opt-in diagnostics for the engines that never form per-task gradients (``log.grad_conflict``):
        T extra gradient passes and one T x shared all-reduce, at log steps only. Fills ``stats``
        with global per-task gradient norms and cosines of this step's batch, before its update."""
        shared = self.module.shared_parameters()
        jacobian = torch.zeros(len(active), sum(p.numel() for p in shared), device=self.dist.device)
        with self.local():
            for batch in micro_batches:
                with self.eager(self.batched):
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
    def weighted_terms(self, losses: dict[str, Tensor], step: int, accum: int,
                       via: dict[str, "SplitFeatures"] | None = None) -> dict[str, Tensor]:
        """The weighting's terms for these losses. For GradNorm, also each task's gradient of the
        last shared layer (T backward passes through the heads and that layer only; the graph is
        retained), accumulated for ``take_task_grads``. ``via``: for losses computed on detached
        features (``per_task``'s feature route), each task's split, through which the layer is
        reached in two hops: the loss's gradient of the detached features, then the features'
        vector-Jacobian product with the layer."""
        if self.weighting.needs_task_grads:
            layer = self.module.last_shared_parameters(self.weighting.args.get("layer"))
            if self.sharded:  # the graph's unsharded weight: local gradients, averaged by TrainStep
                layer = unsharded(self.module, layer)
            scale = self._loss_scale()
            for name, loss in losses.items():
                if via is not None:
                    grads = via[name].vjp(self._scaled(loss), layer)
                else:
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
        if self.sharded:  # FSDP2's no_sync: gradients accumulate unsharded until a pass with sync on
            return no_sync(self.module)
        return self.dist.accelerator.no_sync(self.model)

    def final_sync(self, final: bool = True) -> AbstractContextManager:
        """Under FSDP, around the update's LAST backward pass (``final``): gradient sync on, so that
        every unit reduce-scatters what it accumulated, once (in its post-backward hook, or in the
        root's end-of-backward callback for the units this pass does not reach). Elsewhere, and
        under DDP, nothing."""
        return sync(self.module, True) if self.sharded and final else nullcontext()

    def trainable(self, active: list[str]) -> list[Tensor]:
        """Encoder parameters, the heads of ``active`` tasks and the weighting's learnable
        parameters for them (uncertainty, learnable), in a fixed order."""
        return self.module.shared_parameters() + self.module.head_parameters(active) + self.weighting.parameters(active)

    def reduce_grads(self, params: Sequence[Tensor], losses: dict[str, Tensor], tensors: Sequence[Tensor] = ()) -> None:
        """One coalesced all-reduce (mean over ranks) of ``tensors`` and these parameters'
        gradients, in place. A parameter that got no gradient on this step contributes zeros so
        every rank sends the same layout. ``losses`` are this rank's losses behind them (see ``poison``)."""
        if self.sharded:  # FSDP reduce-scattered the model's gradients in backward (final_sync)
            params = [p for p in params if not is_dtensor(p)]
            if not params and not tensors:
                return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        self.poison(losses, [*tensors, *grads])
        self.dist.all_reduce_grads_([*tensors, *grads])

    @contextmanager
    def overlapped(self, params: Sequence[Tensor], losses: dict[str, Tensor] | Callable[[], dict[str, Tensor]],
                   tensors: Sequence[Tensor] = ()) -> Iterator[OverlappedReduce]:
        """``reduce_grads(params, losses)``, overlapped with the backward passes inside the block:
        put around the pass(es) that give each of ``params`` its FINAL gradient for this update
        (the last micro-step's), and nothing else. Each bucket of gradients (reverse parameter
        order, ``bucket_bytes``) starts its all-reduce as soon as backward has produced it; the
        rest is reduced, and every mean is in ``.grad``, when the block exits. ``tensors`` are
        averaged in place too, each once it is marked with ``mark_ready`` on the yielded object.
        Same bytes and values as ``reduce_grads``; on one process it only fills missing grads with
        zeros. ``losses`` decide the NaN poisoning (``must_poison``): before backward, or, given
        as a function, when the block exits (some losses are computed inside it; the last bucket
        then waits for the exit, see ``OverlappedReduce``)."""
        if self.sharded:  # FSDP reduce-scatters the model's gradients in this block's backward
            with self.final_sync():
                yield _Unarmed()
            self.reduce_grads(params, losses() if callable(losses) else losses, tensors)
            return
        if not self.overlap:  # the reference: one collective after the block
            yield _Unarmed()
            self.reduce_grads(params, losses() if callable(losses) else losses, tensors)
            return
        poison = (lambda: self.must_poison(losses())) if callable(losses) else self.must_poison(losses)
        reduce = OverlappedReduce(self.dist, params, tensors, self.bucket_bytes, poison=poison)
        with reduce.armed():
            yield reduce
        reduce.finish()
        self.overlap_counts["buckets"] += len(reduce.launched)
        self.overlap_counts["in_backward"] += reduce.launched_in_backward
        self.overlap_counts["early"] += reduce.launched_early

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
        """``loss.backward``, through Accelerate when it has an fp16 loss scaler to apply (without
        one its ``backward`` only adds bookkeeping: about 6 us a call, T calls a step in ``per_task``)."""
        if self.dist.accelerator.scaler is not None:
            self.dist.accelerator.backward(loss, **kwargs)
        else:
            loss.backward(**kwargs)

    def _scaled(self, loss: Tensor) -> Tensor:
        """The loss times the fp16 loss scale, through the scaler (which also initialises it)."""
        scaler = self.dist.accelerator.scaler
        return scaler.scale(loss) if scaler is not None and scaler.is_enabled() else loss

    def _loss_scale(self) -> float:
        scaler = self.dist.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
