"""Tasks: a name, the batch key of its target, a loss that returns per-element losses, metrics.

A task's loss on the global batch is the sum of its per-element losses over the *labelled*
elements, divided by their global count (every rank, every micro-step). A missing label is NaN in a
float target and -100 (PyTorch's ``ignore_index``) in an integer one; a task may also name a mask
key. So partially labelled data, and token- or pixel-level targets with padding, give the same
gradients on N processes as on one (the engines scale each piece's sum by ``world * accum / C_t``).

Metrics are reduced the same way: each is the mean of per-element values over the labelled
elements, from globally all-reduced sums and counts (no sample counted twice or dropped).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UsageError, did_you_mean

IGNORE_INDEX = -100
"""A missing label in an integer target (PyTorch's ``ignore_index``)."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(output, target) -> per-element losses`` of the target's shape (``reduction="none"``)."""


# ---------------------------------------------------------------------------------------------
# losses: per-element, class dimension 1 (PyTorch's convention) or last


def _class_dim_first(output: Tensor, target: Tensor) -> Tensor:
    """Logits with the class dimension at 1, as ``F.cross_entropy`` wants: (B, C, ...) is kept;
    (B, ..., C) for a (B, ...) target (token classification) is moved."""
    if output.dim() == target.dim() + 1 and output.shape[2:] == target.shape[1:]:
        return output  # (B, C, d1, ...) against (B, d1, ...)
    if output.dim() == target.dim() + 1 and output.shape[:-1] == target.shape:
        return output.movedim(-1, 1)
    raise UsageError(f"logits of shape {tuple(output.shape)} do not fit class targets of shape "
                     f"{tuple(target.shape)}: expected (B, C, ...) or (B, ..., C)")


def _same_shape(output: Tensor, target: Tensor) -> Tensor:
    """A regression head's (B, 1) output against a (B,) target: the trailing 1 is dropped."""
    if output.dim() == target.dim() + 1 and output.shape[-1] == 1:
        return output.squeeze(-1)
    return output


class CrossEntropy(nn.Module):
    """``ce``: softmax cross-entropy per element; targets are class indices (-100: unlabelled)."""

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(_class_dim_first(output, target), target.long(), reduction="none",
                               ignore_index=IGNORE_INDEX)


class Elementwise(nn.Module):
    """A ``torch.nn.functional`` loss applied per element after aligning a trailing 1."""

    def __init__(self, fn: Callable[..., Tensor], **kwargs: Any) -> None:
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        output = _same_shape(output, target)
        return self.fn(output, target.to(output.dtype), reduction="none", **self.kwargs)


def mse() -> nn.Module:
    """``mse``: squared error."""
    return Elementwise(F.mse_loss)


def l1() -> nn.Module:
    """``l1``: absolute error."""
    return Elementwise(F.l1_loss)


def huber(delta: float = 1.0) -> nn.Module:
    """``huber``: quadratic below ``delta``, linear above."""
    return Elementwise(F.huber_loss, delta=delta)


def smooth_l1(beta: float = 1.0) -> nn.Module:
    """``smooth_l1``: Huber divided by ``beta``."""
    return Elementwise(F.smooth_l1_loss, beta=beta)


def bce() -> nn.Module:
    """``bce`` (also ``multilabel_bce``): binary cross-entropy with logits, per output; targets 0/1."""
    return Elementwise(F.binary_cross_entropy_with_logits)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "mse": mse, "l1": l1, "huber": huber, "smooth_l1": smooth_l1, "ce": CrossEntropy, "bce": bce,
    "multilabel_bce": bce,
}
"""Loss registry: short name -> a factory of a per-element loss module (``reduction="none"``)."""

KIND_LOSSES: dict[str, list[str]] = {
    "regression": ["mse", "l1", "huber", "smooth_l1"],
    "classification": ["ce"],
    "binary": ["bce"],
}
"""The losses each built-in kind allows; the first is its default."""


# ---------------------------------------------------------------------------------------------
# metrics: per-element values, reported as their mean over the labelled elements


def squared_error(output: Tensor, target: Tensor) -> Tensor:
    return (_same_shape(output, target).double() - target.double()) ** 2


def absolute_error(output: Tensor, target: Tensor) -> Tensor:
    return (_same_shape(output, target).double() - target.double()).abs()


def accuracy(output: Tensor, target: Tensor) -> Tensor:
    """Classification: the arg-max class is the target; binary (one logit): logit > 0 is target 1."""
    if output.dim() == target.dim() + 1 and output.shape[-1] == 1 or output.shape == target.shape:
        return ((_same_shape(output, target) > 0).to(target.dtype) == target).double()
    return (_class_dim_first(output, target).argmax(1) == target).double()


METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": squared_error, "mae": absolute_error, "accuracy": accuracy,
}
"""Metric registry: short name -> ``fn(output, target) -> per-element values``; the reported value
is their mean over the labelled elements. ``rmse`` is derived from ``mse``."""

DERIVED = {"rmse": ("mse", math.sqrt)}

KIND_METRICS: dict[str, list[str]] = {
    "regression": ["mse", "rmse", "mae"],
    "classification": ["accuracy"],
    "binary": ["accuracy"],
}


def _registry_error(kind: str, name: str, registry: dict) -> UsageError:
    return UsageError(f"unknown {kind} {name!r}{did_you_mean(name, registry)}; registered: "
                      f"{', '.join(sorted(registry))}")


# ---------------------------------------------------------------------------------------------
# the task


Metric = Union[str, Callable[[Tensor, Tensor], Tensor]]


@dataclass
class Task:
    """One task: ``Task("depth", loss="l1", target="depth_map")``.

    ``loss`` is a registered name (``LOSSES``) or a callable ``(output, target) -> per-element
    losses`` of the target's shape. ``target`` is the batch key of the target (default: the name).
    ``kind`` (``regression``, ``classification``, ``binary``) picks the default loss, metrics and,
    for the built-in heads, the output width; ``None`` for a custom task. ``metrics`` are registered
    names or callables returning per-element values (default: the kind's). ``weight`` is the static
    weight (``mtl.weighting: static``). ``mask`` names an optional batch key of a boolean tensor of
    the target's shape: False elements are unlabelled, as NaN or -100 targets are.
    """

    name: str
    loss: str | LossFn | None = None
    target: str | None = None
    kind: str | None = None
    metrics: list[Metric] | None = None
    weight: float = 1.0
    mask: str | None = None
    num_classes: int = 0
    """Classes of a classification task (the built-in head's width); 0 otherwise."""
    loss_fn: LossFn = field(init=False, repr=False)
    metric_fns: dict[str, Callable[[Tensor, Tensor], Tensor]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.target is None:
            self.target = self.name
        if self.kind is not None and self.kind not in KIND_LOSSES:
            raise UsageError(f"task {self.name!r}: unknown kind {self.kind!r}{did_you_mean(self.kind, KIND_LOSSES)}; "
                             f"kinds: {', '.join(KIND_LOSSES)}, or None for a custom task")
        if self.loss is None:
            if self.kind is None:
                raise UsageError(f"task {self.name!r}: give a loss (a name: {', '.join(sorted(LOSSES))}, or a "
                                 "callable returning per-element losses) or a kind (regression, classification, binary)")
            self.loss = KIND_LOSSES[self.kind][0]
        if isinstance(self.loss, str):
            if self.loss not in LOSSES:
                raise _registry_error("loss", self.loss, LOSSES)
            self.loss_fn = LOSSES[self.loss]()
        elif callable(self.loss):
            self.loss_fn = self.loss
        else:
            raise UsageError(f"task {self.name!r}: loss must be a name or a callable, got {self.loss!r}")
        names = self.metrics if self.metrics is not None else KIND_METRICS.get(self.kind, [])
        self.metric_fns = {}
        for metric in names:
            if isinstance(metric, str):
                if metric not in METRICS and metric not in DERIVED:
                    raise _registry_error("metric", metric, {**METRICS, **DERIVED})
                if metric in DERIVED:
                    base = DERIVED[metric][0]
                    self.metric_fns.setdefault(base, METRICS[base])
                else:
                    self.metric_fns[metric] = METRICS[metric]
            elif callable(metric):
                self.metric_fns[getattr(metric, "__name__", f"metric{len(self.metric_fns)}")] = metric
            else:
                raise UsageError(f"task {self.name!r}: a metric must be a name or a callable, got {metric!r}")
        self._derived = [m for m in names if isinstance(m, str) and m in DERIVED]
        # A derived metric's base (rmse's mse) is summed but only reported if it was asked for too.
        self._unreported = {DERIVED[m][0] for m in self._derived} - {m for m in names if isinstance(m, str)}

    @property
    def loss_name(self) -> str:
        """The loss's registered name, or the callable's name."""
        return self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", type(self.loss).__name__)

    @property
    def out_dim(self) -> int:
        """The width of a built-in head for this task."""
        return self.num_classes if self.kind == "classification" else 1

    # -- masks ---------------------------------------------------------------------------------
    @staticmethod
    def labelled(target: Tensor) -> Tensor:
        """Which elements carry a label: not NaN (float targets), not -100 (integer targets)."""
        if target.is_floating_point():
            return ~torch.isnan(target)
        if target.dtype == torch.bool:
            return torch.ones_like(target)
        return target != IGNORE_INDEX

    @staticmethod
    def fillable(target: Tensor) -> Tensor:
        """The target with its missing labels replaced by 0: a loss of a NaN target has a NaN
        gradient even where it is masked out (0 * NaN), so missing labels never reach the loss."""
        if target.is_floating_point():
            return torch.nan_to_num(target, nan=0.0)
        if target.dtype == torch.bool:
            return target
        return target.masked_fill(target == IGNORE_INDEX, 0)

    def count(self, target: Tensor) -> Tensor:
        """The number of labelled elements (a float64 scalar)."""
        return self.labelled(target).sum().double()

    # -- losses --------------------------------------------------------------------------------
    def element_losses(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Per-element losses (fp32, zero where unlabelled) and the labelled mask, both of the
        target's shape. Raises UsageError if the loss returns another shape."""
        mask = self.labelled(target)
        values = self.loss_fn(output.float(), self.fillable(target))
        if values.shape != target.shape:
            raise UsageError(f"tasks.{self.name}.loss: {self.loss_name} returned shape {tuple(values.shape)} for a "
                             f"target of shape {tuple(target.shape)}; a loss must return per-element losses "
                             "(reduction='none')")
        return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)), mask

    def loss_sum(self, output: Tensor, target: Tensor, masked: bool = True) -> Tensor:
        """The sum of the per-element losses over the labelled elements (0 if there are none).
        ``masked=False``: every element is known to be labelled, which saves the mask's ops (a
        measurable share of a small model's step)."""
        if masked:
            values, _ = self.element_losses(output, target)
            return values.sum()
        values = self.loss_fn(output.float(), target)
        if values.shape != target.shape:
            self.element_losses(output, target)  # raises the one-line error naming the loss
        return values.sum()

    def mean_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The mean loss over the labelled elements of this batch (a reference for tests and
        benchmarks; training divides by the global count instead)."""
        values, mask = self.element_losses(output, target)
        return values.sum() / mask.sum().clamp_min(1)

    # -- metrics -------------------------------------------------------------------------------
    @property
    def sum_keys(self) -> list[str]:
        """The keys of ``metric_sums``, known without data (for a fixed-layout all-reduce)."""
        return ["loss", "count", *self.metric_fns]

    def metric_sums(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Sums over the labelled elements of the loss and of each metric's values, and their count
        (float64, so the reduction across ranks is exact enough)."""
        values, mask = self.element_losses(output, target)
        sums = {"loss": values.double().sum(), "count": mask.sum().double()}
        zero = torch.zeros((), dtype=torch.float64, device=values.device)
        output, target = output.float(), self.fillable(target)
        for name, fn in self.metric_fns.items():
            per_element = fn(output, target).double()
            sums[name] = torch.where(mask, per_element, zero).sum()
        return sums

    def metrics_from_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """Final metrics from globally reduced sums: each the mean over the labelled elements."""
        count = sums["count"]
        if count <= 0:
            return {}
        metrics = {"loss": sums["loss"] / count}
        metrics.update({name: sums[name] / count for name in self.metric_fns})
        for name in self._derived:
            base, finish = DERIVED[name]
            metrics[name] = finish(metrics[base])
        for name in self._unreported:
            del metrics[name]
        return metrics


def target_dtype(kind: str) -> torch.dtype:
    return torch.long if kind == "classification" else torch.float32
