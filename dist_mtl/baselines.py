"""Trivial baselines for datasets read item by item: the metrics of a constant prediction.

A table's baselines are computed from its columns (``data._baselines``). A map-style dataset has
no columns to read, so its baseline is the prediction a model makes without looking at the input:
the prior of the training labels, estimated from the first global batches (every rank reads the
same ones, so every rank holds the same prior), and scored on the validation set with the task's
own metrics, in the same pass and the same collective as the model's.

Per kind, the constant prediction is:

- classification, segmentation, token_classification: logits ``log p_c`` of the class frequencies
  (the majority class wins every arg-max);
- binary, multilabel: the logit of each label's positive rate;
- regression, depth: the mean target;
- normals: the mean normal direction.

Custom tasks (``kind: None``) have no baseline.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .tasks import Task

SOFTMAX_KINDS = ("classification", "segmentation", "token_classification")
RATE_KINDS = ("binary", "multilabel")
MEAN_KINDS = ("regression", "depth")


def estimate_priors(loader, groups, samples: int = 4096) -> dict[str, Tensor]:
    """Each task's label prior from the training items of the first global batches (about
    ``samples`` items per dataset, at least one batch), read in this process with the items'
    seeds, so every rank computes the same prior. ``groups``: the datasets to estimate for."""
    totals: dict[str, tuple[Tensor, Tensor]] = {}
    for group in groups:
        g = loader.groups.index(group)
        sampler = loader.samplers[g]
        steps = max(1, min(math.ceil(samples / sampler.batch_size), math.ceil(sampler.num_rows / sampler.batch_size)))
        names = [task.name for task in group.tasks]
        for step in range(steps):
            for piece in loader.micro_batches(step, 0, 1, 1, names, torch.device("cpu"), streamed=False):
                for _, targets in piece:
                    for task in group.tasks:
                        part = label_statistics(task, targets[task.name])
                        if part is not None:
                            total = totals.get(task.name)
                            totals[task.name] = part if total is None else (total[0] + part[0], total[1] + part[1])
    return {name: sums / counts.clamp_min(1) for name, (sums, counts) in totals.items()}


def label_statistics(task: Task, target: Tensor) -> tuple[Tensor, Tensor] | None:
    """Sums over the labelled elements of ``target`` and their counts (float64): the prior is
    ``sums / counts``. Per class (counts: one), per label (multilabel: counts per label), or one
    mean (a vector for normals). None for a kind without a baseline."""
    mask = task.element_mask(target)
    count = mask.sum().double().view(1)
    if task.kind in SOFTMAX_KINDS and task.num_classes:
        labels = target[mask].long()
        return torch.bincount(labels, minlength=task.num_classes)[:task.num_classes].double(), count
    if task.kind == "multilabel":  # each label its own rate
        values = torch.where(mask, target, torch.zeros_like(target)).double().reshape(-1, target.shape[-1])
        return values.sum(0), mask.reshape(-1, target.shape[-1]).sum(0).double()
    if task.kind in ("binary", *MEAN_KINDS):
        return torch.where(mask, target, torch.zeros_like(target)).double().sum().view(1), count
    if task.kind == "normals":
        vectors = torch.nan_to_num(target.double()) * mask.unsqueeze(1)
        return vectors.sum((0, *range(2, target.dim()))), count
    return None


def constant_output(task: Task, prior: Tensor, target: Tensor) -> Tensor:
    """The constant prediction of ``task`` from ``prior`` for a batch with ``target``'s shape, in
    the layout the task's loss and metrics take (class dimension 1 for dense maps, last for
    tokens and samples)."""
    prior = prior.float().to(target.device)
    batch = target.shape
    if task.kind in SOFTMAX_KINDS:
        logits = torch.log(prior.clamp_min(1e-12))
        if task.kind == "segmentation":
            return logits.view(1, -1, *([1] * (len(batch) - 1))).expand(batch[0], -1, *batch[1:])
        return logits.expand(*batch, -1)
    if task.kind in RATE_KINDS:
        p = prior.clamp(1e-6, 1 - 1e-6)
        logit = torch.log(p / (1 - p))
        return logit.expand(*batch) if task.kind == "multilabel" else logit.view(()).expand(*batch)
    if task.kind in MEAN_KINDS:
        return prior.view(()).expand(*batch)
    if task.kind == "normals":
        direction = prior / prior.norm().clamp_min(1e-12)
        return direction.view(1, 3, *([1] * (len(batch) - 2))).expand(*batch)
    raise ValueError(f"no constant baseline for kind {task.kind!r}")
