"""Task kinds: the one place that knows each kind's head size, loss and metrics.

Metrics are computed as per-sample *sums* so that evaluation across ranks is an exact all-reduce
of sums and counts (no duplicated or dropped samples, whatever the number of processes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# kind -> loss name -> loss class. The first name of each kind is its default.
LOSSES: dict[str, dict[str, type[nn.Module]]] = {
    "regression": {"mse": nn.MSELoss, "l1": nn.L1Loss, "huber": nn.HuberLoss, "smooth_l1": nn.SmoothL1Loss},
    "classification": {"ce": nn.CrossEntropyLoss},
    "binary": {"bce": nn.BCEWithLogitsLoss},
}


@dataclass
class Task:
    """A task at run time: its name, kind, output width and loss."""

    name: str
    kind: str
    loss_name: str
    num_classes: int = 0
    """Classes of a classification task (read from the data); 0 otherwise."""

    def __post_init__(self) -> None:
        self.loss_fn = LOSSES[self.kind][self.loss_name]()
        self._sum_loss_fn = LOSSES[self.kind][self.loss_name](reduction="sum")

    @property
    def out_dim(self) -> int:
        return self.num_classes if self.kind == "classification" else 1

    def prepare_output(self, output: Tensor) -> Tensor:
        """Head output in the shape the loss expects: (B,) for scalar kinds, (B, C) otherwise."""
        output = output.float()  # losses in fp32 even under autocast
        return output if self.kind == "classification" else output.squeeze(-1)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean loss over the batch."""
        return self.loss_fn(self.prepare_output(output), target)

    @property
    def sum_keys(self) -> list[str]:
        """The keys of ``metric_sums``, known without data (for a fixed-layout all-reduce)."""
        return ["loss", "sq_err", "abs_err"] if self.kind == "regression" else ["loss", "correct"]

    def metric_sums(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Per-batch sums of each metric's per-sample terms (float64 for exact-enough reduction)."""
        out = self.prepare_output(output)
        sums = {"loss": self._sum_loss_fn(out, target).double()}
        if self.kind == "regression":
            err = (out - target).double()
            sums["sq_err"] = (err * err).sum()
            sums["abs_err"] = err.abs().sum()
        elif self.kind == "classification":
            sums["correct"] = (out.argmax(-1) == target).double().sum()
        else:
            sums["correct"] = ((out > 0).to(target.dtype) == target).double().sum()
        return sums

    @staticmethod
    def metrics_from_sums(sums: dict[str, float], count: int) -> dict[str, float]:
        """Final metrics from globally reduced sums over ``count`` samples."""
        metrics = {"loss": sums["loss"] / count}
        if "sq_err" in sums:
            metrics["mse"] = sums["sq_err"] / count
            metrics["rmse"] = math.sqrt(metrics["mse"])
            metrics["mae"] = sums["abs_err"] / count
        if "correct" in sums:
            metrics["accuracy"] = sums["correct"] / count
        return metrics


def target_dtype(kind: str) -> torch.dtype:
    return torch.long if kind == "classification" else torch.float32
