"""The gradient all-reduce overlapped with backward, for the engines that reduce gradients themselves.

Under DDP, ``sum`` hides most of its all-reduce behind backward: DDP's reducer sends a bucket of
gradients as soon as backward has produced all of them, while backward goes on with the earlier
layers. The other engines back-propagate several times (or through ``autograd.grad``), so they run
under ``no_sync`` and average their gradients in one collective after the last backward
(``BackwardEngine.reduce_grads``): all of its time is exposed. :class:`OverlappedReduce` gives
them DDP's overlap back. It is armed around the backward pass(es) that produce the FINAL gradient
of each parameter for this update (the last micro-step's), and nowhere else.

How, and why it is safe:

- The parameters are split into buckets of about ``bucket_bytes`` (DDP's default 25 MiB, the first
  one 1 MiB as DDP does, so that communication starts early), in REVERSE parameter order: the
  order in which backward produces gradients (the heads and the encoder's last layers first).
- While armed, a ``post_accumulate_grad`` hook on each parameter marks it ready. When a bucket is
  complete and every earlier bucket has been launched, it is flattened into a buffer and its
  all-reduce starts asynchronously (``async_op=True``); backward continues meanwhile (on CPU, gloo
  sends on its own thread).
- Buckets launch in the same fixed order on every rank, whether from a hook or from ``finish``: a
  rank whose parameter got no gradient in the armed pass (its bucket then waits for ``finish``)
  still issues the same collectives in the same order, which is what collectives need. What
  happens inside backward depends only on which hooks have fired, i.e. on the autograd graph's
  order, so a collective issued by backward itself (``CpuSyncBatchNorm``) interleaves with the
  launches identically on every rank whose graph is the same, which that collective needs anyway.
- ``finish`` (before the optimizer update) launches what is left, waits, divides by the world size
  and copies the means back into ``.grad``. A parameter with no gradient contributes zeros, so
  every rank sends the same layout; the bytes counted in ``Distributed.grad_bytes`` are those of
  the single coalesced all-reduce they replace (the buffers share that collective's dtype), and
  the values are the same element-wise sums and divisions: bitwise equal on 2 ranks.
- Non-finite losses: whether this rank must poison its share (``BackwardEngine.must_poison``) is
  decided from the losses BEFORE the armed backward (they are known by then), and each bucket's
  buffer is filled with NaN before it is launched, so every rank sees NaN and skips together.
  An engine whose last losses are computed inside the armed block (``per_task``: a head's forward
  follows the previous head's backward) passes ``poison`` as a function instead: the LAST bucket
  is then held back to ``finish``, which asks the function and poisons that bucket. One poisoned
  bucket is enough: the non-finite guard checks every reduced value. The held bucket holds the
  parameters whose gradients backward produces last, so little overlap is lost.
- A parameter that receives a second gradient after its bucket was launched would be reduced
  without it: that raises instead (arm only around each parameter's final accumulation).

Plain tensors (not parameters) can be reduced the same way: pass them as ``tensors`` and call
``mark_ready`` when each is final (the ``jacobian`` engine's rows). They are bucketed before the
parameters, in the order given, and averaged in place.

On one process nothing is registered, copied or launched: ``finish`` only gives a parameter that
has no gradient a zero one, as ``reduce_grads`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from .distributed import Distributed

BUCKET_BYTES = 25 * 2**20
"""DDP's default bucket size (``bucket_cap_mb=25``)."""
FIRST_BUCKET_BYTES = 2**20
"""DDP's first bucket (``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``): small, so that the
first all-reduce starts after the last layers' backward instead of a quarter of the way in."""


class OverlappedReduce:
    """One update's averaging over ranks of ``params``' gradients (and of ``tensors``), in buckets
    launched during backward. Use ``armed()`` around the final backward pass(es), then ``finish()``.

    ``poison``: fill this rank's share with NaN (``BackwardEngine.must_poison``); or a function
    asked at ``finish``, the last bucket held back until then (see the module docstring)."""

    def __init__(self, dist: Distributed, params: Sequence[Tensor], tensors: Sequence[Tensor] = (),
                 bucket_bytes: int = BUCKET_BYTES, first_bucket_bytes: int = FIRST_BUCKET_BYTES,
                 poison: bool | Callable[[], bool] = False) -> None:
        self.dist, self.poison = dist, poison
        self.held = 0 if isinstance(poison, bool) else 1
        """Buckets kept for ``finish`` (the last one, while the poisoning is undecided)."""
        self.params, self.tensors = list(params), list(tensors)
        self.active = dist.distributed and bool(self.params or self.tensors)
        # Slots in launch order: the plain tensors as given, then the parameters in reverse order.
        self.slots: list[tuple[str, int]] = [("t", k) for k in range(len(self.tensors))]
        self.slots += [("p", i) for i in reversed(range(len(self.params)))]
        self.buckets: list[list[int]] = []  # slot indices, in launch order
        self.bucket_of: list[int] = []
        self.launched: list[tuple[Tensor, object]] = []  # (buffer, work) per launched bucket, in order
        self.launched_in_backward = 0
        """Buckets launched from a hook, i.e. while a backward pass was running: the overlap."""
        self.launched_early = 0
        """Buckets launched before ``finish`` (from a hook or ``mark_ready``)."""
        self._in_hook = self._finishing = False
        if not self.active:
            return
        # The dtype ``torch.cat`` would give the whole list: the bytes of the one collective replaced.
        self.dtype = functools.reduce(torch.promote_types, [t.dtype for t in [*self.tensors, *self.params]])
        cap, size = min(first_bucket_bytes, bucket_bytes), 0
        for s in range(len(self.slots)):
            if not self.buckets or size >= cap:  # a bucket closes once it holds ``cap`` bytes
                cap, size = (bucket_bytes if self.buckets else cap), 0
                self.buckets.append([])
            self.buckets[-1].append(s)
            self.bucket_of.append(len(self.buckets) - 1)
            size += self._value(s).numel() * self.dtype.itemsize
        self.missing = [len(b) for b in self.buckets]
        self.ready = [False] * len(self.slots)

    def _value(self, s: int) -> Tensor:
        kind, i = self.slots[s]
        return self.tensors[i] if kind == "t" else self.params[i]

    # -- arming ----------------------------------------------------------------------------------
    @contextmanager
    def armed(self) -> Iterator["OverlappedReduce"]:
        """Hooks on the parameters for the duration of the block (the final backward passes);
        removed on exit, also on an error. Nothing on one process."""
        handles = []
        if self.active:
            for i, p in enumerate(self.params):
                if p.requires_grad:
                    handles.append(p.register_post_accumulate_grad_hook(functools.partial(self._hook, i)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, i: int, param: Tensor) -> None:
        self._in_hook = True
        try:
            self._mark(len(self.tensors) + len(self.params) - 1 - i)
        finally:
            self._in_hook = False

    def mark_ready(self, k: int) -> None:
        """``tensors[k]`` holds its final value: its bucket may launch."""
        if self.active:
            self._mark(k)

    def _mark(self, s: int) -> None:
        b = self.bucket_of[s]
        if self.ready[s]:
            if b < len(self.launched):
                kind, i = self.slots[s]
                raise RuntimeError(f"OverlappedReduce: {'parameter' if kind == 'p' else 'tensor'} {i} received "
                                   "another gradient after its bucket was all-reduced; arm only around the "
                                   "backward pass that gives each parameter its final gradient")
            return  # accumulated again before its bucket left: the buffer is taken at launch
        self.ready[s] = True
        self.missing[b] -= 1
        while len(self.launched) < len(self.buckets) - self.held and self.missing[len(self.launched)] == 0:
            self._launch(len(self.launched))

    # -- communication ---------------------------------------------------------------------------
    @torch.no_grad()
    def _launch(self, b: int) -> None:
        values = []
        for s in self.buckets[b]:
            kind, i = self.slots[s]
            if kind == "p":
                p = self.params[i]
                if p.grad is None:  # no gradient at this step: zeros, the same layout on every rank
                    p.grad = torch.zeros_like(p)
                values.append(p.grad)
            else:
                values.append(self.tensors[i])
        flat = torch.cat([v.reshape(-1) for v in values]).to(self.dtype)
        if self.poison is True:
            flat.fill_(float("nan"))
        self.launched.append((flat, self.dist.start_all_reduce(flat)))
        self.launched_in_backward += self._in_hook
        self.launched_early += not self._finishing

    @torch.no_grad()
    def finish(self) -> None:
        """Launch the buckets not launched yet (in order), wait for all, and leave the mean over
        ranks in each parameter's ``.grad`` (and in each tensor)."""
        if not self.active:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            return
        self._finishing = True
        if self.held:  # every loss is known now: decide, and let the held bucket carry it
            self.poison, self.held = bool(self.poison()), 0
        while len(self.launched) < len(self.buckets):
            self._launch(len(self.launched))
        for b, (flat, work) in enumerate(self.launched):
            work.wait()
            flat /= self.dist.world_size
            offset = 0
            for s in self.buckets[b]:
                kind, i = self.slots[s]
                target = self.params[i].grad if kind == "p" else self.tensors[i]
                target.copy_(flat[offset:offset + target.numel()].view_as(target))
                offset += target.numel()

    @property
    def num_buckets(self) -> int:
        """The buckets on several processes (none on one)."""
        return len(self.buckets)

