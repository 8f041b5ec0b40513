"""Non-finite losses and gradients (``train.on_nonfinite``): one decision on every rank.

The decision is made on the *reduced* gradients, which are bitwise identical on every rank, so
every rank decides the same without any extra collective. A non-finite loss always reaches them:
the engines turn a rank's gradients to NaN before the reduction when one of its own losses is
non-finite (``BackwardEngine.poison``), since a loss can be infinite while its gradient is finite
(cross-entropy of a ``-inf`` logit). Only once a step is found bad do the ranks exchange their own
losses, to say which task and which rank.

Cost per update: one pass over the reduced gradients and the T local losses, and one host sync
(as ``GradScaler`` has); on several processes, one more test of the local losses before the
reduction. On the benchmark MLP (0.15 M parameters, one CPU thread) that is about 0.15 ms, 3 % of
a step; on a GPU it is a few small kernels. Under fp16 the gradients are left to the loss
scaler, which skips overflowing steps by design; the losses are still checked, with one all-reduce
of one number per update.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

from .distributed import Distributed
from .errors import RunFailed


class NonFiniteError(RunFailed):
    """``on_nonfinite=abort`` (or too many skips in a row): the CLI prints it as one line, exit 1."""


def all_finite(values: list[Tensor], fused: bool | None = None) -> bool:
    """Whether every element of every tensor is finite: one pass over the values and one host
    sync. A plain sum is non-finite iff an element is (``inf - inf`` is NaN), short of a total
    beyond 3e38; a norm would square its way to a false alarm from 2e19. ``fused`` (default: on
    CUDA, where it is one multi-tensor kernel instead of a kernel per tensor): the norms first,
    and the sums only to confirm a non-finite norm, so the answer is the sums' either way."""
    if not values:
        return True
    values = [v.detach() for v in values]
    if values[0].is_cuda if fused is None else fused:
        if bool(torch.stack(torch._foreach_norm(values)).sum().isfinite()):
            return True  # (a NaN or inf element makes its norm non-finite)
    # a 0-dim value (a loss, the clip's norm) is its own sum: one op fewer each
    return bool(torch.stack([v if v.dim() == 0 else v.sum() for v in values]).sum().isfinite())


class NonFiniteGuard:
    """Checks each update; on a bad one, skips it on every rank or stops every rank."""

    def __init__(self, dist: Distributed, mode: str, max_consecutive: int, check_grads: bool = True,
                 sharded: bool = False) -> None:
        self.dist, self.mode, self.max_consecutive, self.check_grads = dist, mode, max_consecutive, check_grads
        self.sharded = sharded
        """FSDP (``train.parallel: fsdp``): each rank holds its own shard of the reduced gradients, so
        the ranks cannot decide alone; each checks its shards and its own losses, and one MIN
        all-reduce of that one flag decides for every rank (no NaN poisoning is needed)."""
        self.skipped = 0
        """Updates skipped so far in this process's run (logged as ``nonfinite/skipped``)."""
        self.consecutive = 0
        self.events: list[dict] = []
        """What was skipped since the trainer last took them (``take_events``)."""

    def allows(self, step: int, local_losses: dict[str, Tensor], grads: list[Tensor], task: str | None = None) -> bool:
        """Whether to apply this update. ``grads`` are the reduced gradients (identical on every
        rank, and non-finite on every rank if one rank's own loss was: see ``poison``), so the
        answer is the same on every rank; a False is counted, or raises on abort."""
        if self.sharded and self.dist.distributed:  # this rank's shards and losses, made global (one number)
            from .sharding import local

            mine = all_finite([local(g) for g in grads] + list(local_losses.values()))
            flag = torch.tensor([float(mine)], device=self.dist.device)
            finite = bool(self.dist.min_max(flag)[0].item())
        elif self.check_grads:  # this rank's own losses too: a no-op on several processes (see poison)
            finite = all_finite(grads + list(local_losses.values()))
        else:  # fp16: the local losses, made global (one all-reduce of one number)
            flag = torch.tensor([float(all_finite(list(local_losses.values())))], device=self.dist.device)
            finite = bool(self.dist.min_max(flag)[0].item())
        if finite:
            self.consecutive = 0
            return True
        # Rare path, taken by every rank together: find out who and what.
        where = self.dist.all_gather_object({name: float(v) for name, v in local_losses.items()})
        bad = {name: {rank: value for rank, losses in enumerate(where) if not math.isfinite(value := losses[name])}
               for name in local_losses}
        bad = {name: ranks for name, ranks in bad.items() if ranks}
        what = describe(bad)
        update = f"step {step + 1}" + (f" (task {task!r}'s update)" if task else "")
        event = {"step": step + 1, "task_update": task, "action": self.mode,
                 "losses": {name: {str(r): str(v) for r, v in ranks.items()} for name, ranks in bad.items()}}
        if self.mode == "abort":
            self.events.append(event)
            raise NonFiniteError(f"non-finite {what} at {update}; stopped (train.on_nonfinite=abort). "
                                 "Set train.on_nonfinite=skip to skip such updates, or lower train.lr / set "
                                 "train.grad_clip")
        self.skipped += 1
        self.consecutive += 1
        self.events.append(event)
        if self.dist.is_main:
            print(f"dist-mtl: skipped {update} on every rank: non-finite {what} "
                  f"({self.skipped} skipped so far)", file=sys.stderr, flush=True)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteError(f"{self.consecutive} updates in a row had non-finite values (last: {what} at "
                                 f"{update}); stopped (train.max_consecutive_skips={self.max_consecutive})")
        return False

    def take_events(self) -> list[dict]:
        events, self.events = self.events, []
        return events


def describe(bad: dict[str, dict[int, float]]) -> str:
    """``loss of task 't1' (nan on rank 1)``, or ``gradient`` when every loss was finite."""
    if not bad:
        return "gradient (every task's loss is finite)"
    parts = [f"task {name!r} ({', '.join(f'{v} on rank {r}' for r, v in ranks.items())})"
             for name, ranks in bad.items()]
    return "loss of " + "; ".join(parts)
