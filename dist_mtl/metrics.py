"""Metrics that are not means of per-element values: macro F1, mean average precision, mean IoU.

Validation metrics must come out the same on any number of processes, so each rank computes *sums*
that are all-reduced before the metric is finished. A per-element metric (accuracy, absolute
error) is a mean, so its sum and the labelled count suffice. F1, AP and IoU are ratios of class-wise
counts, so a ``SumMetric`` reduces a fixed-shape float64 tensor instead: its shape depends only on
the number of classes (known from the task, never from the data), so every rank, even one with no
validation rows, contributes the same layout to the one flat all-reduce of ``trainer.evaluate``.

Every ``sums`` below is additive over samples: the sums of two halves of a batch add up to the
sums of the whole batch, which is what makes the reduced metric exact across ranks.

Conventions of the inputs (``Task.metric_sums`` prepares them):

- ``output``: logits with the class dimension at 1, (B, C, ...) against a (B, ...) class target;
  or, for per-label binary tasks (multilabel), logits of the target's shape (B, K).
- ``target``: the target with missing labels replaced by 0 (they are excluded by ``mask``).
- ``mask``: bool, the shape of the per-element values (the target's shape for these metrics):
  True where the element carries a label.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import UsageError


class SumMetric:
    """A metric finished from a fixed-shape sum tensor. Subclasses define ``shape``, ``sums`` and
    ``finish``; instances are stateless (the registry holds one of each)."""

    needs_classes = True
    """The shape depends on the task's ``num_classes``, which must then be set."""

    def shape(self, num_classes: int) -> tuple[int, ...]:
        """The shape of the sum tensor, from the number of classes alone."""
        raise NotImplementedError

    def sums(self, output: Tensor, target: Tensor, mask: Tensor, num_classes: int) -> Tensor:
        """This batch's sums (float64, of ``shape(num_classes)``) over the labelled elements."""
        raise NotImplementedError

    def finish(self, sums: Tensor) -> float | None:
        """The metric from the globally reduced sums; None where it is undefined (no class
        occurs): the metric is then not reported."""
        raise NotImplementedError


def _per_label(output: Tensor, target: Tensor) -> bool:
    """Binary per label (multilabel logits of the target's shape) rather than arg-max classes."""
    return output.shape == target.shape


def _class_indices(target: Tensor, mask: Tensor, num_classes: int) -> Tensor:
    """The labelled class indices (long, 1-D), checked against ``num_classes`` (a label outside
    [0, C) would make ``bincount`` longer than the fixed layout)."""
    labels = target[mask].long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise UsageError(f"a class label {bad} is outside [0, {num_classes}) (num_classes: {num_classes}); "
                         "set num_classes to the number of classes, and mark missing labels with -100")
    return labels


def _check_labels(output: Tensor, num_classes: int) -> None:
    if output.shape[1] != num_classes:
        raise UsageError(f"logits of shape {tuple(output.shape)} have {output.shape[1]} labels along dim 1, but "
                         f"num_classes is {num_classes}")


def _confusion_counts(output: Tensor, target: Tensor, mask: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per class: true positives, predicted count and labelled count (float64 vectors of C)."""
    if _per_label(output, target):  # (B, K) logits and 0/1 targets: each label is its own binary problem
        _check_labels(output, num_classes)
        predicted, truth = (output > 0) & mask, (target > 0.5) & mask
        dims = [d for d in range(output.dim()) if d != 1]
        hits = (predicted & truth).sum(dims).double()
        return hits, predicted.sum(dims).double(), truth.sum(dims).double()
    truth = _class_indices(target, mask, num_classes)
    predicted = output.argmax(1)[mask]
    hits = torch.bincount(truth[predicted == truth], minlength=num_classes).double()
    return (hits, torch.bincount(predicted, minlength=num_classes).double(),
            torch.bincount(truth, minlength=num_classes).double())


class MacroF1(SumMetric):
    """``f1``: the F1 score of each class, averaged over the classes that occur (labelled or
    predicted at least once; others have no defined F1). Multiclass: the arg-max class against the
    label, per element (token, pixel, sample). Multilabel: logit > 0 against each 0/1 label.
    Sums: (3, C) = true positives, false positives, false negatives."""

    def shape(self, num_classes: int) -> tuple[int, ...]:
        return (3, num_classes)

    def sums(self, output: Tensor, target: Tensor, mask: Tensor, num_classes: int) -> Tensor:
        hits, predicted, labelled = _confusion_counts(output, target, mask, num_classes)
        return torch.stack([hits, predicted - hits, labelled - hits])

    def finish(self, sums: Tensor) -> float | None:
        tp, fp, fn = sums.double()
        denominator = 2 * tp + fp + fn
        present = denominator > 0
        if not bool(present.any()):
            return None
        return float((2 * tp[present] / denominator[present]).mean())


class MeanIoU(SumMetric):
    """``miou``: per class, intersection over union of the predicted (arg-max) and labelled
    elements over the whole validation set, averaged over the classes that occur (union > 0).
    Sums: (2, C) = intersection, union."""

    def shape(self, num_classes: int) -> tuple[int, ...]:
        return (2, num_classes)

    def sums(self, output: Tensor, target: Tensor, mask: Tensor, num_classes: int) -> Tensor:
        hits, predicted, labelled = _confusion_counts(output, target, mask, num_classes)
        return torch.stack([hits, predicted + labelled - hits])

    def finish(self, sums: Tensor) -> float | None:
        intersection, union = sums.double()
        present = union > 0
        if not bool(present.any()):
            return None
        return float((intersection[present] / union[present]).mean())


class MeanAveragePrecision(SumMetric):
    """``mean_ap``: average precision of each label of a multilabel task, averaged over the labels
    with at least one labelled positive.

    AP is a function of the ranking of all scores, which is not a sum; so each rank histograms
    the predicted probabilities ``sigmoid(logit)`` of the positives and of the negatives of each
    label into ``bins`` equal-width bins on [0, 1]. AP is then computed from those histograms as
    scikit-learn's ``average_precision_score`` is from scores: precision at each threshold,
    weighted by the recall gained there, thresholds descending. It equals that AP for the scores
    rounded down to their bin: exact up to the bin width (1e-3 by default), and the same on any
    number of processes (the histograms add up exactly). Sums: (2, K, bins) = positives,
    negatives per label and bin."""

    def __init__(self, bins: int = 1000) -> None:
        self.bins = bins

    def shape(self, num_classes: int) -> tuple[int, ...]:
        return (2, num_classes, self.bins)

    def sums(self, output: Tensor, target: Tensor, mask: Tensor, num_classes: int) -> Tensor:
        if not _per_label(output, target):
            raise UsageError(f"mean_ap applies to multilabel tasks (logits of the target's shape (B, K)); got logits "
                             f"{tuple(output.shape)} for targets {tuple(target.shape)}")
        _check_labels(output, num_classes)
        probability = torch.sigmoid(output.double())
        bin_index = (probability * self.bins).long().clamp_(0, self.bins - 1)
        # the label's index along dim 1, broadcast to every element: (B, K) -> label k of each element
        label = torch.arange(output.shape[1], device=output.device).view(1, -1, *[1] * (output.dim() - 2))
        flat = (label * self.bins + bin_index).expand_as(output)
        positive = (target > 0.5) & mask
        negative = (target <= 0.5) & mask
        size = num_classes * self.bins
        return torch.stack([torch.bincount(flat[positive], minlength=size).double(),
                            torch.bincount(flat[negative], minlength=size).double()]).view(2, num_classes, self.bins)

    def finish(self, sums: Tensor) -> float | None:
        positives, negatives = sums.double()
        # from the highest bin down: labelled positives and negatives at or above each threshold
        tp = positives.flip(-1).cumsum(-1)
        fp = negatives.flip(-1).cumsum(-1)
        gained = positives.flip(-1)
        total = tp[:, -1]
        present = total > 0
        if not bool(present.any()):
            return None
        precision = tp / (tp + fp).clamp_min(1)
        ap = (gained * precision).sum(-1)[present] / total[present]
        return float(ap.mean())


SUM_METRICS: dict[str, SumMetric] = {"f1": MacroF1(), "miou": MeanIoU(), "mean_ap": MeanAveragePrecision()}
"""Registry of metrics reduced from fixed-shape sums: name -> a stateless ``SumMetric``."""
