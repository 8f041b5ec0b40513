"""Tasks: a name, the batch key of its target, a loss that returns per-element losses, metrics.

A task's loss on the global batch is the sum of its per-element losses over the *labelled*
elements, divided by their global count (every rank, every micro-step). A missing label is NaN in a
float target and -100 (PyTorch's ``ignore_index``) in an integer one; a task may also name a mask
key. So partially labelled data, and token- or pixel-level targets with padding, give the same
gradients on N processes as on one (the engines scale each piece's sum by ``world * accum / C_t``).

Metrics are reduced the same way: each is the mean of per-element values over the labelled
elements, from globally all-reduced sums and counts (no sample counted twice or dropped); or, for
F1, mean AP and mIoU, a function of fixed-shape count vectors (``dist_mtl.metrics``).

Kinds, their shapes (B: batch, K/C: classes, L: tokens, H x W: pixels) and defaults:

==================== ========================= ============================== ====== ========================
kind                 output                    target                         loss   metrics
==================== ========================= ============================== ====== ========================
regression           (B, 1) or (B,)            float (B,)                     mse    mse, rmse, mae
classification       (B, C)                    int64 (B,)                     ce     accuracy
binary               (B, 1) or (B,)            float 0/1 (B,)                 bce    accuracy
multilabel           (B, K)                    float 0/1 (B, K)               bce    mean_ap, f1
segmentation         (B, C, H, W)              int64 (B, H, W)                ce     miou, pixel_accuracy
depth                (B, 1, H, W) or (B, H, W) float (B, H, W)                l1     abs_err, rel_err
normals              (B, 3, H, W)              float unit vectors (B, 3, H, W) cosine mean_angle, within_11.25
token_classification (B, L, C)                 int64 (B, L)                   ce     accuracy, f1
==================== ========================= ============================== ====== ========================

An *element* is one label: a sample, a (sample, label) pair for multilabel, a pixel, a token. For
``normals`` it is a pixel, not a channel: the per-element losses are (B, H, W), and a pixel is
unlabelled if any of its three channels is NaN (``Task.element_mask``).
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
from .metrics import SUM_METRICS, SumMetric

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
    """A regression head's (B, 1) output against a (B,) target: the trailing 1 is dropped; a dense
    head's (B, 1, H, W) against a (B, H, W) target (depth): the channel dimension is dropped."""
    if output.dim() == target.dim() + 1 and output.shape[-1] == 1:
        return output.squeeze(-1)
    if output.dim() == target.dim() + 1 and output.dim() > 2 and output.shape[1] == 1 \
            and output.shape[2:] == target.shape[1:]:
        return output.squeeze(1)
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


class Cosine(nn.Module):
    """``cosine``: 1 - cos(output, target) over the channel dimension 1, per pixel (surface
    normals). Output (B, 3, H, W), any length (it is normalised); target (B, 3, H, W) unit vectors;
    per-element losses (B, H, W), in [0, 2]."""

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        return 1 - _cosine(output, target)


def _cosine(output: Tensor, target: Tensor) -> Tensor:
    """cos of the angle between output and target along dim 1: (B, 3, ...) -> (B, ...). A zero
    vector (a missing label filled with 0) gives 0, never NaN (``F.normalize``'s eps)."""
    return (F.normalize(output, dim=1) * F.normalize(target.to(output.dtype), dim=1)).sum(1)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "mse": mse, "l1": l1, "huber": huber, "smooth_l1": smooth_l1, "ce": CrossEntropy, "bce": bce,
    "multilabel_bce": bce, "cosine": Cosine,
}
"""Loss registry: short name -> a factory of a per-element loss module (``reduction="none"``)."""

KIND_LOSSES: dict[str, list[str]] = {
    "regression": ["mse", "l1", "huber", "smooth_l1"],
    "classification": ["ce"],
    "binary": ["bce"],
    "multilabel": ["bce", "multilabel_bce"],
    "segmentation": ["ce"],
    "depth": ["l1", "huber", "smooth_l1", "mse"],
    "normals": ["cosine"],
    "token_classification": ["ce"],
}
"""The losses each built-in kind allows; the first is its default."""

CLASS_KINDS = ("classification", "multilabel", "segmentation", "token_classification")
"""Kinds whose head width and metrics need the number of classes (labels, for multilabel)."""

DENSE_KINDS = ("segmentation", "depth", "normals")
"""Per-pixel kinds: the built-in head is a ``models.DenseDecoder``."""

KIND_CHANNELS = {"depth": 1, "normals": 3}
"""The output channels of a dense kind without classes."""

_CLASS_LAST = ("token_classification",)
"""Kinds whose logits carry the class dimension last, (B, L, C): registered losses and metrics get
them as (B, C, L), unambiguous even when C == L (``_class_dim_first`` would have to guess)."""

_VECTOR_ELEMENT = {"normals": 1}
"""Kinds whose element is a vector along this target dimension (normals: 3 channels per pixel)."""

_SHAPED_KINDS = ("multilabel", "segmentation", "depth", "normals", "token_classification")
"""Kinds whose output shape ``Task.check_shapes`` checks against the target's."""


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


def relative_error(output: Tensor, target: Tensor) -> Tensor:
    """|d - t| / t per element (depth; the target must be positive where labelled: write NaN for
    invalid depth, including 0)."""
    return absolute_error(output, target) / target.double()


def angle_error(output: Tensor, target: Tensor) -> Tensor:
    """The angle in degrees between the predicted and the target normal, per pixel: (B, 3, H, W)
    -> (B, H, W)."""
    return torch.rad2deg(torch.acos(_cosine(output.double(), target.double()).clamp(-1.0, 1.0)))


def within_11_25(output: Tensor, target: Tensor) -> Tensor:
    """1 where the angle error is below 11.25 degrees, else 0 (reported as a fraction, as accuracy
    is)."""
    return (angle_error(output, target) < 11.25).double()


METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": squared_error, "mae": absolute_error, "accuracy": accuracy, "pixel_accuracy": accuracy,
    "abs_err": absolute_error, "rel_err": relative_error, "mean_angle": angle_error, "within_11.25": within_11_25,
}
"""Metric registry: short name -> ``fn(output, target) -> per-element values``; the reported value
is their mean over the labelled elements. ``rmse`` is derived from ``mse``. Metrics that are not
means (``f1``, ``mean_ap``, ``miou``) are in ``SUM_METRICS`` (``dist_mtl.metrics``)."""

DERIVED = {"rmse": ("mse", math.sqrt)}

KIND_METRICS: dict[str, list[str]] = {
    "regression": ["mse", "rmse", "mae"],
    "classification": ["accuracy"],
    "binary": ["accuracy"],
    "multilabel": ["mean_ap", "f1"],
    "segmentation": ["miou", "pixel_accuracy"],
    "depth": ["abs_err", "rel_err"],
    "normals": ["mean_angle", "within_11.25"],
    "token_classification": ["accuracy", "f1"],
}

METRIC_NAMES: dict[str, object] = {**METRICS, **DERIVED, **SUM_METRICS}
"""Every registered metric name (per-element, derived, from sums)."""


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
    ``kind`` (``regression``, ``classification``, ``binary``, ``multilabel``, ``segmentation``,
    ``depth``, ``normals``, ``token_classification``: see the module docstring for shapes) picks
    the default loss, metrics and, for the built-in heads, the output width; ``None`` for a custom
    task. ``metrics`` are registered names or callables returning per-element values (default: the
    kind's). ``weight`` is the static weight (``mtl.weighting: static``). ``mask`` names an optional
    batch key of a boolean tensor of the target's shape (of the pixels, for normals): False
    elements are unlabelled, as NaN or -100 targets are.

    Registered losses and metrics of a ``token_classification`` task get its (B, L, C) logits as
    (B, C, L); a callable gets the head's output as it is.
    """

    name: str
    loss: str | LossFn | None = None
    target: str | None = None
    kind: str | None = None
    metrics: list[Metric] | None = None
    weight: float = 1.0
    mask: str | None = None
    num_classes: int = 0
    """Classes of a classification, segmentation or token_classification task, labels K of a
    multilabel task (the built-in head's width, the layout of F1/AP/IoU sums); 0 otherwise."""
    loss_fn: LossFn = field(init=False, repr=False)
    metric_fns: dict[str, Callable[[Tensor, Tensor], Tensor]] = field(init=False, repr=False)
    sum_metrics: dict[str, SumMetric] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.target is None:
            self.target = self.name
        if self.kind is not None and self.kind not in KIND_LOSSES:
            raise UsageError(f"task {self.name!r}: unknown kind {self.kind!r}{did_you_mean(self.kind, KIND_LOSSES)}; "
                             f"kinds: {', '.join(KIND_LOSSES)}, or None for a custom task")
        if self.kind in CLASS_KINDS and self.kind != "classification" and self.num_classes <= 0:
            # (a table's classification task gets its classes from the data after construction)
            raise UsageError(f"task {self.name!r}: kind {self.kind} needs num_classes (the number of "
                             f"{'labels' if self.kind == 'multilabel' else 'classes'}: the head's width and the layout "
                             "of its metrics' sums)")
        if self.loss is None:
            if self.kind is None:
                raise UsageError(f"task {self.name!r}: give a loss (a name: {', '.join(sorted(LOSSES))}, or a "
                                 "callable returning per-element losses) or a kind ("
                                 f"{', '.join(KIND_LOSSES)})")
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
        self.metric_fns, self.sum_metrics = {}, {}
        self._builtin: set[str] = set()  # registered per-element metrics: they get canonical logits
        for metric in names:
            if isinstance(metric, str):
                if metric not in METRIC_NAMES:
                    raise _registry_error("metric", metric, METRIC_NAMES)
                if metric in SUM_METRICS:
                    if self.num_classes <= 0 and self.kind != "classification":
                        raise UsageError(f"task {self.name!r}: metric {metric} needs num_classes (the layout of its "
                                         "per-class sums)")
                    self.sum_metrics[metric] = SUM_METRICS[metric]
                elif metric in DERIVED:
                    base = DERIVED[metric][0]
                    self.metric_fns.setdefault(base, METRICS[base])
                    self._builtin.add(base)
                else:
                    self.metric_fns[metric] = METRICS[metric]
                    self._builtin.add(metric)
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
        """The width (channels, for dense kinds) of a built-in head for this task."""
        if self.kind in CLASS_KINDS:
            return self.num_classes
        return KIND_CHANNELS.get(self.kind, 1)

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

    def element_mask(self, target: Tensor) -> Tensor:
        """Which elements carry a label, in the shape of the per-element losses: ``labelled`` of
        the target, except for a kind whose element is a vector (normals: a (B, 3, H, W) target
        has (B, H, W) elements, labelled where none of the three channels is NaN)."""
        mask = self.labelled(target)
        dim = _VECTOR_ELEMENT.get(self.kind)
        return mask if dim is None else mask.all(dim)

    def count(self, target: Tensor) -> Tensor:
        """The number of labelled elements (a float64 scalar): pixels for normals, not channels."""
        return self.element_mask(target).sum().double()

    def _canonical(self, output: Tensor) -> Tensor:
        """Logits as registered losses and metrics take them: class dimension at 1."""
        return output.movedim(-1, 1) if self.kind in _CLASS_LAST else output

    def check_shapes(self, output: Tensor, target: Tensor) -> None:
        """A one-line UsageError naming the task when the head's output cannot fit a target of a
        built-in kind (before the loss fails with a broadcasting error or a silent broadcast)."""
        if self.kind not in _SHAPED_KINDS:
            return  # the original kinds: shapes are the loss's business (custom heads may broadcast)
        o, t, k = tuple(output.shape), tuple(target.shape), self.num_classes
        with_channels = len(o) == len(t) + 1 and o[:1] == t[:1] and o[2:] == t[1:]  # (B, C, ...) vs (B, ...)
        if self.kind == "multilabel":
            fits, needs = o == t and o[1:] == (k,), f"(B, {k}) logits, the target's shape"
        elif self.kind == "segmentation":
            fits, needs = with_channels and o[1] == k, f"(B, {k}, H, W) logits at the label size (H, W) = {t[1:]}"
        elif self.kind == "depth":
            fits, needs = o == t or with_channels and o[1] == 1, f"(B, 1, H, W) or (B, H, W) at the label size {t[1:]}"
        elif self.kind == "normals":
            fits, needs = o == t and len(t) == 4 and t[1] == 3, "(B, 3, H, W), the target's shape"
        else:  # token_classification
            fits, needs = len(o) == len(t) + 1 and o[:-1] == t and o[-1] == k, f"(B, L, {k}) logits"
        if not fits:
            raise UsageError(f"task {self.name!r} ({self.kind}): the head's output has shape {o}, but its target {t} "
                             f"needs {needs}; give model.heads.{self.name} a head of that shape, or resize the labels")

    # -- losses --------------------------------------------------------------------------------
    def element_losses(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Per-element losses (fp32, zero where unlabelled) and the labelled mask, both of the
        element shape (the target's, or its pixels for normals). Raises UsageError if the output
        does not fit the target, or the loss returns another shape."""
        self.check_shapes(output, target)
        mask = self.element_mask(target)
        values = self._loss_values(output, self.fillable(target))
        if values.shape != mask.shape:
            raise UsageError(f"tasks.{self.name}.loss: {self.loss_name} returned shape {tuple(values.shape)} for a "
                             f"target of shape {tuple(target.shape)}; a loss must return per-element losses "
                             f"(reduction='none'), here of shape {tuple(mask.shape)}")
        return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)), mask

    def _loss_values(self, output: Tensor, target: Tensor) -> Tensor:
        output = output.float()
        return self.loss_fn(self._canonical(output) if isinstance(self.loss, str) else output, target)

    def loss_sum(self, output: Tensor, target: Tensor, masked: bool = True) -> Tensor:
        """The sum of the per-element losses over the labelled elements (0 if there are none).
        ``masked=False``: every element is known to be labelled, which saves the mask's ops (a
        measurable share of a small model's step)."""
        if masked:
            values, _ = self.element_losses(output, target)
            return values.sum()
        values = self._loss_values(output, target)
        dim = _VECTOR_ELEMENT.get(self.kind)
        if values.shape != (target.shape if dim is None else target.shape[:dim] + target.shape[dim + 1:]):
            self.element_losses(output, target)  # raises the one-line error naming the loss
        return values.sum()

    def mean_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The mean loss over the labelled elements of this batch (a reference for tests and
        benchmarks; training divides by the global count instead)."""
        values, mask = self.element_losses(output, target)
        return values.sum() / mask.sum().clamp_min(1)

    # -- metrics -------------------------------------------------------------------------------
    @property
    def sum_shapes(self) -> dict[str, tuple[int, ...]]:
        """The keys of ``metric_sums`` and each sum's shape, known without data: scalars for the
        loss, the count and per-element metrics; (3, C), (2, C, bins)... for F1, mIoU, mean AP
        (from ``num_classes``). ``trainer.evaluate`` flattens them into one all-reduce."""
        shapes: dict[str, tuple[int, ...]] = {"loss": (), "count": ()}
        shapes.update({name: () for name in self.metric_fns})
        for name, metric in self.sum_metrics.items():
            if self.num_classes <= 0:
                raise UsageError(f"task {self.name!r}: metric {name} needs num_classes")
            shapes[name] = metric.shape(self.num_classes)
        return shapes

    @property
    def sum_keys(self) -> list[str]:
        """The keys of ``metric_sums``, known without data (for a fixed-layout all-reduce)."""
        return list(self.sum_shapes)

    def metric_sums(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Sums over the labelled elements of the loss and of each metric's values, and their count
        (float64, so the reduction across ranks is exact enough), each of ``sum_shapes``'s shape.
        Every sum adds up over samples: the sums of two halves of a batch are the whole's."""
        values, mask = self.element_losses(output, target)
        sums = {"loss": values.double().sum(), "count": mask.sum().double()}
        zero = torch.zeros((), dtype=torch.float64, device=values.device)
        output, target = output.float(), self.fillable(target)
        canonical = self._canonical(output)
        for name, fn in self.metric_fns.items():
            per_element = fn(canonical if name in self._builtin else output, target).double()
            sums[name] = torch.where(mask, per_element, zero).sum()
        for name, metric in self.sum_metrics.items():
            sums[name] = metric.sums(canonical, target, mask, self.num_classes)
        return sums

    def metrics_from_sums(self, sums: dict[str, Any]) -> dict[str, float]:
        """Final metrics from globally reduced sums: each per-element metric the mean over the
        labelled elements; F1, mIoU, mean AP from their count vectors (floats for scalar sums,
        float64 tensors for the others). A metric undefined on these sums is left out."""
        count = float(sums["count"])
        if count <= 0:
            return {}
        metrics = {"loss": float(sums["loss"]) / count}
        metrics.update({name: float(sums[name]) / count for name in self.metric_fns})
        for name, metric in self.sum_metrics.items():
            value = metric.finish(torch.as_tensor(sums[name], dtype=torch.float64))
            if value is not None:
                metrics[name] = value
        for name in self._derived:
            base, finish = DERIVED[name]
            metrics[name] = finish(metrics[base])
        for name in self._unreported:
            del metrics[name]
        return metrics


def target_dtype(kind: str) -> torch.dtype:
    return torch.long if kind in ("classification", "segmentation", "token_classification") else torch.float32
