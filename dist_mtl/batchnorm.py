"""Synchronised BatchNorm for CPU processes (gloo), where ``nn.SyncBatchNorm`` refuses to run.

``nn.SyncBatchNorm`` only takes CUDA tensors, so on CPU ranks every BatchNorm would normalise with
its own micro-batch's statistics and N processes would not match 1. ``CpuSyncBatchNorm`` computes
the statistics of the global micro-batch instead: in training mode each rank sums, per channel,
its element count, sum and sum of squares, and one all-reduce of those ``2C + 1`` numbers gives
every rank the same mean and variance, those of the union of the ranks' micro-batches. The
all-reduce is differentiable (``torch.distributed.nn.functional.all_reduce``: its backward
all-reduces the incoming gradient), so each rank's gradient carries the terms that flow through
the shared statistics from every other rank's loss, as one process's autograd would. The running
statistics are updated from the same global values, so they stay identical on every rank.

So with ``grad_accum: 1`` (each optimizer step's global batch is split across ranks only), N
processes match 1 process running a plain BatchNorm, up to float rounding. With accumulation the
statistics are those of each micro-step's global micro-batch, which one process (seeing the whole
batch) does not reproduce: the start-up warning says so.

Costs: one all-reduce of ``2C + 1`` floats per BatchNorm layer in each training forward, and one
in its backward. Evaluation uses the running statistics, with no communication. With one process
(or no process group) it is exactly ``nn.BatchNorm*d``.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from .errors import UsageError

# torch 2.13 marks torch.distributed.nn.functional.all_reduce deprecated in favour of the functional
# collectives, which have no backward; this module needs the differentiable one, so the warning
# (one per rank, at the first synchronised forward) would only be noise.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global micro-batch of all ranks (see the module docstring).

    Shapes: inputs ``(B, C)``, ``(B, C, L)``, ``(B, C, H, W)`` or ``(B, C, D, H, W)``; the
    statistics are per channel ``C``, over every other dimension and every rank's batch.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"CpuSyncBatchNorm: expected an input of at least 2 dimensions (B, C, ...), got {input.dim()}")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        uses_batch_stats = self.training or not self.track_running_stats
        if not uses_batch_stats or not torch_dist.is_available() or not torch_dist.is_initialized() \
                or torch_dist.get_world_size() == 1:
            return super().forward(input)  # plain BatchNorm: nothing to synchronise
        from torch.distributed.nn.functional import all_reduce

        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        # fp32 activations for half inputs, and the sums in float64: var = E[x^2] - E[x]^2 cancels
        # in fp32 when a channel's mean is large against its spread. It costs 2C + 1 doubles.
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        count = torch.tensor([input.numel() / channels], dtype=torch.float64, device=x.device)
        sums = [x.sum(dims, dtype=torch.float64), (x * x).sum(dims, dtype=torch.float64)]
        stats = all_reduce(torch.cat([count, *sums]), op=torch_dist.ReduceOp.SUM)
        n = stats[0]
        mean64 = stats[1:channels + 1] / n
        var = (stats[channels + 1:] / n - mean64 * mean64).clamp_min(0.0).to(x.dtype)  # biased, as BN normalises
        mean = mean64.to(x.dtype)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n.item())
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: float) -> None:
        """As ``nn.BatchNorm``: an exponential (or, with ``momentum=None``, cumulative) average of the
        batch mean and of the unbiased batch variance, from the global values (so on every rank alike)."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (n / (n - 1)) if n > 1 else var
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert_cpu_sync_batchnorm(module: nn.Module, prefix: str = "") -> nn.Module:
    """``module`` with every ``nn.BatchNorm1d/2d/3d`` replaced by a ``CpuSyncBatchNorm`` that holds
    the same parameters, buffers and mode (the module itself if it is one). A BatchNorm subclass
    with a forward of its own (timm's ``BatchNormAct2d`` adds an activation) cannot be replaced
    without losing that: ``UsageError`` naming it."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        if type(module) not in _PLAIN:
            raise UsageError(f"model.sync_batchnorm: cannot synchronise {prefix or 'the model'} "
                             f"({type(module).__name__}, a BatchNorm subclass with its own forward) on CPU processes; "
                             "use nn.BatchNorm*d, GroupNorm or LayerNorm there")
        synced = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias  # the same Parameters (and requires_grad)
        if module.track_running_stats:
            synced.running_mean, synced.running_var = module.running_mean, module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in list(module.named_children()):
        replaced = convert_cpu_sync_batchnorm(child, f"{prefix}.{name}" if prefix else name)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def is_synchronised(module: nn.Module) -> bool:
    """Whether a BatchNorm module normalises with the statistics of all ranks."""
    return isinstance(module, (nn.SyncBatchNorm, CpuSyncBatchNorm))


__all__ = ["CpuSyncBatchNorm", "convert_cpu_sync_batchnorm", "is_synchronised"]
